"""A pool of solver actors: created on reserved resources, called with time limits, recreated when they die.

The pool checks the request against the cluster before creating anything (more GPUs than the cluster has
fails at once), reserves one bundle per worker in a placement group (PACK / SPREAD), and starts the actors
with Ray's ``max_restarts``. Calls go through :meth:`WorkerPool.call`, which waits with ``timeout_s`` and lets
actor failures through so the driver can :meth:`WorkerPool.recover`: dead actors are recreated in their
bundle (they reload their shard in their constructor) and reported back for the driver to restore.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import ray
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from idl_ray.distributed import resources
from idl_ray.distributed.actors import SolverWorker
from idl_ray.distributed.config import RayRunConfig
from idl_ray.distributed.shards import ShardSource
from idl_ray.errors import DistributedError

logger = logging.getLogger(__name__)

_REMOTE_WORKER: Any = None


def _remote_worker() -> Any:
    global _REMOTE_WORKER
    if _REMOTE_WORKER is None:
        _REMOTE_WORKER = ray.remote(SolverWorker)
    return _REMOTE_WORKER


class WorkerPool:
    """``config.num_workers`` :class:`SolverWorker` actors.

    Parameters
    ----------
    config : RayRunConfig

    Attributes
    ----------
    actors : list of actor handles
    use_gpu : bool
    infos : list of dict, what each worker reported (device, pid, samples, load time)
    restarts : int, actors recreated so far
    """

    def __init__(self, config: RayRunConfig) -> None:
        resources.ensure_ray()
        self.config = config
        totals = resources.cluster_totals()
        self.use_gpu = resources.resolve_use_gpu(config, totals)
        resources.check_resources(config, self.use_gpu, totals)
        self.sources: list[list[ShardSource]] = [[] for _ in range(config.num_workers)]
        self.restarts = 0
        self.group = resources.reserve(config, self.use_gpu)
        self.actors: list[Any] = []
        self.infos: list[dict[str, Any]] = []
        start = time.perf_counter()
        try:
            self.actors = [self._create(rank) for rank in range(config.num_workers)]
            self.infos = self._wait_ready(self.actors, "the solver actors to start")
        except BaseException:
            self.shutdown()
            raise
        self.start_s = time.perf_counter() - start

    def load(self, sources: Sequence[Sequence[ShardSource]]) -> list[dict[str, Any]]:
        """Give each worker its shard sources and wait until all have loaded them (inside the actors)."""
        if len(sources) != self.size:
            raise DistributedError(f"{len(sources)} source lists for {self.size} workers.")
        self.sources = [list(s) for s in sources]
        try:
            self.infos = resources.get(
                [a.load.remote(s) for a, s in zip(self.actors, self.sources)],
                self.config.timeout_s,
                "the solver actors to load their shards",
            )
        except ray.exceptions.RayTaskError as exc:
            raise DistributedError(f"A solver actor could not load its shard: {_cause(exc)}") from exc
        return self.infos

    def release_data(self) -> None:
        """Drop every worker's shard and solver state, keeping the actors for another solve."""
        self.sources = [[] for _ in range(self.size)]
        resources.get([a.reset.remote() for a in self.actors], self.config.timeout_s, "resetting the actors")

    @property
    def size(self) -> int:
        return len(self.actors)

    def _create(self, rank: int) -> Any:
        options: dict[str, Any] = {
            "num_cpus": self.config.cpus_per_worker,
            "num_gpus": self.config.gpus_per_worker if self.use_gpu else 0,
            "max_restarts": self.config.max_restarts,
        }
        if self.group is not None:
            options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                placement_group=self.group, placement_group_bundle_index=rank
            )
        return _remote_worker().options(**options).remote(rank, self.config.threads)

    def _wait_ready(self, actors: Sequence[Any], what: str) -> list[dict[str, Any]]:
        try:
            return resources.get([a.info.remote() for a in actors], self.config.timeout_s, what)
        except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as exc:
            raise DistributedError(f"A solver actor failed while starting: {_cause(exc)}") from exc

    def call(
        self,
        method: str,
        *args: Any,
        per_worker: Sequence[tuple] | None = None,
        what: str = "",
        **kwargs: Any,
    ) -> list[Any]:
        """Call ``method`` on every worker (same arguments, or ``per_worker`` positional tuples) and wait."""
        if per_worker is not None:
            refs = [getattr(a, method).remote(*pw, **kwargs) for a, pw in zip(self.actors, per_worker)]
        else:
            refs = [getattr(a, method).remote(*args, **kwargs) for a in self.actors]
        return resources.get(refs, self.config.timeout_s, what or f"{method} on the solver actors")

    def recover(self, error: BaseException) -> list[int]:
        """After an actor failure: recreate the dead actors; return the ranks that must be set up again.

        Raises :class:`DistributedError` once more than ``max_restarts`` actors had to be brought back.
        """
        needs_setup: list[int] = []
        for rank, actor in enumerate(self.actors):
            try:
                info = resources.get(actor.info.remote(), min(30.0, self.config.timeout_s), "a health check")
                if info.get("mode") is None:
                    # restarted by Ray: alive, but its shard and solver state are gone
                    self._count_restart(rank, error)
                    needs_setup.append(rank)
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError, DistributedError):
                self._count_restart(rank, error)
                resources.kill_all([actor])
                self.actors[rank] = self._create(rank)
                self.infos[rank] = self._wait_ready([self.actors[rank]], f"the recreated actor {rank}")[0]
                needs_setup.append(rank)
        for rank in needs_setup:
            if self.sources[rank]:
                self.infos[rank] = resources.get(
                    self.actors[rank].load.remote(self.sources[rank]),
                    self.config.timeout_s,
                    f"the recreated actor {rank} to reload its shard",
                )
        if not needs_setup:  # the failure was transient (e.g. unavailable during a restart)
            logger.warning("Solver actor failure with every actor alive afterwards: %s", _cause(error))
        return needs_setup

    def _count_restart(self, rank: int, error: BaseException) -> None:
        self.restarts += 1
        if self.restarts > self.config.max_restarts:
            raise DistributedError(
                f"Solver actor {rank} died and the restart budget (max_restarts={self.config.max_restarts}) "
                f"is spent. Last failure: {_cause(error)}"
            ) from error
        logger.warning(
            "Solver actor %d died (%s); recreating it and resuming from the last checkpoint.",
            rank,
            _cause(error),
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
