"""A pool of solver actors: created on reserved resources, called with time limits, recreated when they die.

The pool checks the request against the cluster before creating anything (more GPUs than the cluster has
fails at once), reserves one bundle per worker in a placement group (PACK / SPREAD), and starts the actors
with Ray's ``max_restarts``. Calls go through :meth:`WorkerPool.call`, which waits with ``timeout_s`` and lets
actor failures through so the driver can :meth:`WorkerPool.recover`: dead actors are recreated in their
bundle, reload their shard, and are reported back for the driver to restore (see :meth:`WorkerPool.retry`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, TypeVar

import ray
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from idl_ray.distributed import resources
from idl_ray.distributed.actors import SolverWorker
from idl_ray.distributed.config import RayRunConfig
from idl_ray.distributed.shards import ShardSource
from idl_ray.errors import DistributedError

logger = logging.getLogger(__name__)

_REMOTE_WORKER: Any = None
T = TypeVar("T")


def _remote_worker() -> Any:
    global _REMOTE_WORKER
    if _REMOTE_WORKER is None:
        _REMOTE_WORKER = ray.remote(SolverWorker)
    return _REMOTE_WORKER


class WorkerPool:
    """``config.num_workers`` :class:`SolverWorker` actors.

    Every phase of a solve that calls the actors (start, load, Gram reduction, factorisation,
    iterations, final gather) survives the loss of an actor: :meth:`retry` runs a phase, and when an
    actor died :meth:`recover` recreates it in its bundle, reloads its shard, and the phase runs again
    (the iteration loops instead roll back to their last checkpoint). Up to ``config.max_restarts``
    actors may be lost per solve; one more is a :class:`~idl_ray.errors.DistributedError` that names
    the actor, the phase and the cause. Ray itself never restarts the actors (its ``max_restarts`` is
    0): a restarted actor would come back empty and answer the next call wrongly, so the driver, which
    knows what each actor must hold, recreates them.

    Parameters
    ----------
    config : RayRunConfig

    Attributes
    ----------
    actors : list of actor handles
    use_gpu : bool
    infos : list of dict, what each worker reported (device, pid, samples, load time)
    restarts : int, actors recreated so far
    phase : str, the phase in progress (named in the error when the restart budget is spent)
    phase_hook : callable(phase, pool) or None, class attribute
        Called at the start of every phase (each attempt), before its calls are sent. A fault-injection
        point for tests (kill an actor at a chosen phase); None in normal use.
    """

    phase_hook: ClassVar[Callable[[str, WorkerPool], None] | None] = None

    def __init__(self, config: RayRunConfig) -> None:
        resources.ensure_ray()
        self.config = config
        totals = resources.cluster_totals()
        self.use_gpu = resources.resolve_use_gpu(config, totals)
        resources.check_resources(config, self.use_gpu, totals)
        self.sources: list[list[ShardSource]] = [[] for _ in range(config.num_workers)]
        self.restarts = 0
        self.phase = "start"
        self.group = resources.reserve(config, self.use_gpu)
        self.actors: list[Any] = []
        self.infos: list[dict[str, Any]] = []
        start = time.perf_counter()
        try:
            self.actors = [self._create(rank) for rank in range(config.num_workers)]
            self.infos = [{} for _ in self.actors]
            self.infos = self.retry(
                "start", lambda: self._wait_ready(self.actors, "the solver actors to start")
            )
        except BaseException:
            self.shutdown()
            raise
        self.start_s = time.perf_counter() - start

    def load(self, sources: Sequence[Sequence[ShardSource]]) -> list[dict[str, Any]]:
        """Give each worker its shard sources and wait until all have loaded them (inside the actors)."""
        if len(sources) != self.size:
            raise DistributedError(f"{len(sources)} source lists for {self.size} workers.")
        self.sources = [list(s) for s in sources]
        sent = False

        def attempt() -> list[dict[str, Any]]:
            nonlocal sent
            if sent:  # after a recovery every live actor holds its shard (the lost ones were reloaded)
                refs = [a.info.remote() for a in self.actors]
            else:
                sent = True
                refs = [a.load.remote(s) for a, s in zip(self.actors, self.sources)]
            try:
                return resources.get(refs, self.config.timeout_s, "the solver actors to load their shards")
            except ray.exceptions.RayTaskError as exc:
                if resources.is_actor_failure(exc):
                    raise
                raise DistributedError(f"A solver actor could not load its shard: {_cause(exc)}") from exc

        self.infos = self.retry("load", attempt)
        return self.infos

    def release_data(self) -> None:
        """Drop every worker's shard and solver state, keeping the actors for another solve."""
        self.sources = [[] for _ in range(self.size)]
        # an actor of a kept or shared pool may have died between solves: it is recreated here
        self.retry(
            "reset",
            lambda: resources.get(
                [a.reset.remote() for a in self.actors], self.config.timeout_s, "resetting the actors"
            ),
        )

    @property
    def size(self) -> int:
        return len(self.actors)

    def _create(self, rank: int) -> Any:
        options: dict[str, Any] = {
            "num_cpus": self.config.cpus_per_worker,
            "num_gpus": self.config.gpus_per_worker if self.use_gpu else 0,
            # the driver recreates lost actors (see the class docstring); Ray must not revive them empty
            "max_restarts": 0,
        }
        if self.group is not None:
            options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                placement_group=self.group, placement_group_bundle_index=rank
            )
        return _remote_worker().options(**options).remote(rank, self.config.threads)

    def _wait_ready(self, actors: Sequence[Any], what: str) -> list[dict[str, Any]]:
        try:
            return resources.get([a.info.remote() for a in actors], self.config.timeout_s, what)
        except ray.exceptions.RayTaskError as exc:
            if resources.is_actor_failure(exc):
                raise
            raise DistributedError(f"A solver actor failed while starting: {_cause(exc)}") from exc

    def _enter(self, phase: str) -> None:
        self.phase = phase
        hook = type(self).phase_hook
        if hook is not None:
            hook(phase, self)

    def retry(
        self,
        phase: str,
        attempt: Callable[[], T],
        on_recover: Callable[[list[int]], None] | None = None,
    ) -> T:
        """Run ``attempt()`` (a phase whose calls can simply be repeated); when an actor was lost,
        :meth:`recover`, call ``on_recover(lost_ranks)`` and run it again. Other errors propagate."""
        while True:
            self._enter(phase)
            try:
                return attempt()
            except Exception as exc:
                if not resources.is_actor_failure(exc):
                    raise
                lost = self.recover(exc)
                if on_recover is not None:
                    on_recover(lost)

    def call(
        self,
        method: str,
        *args: Any,
        per_worker: Sequence[tuple] | None = None,
        what: str = "",
        **kwargs: Any,
    ) -> list[Any]:
        """Call ``method`` on every worker (same arguments, or ``per_worker`` positional tuples) and wait.

        Actor failures propagate (the caller decides how to resume: :meth:`retry`, or a checkpoint)."""
        self._enter(method)
        if per_worker is not None:
            refs = [getattr(a, method).remote(*pw, **kwargs) for a, pw in zip(self.actors, per_worker)]
        else:
            refs = [getattr(a, method).remote(*args, **kwargs) for a in self.actors]
        return resources.get(refs, self.config.timeout_s, what or f"{method} on the solver actors")

    def recover(self, error: BaseException) -> list[int]:
        """After an actor failure: recreate the dead actors and reload their shards; return their ranks
        (the caller restores their solver state). A further loss while recovering is recovered too.

        Raises :class:`DistributedError` once more than ``max_restarts`` actors had to be brought back.
        """
        phase = self.phase
        lost: set[int] = set()
        fresh: set[int] = set()  # recreated and not yet reloaded
        rounds = 0
        while True:
            rounds += 1
            if rounds > self.config.max_restarts + 3:  # failures without a dead actor to show for them
                raise DistributedError(
                    f"Could not bring the solver actors back during {phase!r} after {rounds - 1} rounds of "
                    f"recovery. Last failure: {_cause(error)}"
                ) from error
            try:
                for rank in self._dead_ranks():
                    self._count_restart(rank, error, phase)
                    resources.kill_all([self.actors[rank]])
                    self.actors[rank] = self._create(rank)
                    lost.add(rank)
                    fresh.add(rank)
                if fresh:
                    order = sorted(fresh)
                    refs = [
                        self.actors[r].load.remote(self.sources[r])
                        if self.sources[r]
                        else self.actors[r].info.remote()
                        for r in order
                    ]
                    infos = resources.get(
                        refs, self.config.timeout_s, "the recreated actor(s) to start and reload their shards"
                    )
                    for rank, info in zip(order, infos):
                        self.infos[rank] = info
                    fresh.clear()
                break
            except ray.exceptions.RayTaskError as exc:
                if not resources.is_actor_failure(exc):
                    raise DistributedError(
                        f"A recreated solver actor could not reload its shard: {_cause(exc)}"
                    ) from exc
                error = exc
            except Exception as exc:
                if not resources.is_actor_failure(exc):
                    raise
                error = exc  # lost again while recovering: the next round finds and counts it
        if not lost:  # the failure was transient (e.g. unavailable for a moment)
            logger.warning("Solver actor failure with every actor alive afterwards: %s", _cause(error))
        self.phase = phase
        return sorted(lost)

    def _dead_ranks(self) -> list[int]:
        """Ranks whose actor does not answer a health check (all checked at once)."""
        refs = [actor.info.remote() for actor in self.actors]
        dead = []
        for rank, ref in enumerate(refs):
            try:
                resources.get(ref, min(30.0, self.config.timeout_s), "a health check")
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError, DistributedError):
                dead.append(rank)
            except ray.exceptions.RayTaskError as exc:
                if not resources.is_actor_failure(exc):
                    raise
                dead.append(rank)
        return dead

    def _count_restart(self, rank: int, error: BaseException, phase: str) -> None:
        self.restarts += 1
        where = self.infos[rank] if rank < len(self.infos) else {}
        who = f"Solver actor {rank}" + (
            f" (pid {where['pid']}, {where.get('device')})" if where.get("pid") else ""
        )
        if self.restarts > self.config.max_restarts:
            raise DistributedError(
                f"{who} was lost during {phase!r} and the restart budget is spent: "
                f"{self.restarts} actor loss(es) in this solve, max_restarts={self.config.max_restarts}. "
                f"Its shard and solver state are gone. Last failure: {_cause(error)}. Raise "
                "max_restarts, or find why the actors die (memory, node loss)."
            ) from error
        logger.warning(
            "%s was lost during %r (%s); recreating it (%d of max_restarts=%d).",
            who,
            phase,
            _cause(error),
            self.restarts,
            self.config.max_restarts,
        )

    def __del__(self) -> None:
        # a pool dropped without shutdown (e.g. a solver with keep_workers garbage-collected) must not
        # keep its placement group reserved; the actors die with their last handle anyway
        try:
            if getattr(self, "group", None) is not None and ray.is_initialized():
                self.shutdown()
        except Exception:  # pragma: no cover - interpreter shutdown
            pass

    def shutdown(self) -> None:
        """Kill the pool's actors and release its placement group."""
        resources.kill_all(self.actors)
        self.actors = []
        resources.release(self.group)
        self.group = None


def _cause(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    # Ray's messages carry the remote traceback; keep the informative last lines.
    tail = [line for line in text if line.strip()][-3:]
    return " | ".join(tail) if tail else type(exc).__name__


__all__ = ["WorkerPool"]
