"""SIM solver benchmark: our ADMMSolver vs torchidl's ADMMSolver (its defaults) vs our CVXSolver, and our
solve vs the floor (forming G once + one factorisation) at m = 60,000 samples.

Same teacher and same states for every solver: a bias-free p-64-32-16-10 ReLU MLP trained on digits, with
p = 64 (8x8) and p = 784 (digits upsampled to 28x28). Every solution is scored with the same objective
(idl_ray.sim.problem.SIMProblem, whose loss is averaged over samples: torchidl's lambda = 1e-6 on the summed
loss is lam = 1e-6 / m here), the same ||A||_inf and the same fixed-point prediction.

Usage::

    python benchmarks/bench_sim.py --quick --threads 1      # ~2 min on a 2-core CPU: p = 64, m_floor = 10,000
    python benchmarks/bench_sim.py                          # p = 64 and 784, m_floor = 60,000 (~10 min)
    python benchmarks/bench_sim.py --device cuda --skip-cvx # GPU run of our solvers (torchidl runs on cuda too)
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from idl_ray.errors import ConvergenceWarning
from idl_ray.implicit.fixed_point import solve_fixed_point
from idl_ray.implicit.projection import inf_norm
from idl_ray.sim.extraction import extract_states
from idl_ray.sim.problem import GramStats, SIMProblem
from idl_ray.sim.rescale import layer_scales
from idl_ray.sim.solvers import ADMMSolver, CVXSolver

TORCHIDL_LAMBDA = 1e-6  # torchidl ADMMSolver default lambda_y = lambda_z, on the summed squared loss


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def digits_data(p: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    X = torch.tensor(data.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    if p == 784:
        X = F.interpolate(X, size=(28, 28), mode="bilinear", align_corners=False)
    elif p != 64:
        raise SystemExit("--sizes accepts 64 and 784")
    X = X.flatten(1)
    y = torch.tensor(data.target)
    perm = torch.randperm(len(X), generator=torch.Generator().manual_seed(seed))
    cut = int(0.8 * len(X))
    return X[perm[:cut]], y[perm[:cut]], X[perm[cut:]], y[perm[cut:]]


def train_teacher(
    p: int,
    X: torch.Tensor,
    y: torch.Tensor,
    epochs: int = 40,
    *,
    hidden: tuple[int, ...] = (64, 32, 16),
    bias: bool = False,
) -> nn.Module:
    """A p-hidden-10 ReLU MLP trained on (X, y) with Adam (seeded): the SIM benchmarks' teacher (default:
    torchidl's bias-free p-64-32-16-10 tutorial shape)."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    width = p
    for h in hidden:
        layers += [nn.Linear(width, h, bias=bias), nn.ReLU()]
        width = h
    model = nn.Sequential(*layers, nn.Linear(width, 10, bias=bias))
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        perm = torch.randperm(len(X), generator=gen)
        for i in range(0, len(X), 64):
            idx = perm[i : i + 64]
            opt.zero_grad()
            F.cross_entropy(model(X[idx]), y[idx]).backward()
            opt.step()
    return model.eval().requires_grad_(False)


def sim_accuracy(weights: dict[str, torch.Tensor], X: torch.Tensor, y: torch.Tensor) -> float:
    """Accuracy of an implicit model from (A, B, C, D) (fixed point by Picard; capped if not well-posed)."""
    A, B, C, D = (weights[k].double() for k in "ABCD")
    U = X.double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        Xs, _ = solve_fixed_point(A, U @ B.T, "relu", {"tol": 1e-8, "max_iter": 3000})
    Y = Xs @ C.T + U @ D.T
    return float((Y.argmax(1) == y).double().mean())


