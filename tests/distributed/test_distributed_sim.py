"""SIM on a digits MLP teacher with the Ray solvers: the single-process answer, stage by stage."""

from __future__ import annotations

import pytest
import torch
from distributed_helpers import TIMEOUT_S, relative_gap

from idl_ray.datasets import load_dataset
from idl_ray.distributed import RayADMMSolver
from idl_ray.sim.estimator import SIM
from idl_ray.sim.solvers.admm import ADMMSolver
from idl_ray.teachers import mlp_teacher, train_classifier

TOL = dict(gap_tol=1e-9, abs_tol=1e-9, rel_tol=1e-7, max_iter=20_000)


@pytest.fixture(scope="module")
def digits_teacher():
    split = load_dataset("digits")
    torch.manual_seed(0)
    teacher = mlp_teacher(split.num_features, [32, 16], split.num_classes, bias=True)
    train_classifier(teacher, split, epochs=8, seed=0)
    return teacher, split


# Consensus ADMM needs more iterations than the Gram form on ill-conditioned stages (digits' stage 2 with
# a tiny lam: ~2x), each one a round trip; an elastic-net fit keeps its test short. The gram strategy
# replays the single-process iterations, so it is tested on the plain lasso.
SETTINGS = {
    "gram": dict(kappa=0.9, lam=1e-4),
    "consensus": dict(kappa=0.9, lam=1e-3, l2=1e-2, variant="elastic_net"),
}


@pytest.mark.parametrize("strategy", ["gram", "consensus"])
def test_sim_with_ray_solver_matches_single_process(strategy, digits_teacher, worker_pools):
    teacher, split = digits_teacher
    reference = SIM(**SETTINGS[strategy]).fit(teacher, split.x_train, solver=ADMMSolver(device="cpu", **TOL))
    solver = RayADMMSolver(strategy=strategy, workers=worker_pools(2), timeout_s=TIMEOUT_S, **TOL)
    sim = SIM(**SETTINGS[strategy]).fit(teacher, split.x_train, solver=solver)
    for stage in ("stage1", "stage2"):
        ours, ref = sim.stats_[stage], reference.stats_[stage]
        assert ours.converged
        assert relative_gap(ours.objective, ref.objective) < 1e-5, stage
        assert ours.constraint_violation == 0.0
    assert float(sim.A_.abs().sum(dim=1).max()) <= 0.9
    ours_acc = sim.score(split.x_test, split.y_test)
    ref_acc = reference.score(split.x_test, split.y_test)
    assert abs(ours_acc - ref_acc) <= 0.01
    if strategy == "consensus":  # SIM kept the samples, so the shards are real sample shards
        assert sim.problems_["stage1"].samples is not None


def test_sim_fit_holds_a_ray_solvers_actors_for_both_stages(digits_teacher):
    """A RayADMMSolver without keep_workers serves both stages of one fit from the same actors (one
    start-up per fit, not per stage) and stops them when the fit ends."""
    teacher, split = digits_teacher
    solver = RayADMMSolver(num_workers=1, use_gpu=False, cpus_per_worker=0.2, timeout_s=TIMEOUT_S, **TOL)
    first = SIM(kappa=0.9, lam=1e-4).fit(teacher, split.x_train, solver=solver)
    second = SIM(kappa=0.9, lam=1e-4).fit(teacher, split.x_train, solver=solver)
    pids = [tuple(sim.stats_[s].extra["pids"]) for sim in (first, second) for s in ("stage1", "stage2")]
    assert pids[0] == pids[1] and pids[2] == pids[3]
    assert set(pids[0]).isdisjoint(pids[2])  # the first fit's actor was stopped
    for sim in (first, second):
        assert sim.stats_["stage1"].converged and sim.stats_["stage2"].converged
