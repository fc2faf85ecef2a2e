"""Cluster resources: check before asking, wait with a limit, fail with a message that says what to do.

Asking Ray for more GPUs or CPUs than the cluster has does not fail by itself: the actors stay pending
forever. Every entry point here checks the request against ``ray.cluster_resources()`` first and waits
for placement groups and results with a time limit, raising :class:`DistributedError` instead.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group

from idl_ray.distributed.config import RayRunConfig
from idl_ray.errors import ClusterConfigError, DistributedError

logger = logging.getLogger(__name__)


def ensure_ray() -> None:
    """Start a local Ray (the machine's own resources) unless the process is already connected."""
    if not ray.is_initialized():
        import os

        address = os.environ.get("RAY_ADDRESS")
        if address:  # ray.init() would join it, retrying an unreachable one for minutes
            from idl_ray.jobs.common import check_reachable

            check_reachable(address)
        logger.info("Ray is not initialised: starting a local instance with ray.init().")
        ray.init(include_dashboard=False)


def cluster_totals() -> dict[str, float]:
    """Total CPUs and GPUs of the cluster (0 where absent)."""
    resources = ray.cluster_resources()
    return {"CPU": float(resources.get("CPU", 0.0)), "GPU": float(resources.get("GPU", 0.0))}


def resolve_use_gpu(config: RayRunConfig, totals: dict[str, float] | None = None) -> bool:
    """Whether the actors take GPUs: ``config.use_gpu``, or (when None) whether there are enough GPUs."""
    if config.use_gpu is not None:
        return config.use_gpu
    totals = cluster_totals() if totals is None else totals
    needed = config.num_workers * config.gpus_per_worker
    use = totals["GPU"] >= needed > 0
    if not use and totals["GPU"] > 0:
        logger.info(
            "use_gpu=None: the cluster has %g GPU(s), fewer than the %g needed for %d worker(s); using CPU "
            "actors. Pass use_gpu=True with num_workers <= the GPU count to use them.",
            totals["GPU"],
            needed,
            config.num_workers,
        )
    return use


def bundle(config: RayRunConfig, use_gpu: bool) -> dict[str, float]:
    """The resources one actor asks for."""
    resources = {"CPU": float(config.cpus_per_worker)}
    if use_gpu:
        resources["GPU"] = float(config.gpus_per_worker)
    return resources


def check_resources(config: RayRunConfig, use_gpu: bool, totals: dict[str, float] | None = None) -> None:
    """Raise :class:`DistributedError` at once when the cluster cannot hold the requested actors."""
    totals = cluster_totals() if totals is None else totals
    one = bundle(config, use_gpu)
    for name, amount in one.items():
        needed = amount * config.num_workers
        if needed > totals.get(name, 0.0) + 1e-9:
            per = "gpus_per_worker" if name == "GPU" else "cpus_per_worker (--cpus-per-worker in idl-ray)"
            fix = (
                "Use fewer workers (num_workers; --workers in idl-ray), a smaller "
                + per
                + (", or use_gpu=False for CPU actors (--no-use-gpu)" if name == "GPU" else "")
                + ", or connect to a larger cluster."
            )
            raise ClusterConfigError(
                f"The solve asks for {needed:g} {name}(s) ({config.num_workers} worker(s) x {amount:g} "
                f"{name} each) but the Ray cluster has {totals.get(name, 0.0):g} in total. {fix}"
            )


def reserve(config: RayRunConfig, use_gpu: bool) -> PlacementGroup | None:
    """Create and wait for a placement group with one bundle per worker (None without a strategy)."""
    if config.placement_strategy is None:
        return None
    group = placement_group(
        [bundle(config, use_gpu)] * config.num_workers, strategy=config.placement_strategy
    )
    try:
        ready = group.wait(timeout_seconds=config.timeout_s)
    except Exception as exc:  # Ray raises on a group that can never be placed (e.g. STRICT_SPREAD)
        remove_placement_group(group)
        raise DistributedError(f"Could not place the solver actors: {exc}") from exc
    if not ready:
        remove_placement_group(group)
        raise DistributedError(
            f"The placement group for {config.num_workers} worker(s) with {bundle(config, use_gpu)} each "
            f"(strategy {config.placement_strategy}) was not ready after {config.timeout_s:g} s: the "
            "cluster's free resources are taken by other work. Free them, use fewer workers or smaller "
            "bundles, or raise timeout_s."
        )
    return group


def release(group: PlacementGroup | None) -> None:
    """Remove a placement group made by :func:`reserve` (no-op for None)."""
    if group is not None:
        try:
            remove_placement_group(group)
        except Exception:  # pragma: no cover - already gone with the cluster
            logger.debug("placement group already removed", exc_info=True)


def get(refs: Any, timeout_s: float, what: str) -> Any:
    """``ray.get`` with a time limit; a time-out becomes a :class:`DistributedError` naming ``what``.

    Actor failures (``RayActorError``) propagate unchanged so the driver can recover from them.
    """
    try:
        return ray.get(refs, timeout=timeout_s)
    except ray.exceptions.GetTimeoutError as exc:
        raise DistributedError(
            f"Timed out after {timeout_s:g} s waiting for {what}. The actors may be starved of CPUs "
            "(use fractional cpus_per_worker) or the cluster is overloaded; raise timeout_s if the work "
            "is simply long."
        ) from exc


def is_actor_failure(exc: BaseException) -> bool:
    """True for errors that mean an actor died or became unreachable (recoverable by recreation),
    also when they reach the driver wrapped in a task that took the dead actor's result (the merge
    tasks of the Gram reduction)."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)):
            return True
        exc = getattr(exc, "cause", None) if isinstance(exc, ray.exceptions.RayTaskError) else None
        seen += 1
    return False


def kill_all(actors: Sequence[Any]) -> None:
    """Kill the given actors (ours), ignoring the ones already dead."""
    for actor in actors:
        try:
            ray.kill(actor)
        except Exception:  # pragma: no cover - already dead
            logger.debug("actor already dead", exc_info=True)


__all__ = [
    "bundle",
    "check_resources",
    "cluster_totals",
    "ensure_ray",
    "get",
    "is_actor_failure",
    "kill_all",
    "release",
    "reserve",
    "resolve_use_gpu",
]
