"""The lambda path vs cold solves on the same lams, side by side in one run.

For each input size p in {64, 784} (digits, upsampled bilinearly to 28x28 for 784, as in
``bench_sim_grid.py``) a p-64-32-10 ReLU MLP teacher with biases is trained, then:

- **path**: ``SIM.fit_path`` with ``n_lams`` points from lam_max down to ``lam_ratio * lam_max``: the states
  are recorded once, one ``ADMMSolver`` serves every point (its eigendecomposition of G is computed once),
  and each point starts from the previous one's weights;
- **cold**: ``SIM(lam=...).fit`` at each of the same lams with a fresh ``ADMMSolver`` (its own extraction,
  factorisation and cold start: what a user without a path would run).

Each round runs the path then the cold fits; ``--repeats`` rounds, medians reported. Printed per lam: steps of both stages (path / cold), time, nonzeros, held-out accuracy, and the largest
relative objective difference between the two (both are certified to ``gap_tol``). Then the totals: path
time vs the sum of the cold fits (goal: >= 5x less), vs the sum of the cold solves alone (extraction left
out), and vs one cold fit (median over the lams).

Usage::

    python benchmarks/bench_sim_path.py --sizes 64 --threads 1
    python benchmarks/bench_sim_path.py --sizes 784 --n-lams 8 --max-iter 2000 --threads 1   # slow here
    python benchmarks/bench_sim_path.py --sizes 64 --ray-workers 2 --repeats 1   # RayADMMSolver, one pool

With ``--ray-workers`` both sides use ``RayADMMSolver`` on the same started actors (no actor start-up on
either side): the path's one solver keeps the factored H on the workers for every point, while each cold
fit's fresh solver sends and factors H again and starts cold.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_sim import digits_data, train_teacher  # the same digits split (64, or upsampled to 784)

from idl_ray.errors import ConvergenceWarning
from idl_ray.sim import SIM
from idl_ray.sim.solvers import ADMMSolver

#: with --ray-workers: the started actors every Ray solver of the run uses (cold fits and path alike)
POOL: list = []


def solver(args):
    """A fresh solver: ADMMSolver, or with --ray-workers a RayADMMSolver (gram) on the run's started actors
    (a fresh instance names its Gram anew, so a cold fit sends and factors H again, as a new solver must)."""
    options = {} if args.max_iter is None else {"max_iter": args.max_iter}
    if args.check_every is not None:
        options["check_every"] = args.check_every
    if not args.ray_workers:
        return ADMMSolver(device="cpu", warn=False, **options)
    from idl_ray.distributed import RayADMMSolver, RayRunConfig, WorkerPool

    if not POOL:
        config = RayRunConfig(num_workers=args.ray_workers, cpus_per_worker=0.5, use_gpu=False)
        POOL.append(WorkerPool(config))
    return RayADMMSolver(workers=POOL[0], warn=False, **options)


def run_case(p: int, args) -> dict:
    """``args.repeats`` rounds of (path, cold fits), interleaved so load changes hit both; the medians of
    the totals and per-point times, the steps and answers of the last round."""
    X, y, Xt, yt = digits_data(p)
    teacher = train_teacher(p, X, y, hidden=(64, 32), bias=True)
    rounds = [one_round(teacher, X, Xt, yt, args) for _ in range(args.repeats)]
    case = rounds[-1]
    for key in ("path_s", "path_fit_s", "extraction_s", "cold_fits_s", "cold_solves_s", "one_cold_fit_s"):
        case[key] = statistics.median(r[key] for r in rounds)
    for k, row in enumerate(case["rows"]):
        row["time_path_s"] = statistics.median(r["rows"][k]["time_path_s"] for r in rounds)
        row["time_cold_fit_s"] = statistics.median(r["rows"][k]["time_cold_fit_s"] for r in rounds)
    case["p"] = p
    case["repeats"] = args.repeats
    case["speedup_vs_cold_fits"] = case["cold_fits_s"] / case["path_fit_s"]
    case["speedup_vs_cold_solves"] = case["cold_solves_s"] / (case["path_fit_s"] - case["extraction_s"])
    case["path_vs_one_fit"] = case["path_fit_s"] / case["one_cold_fit_s"]
    case["speedups_per_round"] = [r["cold_fits_s"] / r["path_fit_s"] for r in rounds]
    return case


def one_round(teacher, X, Xt, yt, args) -> dict:
    sim = SIM(activation="relu", kappa=args.kappa, device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        start = time.perf_counter()
        path = sim.fit_path(
            teacher, X, n_lams=args.n_lams, lam_ratio=args.lam_ratio, solver=solver(args), test_data=(Xt, yt)
        )
        path_s = time.perf_counter() - start
        # the path's own clock without the table's evaluation (accuracy, Lipschitz bound per point)
        path_fit_s = path.extraction_time_s + sum(row["time_s"] for row in path.rows)
        cold = []
        for lam in path.lams:
            start = time.perf_counter()
            fitted = SIM(activation="relu", kappa=args.kappa, lam=lam, device="cpu").fit(
                teacher, X, solver=solver(args)
            )
            total = time.perf_counter() - start
            s1, s2 = fitted.stats_["stage1"], fitted.stats_["stage2"]
            cold.append({"fit_s": total, "solve_s": s1.time_s + s2.time_s, "stats": (s1, s2)})
    rows = []
    for point, row, c in zip(path.models, path.rows, cold):
        s1, s2 = c["stats"]
        warm1, warm2 = point.stats_["stage1"], point.stats_["stage2"]
        diff = max(
            abs(warm1.objective - s1.objective) / max(abs(s1.objective), 1e-300),
            abs(warm2.objective - s2.objective) / max(abs(s2.objective), 1e-300),
        )
        rows.append(
            {
                "lam": row["lam"],
                "steps_path": (warm1.iterations, warm2.iterations),
                "steps_cold": (s1.iterations, s2.iterations),
                "certified_path": bool(warm1.converged and warm2.converged),
                "certified_cold": bool(s1.converged and s2.converged),
                "time_path_s": row["time_s"],
                "time_cold_fit_s": c["fit_s"],
                "nnz": row["nnz"],
                "frac_nonzero": row["frac_nonzero"],
                "accuracy": row["accuracy"],
                "lipschitz": row["lipschitz"],
                "objective_rel_diff": diff,
            }
        )
    cold_fit = sum(c["fit_s"] for c in cold)
    cold_solve = sum(c["solve_s"] for c in cold)
    # stages where the path took more steps, among those both solves certified (capped ones stop at max_iter)
    pairs = [
        (r["steps_path"][s], r["steps_cold"][s], c["stats"][s].converged, m.stats_[f"stage{s + 1}"].converged)
        for r, c, m in zip(rows, cold, path.models)
        for s in (0, 1)
    ]
    more_steps = sum((a or 0) > (b or 0) for a, b, ok_cold, ok_path in pairs if ok_cold and ok_path)
    capped = sum(not (ok_cold and ok_path) for _, _, ok_cold, ok_path in pairs)
    return {
        "n_lams": len(rows),
        "lam_max": path.lam_max,
        "lam_ratio": args.lam_ratio,
        "teacher_accuracy": path.teacher["accuracy"],
        "rows": rows,
        "path_s": path_s,
        "path_fit_s": path_fit_s,
        "extraction_s": path.extraction_time_s,
        "cold_fits_s": cold_fit,
        "cold_solves_s": cold_solve,
        "one_cold_fit_s": statistics.median(c["fit_s"] for c in cold),
        "stages_with_more_steps_on_the_path": more_steps,
        "stages_not_certified_by_both": capped,
        "max_objective_rel_diff": max(r["objective_rel_diff"] for r in rows),
    }


def report(case: dict) -> None:
    print(
        f"\np = {case['p']}: {case['n_lams']} lams from {case['lam_max']:.3g} (ratio {case['lam_ratio']:g}); "
        f"teacher accuracy {case['teacher_accuracy']:.4f}"
    )
    print(
        f"{'lam':>10} {'steps path':>11} {'steps cold':>11} {'t path':>8} {'t cold':>8} {'nnz':>6} "
        f"{'acc':>6} {'obj diff':>9}"
    )
    for r in case["rows"]:
        flag = "" if r["certified_path"] and r["certified_cold"] else "  (not certified)"
        print(
            f"{r['lam']:10.3g} {r['steps_path'][0]:>5}/{r['steps_path'][1]:<5} {r['steps_cold'][0]:>5}/"
            f"{r['steps_cold'][1]:<5} {r['time_path_s']:8.3f} {r['time_cold_fit_s']:8.3f} {r['nnz']:6d} "
            f"{r['accuracy']:6.3f} {r['objective_rel_diff']:9.1e}{flag}"
        )
    print(
        f"path {case['path_fit_s']:.3f} s (extraction {case['extraction_s']:.3f} s; with the table's evaluation "
        f"{case['path_s']:.3f} s) vs {case['n_lams']} cold fits {case['cold_fits_s']:.3f} s = "
        f"{case['speedup_vs_cold_fits']:.2f}x less time; vs the cold solves alone {case['cold_solves_s']:.3f} s = "
        f"{case['speedup_vs_cold_solves']:.2f}x; path = {case['path_vs_one_fit']:.2f} x one cold fit "
        f"({case['one_cold_fit_s']:.3f} s); stages with more steps on the path: "
        f"{case['stages_with_more_steps_on_the_path']} of the "
        f"{2 * case['n_lams'] - case['stages_not_certified_by_both']} stages both certified; "
        f"max relative objective difference {case['max_objective_rel_diff']:.1e}; medians of "
        f"{case['repeats']} rounds (speedup per round: "
        f"{', '.join(f'{v:.2f}x' for v in case['speedups_per_round'])})"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="64")
    parser.add_argument("--n-lams", type=int, default=20)
    parser.add_argument("--lam-ratio", type=float, default=1e-5)
    parser.add_argument("--kappa", type=float, default=0.95)
    parser.add_argument("--max-iter", type=int, default=None, help="cap the solver (default: its own)")
    parser.add_argument("--check-every", type=int, default=None, help="ADMM steps between certificates")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of (path, cold fits); medians")
    parser.add_argument(
        "--ray-workers", type=int, default=0, help="RayADMMSolver (gram) on this many started local actors"
    )
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    machine = f"{platform.machine()}, {torch.get_num_threads()} thread(s), torch {torch.__version__}"
    if args.ray_workers:
        import ray

        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        machine += f", RayADMMSolver on {args.ray_workers} started actors (ray {ray.__version__})"
    print(f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; {machine}")
    cases = []
    for p in (int(s) for s in args.sizes.split(",")):
        case = run_case(p, args)
        report(case)
        cases.append(case)
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "cases": cases}, indent=2) + "\n")
    if POOL:
        import ray

        POOL[0].shutdown()
        ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
