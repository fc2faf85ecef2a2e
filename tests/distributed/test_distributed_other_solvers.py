"""RayProjectedGDSolver (the summed Gram, or a gradient summed every step) and RayCVXSolver (row blocks as
tasks) vs single process."""

from __future__ import annotations

import pytest
import torch
from distributed_helpers import TIMEOUT_S, random_problem, relative_gap, shard

from idl_ray.distributed import RayCVXSolver, RayProjectedGDSolver
from idl_ray.errors import ConvergenceWarning
from idl_ray.sim.solvers.admm import ADMMSolver
from idl_ray.sim.solvers.cvx import CVXSolver
from idl_ray.sim.solvers.projected_gd import ProjectedGDLowRankSolver


@pytest.fixture(scope="module")
def problem():
    return random_problem(m=800, n=6, p=8, seed=7)


@pytest.fixture(scope="module")
def reference(problem):
    return ADMMSolver(device="cpu", gap_tol=1e-10).solve(problem)


@pytest.mark.parametrize("strategy", ["gram", "data"])
def test_projected_gd_full_rank_matches_admm(strategy, problem, reference, worker_pools):
    solver = RayProjectedGDSolver(workers=worker_pools(2), tol=1e-10, timeout_s=TIMEOUT_S, strategy=strategy)
    result = solver.solve(problem)
    assert result.stats.converged and result.stats.extra["strategy"] == strategy
    assert relative_gap(result.stats.objective, reference.stats.objective) < 1e-5
    assert result.stats.constraint_violation == 0.0
    single = ProjectedGDLowRankSolver(device="cpu", tol=1e-10).solve(problem)
    assert torch.allclose(result.weights, single.weights, atol=1e-5)


@pytest.mark.parametrize("strategy", ["gram", "data"])
def test_projected_gd_low_rank_keeps_the_bound_and_matches_single_process(strategy, problem, worker_pools):
    kwargs = dict(rank=2, max_iter=300, lr=2e-2)
    with pytest.warns(ConvergenceWarning, match="low-rank Adam"):  # 300 Adam steps: its test is not met
        ours = RayProjectedGDSolver(
            workers=worker_pools(2), timeout_s=TIMEOUT_S, strategy=strategy, **kwargs
        ).solve(problem)
    with pytest.warns(ConvergenceWarning, match="low-rank Adam"):
        single = ProjectedGDLowRankSolver(device="cpu", **kwargs).solve(problem)
    assert ours.stats.constraint_violation == 0.0
    assert torch.linalg.matrix_rank(ours.weights[:, : problem.n_constrained]) <= 2
    # same steps on the same gradient (summed in another order): the same answer to rounding
    assert relative_gap(ours.stats.objective, single.stats.objective) < 1e-6


@pytest.mark.parametrize("strategy", ["gram", "data"])
def test_projected_gd_on_a_sharded_problem(strategy, problem, reference, worker_pools):
    sharded = shard(problem, 2)
    solver = RayProjectedGDSolver(workers=worker_pools(2), tol=1e-10, timeout_s=TIMEOUT_S, strategy=strategy)
    result = solver.solve(sharded)
    assert relative_gap(result.stats.objective, reference.stats.objective) < 1e-5
    assert result.stats.extra["num_workers"] == 2  # the shards were loaded into the actors


def test_the_gram_strategy_is_the_single_process_solve_on_the_summed_gram(problem, worker_pools):
    """The actors' shard Grams summed once, then no round trip per step: the same iterations and weights as
    ProjectedGDLowRankSolver on the same problem (the sum's rounding aside), where the data strategy pays a
    gradient round trip per step."""
    sharded = shard(problem, 2)
    single = ProjectedGDLowRankSolver(device="cpu").solve(problem)
    gram = RayProjectedGDSolver(workers=worker_pools(2), timeout_s=TIMEOUT_S).solve(sharded)
    assert gram.stats.converged and gram.stats.iterations == single.stats.iterations
    torch.testing.assert_close(gram.weights, single.weights, atol=1e-9, rtol=0)
    assert "gradient_calls" not in gram.stats.extra
    data = RayProjectedGDSolver(workers=worker_pools(2), timeout_s=TIMEOUT_S, strategy="data").solve(sharded)
    assert data.stats.extra["gradient_calls"] >= data.stats.iterations


def test_cvx_as_ray_tasks_matches_single_process_cvx(problem, reference):
    ours = RayCVXSolver(num_tasks=3, cpus_per_worker=0.5, timeout_s=TIMEOUT_S).solve(problem)
    single = CVXSolver().solve(problem)
    assert ours.stats.extra["tasks"] == 3
    assert torch.allclose(ours.weights, single.weights, atol=1e-6)  # same programs; warm starts differ
    assert relative_gap(ours.stats.objective, reference.stats.objective) < 1e-5
    assert ours.stats.constraint_violation == 0.0
