"""Both strategies give the single-process ADMM answer, whatever the number of workers."""

from __future__ import annotations

import pytest
import torch
from distributed_helpers import TIMEOUT_S, random_problem, relative_gap, shard

from idl_ray.distributed import RayADMMSolver, ShardedProblem
from idl_ray.errors import ConfigError
from idl_ray.sim.problem import SIMProblem
from idl_ray.sim.solvers.admm import ADMMSolver

# gap_tol for the certified solvers (single process, gram), abs/rel_tol for consensus's residual test
TOL = dict(gap_tol=1e-10, abs_tol=1e-10, rel_tol=1e-8, max_iter=20_000)


@pytest.fixture
def ray_solver(worker_pools):
    """A RayADMMSolver on a shared, already started pool of ``workers`` actors."""

    def make(strategy: str, workers: int, **kwargs) -> RayADMMSolver:
        return RayADMMSolver(
            strategy=strategy, workers=worker_pools(workers), timeout_s=TIMEOUT_S, **{**TOL, **kwargs}
        )

    return make


@pytest.fixture(scope="module")
def problem():
    return random_problem()


@pytest.fixture(scope="module")
def reference(problem):
    return ADMMSolver(device="cpu", **TOL).solve(problem)


def check_same_answer(result, reference, problem):
    assert result.stats.converged
    assert relative_gap(result.stats.objective, reference.stats.objective) < 1e-5
    assert result.stats.constraint_violation == 0.0
    assert problem.constraint_norm(result.weights) <= problem.kappa
    assert torch.allclose(result.weights, reference.weights, atol=1e-4)


@pytest.mark.parametrize("strategy", ["gram", "consensus"])
def test_one_two_three_workers_match_single_process(strategy, problem, reference, ray_solver):
    answers = []
    for workers in (1, 2, 3):
        result = ray_solver(strategy, workers).solve(problem)
        check_same_answer(result, reference, problem)
        answers.append(result.weights)
        extra = result.stats.extra
        assert extra["num_workers"] == workers and extra["devices"] == ["cpu"] * workers
        assert set(extra["timings"]) >= {"load", "gram", "factor", "iterations", "communication"}
    assert torch.allclose(answers[0], answers[1], atol=1e-5)
    assert torch.allclose(answers[0], answers[2], atol=1e-5)


def test_gram_strategy_certifies_each_block_in_one_round_trip(problem, reference, ray_solver):
    result = ray_solver("gram", 2).solve(problem)
    # every worker runs its block to its own certificate: one round trip of iterations, no driver decision
    assert result.stats.converged and len(result.stats.history) == 1
    assert result.stats.history[0]["relative_gap"] <= 1e-10
    assert result.stats.relative_gap <= 1e-10 and reference.stats.relative_gap <= 1e-10
    # the optimum is unique here (full-rank Gram): the same weights as the single process
    assert torch.allclose(result.weights, reference.weights, atol=1e-7)


@pytest.mark.parametrize("strategy", ["gram", "consensus"])
def test_elastic_net_and_no_constraint(strategy, ray_solver):
    for problem in (random_problem(l2=0.05, seed=1), random_problem(kappa=None, seed=2, keep_samples=False)):
        reference = ADMMSolver(device="cpu", **TOL).solve(problem)
        result = ray_solver(strategy, 2).solve(problem)
        assert relative_gap(result.stats.objective, reference.stats.objective) < 1e-5
        assert result.stats.constraint_violation == 0.0


def test_more_workers_than_rows(ray_solver):
    problem = random_problem(m=300, n=2, p=4)
    reference = ADMMSolver(device="cpu", **TOL).solve(problem)
    result = ray_solver("gram", 3).solve(problem)
    assert relative_gap(result.stats.objective, reference.stats.objective) < 1e-5


@pytest.mark.parametrize("strategy", ["gram", "consensus"])
def test_sharded_problem_from_the_object_store(strategy, problem, reference, ray_solver):
    sharded = shard(problem, 4)
    result = ray_solver(strategy, 2).solve(sharded)  # 4 shards dealt to 2 workers
    check_same_answer(result, reference, problem)
    assert result.stats.extra["timings"]["gram"] > 0


def test_kept_workers_serve_several_solves(problem, reference):
    solver = RayADMMSolver(
        num_workers=2, use_gpu=False, cpus_per_worker=0.2, keep_workers=True, timeout_s=TIMEOUT_S, **TOL
    )
    with solver:
        first = solver.solve(problem)
        pool = solver._pool
        second = solver.solve(random_problem(seed=3))
        assert solver._pool is pool
        check_same_answer(first, reference, problem)
        assert second.stats.converged
    assert solver._pool is None


def test_workers_started_early_serve_the_solve(problem, reference):
    """start_workers() starts the kept actors on a thread; the solve waits for them and uses them (same pids);
    without keep_workers it is refused, and a start that fails is raised by the solve that waits for it."""
    solver = RayADMMSolver(
        num_workers=2, use_gpu=False, cpus_per_worker=0.2, keep_workers=True, timeout_s=TIMEOUT_S, **TOL
    )
    with solver:
        solver.start_workers()
        solver.start_workers()  # a second call while starting: no second pool
        result = solver.solve(problem)
        pool = solver._pool
        assert pool is not None and result.stats.extra["pids"] == [i["pid"] for i in pool.infos]
        check_same_answer(result, reference, problem)
    with pytest.raises(ConfigError, match="keep_workers=True"):
        RayADMMSolver(num_workers=1, cpus_per_worker=0.2).start_workers()
    too_big = RayADMMSolver(num_workers=1, cpus_per_worker=10_000, keep_workers=True, timeout_s=TIMEOUT_S)
    too_big.start_workers()
    with pytest.raises(Exception, match="CPU"):
        too_big.solve(problem)
    too_big.close()


def test_reduce_returns_the_single_process_problem(problem, ray_solver):
    sharded = ShardedProblem.from_tensors(
        problem.samples.features, problem.samples.targets, num_shards=2, n_constrained=problem.n_constrained
    )
    reduced = ray_solver("gram", 2).reduce(sharded)
    assert reduced.num_samples == problem.num_samples
    assert torch.allclose(reduced.G, problem.G) and torch.allclose(reduced.Rt, problem.Rt)


def test_gram_workers_take_the_least_squares_start_as_the_single_process(ray_solver):
    """lam = 0 on a rank-deficient Gram: each worker starts its rows at the least-squares fit (from its own
    factor), as ADMMSolver does, so the Ray solve takes the single-process steps, not a cold start's."""
    g = torch.Generator().manual_seed(5)
    features = torch.randn(600, 4, generator=g, dtype=torch.float64) @ torch.randn(
        4, 24, generator=g, dtype=torch.float64
    )  # rank 4 of 24
    targets = features @ (0.1 * torch.randn(24, 10, generator=g, dtype=torch.float64))
    targets = targets + 0.05 * torch.randn(600, 10, generator=g, dtype=torch.float64)
    problem = SIMProblem.from_samples(features, targets, n_constrained=10, lam=0.0, kappa=0.9)
    single = ADMMSolver(device="cpu", **TOL).solve(problem)
    warm = ray_solver("gram", 2).solve(problem)
    cold = ray_solver("gram", 2, warm_start=False).solve(problem)
    assert single.stats.converged and warm.stats.converged and cold.stats.converged
    assert warm.stats.iterations == single.stats.iterations < cold.stats.iterations
    assert relative_gap(warm.stats.objective, single.stats.objective) < 1e-9
    assert relative_gap(cold.stats.objective, single.stats.objective) < 1e-6
    assert warm.stats.constraint_violation == 0.0
