"""Per-entry l1 weights on Ray: the gram strategy (row blocks with their weights), the consensus strategy
and the distributed FISTA equal the single-process ADMM answer, which tests/sim/test_l1_weights.py checks
against Clarabel; the low-rank fit, which cannot honour weights, says so."""

from __future__ import annotations

import pytest
import torch
from distributed_helpers import TIMEOUT_S, random_problem, relative_gap

from idl_ray.distributed import RayADMMSolver, RayProjectedGDSolver
from idl_ray.errors import ConfigError
from idl_ray.sim.solvers.admm import ADMMSolver

TOL = dict(gap_tol=1e-10, max_iter=20_000)


@pytest.fixture(scope="module")
def weighted():
    problem = random_problem(m=400, n=6, p=8, lam=5e-3)
    generator = torch.Generator().manual_seed(1)
    weights = 0.2 + 2.8 * torch.rand(problem.rows, problem.dim, generator=generator, dtype=torch.float64)
    weights[torch.rand(problem.rows, problem.dim, generator=generator) < 0.2] = torch.inf
    return problem.replace(l1_weights=weights)


@pytest.mark.parametrize("workers", [1, 3])
def test_gram_strategy_equals_single_process_with_weights(weighted, worker_pools, workers):
    reference = ADMMSolver(device="cpu", **TOL).solve(weighted)
    solver = RayADMMSolver(strategy="gram", workers=worker_pools(workers), timeout_s=TIMEOUT_S, **TOL)
    result = solver.solve(weighted)
    assert result.stats.converged
    held = torch.isinf(weighted.l1_weights)
    assert bool((result.weights[held] == 0).all())
    assert relative_gap(result.stats.objective, reference.stats.objective) < 1e-7
    assert torch.allclose(result.weights, reference.weights, atol=1e-5)
    # the weights matter: the unweighted optimum is a different point with a higher weighted objective
    unweighted = ADMMSolver(device="cpu", **TOL).solve(weighted.replace(l1_weights=None))
    assert weighted.objective(unweighted.weights) > result.stats.objective * (1 + 1e-4)


@pytest.mark.parametrize("make", ["consensus", "projected_gd", "projected_gd_data"])
def test_consensus_and_distributed_fista_honour_weights(weighted, worker_pools, make):
    reference = ADMMSolver(device="cpu", **TOL).solve(weighted)
    if make == "consensus":
        solver = RayADMMSolver(
            strategy="consensus", workers=worker_pools(2), timeout_s=TIMEOUT_S, gap_tol=1e-9, max_iter=20_000
        )
    else:
        strategy = "data" if make == "projected_gd_data" else "gram"
        solver = RayProjectedGDSolver(
            workers=worker_pools(2), timeout_s=TIMEOUT_S, gap_tol=1e-9, strategy=strategy
        )
    result = solver.solve(weighted)
    assert result.stats.converged
    assert bool((result.weights[torch.isinf(weighted.l1_weights)] == 0).all())
    assert relative_gap(result.stats.objective, reference.stats.objective) < 1e-6


@pytest.mark.parametrize("strategy", ["gram", "data"])
def test_low_rank_fit_rejects_weights(strategy, weighted, worker_pools):
    solver = RayProjectedGDSolver(rank=2, workers=worker_pools(1), timeout_s=TIMEOUT_S, strategy=strategy)
    with pytest.raises(ConfigError, match=r"RayProjectedGDSolver.*low-rank.*l1_weights"):
        solver.solve(weighted)
