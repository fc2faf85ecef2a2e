"""The dual active-set method on vs off, side by side: ``SIM.fit`` at defaults over the sparsity grid.

The same teacher as ``bench_sim_grid.py`` (digits upsampled to 28x28, a p-64-32-10 ReLU MLP with biases, or
8x8 with ``--sizes 64``), fitted at every lam by ``ADMMSolver()`` and by ``ADMMSolver(active_set=False)``
(the seventh session's route: ADMM, the interior-point hand-over, the vertex step), alternating, ``--rounds``
times each. Printed per lam: the median whole fit (extraction + both stages) and per stage, the ratio off/on,
both objectives (their relative difference) and the nonzeros of [A B].

Usage::

    python benchmarks/bench_active_set.py --sizes 784 --threads 1 --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from bench_sim import digits_data, train_teacher

from idl_ray.sim.estimator import SIM
from idl_ray.sim.solvers import ADMMSolver

LAMS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2)


def fit(model, X, lam: float, kappa: float, active_set: bool) -> dict:
    sim = SIM(activation="relu", kappa=kappa, lam=lam, progress=False)
    start = time.perf_counter()
    sim.fit(model, X, solver=ADMMSolver(active_set=active_set))
    total = time.perf_counter() - start
    stats = sim.stats_
    return {
        "total": total,
        "stage1": stats["stage1"].time_s,
        "stage2": stats["stage2"].time_s,
        "objective": stats["stage1"].objective + stats["stage2"].objective,
        "converged": stats["stage1"].converged and stats["stage2"].converged,
        "nnz": int((sim.A_ != 0).sum() + (sim.B_ != 0).sum()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="784")
    parser.add_argument("--lams", default=",".join(str(v) for v in LAMS))
    parser.add_argument("--kappa", type=float, default=0.95)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, rounds {args.rounds}", flush=True)
    for p in (int(v) for v in args.sizes.split(",")):
        X, y, _, _ = digits_data(p)
        model = train_teacher(p, X, y, hidden=(64, 32), bias=True)
        for lam in (float(v) for v in args.lams.split(",")):
            runs: dict[bool, list[dict]] = {True: [], False: []}
            for _ in range(args.rounds):
                for active_set in (True, False):
                    runs[active_set].append(fit(model, X, lam, args.kappa, active_set))

            def median(on: bool, key: str, runs=runs) -> float:
                return statistics.median(r[key] for r in runs[on])

            on_obj, off_obj = runs[True][0]["objective"], runs[False][0]["objective"]
            converged = all(r["converged"] for rs in runs.values() for r in rs)
            print(
                f"p={p} lam={lam:g}: fit on {median(True, 'total'):.2f}s off {median(False, 'total'):.2f}s "
                f"= {median(False, 'total') / median(True, 'total'):.2f}x | stage1 {median(True, 'stage1'):.2f}"
                f" vs {median(False, 'stage1'):.2f}s | stage2 {median(True, 'stage2'):.2f} vs "
                f"{median(False, 'stage2'):.2f}s | objective on-off {(on_obj - off_obj) / abs(off_obj):+.1e} "
                f"| nnz {runs[True][0]['nnz']} vs {runs[False][0]['nnz']} | all certified {converged}",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