def run_ours(problems, device: torch.device, repeats: int) -> dict:
    """Our ADMMSolver on both stages as SIM.fit solves them (stage 2 reuses stage 1's factor, and with
    ``planned_stages`` rides in its active-set batch on a low-rank G); median over repeats."""
    times, result = [], None
    for _ in range(repeats):
        solver = ADMMSolver(device=device, warn=False)
        sync(device)
        start = time.perf_counter()
        with solver.planned_stages(problems):
            r1 = solver.solve(problems[0])
            r2 = solver.solve(problems[1])
        sync(device)
        times.append(time.perf_counter() - start)
        result = (r1, r2)
    r1, r2 = result
    return {
        "time_s": statistics.median(times),
        "times_s": times,
        "W1": r1.weights.cpu(),
        "W2": r2.weights.cpu(),
        "iterations": (r1.stats.iterations, r2.stats.iterations),
        "converged": (r1.stats.converged, r2.stats.converged),
    }


def run_cvx(problems) -> dict:
    start = time.perf_counter()
    r1 = CVXSolver(n_jobs=None).solve(problems[0])
    r2 = CVXSolver(n_jobs=None).solve(problems[1])
    return {"time_s": time.perf_counter() - start, "W1": r1.weights, "W2": r2.weights}


def run_torchidl(
    states: dict, n: int, device: torch.device, epochs_ab: int | None = None, lam_summed: float | None = None
) -> dict:
    """torchidl.sim.solvers.ADMMSolver with its defaults on the same (scaled) states.

    With ``epochs_ab`` (fewer than its default 1000; stage 2 gets epochs_ab / 10, its default ratio) the run is
    truncated and the time of the default run is extrapolated linearly (torchidl runs a fixed number of
    epochs, each of the same cost); objective and accuracy of a truncated run are not comparable.
    """
    from torchidl.sim.solvers import ADMMSolver as TorchIDLADMM

    settings = {} if lam_summed is None else {"lambda_y": lam_summed, "lambda_z": lam_summed}
    if epochs_ab is None:
        solver = TorchIDLADMM(
            **settings
        )  # defaults: 1000 / 100 epochs, lambda 1e-6, rho 10, 100 rows per batch
    else:
        solver = TorchIDLADMM(num_epoch_ab=epochs_ab, num_epoch_cd=max(1, epochs_ab // 10), **settings)
    config = {"activation_fn": torch.relu, "device": str(device), "atol": 1e-6, "kappa": states["kappa"]}
    X, U, Z, Y = (states[k].numpy().astype("float32") for k in ("X", "U", "Z", "Y"))
    sink = io.StringIO()
    sync(device)
    start = time.perf_counter()
    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        A, B, C, D = solver.solve(X, U, Z, Y, config)
    sync(device)
    elapsed = time.perf_counter() - start
    to_t = lambda a: torch.as_tensor(a, dtype=torch.float64)  # noqa: E731
    W1 = torch.cat([to_t(A), to_t(B)], dim=1)
    W2 = torch.cat([to_t(C), to_t(D)], dim=1)
    if epochs_ab is None:
        return {"time_s": elapsed, "W1": W1, "W2": W2}
    return {
        "time_s": elapsed * 1000 / epochs_ab,
        "measured_s": elapsed,
        "truncated_epochs": epochs_ab,
        "W1": W1,
        "W2": W2,
    }


def size_case(p: int, args, device: torch.device) -> dict:
    Xtr, ytr, Xte, yte = digits_data(p)
    teacher = train_teacher(p, Xtr, ytr)
    teacher_acc = float((teacher(Xte).argmax(1) == yte).double().mean())
    states = extract_states(teacher, Xtr, progress=False)
    s = states.structure
    n, m = s.num_hidden, states.num_samples
    scales = layer_scales(s, args.kappa)
    Z = states.Z.double() * scales[:, None]
    X = states.X.double() * scales[:, None]
    U, Y = states.U.double(), states.Y.double()
    lam = TORCHIDL_LAMBDA / m if args.lam is None else args.lam
    features = torch.cat([X, U]).T
    stats = GramStats.from_batch(features, torch.cat([Z, Y]).T)
    problems = (
        SIMProblem(stats=stats.row_block(slice(0, n)), n_constrained=n, lam=lam, kappa=args.kappa),
        SIMProblem(stats=stats.row_block(slice(n, None)), n_constrained=0, lam=lam, kappa=None),
    )
    out = {
        "p": p,
        "n": n,
        "m": m,
        "lam": lam,
        "teacher_accuracy": teacher_acc,
        "scales": [float(scales.min()), float(scales.max())],
    }

    def score(name: str, res: dict) -> None:
        W1, W2 = res["W1"].double().cpu(), res["W2"].double().cpu()
        weights = {"A": W1[:, :n], "B": W1[:, n:], "C": W2[:, :n], "D": W2[:, n:]}
        out[name] = {
            "time_s": res["time_s"],
            "objective_stage1": problems[0].objective(W1),
            "objective_stage2": problems[1].objective(W2),
            "a_inf_norm": inf_norm(weights["A"]),
            "accuracy": sim_accuracy(weights, Xte, yte),
            # (A, B) nonzeros: exact, and above 1e-6 of the largest |entry| (a solver's rounding-level entries)
            "nnz_AB": int((W1 != 0).sum()),
            "nnz_AB_1e-6": int((W1.abs() > 1e-6 * W1.abs().max()).sum()),
            **{
                k: v
                for k, v in res.items()
                if k in ("iterations", "converged", "times_s", "measured_s", "truncated_epochs")
            },
        }
        print(
            f"  p={p} {name:9s} {res['time_s']:9.3f} s  obj1 {out[name]['objective_stage1']:.6e}  "
            f"obj2 {out[name]['objective_stage2']:.6e}  ||A||_inf {out[name]['a_inf_norm']:.6f}  "
            f"acc {out[name]['accuracy']:.4f}  nnz(A,B) {out[name]['nnz_AB']} "
            f"({out[name]['nnz_AB_1e-6']} above 1e-6 max)  iterations {res.get('iterations')}",
            flush=True,
        )

    score("ours", run_ours(problems, device, args.repeats))
    if not args.skip_torchidl:
        try:
            score(
                "torchidl",
                run_torchidl(
                    {"X": X.float(), "U": U.float(), "Z": Z.float(), "Y": Y.float(), "kappa": args.kappa},
                    n,
                    device,
                    args.torchidl_epochs_large if p == 784 else None,
                    None if args.lam is None else args.lam * m,
                ),
            )
        except Exception as exc:  # report exactly why a reference piece could not run
            out["torchidl"] = {"error": f"{type(exc).__name__}: {exc}"}
            print(f"  p={p} torchidl failed: {out['torchidl']['error']}", flush=True)
    if not args.skip_cvx and (p == 64 or args.cvx_large):
        score("cvx", run_cvx(problems))
    return out


def floor_case(m: int, args, device: torch.device) -> dict:
    """Our full solve (Gram accumulation + both stages) vs the floor (G once + one eigendecomposition)."""
    p = 784
    Xtr, ytr, _, _ = digits_data(p)
    teacher = train_teacher(p, Xtr, ytr, epochs=10)
    gen = torch.Generator().manual_seed(1)
    # augmented digits: random sample + small shifts (rolls) + noise, m inputs in all
    idx = torch.randint(0, len(Xtr), (m,), generator=gen)
    imgs = Xtr[idx].reshape(-1, 28, 28)
    shifts = torch.randint(-2, 3, (m, 2), generator=gen)
    for dx in range(-2, 3):
        for dy in range(-2, 3):
            sel = (shifts[:, 0] == dx) & (shifts[:, 1] == dy)
            imgs[sel] = torch.roll(imgs[sel], shifts=(dx, dy), dims=(1, 2))
    inputs = (imgs.reshape(m, -1) + 0.05 * torch.randn(m, p, generator=gen)).clamp(0, 1)
    states = extract_states(teacher, inputs, batch_size=4096, progress=False)
    s = states.structure
    n = s.num_hidden
    scales = layer_scales(s, args.kappa)
    features = torch.cat([states.X * scales[:, None].float(), states.U]).T.contiguous().to(device)
    targets = torch.cat([states.Z * scales[:, None].float(), states.Y]).T.contiguous().to(device)
    lam = TORCHIDL_LAMBDA / m

    floors, ours, iters = [], [], None
    for _ in range(args.repeats):
        sync(device)
        start = time.perf_counter()
        F64 = features.double()
        G = F64.T @ F64
        torch.linalg.eigh(G / m)  # the floor's one eigendecomposition (GramFactor may sketch a low rank)
        sync(device)
        floors.append(time.perf_counter() - start)
        del F64, G

        sync(device)
        start = time.perf_counter()
        stats = GramStats.zeros(features.shape[1], targets.shape[1], device=device)
        for i in range(0, m, 8192):
            stats.add(features[i : i + 8192], targets[i : i + 8192])
        solver = ADMMSolver(device=device, warn=False)
        r1 = solver.solve(
            SIMProblem(stats=stats.row_block(slice(0, n)), n_constrained=n, lam=lam, kappa=args.kappa)
        )
        r2 = solver.solve(SIMProblem(stats=stats.row_block(slice(n, None)), lam=lam))
        sync(device)
        ours.append(time.perf_counter() - start)
        iters = (r1.stats.iterations, r2.stats.iterations)
    floor, our = statistics.median(floors), statistics.median(ours)
    print(
        f"  m={m} floor {floor:.3f} s  ours {our:.3f} s  ratio {our / floor:.2f}  iterations {iters}",
        flush=True,
    )
    return {
        "m": m,
        "n": n,
        "d": features.shape[1],
        "floor_s": floor,
        "ours_s": our,
        "ratio": our / floor,
        "iterations": iters,
        "floor_times_s": floors,
        "our_times_s": ours,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--sizes", default=None, help="comma-separated input sizes from {64, 784}")
    parser.add_argument("--m-floor", type=int, default=None, help="samples of the floor case (0 skips it)")
    parser.add_argument("--kappa", type=float, default=0.99)
    parser.add_argument("--repeats", type=int, default=3, help="repeats of our solves (median reported)")
    parser.add_argument(
        "--quick", action="store_true", help="p = 64 only, m_floor = 10,000 (about 2 min on a 2-core CPU)"
    )
    parser.add_argument("--skip-torchidl", action="store_true")
    parser.add_argument("--skip-cvx", action="store_true")
    parser.add_argument("--cvx-large", action="store_true", help="also run CVX at p = 784 (slow)")
    parser.add_argument(
        "--torchidl-epochs-large",
        type=int,
        default=None,
        help="truncate torchidl at p = 784 to this many stage-1 epochs and extrapolate its time (default: its 1000)",
    )
    parser.add_argument(
        "--lam",
        type=float,
        default=None,
        help="SIM lam for both solvers (torchidl gets lambda = lam * m on its summed loss); default: torchidl's 1e-6 / m",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else ([64] if args.quick else [64, 784])
    m_floor = args.m_floor if args.m_floor is not None else (10_000 if args.quick else 60_000)
    info = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
        "device": str(device),
    }
    print(f"SIM benchmark on {info}", flush=True)
    results: dict = {"info": info, "sizes": []}
    for p in sizes:
        results["sizes"].append(size_case(p, args, device))
    for case in results["sizes"]:
        if "torchidl" in case and "time_s" in case["torchidl"]:
            ratio = case["torchidl"]["time_s"] / case["ours"]["time_s"]
            case["speedup_vs_torchidl"] = ratio
            print(f"  p={case['p']}: ours is {ratio:.1f}x faster than torchidl ADMM", flush=True)
    if m_floor:
        results["floor"] = floor_case(m_floor, args, device)
    if args.json:
        args.json.write_text(
            json.dumps(
                results,
                indent=2,
                default=lambda o: None if isinstance(o, float) and math.isnan(o) else str(o),
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
