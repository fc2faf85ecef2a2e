"""SIM of a digits MLP teacher with the Ray-distributed ADMM solver (local Ray, < 1 minute on 2 cores).

    python examples/sim_ray_digits.py

Trains a small 64-32-16-10 ReLU MLP on scikit-learn's 8x8 digits, fits a well-posed implicit model to its
states with ``RayADMMSolver`` (2 CPU actors, gram strategy) and with the single-process ``ADMMSolver``, and
prints accuracies, ||A||_inf, objectives and where the distributed solve spent its time.
"""

from __future__ import annotations

import os
import time

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import ray
import torch

from idl_ray.datasets import load_dataset
from idl_ray.distributed import RayADMMSolver
from idl_ray.sim.estimator import SIM
from idl_ray.sim.solvers.admm import ADMMSolver
from idl_ray.teachers import accuracy, mlp_teacher, train_classifier


def main() -> None:
    torch.manual_seed(0)
    split = load_dataset("digits")
    teacher = mlp_teacher(split.num_features, [32, 16], split.num_classes, bias=True)
    train_classifier(teacher, split, epochs=8)
    print(f"teacher test accuracy: {accuracy(teacher, split.x_test, split.y_test):.3f}")

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        # SIM.fit runs both stages on the same two actors and stops them when it ends
        solver = RayADMMSolver(num_workers=2, cpus_per_worker=1, strategy="gram")
        start = time.perf_counter()
        sim = SIM(kappa=0.95, lam=1e-4).fit(teacher, split.x_train, solver=solver)
        ray_time = time.perf_counter() - start
    finally:
        ray.shutdown()
    start = time.perf_counter()
    local = SIM(kappa=0.95, lam=1e-4).fit(teacher, split.x_train, solver=ADMMSolver(device="cpu"))
    local_time = time.perf_counter() - start

    for name, fitted, seconds in (("RayADMMSolver", sim, ray_time), ("ADMMSolver", local, local_time)):
        print(
            f"{name:14s} SIM test accuracy {fitted.score(split.x_test, split.y_test):.3f}, "
            f"||A||_inf {float(fitted.A_.abs().sum(1).max()):.4f} (kappa 0.95), "
            f"stage-1 objective {fitted.stats_['stage1'].objective:.8f}, fit {seconds:.1f} s"
        )
    timings = sim.stats_["stage1"].extra["timings"]
    print("stage-1 time on Ray:", ", ".join(f"{k} {v:.3f} s" for k, v in timings.items() if v))


if __name__ == "__main__":
    main()
