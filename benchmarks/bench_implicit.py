"""Training-step benchmark: idl_ray.ImplicitModel vs torchidl.ImplicitModel, side by side in one process.

Both models train on the same batches (scikit-learn digits; 8x8 = 64 features, or upsampled to
28x28 = 784 features) with the same optimiser, batch size, hidden size and tolerance. Steps alternate
between the two models so machine noise hits both alike. Reported per shape:

- median wall time of one training step (forward + backward + optimiser step) and the ratio;
- fixed-point iterations per step (forward and backward) for both;
- the fixed-point residual each model actually reached, measured the same way for both
  (max_i ||x_i - phi(A x_i + B u_i)||_inf on a test batch), so "same tolerance" can be checked;
- test accuracy of both after the same number of epochs.

torchidl stops on an absolute max-norm change (``tol``), idl_ray on a per-sample relative 2-norm residual
(``tol``); the same number is passed to both and the achieved residuals are printed.

Usage::

    python benchmarks/bench_implicit.py                 # CPU, 2 threads
    python benchmarks/bench_implicit.py --device cuda   # on a GPU
    python benchmarks/bench_implicit.py --inputs 64 --epochs 10 --fixed-point picard
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
import types
import warnings

import numpy as np
import torch
import torch.nn.functional as F

import idl_ray
from idl_ray.implicit.projection import inf_norm


def load_digits_tensors(side: int, device: torch.device, seed: int = 0):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X / 16.0, dtype=torch.float32)
    if side != 8:
        X = F.interpolate(X.reshape(-1, 1, 8, 8), size=(side, side), mode="bilinear", align_corners=False)
        X = X.reshape(len(X), -1)
    Xtr, Xte, ytr, yte = train_test_split(X.numpy(), y, test_size=0.25, random_state=seed, stratify=y)
    as_t = lambda a, dt: torch.as_tensor(a, dtype=dt, device=device)  # noqa: E731
    return as_t(Xtr, torch.float32), as_t(ytr, torch.long), as_t(Xte, torch.float32), as_t(yte, torch.long)


class TorchidlCounter:
    """Counts torchidl's fixed-point iterations: one ``torch.norm`` per iteration in both of its loops,
    one ``phi`` per forward iteration. Implemented as a proxy for the ``torch`` name inside
    ``torchidl.implicit_function`` (overhead: one Python attribute lookup per call)."""

    def __init__(self) -> None:
        import torchidl.implicit_function as tif

        self.module = tif
        self.norm_calls = 0
        self.phi_calls = 0
        counter = self

        class _Proxy(types.ModuleType):
            def __getattr__(self, name):
                return getattr(torch, name)

            @staticmethod
            def norm(*args, **kwargs):
                counter.norm_calls += 1
                return torch.norm(*args, **kwargs)

        tif.torch = _Proxy("torch_proxy")
        original_phi = tif.ImplicitFunction.phi

        def phi(X):
            counter.phi_calls += 1
            return original_phi(X)

        tif.ImplicitFunction.phi = staticmethod(phi)

    def take(self) -> tuple[int, int]:
        fwd, bwd = self.phi_calls, self.norm_calls - self.phi_calls
        self.norm_calls = self.phi_calls = 0
        return fwd, bwd


def torchidl_residual(model, U: torch.Tensor) -> float:
    """max_i ||x_i - relu(A x_i + B u_i)||_inf of torchidl's returned state (A as torchidl uses it)."""
    from torchidl.implicit_function import project_onto_Linf_ball

    with torch.no_grad():
        Ut = U.T
        A = project_onto_Linf_ball(model.A, model.f.kappa)
        X, _, _ = model.f.inn_pred(A, model.B @ Ut, torch.zeros(model.hidden_dim, U.shape[0], device=U.device),
                                   model.f.mitr, model.f.tol)  # fmt: skip
        return float((X - torch.relu(A @ X + model.B @ Ut)).abs().max())


def ours_residual(model, U: torch.Tensor) -> float:
    with torch.no_grad():
        _, X = model(U, return_state=True)
        Uf = model.prepare_input(U)
        A = model.A.detach()
        return float((X - model.activation(X @ A.T + Uf @ model.B.T)).abs().max())


