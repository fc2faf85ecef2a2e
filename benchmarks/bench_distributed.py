"""Ray-distributed SIM solves vs the single-process ADMMSolver, and a scaling model for GPU clusters.

Side by side in one run on one machine, on synthetic stage-1 states (U ~ N(0, 1) of width p, Z = B* U + noise,
X = relu(Z); features [X, U], targets Z; lam = 1e-4, kappa = 0.9):

* single process: ``SIMProblem.from_batches`` (the Gram pass) + ``ADMMSolver`` (all local threads);
* ``RayADMMSolver(strategy="gram")`` and ``strategy="consensus"`` with 2 CPU workers on a
  ``ShardedProblem`` whose sample shards were put in the object store (the workers form their own Gram).

Reported: wall time from samples in memory to weights, the ratio to single process, and where the time
goes (load, Gram, factor, iterations, communication), plus the objective gap and ||A||_inf.

Then kernel rates measured here (GEMM, Gram accumulation, eigendecomposition) feed a small model of the
time and communication per iteration on 8 and 64 GPUs at n = 10,000, p = 3,072, m = 10^7, with the GPU
rates and interconnect bandwidths stated as assumptions.

Usage::

    python benchmarks/bench_distributed.py --quick            # < 3 min on 2 cores: m = 60,000, n = 112
    python benchmarks/bench_distributed.py                     # m in {60k, 240k} x n in {112, 1000}
    python benchmarks/bench_distributed.py --use-gpu           # GPU actors (one per GPU) and a CUDA baseline
    python benchmarks/bench_distributed.py --write docs/benchmarks/distributed.md
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import statistics
import sys
import time
from typing import Any

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import torch

P = 784
LAM, KAPPA = 1e-4, 0.9


# ---------------------------------------------------------------------------------------------- data
def synthetic_states(m: int, n: int, p: int = P, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch-first float32 features [X, U] (m, n + p) and targets Z (m, n) of a one-layer ReLU teacher."""
    gen = torch.Generator().manual_seed(seed)
    U = torch.randn(m, p, generator=gen)
    B = torch.randn(p, n, generator=gen) / math.sqrt(p)
    Z = U @ B + 0.05 * torch.randn(m, n, generator=gen)
    X = torch.relu(Z)
    return torch.cat([X, U], dim=1), Z


def batches(features: torch.Tensor, targets: torch.Tensor, size: int = 8192):
    for start in range(0, features.shape[0], size):
        yield features[start : start + size], targets[start : start + size]


# ---------------------------------------------------------------------------------------------- runs
@dataclasses.dataclass
class Run:
    name: str
    wall_s: float
    phases: dict[str, float]
    iterations: int | None
    objective: float
    a_inf: float
    converged: bool | None


def run_single(features, targets, n: int, device: str, max_iter: int) -> Run:
    from idl_ray.sim.problem import SIMProblem
    from idl_ray.sim.solvers.admm import ADMMSolver

    start = time.perf_counter()
    problem = SIMProblem.from_batches(batches(features, targets), n_constrained=n, lam=LAM, kappa=KAPPA)
    gram_s = time.perf_counter() - start
    result = ADMMSolver(device=device, max_iter=max_iter, warn=False).solve(problem)
    wall = time.perf_counter() - start
    factor = result.stats.extra.get("factor_time_s", 0.0)
    phases = {
        "load": 0.0,
        "gram": gram_s,
        "factor": factor,
        "iterations": result.stats.time_s - factor,
        "communication": 0.0,
    }
    run = Run(
        "single process",
        wall,
        phases,
        result.stats.iterations,
        result.stats.objective,
        result.stats.constraint_norm,
        result.stats.converged,
    )
    return run, problem


def run_ray(
    features, targets, n: int, strategy: str, workers: int, use_gpu: bool, max_iter: int, pool
) -> Run:
    from idl_ray.distributed import RayADMMSolver, ShardedProblem

    start = time.perf_counter()
    sharded = ShardedProblem.from_tensors(
        features, targets, num_shards=workers, n_constrained=n, lam=LAM, kappa=KAPPA
    )
    put_s = time.perf_counter() - start
    solver = RayADMMSolver(strategy=strategy, workers=pool, max_iter=max_iter, warn=False, timeout_s=3600.0)
    result = solver.solve(sharded)
    wall = time.perf_counter() - start
    timings = dict(result.stats.extra["timings"])
    phases = {
        "load": put_s + timings.get("load", 0.0),
        "gram": timings.get("gram", 0.0),
        "factor": timings.get("factor", 0.0),
        "iterations": timings.get("iterations", 0.0),
        "communication": timings.get("communication", 0.0),
    }
    return Run(
        f"Ray {strategy}, {workers} workers",
        wall,
        phases,
        result.stats.iterations,
        result.stats.objective,
        result.stats.constraint_norm or 0.0,
        result.stats.converged,
    )


