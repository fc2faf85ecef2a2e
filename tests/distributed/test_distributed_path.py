"""The lambda path on Ray: one pool, H shipped and factored once per worker, each point warm-started and
equal to the single-process path."""

from __future__ import annotations

import pytest
import torch
from distributed_helpers import TIMEOUT_S, random_problem
from torch import nn

from idl_ray.distributed import RayADMMSolver
from idl_ray.sim import SIM
from idl_ray.sim.solvers.admm import ADMMSolver

TOL = dict(gap_tol=1e-11, max_iter=20_000)


@pytest.fixture(scope="module")
def teacher_and_inputs():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double().eval().requires_grad_(False)
    inputs = torch.randn(800, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    return teacher, inputs


def sim() -> SIM:
    return SIM(activation="tanh", kappa=0.8, dtype=torch.float64, device="cpu")


def test_path_on_one_pool_ships_the_gram_once(teacher_and_inputs):
    teacher, inputs = teacher_and_inputs
    local = sim().fit_path(teacher, inputs, n_lams=4, solver=ADMMSolver(device="cpu", **TOL))
    solver = RayADMMSolver(
        num_workers=2, use_gpu=False, cpus_per_worker=0.2, keep_workers=True, timeout_s=TIMEOUT_S, **TOL
    )
    with solver:
        ray_path = sim().fit_path(teacher, inputs, lams=local.lams, solver=solver)
        pids = {tuple(m.stats_[s].extra["pids"]) for m in ray_path.models for s in ("stage1", "stage2")}
    assert len(pids) == 1  # the same two actors served all 8 solves
    shipped = [m.stats_[s].extra["gram_shipped"] for m in ray_path.models for s in ("stage1", "stage2")]
    # each worker got the equilibrated stage-1 H and the stage-2 H once; later points reuse both
    assert shipped == [2, 2] + [0] * 6
    for ours, reference in zip(ray_path.models, local.models):
        for stage in ("stage1", "stage2"):
            assert ours.stats_[stage].converged
            a, b = ours.stats_[stage].objective, reference.stats_[stage].objective
            assert abs(a - b) <= 1e-8 * max(abs(b), 1e-12) + 1e-12
        W = torch.cat([ours.A_, ours.B_], dim=1)
        V = torch.cat([reference.A_, reference.B_], dim=1)
        assert float((W - V).norm()) <= 1e-5 * max(float(V.norm()), 1e-12) + 1e-9
    assert ray_path.rows[0]["nnz"] == 0 and ray_path.rows[-1]["nnz"] > 0


def test_ray_solver_starts_from_initial(worker_pools):
    problem = random_problem()
    reference = ADMMSolver(device="cpu", **TOL).solve(problem)
    solver = RayADMMSolver(workers=worker_pools(2), timeout_s=TIMEOUT_S, **TOL)
    cold = solver.solve(problem)
    warm = solver.solve(problem, initial=reference.weights)
    assert warm.stats.converged and cold.stats.converged
    assert warm.stats.iterations <= cold.stats.iterations
    assert torch.allclose(warm.weights, reference.weights, atol=1e-6)
    # the shared pool kept the factored H from the first solve of the same problem
    assert cold.stats.extra["gram_shipped"] == 2 and warm.stats.extra["gram_shipped"] == 0
    other = solver.solve(random_problem(seed=4))  # another Gram is shipped again
    assert other.stats.extra["gram_shipped"] == 2


def test_a_path_keeps_a_solvers_actors_for_its_length_only(teacher_and_inputs):
    """Without keep_workers the path holds the actors in a session: every solve on the same ones, the
    Gram shipped once per stage, and the actors stopped when the path ends."""
    teacher, inputs = teacher_and_inputs
    solver = RayADMMSolver(num_workers=1, use_gpu=False, cpus_per_worker=0.2, timeout_s=TIMEOUT_S, **TOL)
    path = sim().fit_path(teacher, inputs, n_lams=2, solver=solver)
    pids = {tuple(m.stats_[s].extra["pids"]) for m in path.models for s in ("stage1", "stage2")}
    assert len(pids) == 1
    shipped = [m.stats_[s].extra["gram_shipped"] for m in path.models for s in ("stage1", "stage2")]
    assert shipped == [1, 1, 0, 0]
    # stopped at the end: the next solve starts a new actor
    after = solver.solve(path.models[0].problems_["stage2"])
    assert set(after.stats.extra["pids"]).isdisjoint(pids.pop())
