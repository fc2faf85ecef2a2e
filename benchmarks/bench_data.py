"""Streaming state extraction on Ray Data: throughput against the one-process floor, and flat memory.

Teacher: a 784-256-128-10 ReLU MLP with biases (seeded random weights; throughput does not depend on
training). Inputs are generated inside the pipeline: ``ray.data.range(m)`` + ``map_batches`` drawing
N(0, 1) float32 rows from a generator seeded by the batch's first row id, so nothing of size m ever
exists on the driver.

Measured side by side in one run:

* **floor** (one process, all its threads): teacher forward (``StateRecorder.record``) + the stage
  features ``[X, U]``, targets ``[Z, Y]`` + ``G += Phi Phi^T``, ``Rt += T Phi^T`` in float64
  (``GramStats.add``), on batches of the same size, inputs generated beforehand (not timed);
* **ray data**: ``reduce_dataset`` (what ``SIM.fit`` on a ``ray.data.Dataset`` runs): the generator
  tasks, the actor pool (teacher + per-batch Gram), the transfer of one Gram per batch and the
  driver's sum. Reported as samples/s and as a fraction of the floor.
* **peak memory**: the largest sum of the resident set sizes (VmRSS) of the driver and every process
  under it (GCS, raylet, Ray workers, the actors), sampled every 0.2 s during the pass, at each m.
  Shared pages (the object store is shared memory) are counted once per process that maps them, so this
  over-counts; it is the quantity the issue asks for.
* optionally (``--fit-m``), ``SIM.fit(teacher, dataset, solver=RayADMMSolver(...))`` end to end with
  ``regenerate_states=True``, timed per stage: extraction (the streaming pass, reduction included),
  stage-1 solve, regeneration pass, stage-2 solve.

Usage::

    python benchmarks/bench_data.py --sizes 100000 1000000 --fit-m 1000000 --json out.json
    python benchmarks/bench_data.py --quick     # m = 20,000, no fit: a minute
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import threading
import time
from typing import Any

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import numpy as np
import torch
from torch import nn

SIZES = (784, 256, 128, 10)


def teacher() -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for a, b in itertools.pairwise(SIZES):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1]).eval()


def generate(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Seeded synthetic inputs for the rows ``batch["id"]`` (deterministic per batch)."""
    ids = batch["id"]
    rng = np.random.default_rng(int(ids[0]) if len(ids) else 0)
    return {"x": rng.standard_normal((len(ids), SIZES[0]), dtype=np.float32)}


