"""A solver actor SIGKILLed at any phase of a solve (start, load, Gram reduction, factorisation, the steps
whose reply carries the weights, the gather after max_iter) is recreated and the solve ends with the answer of
an undisturbed run; a second loss within the restart budget too; one loss past the budget is one
DistributedError naming the actor and the phase.

The kills go through ``WorkerPool.phase_hook``, called when a phase is about to send its calls: the
victim's process is SIGKILLed and gone before the calls leave, so the phase always meets a dead actor.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
import ray
import torch
from distributed_helpers import TIMEOUT_S, random_problem, shard

from idl_ray.distributed import RayADMMSolver, RayRunConfig, WorkerPool
from idl_ray.errors import DistributedError
from idl_ray.sim.solvers.admm import ADMMSolver

TOL = dict(abs_tol=1e-10, rel_tol=1e-8)


def _gone(pid: int) -> bool:
    """The process is a zombie or no longer exists (reaped between opening its status file and reading it:
    ProcessLookupError)."""
    try:
        with open(f"/proc/{pid}/status") as handle:
            return any(line.split()[1:2] == ["Z"] for line in handle if line.startswith("State:"))
    except (FileNotFoundError, ProcessLookupError):
        return True


class PhaseKiller:
    """SIGKILL worker ``rank`` when the phase named in ``plan`` (phase -> rank) first starts."""

    def __init__(self, plan: dict[str, int]) -> None:
        self.plan = dict(plan)
        self.killed: list[tuple[str, int, int]] = []  # (phase, rank, pid)

    def __call__(self, phase: str, pool: WorkerPool) -> None:
        if phase not in self.plan:
            return
        rank = self.plan.pop(phase)
        pid = pool.infos[rank].get("pid") if pool.infos and pool.infos[rank] else None
        if pid is None:  # still starting: wait until it runs, then kill its process
            pid = ray.get(pool.actors[rank].info.remote(), timeout=TIMEOUT_S)["pid"]
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while not _gone(pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert _gone(pid), f"actor process {pid} survived SIGKILL"
        self.killed.append((phase, rank, pid))


@pytest.fixture(scope="module")
def problem():
    return random_problem(m=600, seed=7)


@pytest.fixture(scope="module")
def reference(problem):
    return ADMMSolver(device="cpu", **TOL).solve(problem)


def _solver(**kwargs) -> RayADMMSolver:
    settings = dict(num_workers=2, use_gpu=False, cpus_per_worker=0.1, timeout_s=TIMEOUT_S, **TOL)
    settings.update(kwargs)
    return RayADMMSolver(**settings)


@pytest.fixture(scope="module")
def pool(ray_cluster):
    """Started actors shared by the tests (a killed one is recreated inside the pool, which stays usable);
    only the start-up test needs a pool of its own."""
    started = WorkerPool(
        RayRunConfig(num_workers=2, cpus_per_worker=0.1, use_gpu=False, timeout_s=TIMEOUT_S, max_restarts=2)
    )
    yield started
    started.shutdown()


@pytest.fixture(scope="module")
def undisturbed(problem, pool):
    """The Ray answers without any kill, per strategy (the killed runs must reproduce them)."""
    sharded = shard(problem, 2)
    return {
        strategy: RayADMMSolver(strategy=strategy, workers=pool, **TOL).solve(sharded)
        for strategy in ("gram", "consensus")
    }


@pytest.mark.parametrize(
    ("strategy", "phase"),
    [
        ("gram", "start"),
        ("gram", "load"),
        ("gram", "gram"),
        ("gram", "factor"),
        # the steps: their reply carries the finished blocks' weights (the final gather)
        ("gram", "run_rows"),
        ("consensus", "load"),
        ("consensus", "factor"),
    ],
)
def test_a_kill_at_any_phase_is_survived_with_the_same_answer(
    strategy, phase, problem, reference, undisturbed, pool, monkeypatch
):
    killer = PhaseKiller({phase: 1})
    monkeypatch.setattr(WorkerPool, "phase_hook", killer)
    # a fresh pool for the start-up kill; the shared, started one for the later phases
    solver = (
        _solver(strategy=strategy)
        if phase == "start"
        else RayADMMSolver(strategy=strategy, workers=pool, **TOL)
    )
    result = solver.solve(shard(problem, 2))
    assert [k[0] for k in killer.killed] == [phase]
    assert result.stats.extra["restarts"] == 1
    assert result.stats.converged
    plain = undisturbed[strategy]
    # the lost phase is repeated (or replayed from the checkpoint): the undisturbed run's iterates
    assert result.stats.iterations == plain.stats.iterations
    assert torch.allclose(result.weights, plain.weights, atol=1e-10, rtol=0)
    assert torch.allclose(result.weights, reference.weights, atol=1e-4)


def test_a_kill_during_the_gather_after_max_iter_replays_from_the_checkpoint(problem, pool, monkeypatch):
    def solver():  # plain ADMM (no acceleration or polish): 20 steps do not certify this problem
        plain = {"anderson": 0, "polish": False}
        return RayADMMSolver(workers=pool, max_iter=20, checkpoint_every=5, warn=False, **TOL, **plain)

    plain = solver().solve(problem)
    assert not plain.stats.converged and plain.stats.iterations == 20
    killer = PhaseKiller({"weights": 0})
    monkeypatch.setattr(WorkerPool, "phase_hook", killer)
    result = solver().solve(problem)
    assert len(killer.killed) == 1 and result.stats.extra["restarts"] == 1
    assert result.stats.iterations == 20
    assert torch.allclose(result.weights, plain.weights, atol=1e-12, rtol=0)


def test_two_losses_within_the_budget_are_both_recovered(problem, undisturbed, pool, monkeypatch):
    assert pool.config.max_restarts == 2
    killer = PhaseKiller({"load": 0, "factor": 1})
    monkeypatch.setattr(WorkerPool, "phase_hook", killer)
    result = RayADMMSolver(workers=pool, **TOL).solve(shard(problem, 2))
    assert [k[0] for k in killer.killed] == ["load", "factor"]
    assert result.stats.extra["restarts"] == 2
    assert torch.allclose(result.weights, undisturbed["gram"].weights, atol=1e-10, rtol=0)


def test_one_loss_past_the_budget_is_one_clear_error(problem, monkeypatch):
    killer = PhaseKiller({"load": 0, "factor": 1})
    monkeypatch.setattr(WorkerPool, "phase_hook", killer)
    with pytest.raises(DistributedError) as info:
        _solver(max_restarts=1).solve(shard(problem, 2))
    message = str(info.value)
    assert "Solver actor 1" in message and "'factor'" in message
    assert "max_restarts=1" in message and "restart budget is spent" in message
    assert str(killer.killed[1][2]) in message  # the lost process is named


def test_a_shared_pool_actor_lost_between_solves_is_recreated(problem, undisturbed, pool):
    pid = pool.infos[0]["pid"]
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while not _gone(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    result = RayADMMSolver(workers=pool, **TOL).solve(shard(problem, 2))
    assert pid not in result.stats.extra["pids"]
    assert torch.allclose(result.weights, undisturbed["gram"].weights, atol=1e-10, rtol=0)


def test_a_finished_solve_gathers_the_weights_with_the_last_steps(problem, undisturbed, pool, monkeypatch):
    """When every block finishes, the weights come back with the last run_rows reply: no separate 'weights'
    round trip (each costs a few ms on the ~0.1 s solves of the idl-ray sim job), the same answer."""
    phases: list[str] = []
    monkeypatch.setattr(WorkerPool, "phase_hook", lambda phase, _pool: phases.append(phase))
    result = RayADMMSolver(workers=pool, **TOL).solve(shard(problem, 2))
    assert "run_rows" in phases and "weights" not in phases
    assert result.stats.converged
    assert torch.allclose(result.weights, undisturbed["gram"].weights, atol=1e-10, rtol=0)
