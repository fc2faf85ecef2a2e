"""One-shot GPU check: correctness and speed of the CUDA paths, against float64 CPU references.

Run on a machine with a CUDA GPU (CI never has one)::

    python benchmarks/gpu_check.py --json gpu_check.json

Checks, each printed as one line and collected in the JSON:
1. ImplicitModel on CUDA: outputs and gradients against the same weights on the CPU in float64.
2. ADMMSolver on CUDA (float64 and float32) against the CPU solve of the same SIM problem:
   relative objective gap, kappa bound, time ratio.
3. RayADMMSolver with use_gpu=True: the actor's device comes from Ray's assignment, and the answer
   matches the single-process solve.
4. The test suite's GPU-marked tests (``pytest -m gpu``): they skip on CPU machines, so a lent GPU is
   where they run; the check fails if any fails or skips.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch


def timed(fn, repeats: int = 3):
    """(result of the last call, median seconds), synchronising CUDA around each call."""
    times, result = [], None
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return result, statistics.median(times)


def check_implicit_model() -> dict:
    from idl_ray import ImplicitModel

    torch.manual_seed(0)
    cpu = ImplicitModel(784, 10, 100, kappa=0.95, bias=True, tol=1e-10, max_iter=2000, dtype=torch.float64)
    gpu = ImplicitModel(784, 10, 100, kappa=0.95, bias=True, tol=1e-10, max_iter=2000, dtype=torch.float64)
    gpu.load_state_dict(cpu.state_dict())
    gpu = gpu.cuda()
    x = torch.randn(256, 784, dtype=torch.float64)
    y = torch.randint(0, 10, (256,))
    out = {}
    for name, model, device in (("cpu", cpu, "cpu"), ("cuda", gpu, "cuda")):
        model.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x.to(device)), y.to(device))
        loss.backward()
        out[name] = {k: p.grad.detach().cpu() for k, p in model.named_parameters()}
        out[name + "_loss"] = float(loss)
    grad_error = max(
        float((out["cuda"][k] - out["cpu"][k]).norm() / out["cpu"][k].norm().clamp_min(1e-30))
        for k in out["cpu"]
    )

    # float32 training-step timing on the GPU
    model = ImplicitModel(784, 10, 100, kappa=0.95, bias=True).cuda()
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    xb, yb = torch.randn(256, 784, device="cuda"), torch.randint(0, 10, (256,), device="cuda")

    def step():
        optimiser.zero_grad()
        torch.nn.functional.cross_entropy(model(xb), yb).backward()
        optimiser.step()

    for _ in range(10):
        step()
    _, step_s = timed(step, repeats=30)
    return {
        "loss_gap": abs(out["cuda_loss"] - out["cpu_loss"]),
        "max_relative_grad_error": grad_error,
        "train_step_ms_float32": step_s * 1e3,
        "A_inf_after_training": float(model.A.detach().abs().sum(1).max()),
        "ok": grad_error < 1e-8,
    }


def make_problem(n: int, p: int, m: int, kappa: float, lam: float):
    """A SIM stage-1 problem from synthetic ReLU states, built on the GPU, then moved to the CPU."""
    from idl_ray.sim.problem import GramStats, SIMProblem

    g = torch.Generator(device="cuda").manual_seed(0)
    U = torch.randn(m, p, device="cuda", generator=g, dtype=torch.float64)
    A_true = torch.randn(n, n, device="cuda", generator=g, dtype=torch.float64) / n
    B_true = torch.randn(n, p, device="cuda", generator=g, dtype=torch.float64) / p**0.5
    Z = U @ B_true.T
    for _ in range(30):
        Z = torch.relu(Z) @ A_true.T + U @ B_true.T
    X = torch.relu(Z)
    features = torch.cat([X, U], dim=1)
    stats = GramStats(
        G=(features.T @ features).cpu(),
        Rt=(Z.T @ features).cpu(),
        target_sq=(Z * Z).sum(dim=0).cpu(),
        num_samples=m,
    )
    return SIMProblem(stats=stats, n_constrained=n, lam=lam, kappa=kappa)


def check_admm(n: int, p: int, m: int) -> dict:
    from idl_ray.sim.solvers import ADMMSolver

    kappa, lam = 0.9, 1e-4
    problem = make_problem(n, p, m, kappa, lam)
    results = {}
    for label, device, dtype in (
        ("cpu64", "cpu", torch.float64),
        ("cuda64", "cuda", torch.float64),
        ("cuda32", "cuda", torch.float32),
    ):
        solver = ADMMSolver(device=device, dtype=dtype, max_iter=5000)
        result, seconds = timed(lambda s=solver: s.solve(problem), repeats=1 if device == "cpu" else 3)
        results[label] = {
            "seconds": seconds,
            "objective": problem.objective(result.weights.double().cpu()),
            "A_inf": problem.constraint_norm(result.weights.double().cpu()),
            "iterations": result.stats.iterations,
        }
    ref = results["cpu64"]["objective"]
    for label in ("cuda64", "cuda32"):
        results[label]["objective_gap"] = abs(results[label]["objective"] - ref) / abs(ref)
        results[label]["speedup_vs_cpu"] = results["cpu64"]["seconds"] / results[label]["seconds"]
    results["shape"] = {"n": n, "p": p, "m": m}
    results["ok"] = results["cuda64"]["objective_gap"] < 1e-5 and all(
        results[k]["A_inf"] <= kappa for k in ("cpu64", "cuda64", "cuda32")
    )
    return results


def check_ray_gpu(n: int, p: int, m: int) -> dict:
    import ray

    from idl_ray.distributed import RayADMMSolver
    from idl_ray.sim.solvers import ADMMSolver

    problem = make_problem(n, p, m, 0.9, 1e-4)
    reference = ADMMSolver(device="cpu").solve(problem)
    ray.init(num_cpus=4, num_gpus=torch.cuda.device_count(), include_dashboard=False)
    try:
        solver = RayADMMSolver(num_workers=1, use_gpu=True, strategy="gram")
        result, seconds = timed(lambda: solver.solve(problem), repeats=1)
        consensus = RayADMMSolver(num_workers=1, use_gpu=True, strategy="consensus").solve(problem)
    finally:
        ray.shutdown()
    ref = problem.objective(reference.weights)
    gap = abs(problem.objective(result.weights) - ref) / abs(ref)
    consensus_gap = abs(problem.objective(consensus.weights) - ref) / abs(ref)
    devices = result.stats.extra.get("devices")
    return {
        "devices": devices,
        "objective_gap_gram": gap,
        "objective_gap_consensus": consensus_gap,
        "seconds_gram": seconds,
        "timings": result.stats.extra.get("timings"),
        "ok": gap < 1e-5
        and consensus_gap < 1e-4
        and all(str(d).startswith("cuda") for d in devices or [None]),
    }


def check_gpu_tests(timeout_s: float = 150.0) -> dict:
    """Run ``pytest -m gpu`` on the repository's tests; every selected test must pass (none skip)."""
    import importlib.util
    import pathlib
    import re
    import subprocess
    import sys

    if importlib.util.find_spec("pytest") is None:
        return {"ok": False, "error": "pytest is not installed here: install it to run the GPU tests"}
    root = pathlib.Path(__file__).resolve().parents[1]
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-m",
        "gpu",
        "-q",
        "-rs",
        "-p",
        "no:cacheprovider",
        "-o",
        "addopts=",  # no --timeout: pytest-timeout may be missing on a GPU image
        str(root / "tests"),
    ]
    env = dict(os.environ)
    env["PYTHONPATH"] = str(root) + os.pathsep + env.get("PYTHONPATH", "")
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, env=env, cwd=root)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"pytest -m gpu ran past {timeout_s:g} s"}
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    summary = lines[-1] if lines else done.stderr.strip()[-300:]
    counts = {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|skipped|error|errors)", summary)}
    return {
        "ok": done.returncode == 0 and counts.get("passed", 0) > 0 and not counts.get("skipped"),
        "summary": summary,
        "counts": counts,
        "output_tail": done.stdout[-3000:] if done.returncode else "",
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None, help="write all results here")
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--p", type=int, default=784)
    parser.add_argument("--m", type=int, default=60_000)
    parser.add_argument("--skip-ray", action="store_true")
    parser.add_argument("--skip-tests", action="store_true", help="do not run pytest -m gpu")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 1
    report = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    print("device:", report["device"], "torch", report["torch"], flush=True)
    checks = [("implicit_model", check_implicit_model), ("admm", lambda: check_admm(args.n, args.p, args.m))]
    if not args.skip_ray:
        checks.append(("ray_gpu", lambda: check_ray_gpu(min(args.n, 300), args.p, min(args.m, 20_000))))
    if not args.skip_tests:
        checks.append(("pytest_gpu", check_gpu_tests))
    failed = 0
    for name, check in checks:
        start = time.perf_counter()
        try:
            report[name] = check()
        except Exception as error:  # report and continue: one broken path must not hide the others
            report[name] = {"ok": False, "error": f"{type(error).__name__}: {error}"}
        report[name]["check_seconds"] = time.perf_counter() - start
        failed += not report[name]["ok"]
        print(f"{name}: {json.dumps(report[name], default=str)}", flush=True)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=2, default=str)
    print("FAILED checks:", failed)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