# ---------------------------------------------------------------------------------------- memory
def _rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _pss_kib(pid: int) -> int:
    """Proportional set size: shared pages (the object store) split between the processes mapping them."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def _name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            parts = f.read().split(b"\0")
    except OSError:
        return "?"
    text = parts[0].decode(errors="replace")
    if text.startswith("ray::"):
        return text
    return " ".join(os.path.basename(x.decode(errors="replace")) for x in parts[:2] if x)[:60]


class PeakRSS:
    """Peak of the summed RSS of this process and all its descendants, sampled in a thread."""

    def __init__(self, every_s: float = 0.2) -> None:
        self.every_s = every_s
        self.peak_kib = 0
        self.peak_pss_kib = 0
        self.processes = 0
        self.breakdown: list[tuple[str, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            pids = _descendants(os.getpid())
            sizes = {p: _rss_kib(p) for p in pids}
            total = sum(sizes.values())
            self.peak_pss_kib = max(self.peak_pss_kib, sum(_pss_kib(p) for p in pids))
            if total > self.peak_kib:
                self.peak_kib, self.processes = total, len(pids)
                self.breakdown = sorted(
                    ((_name(p), round(k / 2**10)) for p, k in sizes.items() if k), key=lambda t: -t[1]
                )
            self._stop.wait(self.every_s)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def gib(self) -> float:
        return self.peak_kib / 2**20

    @property
    def pss_gib(self) -> float:
        return self.peak_pss_kib / 2**20


# ---------------------------------------------------------------------------------------- floor
def floor_throughput(batch_size: int, batches: int, repeats: int) -> dict[str, float]:
    from idl_ray.sim.extraction import StateRecorder
    from idl_ray.sim.problem import GramStats
    from idl_ray.sim.stages import stage_batch

    recorder = StateRecorder(teacher())
    inputs = [generate({"id": np.arange(k * batch_size, (k + 1) * batch_size)})["x"] for k in range(batches)]
    rates = []
    for _ in range(repeats):
        stats = None
        start = time.perf_counter()
        for x in inputs:
            s = recorder.record(torch.from_numpy(x))
            features, targets = stage_batch(s.U.T, s.Z.T, s.X.T, s.Y.T, None)
            stats = GramStats.accumulate(stats, features, targets)
        rates.append(batch_size * batches / (time.perf_counter() - start))
    return {"samples_per_s": statistics.median(rates), "runs": rates, "threads": torch.get_num_threads()}


# ---------------------------------------------------------------------------------------- ray data
def pipeline(m: int, blocks: int):
    import ray

    # fused with the range read into one task of 1 CPU: the actors must leave that CPU free
    return ray.data.range(m, override_num_blocks=blocks).map_batches(generate, batch_format="numpy")


def ray_pass(m: int, config: Any, blocks: int) -> dict[str, Any]:
    from idl_ray.distributed.extraction import prepare, reduce_dataset

    ds = pipeline(m, blocks)
    model = teacher()
    idle = sum(_rss_kib(p) for p in _descendants(os.getpid())) / 2**20
    with PeakRSS() as memory:
        start = time.perf_counter()
        column, structure = prepare(model, ds, input_column=None, dtype=torch.float32, owner="bench")
        stats, info = reduce_dataset(ds, model, structure, column, config, scales=None)
        wall = time.perf_counter() - start
    assert stats.num_samples == m
    return {
        "m": m,
        "wall_s": wall,
        "samples_per_s": m / wall,
        "batches": info.num_batches,
        "actors": info.actors,
        "driver_reduce_s": info.driver_reduce_s,
        "peak_rss_gib": memory.gib,
        "peak_pss_gib": memory.pss_gib,
        "rss_before_gib": idle,
        "processes_at_peak": memory.processes,
        "rss_mib_at_peak": memory.breakdown,
        "trace_G": float(stats.G.trace()),
    }


def fit_end_to_end(m: int, config: Any, blocks: int, workers: int, max_iter: int) -> dict[str, Any]:
    from idl_ray.distributed import RayADMMSolver
    from idl_ray.sim import SIM

    ds = pipeline(m, blocks)
    solver = RayADMMSolver(
        num_workers=workers, cpus_per_worker=0.5, use_gpu=False, max_iter=max_iter, abs_tol=1e-6, rel_tol=1e-4
    )
    sim = SIM(kappa=0.95, lam=1e-4, regenerate_states=True, stream=config)
    with PeakRSS() as memory:
        start = time.perf_counter()
        sim.fit(teacher(), ds, solver=solver)
        wall = time.perf_counter() - start
    info = sim.stream_info_
    return {
        "m": m,
        "total_s": wall,
        "extraction_s": info["extraction"].time_s,
        "extraction_driver_reduce_s": info["extraction"].driver_reduce_s,
        "stage1_solve_s": sim.stats_["stage1"].time_s,
        "regeneration_s": info["regeneration"].time_s,
        "stage2_solve_s": sim.stats_["stage2"].time_s,
        "iterations": {k: v.iterations for k, v in sim.stats_.items()},
        "converged": {k: v.converged for k, v in sim.stats_.items()},
        "a_inf_norm": float(sim.A_.abs().sum(dim=1).max()),
        "peak_rss_gib": memory.gib,
        "peak_pss_gib": memory.pss_gib,
        "rss_mib_at_peak": memory.breakdown,
    }


def main() -> None:
    from idl_ray.distributed.extraction import COMPUTE_CHOICES, StreamConfig

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=float, nargs="*", default=[1e5])
    parser.add_argument("--fit-m", type=float, default=0, help="m of the end-to-end SIM.fit (0: skip)")
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument(
        "--compute",
        choices=COMPUTE_CHOICES,
        default="auto",
        help="StreamConfig.compute (auto: tasks on CPU)",
    )
    parser.add_argument("--cpus-per-actor", type=float, default=0.5)
    parser.add_argument("--threads-per-actor", type=int, default=1)
    parser.add_argument("--object-store-mb", type=int, default=512, help="Ray Data's budget for the pass")
    parser.add_argument("--max-iter", type=int, default=3000, help="ADMM cap per stage in the fit")
    parser.add_argument("--floor-batches", type=int, default=10)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.fit_m, args.floor_batches = [2e4], 0, 4

    import ray

    def start_ray() -> None:  # a fresh local Ray per measurement: no process left over from the last one
        ray.init(
            num_cpus=os.cpu_count(),
            include_dashboard=False,
            log_to_driver=False,
            object_store_memory=1024 * 2**20,
            _node_ip_address="127.0.0.1",
        )
        ray.data.DataContext.get_current().enable_progress_bars = False

    config = StreamConfig(
        num_actors=args.actors,
        compute=args.compute,
        batch_size=args.batch_size,
        cpus_per_actor=args.cpus_per_actor,
        threads_per_actor=args.threads_per_actor,
        use_gpu=False,
        object_store_memory=args.object_store_mb * 2**20,
    )
    report: dict[str, Any] = {
        "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"ray {ray.__version__}, load average before {os.getloadavg()[0]:.1f}",
        "config": config.to_dict(),
    }
    report["floor"] = floor_throughput(args.batch_size, args.floor_batches, repeats=3)
    print(
        f"floor (1 process, {report['floor']['threads']} threads): {report['floor']['samples_per_s']:,.0f} samples/s"
    )
    report["passes"] = []
    for m in (int(s) for s in args.sizes):
        blocks = max(4, m // (4 * args.batch_size))
        start_ray()
        result = ray_pass(m, config, blocks)
        ray.shutdown()
        result["fraction_of_floor"] = result["samples_per_s"] / report["floor"]["samples_per_s"]
        report["passes"].append(result)
        print(
            f"ray data m={m:,}: {result['samples_per_s']:,.0f} samples/s "
            f"({result['fraction_of_floor']:.0%} of the floor), {result['wall_s']:.1f} s, "
            f"peak RSS {result['peak_rss_gib']:.2f} GiB over {result['processes_at_peak']} processes "
            f"(before the pass: {result['rss_before_gib']:.2f} GiB); peak PSS {result['peak_pss_gib']:.2f} GiB"
        )
    if len(report["passes"]) > 1:
        first, last = report["passes"][0], report["passes"][-1]
        ratio = last["peak_rss_gib"] / first["peak_rss_gib"]
        ratio_pss = last["peak_pss_gib"] / first["peak_pss_gib"]
        report["peak_ratio_last_to_first"] = {"rss": ratio, "pss": ratio_pss}
        print(
            f"peak ratio m={int(args.sizes[-1]):,} / m={int(args.sizes[0]):,}: RSS {ratio:.2f}, PSS {ratio_pss:.2f}"
        )
    if args.fit_m:
        m = int(args.fit_m)
        start_ray()
        report["fit"] = fit_end_to_end(m, config, max(4, m // (4 * args.batch_size)), 2, args.max_iter)
        ray.shutdown()
        f = report["fit"]
        print(
            f"SIM.fit m={m:,} with RayADMMSolver: {f['total_s']:.1f} s = extraction {f['extraction_s']:.1f} "
            f"(driver sums {f['extraction_driver_reduce_s']:.2f}) + stage-1 solve {f['stage1_solve_s']:.1f} "
            f"+ regeneration {f['regeneration_s']:.1f} + stage-2 solve {f['stage2_solve_s']:.1f}; "
            f"iterations {f['iterations']}, converged {f['converged']}, peak RSS {f['peak_rss_gib']:.2f} GiB, "
            f"PSS {f['peak_pss_gib']:.2f} GiB"
        )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=2, default=str)


if __name__ == "__main__":
    main()
