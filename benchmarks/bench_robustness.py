"""Robustness of a digits teacher and its SIM: clean accuracy, certified Lipschitz bounds, attacked accuracy.

The 64-input digits teacher with biases (``train_teacher`` of bench_sim.py, p-64-32-10 ReLU, inputs in [0, 1] as
in bench_sim) and SIM models fitted to it (default settings, and one per ``--robust-weight`` when SIM accepts
that option): for each, held-out clean accuracy, the norm bound ``||D|| + ||C|| ||B|| / (1 - ||A||)`` (the
paper's; not defined for the teacher, whose implicit A is strictly triangular with ``||A||_inf`` > 1), the
elementwise bound ``|| |C| M^{-1} |B| + |D| ||_inf`` (defined for both; see docs/robustness.md), and accuracy
under FGSM and PGD (``--pgd-steps``, random start, seeded) at each eps, inputs kept in [0, 1].

Usage::

    python benchmarks/bench_robustness.py --threads 1                          # ~1 min on a 2-core CPU
    python benchmarks/bench_robustness.py --robust-weight 1e-3,1e-2 --json out.json
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import time
from pathlib import Path

import torch
from bench_sim import digits_data, train_teacher

from idl_ray.robustness import attack_accuracy, lipschitz_bound
from idl_ray.sim import SIM
from idl_ray.sim.solvers import ADMMSolver


def floats(text: str) -> list[float]:
    return [float(part) for part in text.split(",") if part]


def evaluate(model, X: torch.Tensor, y: torch.Tensor, eps: list[float], steps: int) -> dict:
    """Clean, FGSM and PGD accuracy (inputs clipped to [0, 1])."""
    fgsm = attack_accuracy(model, X, y, eps, method="fgsm", clip=(0.0, 1.0))
    pgd = attack_accuracy(
        model,
        X,
        y,
        eps,
        method="pgd",
        steps=steps,
        clip=(0.0, 1.0),
        generator=torch.Generator().manual_seed(0),
    )
    return {"clean": attack_accuracy(model, X, y, 0.0), "fgsm": fgsm, "pgd": pgd}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, default=64, help="input size: 64 (8x8) or 784 (upsampled)")
    parser.add_argument(
        "--eps", type=floats, default=[0.01, 0.02, 0.05, 0.1], help="l-inf radii, comma-separated"
    )
    parser.add_argument(
        "--robust-weight",
        type=floats,
        default=[],
        help="SIM(robust_weight=w) for each w, comma-separated (skipped where SIM has no such option)",
    )
    parser.add_argument("--kappa", type=float, default=0.95)
    parser.add_argument("--lam", type=float, default=None, help="SIM's l1 weight (default: SIM's default)")
    parser.add_argument("--epochs", type=int, default=40, help="teacher training epochs")
    parser.add_argument("--pgd-steps", type=int, default=10)
    parser.add_argument("--max-iter", type=int, default=None, help="cap the ADMM solves (default: its own)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    X_train, y_train, X_test, y_test = digits_data(args.size)
    start = time.perf_counter()
    teacher = train_teacher(args.size, X_train, y_train, args.epochs, hidden=(64, 32), bias=True)
    print(f"teacher {args.size}-64-32-10 (biases) trained in {time.perf_counter() - start:.1f} s", flush=True)

    accepts_robust = "robust_weight" in inspect.signature(SIM).parameters
    settings: list[tuple[str, dict]] = [("SIM (default)", {})]
    if args.robust_weight and not accepts_robust:
        print("note: this SIM has no robust_weight option; --robust-weight rows skipped", flush=True)
    elif accepts_robust:
        settings += [(f"SIM robust_weight={w:g}", {"robust_weight": w}) for w in args.robust_weight]

    rows: list[dict] = []
    structure = None
    for name, extra in settings:
        params = {"kappa": args.kappa, **({} if args.lam is None else {"lam": args.lam}), **extra}
        start = time.perf_counter()
        solver = None if args.max_iter is None else ADMMSolver(max_iter=args.max_iter, warn=False)
        sim = SIM(**params).fit(teacher, X_train, solver=solver)
        fit_s = time.perf_counter() - start
        structure = structure or sim.structure_
        row = {
            "model": name,
            "params": params,
            "fit_s": fit_s,
            "L_norm": sim.lipschitz_bound(),
            "L_elementwise": sim.lipschitz_bound(method="elementwise"),
            "nonzeros": sim.summary().nonzeros,
            **evaluate(sim.to_module(), X_test, y_test, args.eps, args.pgd_steps),
        }
        rows.append(row)
    teacher_row = {
        "model": "teacher",
        "L_norm": None,
        "L_elementwise": lipschitz_bound(structure, method="elementwise"),
        **evaluate(teacher, X_test, y_test, args.eps, args.pgd_steps),
    }
    rows.insert(0, teacher_row)

    eps_heads = [f"{m} {e:g}" for m in ("FGSM", "PGD") for e in args.eps]
    head = f"{'model':<26} {'clean':>6} {'L_norm':>9} {'L_elem':>9} " + " ".join(
        f"{h:>10}" for h in eps_heads
    )
    print(
        f"\nheld-out accuracy ({len(y_test)} samples), l-inf attacks, inputs in [0, 1]; PGD {args.pgd_steps} steps"
    )
    print(head)
    print("-" * len(head))
    for row in rows:
        L = "n/a" if row["L_norm"] is None else f"{row['L_norm']:.4g}"
        accs = [*row["fgsm"], *row["pgd"]]
        print(
            f"{row['model']:<26} {row['clean']:>6.3f} {L:>9} {row['L_elementwise']:>9.4g} "
            + " ".join(f"{a:>10.3f}" for a in accs)
        )
    if args.json:
        info = {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        }
        args.json.write_text(json.dumps({"info": info, "eps": args.eps, "rows": rows}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
