"""SIM with every solver on the same teacher and data, side by side (local; Ray solvers on a local ray.init()).

    python examples/sim_solvers.py [--epochs 20] [--hidden 32,16] [--samples 1000] [--no-ray]

Trains a ReLU MLP teacher on scikit-learn's digits, then fits the same SIM problem with the single-process
solvers (ADMM, cvxpy/Clarabel, projected gradient with low-rank A, least squares) and their Ray versions,
and prints, per solver: held-out accuracy, agreement with the teacher, ||A||_inf against kappa, the
stage-1 objective (every solver is judged by the same objective) and the fit time.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import torch

from idl_ray.datasets import load_dataset
from idl_ray.sim import SIM
from idl_ray.sim.solvers import ADMMSolver, CVXSolver, LeastSquareSolver, ProjectedGDLowRankSolver
from idl_ray.teachers import mlp_teacher, train_classifier


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--hidden", default="32,16", help="teacher hidden widths, comma-separated")
    parser.add_argument("--samples", type=int, default=1000, help="samples the SIM problems are fitted on")
    parser.add_argument("--kappa", type=float, default=0.95)
    parser.add_argument("--lam", type=float, default=1e-4)
    parser.add_argument("--no-ray", action="store_true", help="skip the Ray solvers")
    args = parser.parse_args()

    torch.manual_seed(0)
    split = load_dataset("digits")
    hidden = [int(h) for h in args.hidden.split(",")]
    teacher = mlp_teacher(split.num_features, hidden, split.num_classes)
    teacher_acc = train_classifier(teacher, split, epochs=args.epochs)
    x_fit = split.x_train[: args.samples]
    with torch.no_grad():
        teacher_pred = teacher(split.x_test).argmax(dim=1)
    print(f"teacher 64-{args.hidden.replace(',', '-')}-10: held-out accuracy {teacher_acc:.3f}")

    solvers = {
        "admm": ADMMSolver(),
        "cvx": CVXSolver(),
        "projected_gd": ProjectedGDLowRankSolver(),
        "least_squares": LeastSquareSolver(),
    }
    if not args.no_ray:
        import ray

        from idl_ray.distributed import RayADMMSolver, RayCVXSolver, RayProjectedGDSolver

        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        solvers |= {
            "ray-admm": RayADMMSolver(num_workers=2, cpus_per_worker=0.5),
            "ray-cvx": RayCVXSolver(num_workers=2),
            "ray-projected_gd": RayProjectedGDSolver(num_workers=2),
        }
    print(f"{'solver':18s} {'accuracy':>8s} {'agree':>6s} {'||A||_inf':>9s} {'objective':>12s} {'time':>7s}")
    try:
        for name, solver in solvers.items():
            start = time.perf_counter()
            # least squares is unconstrained: its ||A||_inf is not bounded (SIM warns about it)
            variant = "least_squares" if name == "least_squares" else "lasso"
            sim = SIM(kappa=args.kappa, lam=args.lam, variant=variant).fit(teacher, x_fit, solver=solver)
            seconds = time.perf_counter() - start
            pred = sim.predict(split.x_test).argmax(dim=1).cpu()
            accuracy = float((pred == split.y_test).double().mean())
            agreement = float((pred == teacher_pred).double().mean())
            a_inf = float(sim.A_.abs().sum(dim=1).max())
            objective = sim.stats_["stage1"].objective
            print(
                f"{name:18s} {accuracy:8.3f} {agreement:6.3f} {a_inf:9.4f} {objective:12.6g} {seconds:6.2f}s"
            )
    finally:
        if not args.no_ray:
            ray.shutdown()


if __name__ == "__main__":
    main()