def accuracy(model, X: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float((model(X).argmax(1) == y).float().mean())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_models(p: int, args, device: torch.device, *, our_tols: dict, their_tol: float):
    """Both models with the same seed, shapes, kappa and iteration cap; ``our_tols`` are ImplicitModel
    keywords, ``their_tol`` torchidl's ``tol`` and ``grad_tol``."""
    import torchidl

    torch.manual_seed(args.seed)
    ours = idl_ray.ImplicitModel(
        p, 10, args.hidden, kappa=args.kappa, max_iter=args.max_iter, fixed_point=args.fixed_point,
        constraint=args.constraint, device=device, **our_tols,
    )  # fmt: skip
    torch.manual_seed(args.seed)
    theirs = torchidl.ImplicitModel(
        p, 10, args.hidden, kappa=args.kappa, tol=their_tol, grad_tol=their_tol, mitr=args.max_iter,
        grad_mitr=args.max_iter,
    ).to(device)  # fmt: skip
    return ours, theirs


def train_step(model, opt, xb, yb, device: torch.device) -> tuple[float, float, float]:
    """One training step (forward, backward, optimiser): its wall time, its process CPU time, and the wall
    time of its forward + backward alone (without ``zero_grad`` and the optimiser step)."""
    sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    opt.zero_grad(set_to_none=True)
    t1 = time.perf_counter()
    F.cross_entropy(model(xb), yb).backward()
    sync(device)
    t2 = time.perf_counter()
    opt.step()
    sync(device)
    return time.perf_counter() - t0, time.process_time() - c0, t2 - t1


def run_shape(p: int, args, device: torch.device, counter: TorchidlCounter) -> dict:
    side = round(p**0.5)
    Xtr, ytr, Xte, yte = load_digits_tensors(side, device)
    assert Xtr.shape[1] == p, Xtr.shape
    if args.criterion == "absolute":  # torchidl's test max|f(x) - x| < tol, applied per sample
        tols = {"tol": 0.0, "atol": args.tol, "residual_norm": "inf"}
    else:
        tols = {"tol": args.tol, "atol": 0.0}
    ours, theirs = build_models(p, args, device, our_tols=tols, their_tol=args.tol)
    ours.forward_options = dataclasses.replace(ours.forward_options, compaction=args.compaction)
    ours.backward_options = dataclasses.replace(ours.backward_options, compaction=args.compaction)
    opt_o = torch.optim.Adam(ours.parameters(), lr=args.lr)
    opt_t = torch.optim.Adam(theirs.parameters(), lr=args.lr)

    times_o, times_t, it_o, it_t = [], [], [], []
    gen = torch.Generator().manual_seed(args.seed)
    n_steps = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # non-convergence is counted, not printed per step
        for _epoch in range(args.epochs):
            perm = torch.randperm(len(Xtr), generator=gen).to(device)
            for s in range(0, len(Xtr) - args.batch + 1, args.batch):
                idx = perm[s : s + args.batch]
                xb, yb = Xtr[idx], ytr[idx]
                pair = [("o", ours, opt_o), ("t", theirs, opt_t)]
                if n_steps % 2:
                    pair.reverse()
                for tag, model, opt in pair:
                    counter.take()
                    dt = train_step(model, opt, xb, yb, device)
                    if tag == "o":
                        fs, bs = ours.last_forward_stats, ours.last_backward_stats
                        if n_steps >= args.warmup:
                            times_o.append(dt)
                            it_o.append((fs.iterations, bs.iterations))
                    else:
                        fwd, bwd = counter.take()
                        if n_steps >= args.warmup:
                            times_t.append(dt)
                            it_t.append((fwd, bwd))
                n_steps += 1
    med_o, med_t = statistics.median(t[0] for t in times_o), statistics.median(t[0] for t in times_t)
    cpu_o, cpu_t = statistics.median(t[1] for t in times_o), statistics.median(t[1] for t in times_t)
    fb_o, fb_t = statistics.median(t[2] for t in times_o), statistics.median(t[2] for t in times_t)
    probe = Xte[: args.batch]
    quality = {  # before same_problem(), which copies our weights into torchidl's model
        "ours_residual": ours_residual(ours, probe),
        "torchidl_residual": torchidl_residual(theirs, probe),
        "ours_acc": accuracy(ours, Xte, yte),
        "torchidl_acc": accuracy(theirs, Xte, yte),
        "ours_inf_norm": inf_norm(ours.A.detach()),
        "torchidl_stored_inf_norm": inf_norm(theirs.A.detach()),
    }
    same = same_problem(ours, theirs, Xtr, ytr, args, device, counter)
    return {
        **quality,
        **same,
        "input_dim": p,
        "steps_timed": len(times_o),
        "ours_ms": med_o * 1e3,
        "torchidl_ms": med_t * 1e3,
        "speedup": med_t / med_o,
        "ours_cpu_ms": cpu_o * 1e3,
        "torchidl_cpu_ms": cpu_t * 1e3,
        "cpu_speedup": cpu_t / cpu_o,
        "fb_ours_ms": fb_o * 1e3,
        "fb_torchidl_ms": fb_t * 1e3,
        "fb_speedup": fb_t / fb_o,
        "ours_iters": tuple(np.mean(it_o, axis=0)),
        "torchidl_iters": tuple(np.mean(it_t, axis=0)),
    }


def same_problem(ours, theirs, Xtr, ytr, args, device, counter: TorchidlCounter) -> dict:
    """Forward + backward of both models holding the *same* weights (ours, copied into torchidl's), on
    the same batches: the same fixed-point problems, so this isolates the solvers' efficiency from the
    training trajectories (torchidl rescales all of A by one factor; our exact projection leaves many
    rows of A at the bound, which makes its fixed points slower to reach)."""
    ours.project_()  # the last optimiser step may have left A outside the bound: use the A ours uses
    with torch.no_grad():
        theirs.A.copy_(ours.A)  # the matrix ours uses (inside the bound, so torchidl uses it unscaled)
        for name in ("B", "C", "D"):
            getattr(theirs, name).copy_(getattr(ours, name))
    times_o, times_t, it_o, it_t = [], [], [], []
    gen = torch.Generator().manual_seed(args.seed + 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for rep in range(args.same_repeats):
            idx = torch.randperm(len(Xtr), generator=gen)[: args.batch].to(device)
            xb, yb = Xtr[idx], ytr[idx]
            pair = [("o", ours), ("t", theirs)]
            if rep % 2:
                pair.reverse()
            for tag, model in pair:
                model.zero_grad(set_to_none=True)
                counter.take()
                sync(device)
                t0, c0 = time.perf_counter(), time.process_time()
                F.cross_entropy(model(xb), yb).backward()
                sync(device)
                dt = (time.perf_counter() - t0, time.process_time() - c0)
                if tag == "o":
                    times_o.append(dt)
                    it_o.append((ours.last_forward_stats.iterations, ours.last_backward_stats.iterations))
                else:
                    times_t.append(dt)
                    it_t.append(counter.take())
    med_o, med_t = statistics.median(t[0] for t in times_o), statistics.median(t[0] for t in times_t)
    cpu_o, cpu_t = statistics.median(t[1] for t in times_o), statistics.median(t[1] for t in times_t)
    return {
        "same_ours_ms": med_o * 1e3,
        "same_torchidl_ms": med_t * 1e3,
        "same_speedup": med_t / med_o,
        "same_cpu_speedup": cpu_t / cpu_o,
        "same_ours_iters": tuple(np.mean(it_o, axis=0)),
        "same_torchidl_iters": tuple(np.mean(it_t, axis=0)),
    }


class ExplicitFloor(torch.nn.Module):
    """Two explicit relu layers with the implicit models' parameters (A, B, C, D): ``X1 = relu(U B^T)``,
    ``X2 = relu(X1 A^T + U B^T)``, ``Y = X2 C^T + U D^T``. Its training step is what any implementation
    pays besides the fixed-point iterations beyond two: the floor of the cost model."""

    def __init__(self, p: int, n: int, q: int) -> None:
        super().__init__()
        self.A = torch.nn.Parameter(torch.empty(n, n).uniform_(-1 / n, 1 / n))
        self.B = torch.nn.Parameter(torch.empty(n, p).uniform_(-(p**-0.5), p**-0.5))
        self.C = torch.nn.Parameter(torch.empty(q, n).uniform_(-(n**-0.5), n**-0.5))
        self.D = torch.nn.Parameter(torch.empty(q, p).uniform_(-(p**-0.5), p**-0.5))

    def forward(self, U: torch.Tensor) -> torch.Tensor:
        BU = F.linear(U, self.B)
        X = torch.relu(torch.addmm(BU, torch.relu(BU), self.A.t()))
        return torch.addmm(F.linear(U, self.D), X, self.C.t())


def fixed_costs(p: int, args, device: torch.device, steps: int = 40) -> dict:
    """Median training step of both models with tolerances so loose that every solve stops after one
    iteration (forward and backward): what a step costs besides the fixed-point iterations (input
    products, read-out, loss, optimiser, checks, Python). With the training-step medians this splits
    each model's step into ``fixed + per_iteration * (forward + backward iterations - 2)``. The same run
    times :class:`ExplicitFloor`, the part of ``fixed`` no implementation can avoid."""
    side = round(p**0.5)
    Xtr, ytr, _, _ = load_digits_tensors(side, device)
    loose = 1e30
    our_tols = {
        "tol": 0.0,
        "atol": loose,
        "backward_tol": 0.0,
        "backward_atol": loose,
        "residual_norm": "inf",
    }
    ours, theirs = build_models(p, args, device, our_tols=our_tols, their_tol=loose)
    floor = ExplicitFloor(p, args.hidden, 10).to(device)
    models = [(m, torch.optim.Adam(m.parameters(), lr=args.lr)) for m in (ours, theirs, floor)]
    times: list[list[float]] = [[], [], []]
    for s in range(args.warmup + steps):
        start = (s * args.batch) % (len(Xtr) - args.batch)
        xb, yb = Xtr[start : start + args.batch], ytr[start : start + args.batch]
        for i in (s % 3, (s + 1) % 3, (s + 2) % 3):  # rotate the order: noise hits all three alike
            wall, _, _ = train_step(*models[i], xb, yb, device)
            if s >= args.warmup:
                times[i].append(wall)
    assert ours.last_forward_stats.iterations == 1 and ours.last_backward_stats.iterations == 1
    return {
        "fixed_ours_ms": statistics.median(times[0]) * 1e3,
        "fixed_torchidl_ms": statistics.median(times[1]) * 1e3,
        "explicit_floor_ms": statistics.median(times[2]) * 1e3,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads for both models")
    parser.add_argument("--inputs", type=int, nargs="+", default=[64, 784])
    parser.add_argument("--hidden", type=int, default=100)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=10, help="steps before timing starts")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--kappa", type=float, default=0.99)
    parser.add_argument("--tol", type=float, default=3e-6, help="passed to both (torchidl's default)")
    parser.add_argument("--max-iter", type=int, default=300, help="passed to both (torchidl's default)")
    parser.add_argument(
        "--fixed-point", default="picard", choices=sorted(idl_ray.implicit.FIXED_POINT_METHODS)
    )
    parser.add_argument(
        "--criterion",
        default="absolute",
        choices=["absolute", "relative"],
        help="ours stops on max|f(x_i)-x_i| <= tol (absolute: torchidl's test, applied per sample) or on "
        "||f(x_i)-x_i||_2 <= tol*||f(x_i)||_2 (relative, our default kind of test)",
    )
    parser.add_argument(
        "--constraint",
        default="shrink",
        choices=["project", "rescale", "shrink"],
        help="how ours keeps ||A||_inf <= kappa: projected gradient; A = W min(1, kappa/||W||_inf) with "
        "the exact gradient (torchidl's modelling choice without its straight-through gradient); or the "
        "stored A scaled in place by kappa/||A||_inf when it leaves the ball (torchidl's scaling applied to "
        "the parameter)",
    )
    parser.add_argument(
        "--compaction",
        default="auto",
        choices=["auto", "always", "never"],
        help="ours: per-sample active-set compaction in Picard (auto: never on CUDA, always on CPU)",
    )
    parser.add_argument("--same-repeats", type=int, default=30, help="repeats of the same-weights timing")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    try:
        import torchidl  # noqa: F401
    except ImportError:
        raise SystemExit(
            "bench_implicit.py compares against torchidl, a benchmark-only dependency: "
            "pip install --no-deps torchidl==0.0.4 (it imports torch, numpy, scipy, scikit-learn, cvxpy, tqdm and matplotlib)"
        ) from None
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    counter = TorchidlCounter()
    print(
        f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, batch {args.batch}, "
        f"hidden {args.hidden}, tol {args.tol:g}, max_iter {args.max_iter}, kappa {args.kappa}, "
        f"epochs {args.epochs}, ours fixed_point={args.fixed_point!r}, criterion {args.criterion}, constraint {args.constraint!r}, "
        f"compaction {args.compaction!r}"
    )
    header = (
        f"{'input':>5} {'ours ms':>8} {'tidl ms':>8} {'speedup':>7} {'ours it f/b':>12} {'tidl it f/b':>12} "
        f"{'ours res':>9} {'tidl res':>9} {'ours acc':>8} {'tidl acc':>8}"
    )
    print(header)
    for p in args.inputs:
        r = run_shape(p, args, device, counter)
        r |= fixed_costs(p, args, device)
        print(
            f"{p:>5} {r['ours_ms']:>8.2f} {r['torchidl_ms']:>8.2f} {r['speedup']:>6.2f}x "
            f"{r['ours_iters'][0]:>5.1f}/{r['ours_iters'][1]:<6.1f} "
            f"{r['torchidl_iters'][0]:>5.1f}/{r['torchidl_iters'][1]:<6.1f} "
            f"{r['ours_residual']:>9.2e} {r['torchidl_residual']:>9.2e} {r['ours_acc']:>8.4f} {r['torchidl_acc']:>8.4f}"
        )
        print(
            f"      same weights, forward+backward only: ours {r['same_ours_ms']:.2f} ms, torchidl "
            f"{r['same_torchidl_ms']:.2f} ms, speedup {r['same_speedup']:.2f}x (CPU time "
            f"{r['same_cpu_speedup']:.2f}x), iterations f/b ours "
            f"{r['same_ours_iters'][0]:.1f}/{r['same_ours_iters'][1]:.1f}, torchidl "
            f"{r['same_torchidl_iters'][0]:.1f}/{r['same_torchidl_iters'][1]:.1f}"
        )
        print(
            f"      training step, forward+backward only (no zero_grad, no optimiser step): ours "
            f"{r['fb_ours_ms']:.2f} ms, torchidl {r['fb_torchidl_ms']:.2f} ms, speedup {r['fb_speedup']:.2f}x"
        )
        print(
            f"      training step, process CPU time: ours {r['ours_cpu_ms']:.2f} ms, torchidl "
            f"{r['torchidl_cpu_ms']:.2f} ms, speedup {r['cpu_speedup']:.2f}x"
        )
        per_o = (r["ours_ms"] - r["fixed_ours_ms"]) / max(sum(r["ours_iters"]) - 2, 1e-9)
        per_t = (r["torchidl_ms"] - r["fixed_torchidl_ms"]) / max(sum(r["torchidl_iters"]) - 2, 1e-9)
        print(
            f"      cost model, step = fixed + per-iteration x (iterations f+b - 2): fixed (one iteration each "
            f"way) ours {r['fixed_ours_ms']:.2f} ms, torchidl {r['fixed_torchidl_ms']:.2f} ms; per "
            f"iteration ours {per_o * 1e3:.0f} us, torchidl {per_t * 1e3:.0f} us; explicit two-layer network "
            f"with the same parameters {r['explicit_floor_ms']:.2f} ms"
        )
        print(
            f"      timed steps {r['steps_timed']}; ||A||_inf used by ours {r['ours_inf_norm']:.4f}, "
            f"torchidl's stored A {r['torchidl_stored_inf_norm']:.4f} (it rescales a copy to kappa)"
        )


if __name__ == "__main__":
    main()
