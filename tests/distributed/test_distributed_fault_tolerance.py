"""An actor killed with ray.kill in the middle of a solve is recreated; the solve ends with the same answer."""

from __future__ import annotations

import os

import pytest
import ray
import torch
from distributed_helpers import TIMEOUT_S, random_problem, relative_gap, shard

from idl_ray.distributed import RayADMMSolver, load_checkpoint
from idl_ray.errors import DistributedError
from idl_ray.sim.solvers.admm import ADMMSolver

TOL = dict(gap_tol=1e-10, abs_tol=1e-10, rel_tol=1e-8)
#: gram runs of plain ADMM (no acceleration, no polish) in round trips of 10 steps: long enough for a kill
#: to land mid-solve (the accelerated solver certifies this problem within one round trip)
SLOW_GRAM = dict(anderson=0, polish=False, check_every=1)


class KillOnce:
    """A progress callback that kills worker ``rank`` once the solve passes ``at`` iterations."""

    def __init__(self, at: int, rank: int = 1, *, let_ray_restart: bool = False) -> None:
        self.at, self.rank, self.killed_pid = at, rank, None
        self.let_ray_restart = let_ray_restart

    def __call__(self, event) -> None:
        if self.killed_pid is None and event.iteration >= self.at:
            victim = event.workers[self.rank]
            self.killed_pid = ray.get(victim.info.remote(), timeout=TIMEOUT_S)["pid"]
            # no_restart=True: the driver recreates the actor; False: Ray restarts it (max_restarts) and
            # the driver notices the fresh, empty actor and restores it
            ray.kill(victim, no_restart=not self.let_ray_restart)


@pytest.fixture(scope="module")
def problem():
    return random_problem(seed=4)


@pytest.fixture(scope="module")
def reference(problem):
    return ADMMSolver(device="cpu", **TOL).solve(problem)


@pytest.mark.parametrize("strategy", ["gram", "consensus"])
def test_killed_actor_is_survived_with_the_same_answer(strategy, problem, reference, tmp_path):
    killer = KillOnce(at=15)
    # gram workers run max(checkpoint_every, 10 check_every) steps per round trip: 10 here, and plain ADMM
    # (no acceleration, no polish) needs several round trips, so the kill lands mid-solve, after a checkpoint
    chunking = SLOW_GRAM if strategy == "gram" else {}
    solver = RayADMMSolver(
        num_workers=2,
        use_gpu=False,
        cpus_per_worker=0.2,
        strategy=strategy,
        checkpoint_every=10,
        checkpoint_dir=str(tmp_path),
        callback=killer,
        timeout_s=TIMEOUT_S,
        **TOL,
        **chunking,
    )
    result = solver.solve(problem)
    assert killer.killed_pid is not None
    stats = result.stats
    assert stats.converged and stats.extra["restarts"] == 1
    assert stats.extra["timings"]["recovery"] > 0
    assert relative_gap(stats.objective, reference.stats.objective) < 1e-5
    assert stats.constraint_violation == 0.0
    assert torch.allclose(result.weights, reference.weights, atol=1e-4)
    checkpoint = load_checkpoint(os.path.join(tmp_path, f"ray-admm-{strategy}.pt"))
    assert checkpoint.strategy == strategy and checkpoint.iteration >= 10
    assert len(checkpoint.worker_states) == 2


def test_actor_killed_with_ray_restart_allowed_is_restored(problem, reference):
    # ray.kill(no_restart=False): the pool's actors have Ray max_restarts=0 (a Ray-restarted actor
    # would come back empty), so the driver recreates it and restores it from the checkpoint
    killer = KillOnce(at=15, let_ray_restart=True)
    solver = RayADMMSolver(
        num_workers=2,
        use_gpu=False,
        cpus_per_worker=0.2,
        strategy="consensus",
        checkpoint_every=10,
        callback=killer,
        timeout_s=TIMEOUT_S,
        **TOL,
    )
    result = solver.solve(problem)
    assert result.stats.extra["restarts"] == 1
    assert relative_gap(result.stats.objective, reference.stats.objective) < 1e-5


@pytest.mark.parametrize("at", [1, 20], ids=["before-the-first-checkpoint", "mid-solve"])
def test_gram_recovery_replays_exactly(at, problem):
    """A kill after the first round trip loses its checkpoint (taken after the callback): the workers
    replay from the solve's start, which each recomputes (``start_state``); later kills from a checkpoint."""
    plain = RayADMMSolver(  # the same round trips as the killed run (checkpoint_every sets their length)
        num_workers=2, use_gpu=False, cpus_per_worker=0.2, checkpoint_every=10, timeout_s=TIMEOUT_S,
        **TOL, **SLOW_GRAM,
    )  # fmt: skip
    killer = KillOnce(at=at, rank=0)
    killed = RayADMMSolver(
        num_workers=2,
        use_gpu=False,
        cpus_per_worker=0.2,
        checkpoint_every=10,
        callback=killer,
        timeout_s=TIMEOUT_S,
        **TOL,
        **SLOW_GRAM,
    )
    a, b = plain.solve(problem), killed.solve(problem)
    # the kill happened (before convergence) and the actor was replaced
    assert killer.killed_pid is not None and a.stats.iterations > killer.at
    assert b.stats.extra["restarts"] == 1 and b.stats.extra["timings"]["recovery"] > 0
    assert killer.killed_pid not in b.stats.extra["pids"]
    # the history comes back with the checkpoint: one entry per check, as without the kill
    assert [h["iteration"] for h in b.stats.history] == [h["iteration"] for h in a.stats.history]
    # rollback to the checkpoint and replay: the same iterations, the same weights
    assert a.stats.iterations == b.stats.iterations
    assert torch.allclose(a.weights, b.weights, atol=1e-12, rtol=0)


def test_sharded_shard_is_reloaded_by_the_recreated_actor(problem, reference):
    sharded = shard(problem, 2)
    solver = RayADMMSolver(
        num_workers=2,
        use_gpu=False,
        cpus_per_worker=0.2,
        strategy="consensus",
        checkpoint_every=5,
        callback=KillOnce(at=12, rank=0),
        timeout_s=TIMEOUT_S,
        **TOL,
    )
    result = solver.solve(sharded)
    assert result.stats.extra["restarts"] == 1
    assert relative_gap(result.stats.objective, reference.stats.objective) < 1e-5


def test_without_restart_budget_the_failure_is_reported(problem):
    # rounds of 10 steps (chunk = max(checkpoint_every, 10 check_every)): the problem needs ~24, so the kill
    # after the first round is met by the next round's call, never raced by the final gather
    solver = RayADMMSolver(
        num_workers=2,
        use_gpu=False,
        cpus_per_worker=0.2,
        max_restarts=0,
        checkpoint_every=5,
        callback=KillOnce(at=10),
        timeout_s=TIMEOUT_S,
        **TOL,
        **SLOW_GRAM,
    )
    with pytest.raises(DistributedError, match="restart budget"):
        solver.solve(problem)