def median_run(runs: list[Run]) -> Run:
    """The run with the median wall time (its own phase split), so the numbers of a row belong together."""
    ordered = sorted(runs, key=lambda r: r.wall_s)
    return ordered[len(ordered) // 2]


# ---------------------------------------------------------------------------------------------- rates
def measure_rates(
    threads: int, d: int = 896, rows: int = 112, chunk: int = 8192, repeats: int = 3
) -> dict[str, float]:
    """GFLOP/s of the three kernels at ``threads`` torch threads (median of ``repeats``)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(0)
        M = torch.randn(d, d, generator=gen, dtype=torch.float64)
        W = torch.randn(rows, d, generator=gen, dtype=torch.float64)
        F = torch.randn(chunk, d, generator=gen, dtype=torch.float64)
        G = torch.zeros(d, d, dtype=torch.float64)
        S = F.T @ F + d * torch.eye(d, dtype=torch.float64)

        def timed(fn) -> float:
            fn()
            samples = []
            for _ in range(repeats):
                t = time.perf_counter()
                fn()
                samples.append(time.perf_counter() - t)
            return statistics.median(samples)

        gemm = 2 * rows * d * d / timed(lambda: W @ M) / 1e9
        gram = 2 * chunk * d * d / timed(lambda: G.addmm_(F.T, F)) / 1e9
        eigh = 9 * d**3 / timed(lambda: torch.linalg.eigh(S)) / 1e9  # ~9 d^3 flops (tridiagonal + QR)
        return {"gemm_gflops": gemm, "gram_gflops": gram, "eigh_gflops": eigh}
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------- model
@dataclasses.dataclass(frozen=True)
class ClusterAssumptions:
    """Stated assumptions for the paper-scale prediction (not measured here)."""

    gpu_gemm_tflops: float = 50.0  # FP64 GEMM sustained on an H100 SXM (67 peak, tensor cores)
    gpu_eigh_tflops: float = 3.0  # eigendecomposition runs far below GEMM peak (cuSOLVER syevd)
    nvlink_gbs: float = 300.0  # within an 8-GPU node (NVLink/NVSwitch, per GPU, achievable)
    network_gbs: float = 25.0  # between nodes (2 x 100 Gb/s InfiniBand / RoCE per node, achievable)
    rpc_latency_s: float = 1e-3  # one Ray actor round trip (driver <-> workers)
    gpus_per_node: int = 8


def scaling_model(
    gpus: int,
    n: int = 10_000,
    p: int = 3_072,
    m: int = 10**7,
    iters: int = 300,
    a: ClusterAssumptions = ClusterAssumptions(),
) -> dict[str, float]:
    """Predicted costs (seconds, bytes) of both strategies on ``gpus`` GPU actors (float64 throughout).

    gram: Gram pass 2 m d^2 / (K R), tree reduction of d^2 doubles (log2 K levels), one broadcast of H,
    one eigendecomposition per worker (in parallel), then per iteration 2 (n/K) d^2 flops per worker and
    six numbers per worker on the wire. consensus: same Gram pass (no reduction), per iteration 2 n d^2
    flops per worker (every worker updates all rows) and 2 n d doubles per worker to and from the driver.
    """
    d = n + p
    R = a.gpu_gemm_tflops * 1e12
    bw = a.nvlink_gbs * 1e9 if gpus <= a.gpus_per_node else a.network_gbs * 1e9
    gram_bytes = 8.0 * d * d
    levels = max(1, math.ceil(math.log2(gpus))) if gpus > 1 else 0
    out = {"gpus": gpus, "d": d}
    out["gram_pass_s"] = 2.0 * m * d * d / (gpus * R)
    out["reduce_s"] = levels * gram_bytes / bw
    out["broadcast_s"] = levels * gram_bytes / bw
    out["factor_s"] = 9.0 * d**3 / (a.gpu_eigh_tflops * 1e12)
    out["gram_iter_s"] = 2.0 * (n / gpus) * d * d / R + a.rpc_latency_s
    out["gram_iter_bytes"] = 6 * 8 * gpus
    out["gram_total_s"] = (
        out["gram_pass_s"]
        + out["reduce_s"]
        + out["broadcast_s"]
        + out["factor_s"]
        + iters * out["gram_iter_s"]
    )
    block = 8.0 * n * d
    out["consensus_iter_s"] = (
        2.0 * n * d * d / R
        + 2 * block * gpus / (a.network_gbs * 1e9 if gpus > a.gpus_per_node else bw)
        + a.rpc_latency_s
    )
    out["consensus_iter_bytes"] = 2 * block * gpus
    out["consensus_total_s"] = out["gram_pass_s"] + out["factor_s"] + 3 * iters * out["consensus_iter_s"]
    return out


# ---------------------------------------------------------------------------------------------- report
def fmt_phases(phases: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.2f}" for k, v in phases.items())


def markdown(results: list[dict[str, Any]], rates: dict[str, dict[str, float]], machine: str, args) -> str:
    lines = [
        "# Distributed SIM solves: benchmark",
        "",
        f"Machine: {machine}. Command: `python benchmarks/bench_distributed.py {' '.join(sys.argv[1:])}`.",
        f"Synthetic stage-1 states (p = {P}, lam = {LAM}, kappa = {KAPPA}); float64 solves; ADMM defaults "
        "(abs_tol 1e-8, rel_tol 1e-6). Wall time from samples in memory to weights; each row is the median of "
        f"{args.repeats} run(s) (by wall time, with that run's phase split). Ray workers: "
        f"{args.workers}, {args.cpus_per_worker} CPU each; single process uses {torch.get_num_threads()} threads.",
        "",
        "| m | n | solver | wall s | ratio | iterations | load | Gram | factor | iterations s | communication | objective gap | ||A||_inf |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        base = r["runs"][0]
        for run in r["runs"]:
            ph = run["phases"]
            gap = abs(run["objective"] - base["objective"]) / abs(base["objective"])
            lines.append(
                f"| {r['m']:,} | {r['n']} | {run['name']} | {run['wall_s']:.2f} | {run['wall_s'] / base['wall_s']:.2f}x | "
                f"{run['iterations']} | {ph['load']:.2f} | {ph['gram']:.2f} | {ph['factor']:.2f} | "
                f"{ph['iterations']:.2f} | {ph['communication']:.2f} | {gap:.1e} | {run['a_inf']:.6f} |"
            )
    lines += [
        "",
        "## Kernel rates measured here (float64, GFLOP/s, median of 3)",
        "",
        "| threads | GEMM (rows x d)(d x d) | Gram accumulation | eigh (~9 d^3) |",
        "|---|---|---|---|",
    ]
    for threads, r in rates.items():
        lines.append(
            f"| {threads} | {r['gemm_gflops']:.1f} | {r['gram_gflops']:.1f} | {r['eigh_gflops']:.1f} |"
        )
    a = ClusterAssumptions()
    lines += [
        "",
        "## Scaling model: n = 10,000, p = 3,072 (d = 13,072), m = 10^7, float64",
        "",
        f"Assumed (not measured): FP64 GEMM {a.gpu_gemm_tflops} TFLOP/s per GPU, eigh {a.gpu_eigh_tflops} TFLOP/s, "
        f"{a.nvlink_gbs} GB/s within a node of {a.gpus_per_node} GPUs, {a.network_gbs} GB/s between nodes, "
        f"{a.rpc_latency_s * 1e3:.0f} ms per Ray round trip, 300 ADMM iterations (consensus: 3x as many). "
        "The model check below uses the same formulas with this machine's measured rates.",
        "",
        "| GPUs | Gram pass s | reduce + broadcast s | factor s | gram: s / iteration | gram: bytes / iteration | "
        "gram total s | consensus: s / iteration | consensus: bytes / iteration | consensus total s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for gpus in (8, 64):
        s = scaling_model(gpus)
        lines.append(
            f"| {gpus} | {s['gram_pass_s']:.1f} | {s['reduce_s'] + s['broadcast_s']:.2f} | {s['factor_s']:.1f} | "
            f"{s['gram_iter_s'] * 1e3:.1f} ms | {s['gram_iter_bytes']:,} | {s['gram_total_s']:.0f} | "
            f"{s['consensus_iter_s'] * 1e3:.0f} ms | {s['consensus_iter_bytes'] / 1e9:.1f} GB | {s['consensus_total_s']:.0f} |"
        )
    # check the model against this machine: the measured gram runs, predicted from the 1-thread rates
    cpu = rates.get("1", next(iter(rates.values())))
    vm = ClusterAssumptions(
        gpu_gemm_tflops=cpu["gemm_gflops"] / 1e3,
        gpu_eigh_tflops=cpu["eigh_gflops"] / 1e3,
        nvlink_gbs=2.0,
        network_gbs=2.0,
        rpc_latency_s=2e-3,
        gpus_per_node=args.workers,
    )
    lines += [
        "",
        "Model check on this machine (measured 1-thread rates instead of GPU rates, 2 GB/s object store, "
        "2 ms round trips; the Gram pass uses the Gram-accumulation rate):",
        "",
        "| m | n | predicted gram-strategy s (Gram pass + reduce + factor + iterations) | measured s |",
        "|---|---|---|---|",
    ]
    for r in results:
        gram_run = next(run for run in r["runs"] if "gram" in run["name"])
        vm_gram = dataclasses.replace(vm, gpu_gemm_tflops=cpu["gram_gflops"] / 1e3)
        s_pass = scaling_model(args.workers, n=r["n"], p=P, m=r["m"], iters=gram_run["iterations"], a=vm_gram)
        s_iter = scaling_model(args.workers, n=r["n"], p=P, m=r["m"], iters=gram_run["iterations"], a=vm)
        predicted = (
            s_pass["gram_pass_s"]
            + s_iter["reduce_s"]
            + s_iter["broadcast_s"]
            + s_iter["factor_s"]
            + gram_run["iterations"] * s_iter["gram_iter_s"]
        )
        lines.append(f"| {r['m']:,} | {r['n']} | {predicted:.1f} | {gram_run['wall_s']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="m = 60,000 and n = 112 only (< 3 min on 2 cores)"
    )
    parser.add_argument("--use-gpu", action="store_true", help="GPU actors (one per GPU) and a CUDA baseline")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cpus-per-worker", type=float, default=1.0)
    parser.add_argument("--max-iter", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=1, help="runs per cell; the report shows medians")
    parser.add_argument("--skip-consensus", action="store_true")
    parser.add_argument("--write", metavar="PATH", help="write the markdown report here")
    parser.add_argument("--json", metavar="PATH", help="write the raw numbers here")
    parser.add_argument(
        "--cases",
        default=None,
        help="comma-separated m x n cells, e.g. 240000x112,60000x1000 (overrides --quick)",
    )
    args = parser.parse_args(argv)

    import ray

    from idl_ray.distributed import RayRunConfig, WorkerPool

    cases = (
        [(60_000, 112)] if args.quick else [(60_000, 112), (240_000, 112), (60_000, 1000), (240_000, 1000)]
    )
    if args.cases:
        cases = [tuple(int(v) for v in cell.lower().split("x")) for cell in args.cases.split(",")]
    device = "cuda" if args.use_gpu else "cpu"
    ray.init(
        num_cpus=os.cpu_count(),
        include_dashboard=False,
        log_to_driver=False,
        object_store_memory=int(6e9) if not args.quick else int(2e9),
    )
    config = RayRunConfig(
        num_workers=args.workers, use_gpu=args.use_gpu, cpus_per_worker=args.cpus_per_worker, timeout_s=3600.0
    )
    pool = WorkerPool(config)
    results = []
    try:
        for m, n in cases:
            features, targets = synthetic_states(m, n)
            strategies = ["gram"] + ([] if args.skip_consensus else ["consensus"])
            trials: list[list[Run]] = []
            for _ in range(args.repeats):
                single, _ = run_single(features, targets, n, device, args.max_iter)
                trial = [single]
                for strategy in strategies:
                    trial.append(
                        run_ray(
                            features, targets, n, strategy, args.workers, args.use_gpu, args.max_iter, pool
                        )
                    )
                trials.append(trial)
            runs = [median_run([t[i] for t in trials]) for i in range(len(trials[0]))]
            single = runs[0]
            for run in runs:
                print(
                    f"m={m:,} n={n} {run.name}: {run.wall_s:.2f} s ({run.wall_s / single.wall_s:.2f}x), "
                    f"{run.iterations} it, {fmt_phases(run.phases)}; objective {run.objective:.8g}, "
                    f"||A||_inf {run.a_inf:.6f}",
                    flush=True,
                )
            results.append({"m": m, "n": n, "runs": [dataclasses.asdict(r) for r in runs]})
            del features, targets
    finally:
        pool.shutdown()
        ray.shutdown()
    rates = {str(t): measure_rates(t) for t in sorted({1, torch.get_num_threads()})}
    print(json.dumps(rates))
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    machine = (
        f"{platform.machine()} {os.cpu_count()}-core CPU VM shared with other work (load average {load} at "
        f"the end), {platform.system()}, torch {torch.__version__}, no GPU"
    )
    if args.use_gpu and torch.cuda.is_available():
        machine = machine.replace("no GPU", torch.cuda.get_device_name(0))
    report = markdown(results, rates, machine, args)
    print(report)
    if args.write:
        with open(args.write, "w") as handle:
            handle.write(report)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"results": results, "rates": rates}, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
