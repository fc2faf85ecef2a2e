"""Consensus ADMM on Ray vs the single-process ADMMSolver on the 784-input digits teacher with biases.

The issue-9 goal: ``RayADMMSolver(num_workers=2, strategy="consensus")`` reaches the single-process optimum
(objective within 1e-5 relative, the same test predictions) in <= 60 s. Both fits go through ``SIM.fit`` at
defaults (kappa 0.95, lam 1e-4); the consensus fit keeps the samples and shards them over 2 workers.
Prints per stage: time, iterations, converged, relative duality gap, objective and its relative difference;
then the test accuracy of both models and the fraction of equal test predictions.

    PYTHONPATH=$PWD python benchmarks/bench_consensus.py [--p 784] [--max-iter 20000]
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_sim import digits_data, train_teacher

from idl_ray.sim.estimator import SIM
from idl_ray.sim.solvers import ADMMSolver


def stage_weights(sim: SIM) -> dict[str, torch.Tensor]:
    return {"stage1": torch.cat([sim.A_, sim.B_], dim=1), "stage2": torch.cat([sim.C_, sim.D_], dim=1)}


def report(name: str, sim: SIM, reference: SIM, total: float, caught: list[str], Xte, yte) -> None:
    """Print one fit's stages against the reference (single-process) fit, as soon as it is done."""
    print(f"== {name}: whole fit {total:.1f} s, m={sim.n_samples_}; warnings: {caught or 'none'}", flush=True)
    weights = stage_weights(sim)
    for stage in ("stage1", "stage2"):
        stats = sim.stats_[stage]
        # stage 1 is scored on the reference's problem; stage 2 depends on stage 1's (A, B), so on its own
        problem = reference.problems_[stage] if stage == "stage1" else sim.problems_[stage]
        objective = problem.objective(weights[stage])
        ref_obj = reference.problems_[stage].objective(stage_weights(reference)[stage])
        print(
            f"  {stage}: {stats.time_s:.2f} s, {stats.iterations} it, converged={stats.converged}, "
            f"rel gap={stats.relative_gap:.2e}, objective={objective:.10g} "
            f"(rel diff vs admm {(objective - ref_obj) / abs(ref_obj):+.2e}), polished rows "
            f"{stats.extra.get('polished_rows')}",
            flush=True,
        )
    pred = sim.predict(Xte).argmax(1)
    ref_pred = reference.predict(Xte).argmax(1)
    print(
        f"  test accuracy {float((pred == yte).double().mean()):.4f}, "
        f"same predictions as admm: {float((pred == ref_pred).double().mean()):.4f}",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--p", type=int, default=784)
    parser.add_argument("--kappa", type=float, default=0.95)
    parser.add_argument("--max-iter", type=int, default=20_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--log-every", type=int, default=500, help="consensus progress line every this many")
    args = parser.parse_args(argv)
    import ray

    from idl_ray.distributed import RayADMMSolver

    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    Xtr, ytr, Xte, yte = digits_data(args.p)
    teacher = train_teacher(args.p, Xtr, ytr, hidden=(64, 32), bias=True)  # the teacher of issue 9
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    reference = None
    for name, solver in (
        ("admm", ADMMSolver(device="cpu", max_iter=args.max_iter)),
        (
            "ray-consensus",
            RayADMMSolver(
                num_workers=args.workers,
                strategy="consensus",
                cpus_per_worker=0.5,
                max_iter=args.max_iter,
                log_every=args.log_every,
            ),
        ),
    ):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            start = time.perf_counter()
            sim = SIM(activation="relu", kappa=args.kappa).fit(teacher, Xtr, solver=solver)
            total = time.perf_counter() - start
        reference = reference or sim
        report(name, sim, reference, total, [str(w.message)[:200] for w in caught], Xte, yte)
    ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
