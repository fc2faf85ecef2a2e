"""Start-up of streaming extraction on Ray Data: tasks vs an actor pool, first and repeated ``SIM.fit``.

``SIM.fit(teacher, ray_dataset)`` on the digits (1,348 training inputs, 64 features; one batch) with a
64-64-32-10 ReLU MLP (seeded random weights: extraction does not depend on training), ``repeats`` fits in a
row in one Ray session for each ``StreamConfig.compute`` mode, side by side. Printed per mode: the first fit
and the median of the later ones, each as the whole ``SIM.fit`` and its extraction pass; then the ratios
(actors / tasks). An actor pool starts new processes for every pass; tasks run in Ray's pooled worker
processes, which keep their imports and the teacher (``idl_ray.distributed.extraction``).

Usage::

    python benchmarks/bench_stream_start.py --repeats 3 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import ray
import torch

from idl_ray.datasets import load_dataset
from idl_ray.sim import SIM
from idl_ray.sim.solvers import ADMMSolver


def fits(compute: str, repeats: int, x, teacher) -> list[dict[str, float]]:
    """``repeats`` fits in one Ray session (a fresh local Ray per mode)."""
    ray.init(
        num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1"
    )
    ray.data.DataContext.get_current().enable_progress_bars = False
    out = []
    try:
        for _ in range(repeats):
            sim = SIM(
                activation="relu",
                kappa=0.95,
                stream={"num_actors": 2, "cpus_per_actor": 0.5, "compute": compute},
            )
            start = time.perf_counter()
            sim.fit(teacher, ray.data.from_numpy(x), solver=ADMMSolver())
            out.append({"fit_s": time.perf_counter() - start, "extraction_s": sim.extraction_time_s_})
    finally:
        ray.shutdown()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    teacher = torch.nn.Sequential(
        torch.nn.Linear(64, 64),
        torch.nn.ReLU(),
        torch.nn.Linear(64, 32),
        torch.nn.ReLU(),
        torch.nn.Linear(32, 10),
    )
    x = load_dataset("digits", seed=0).x_train.numpy()
    report: dict[str, object] = {
        "machine": f"{os.cpu_count()} CPUs, torch {torch.__version__}, ray {ray.__version__}"
    }
    summary = {}
    for compute in ("tasks", "actors"):
        runs = fits(compute, args.repeats, x, teacher)
        later = runs[1:] or runs
        summary[compute] = {
            "first_fit_s": runs[0]["fit_s"],
            "first_extraction_s": runs[0]["extraction_s"],
            "later_fit_s": statistics.median(r["fit_s"] for r in later),
            "later_extraction_s": statistics.median(r["extraction_s"] for r in later),
        }
        s = summary[compute]
        print(
            f"{compute:6s}: first fit {s['first_fit_s']:.2f} s (extraction {s['first_extraction_s']:.2f} s), "
            f"later fits {s['later_fit_s']:.2f} s (extraction {s['later_extraction_s']:.2f} s), median of {len(later)}",
            flush=True,
        )
    t, a = summary["tasks"], summary["actors"]
    print(
        f"actors / tasks: first fit {a['first_fit_s'] / t['first_fit_s']:.1f}x, "
        f"later fits {a['later_fit_s'] / t['later_fit_s']:.1f}x (extraction {a['later_extraction_s'] / t['later_extraction_s']:.1f}x)"
    )
    report["summary"] = summary
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
