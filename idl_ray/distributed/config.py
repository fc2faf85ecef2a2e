"""How a distributed solve runs: workers, devices, placement, fault tolerance, checkpoints, progress.

Kept apart from the algorithm settings (``ADMMOptions``), in the spirit of Ray Train's
``ScalingConfig``/``RunConfig``: the same algorithm settings work locally and on a cluster.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from idl_ray._validation import Options, bad_parameter, check_positive_float, check_positive_int

PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RayRunConfig(Options):
    """Settings of the Ray side of a distributed SIM solve.

    Parameters
    ----------
    num_workers : int, default 2
        Number of solver actors. With GPUs, one actor per GPU.
    use_gpu : bool or None, default None
        ``True``: one GPU per actor (fails fast if the cluster has fewer GPUs than ``num_workers``).
        ``False``: CPU actors. ``None``: GPUs when the cluster has at least ``num_workers`` of them,
        CPU actors otherwise.
    cpus_per_worker : float, default 1.0
        CPUs reserved per actor; fractional values (e.g. 0.5) let several actors share a core.
    gpus_per_worker : float, default 1.0
        GPUs reserved per actor when GPUs are used (fractional values share a GPU).
    threads_per_worker : int or None, default None
        Torch intra-op threads inside each actor; ``None`` means ``max(1, round(cpus_per_worker))``.
    max_restarts : int, default 2
        How many lost actors the driver recreates per solve (at any phase) before the solve gives up
        with :class:`~idl_ray.errors.DistributedError`. Ray itself never restarts them (see
        :class:`~idl_ray.distributed.pool.WorkerPool`).
    placement_strategy : {"PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"} or None, default "PACK"
        Placement-group strategy for the actors' bundles; ``None`` schedules actors without a group.
    checkpoint_every : int, default 25
        The driver checkpoints the solver state every this many iterations (in memory, and to
        ``checkpoint_dir`` when set). A dead actor costs at most this many iterations.
    checkpoint_dir : str or None, default None
        Directory for on-disk checkpoints (``torch.save`` files); ``None`` keeps them in memory only.
    check_every : int, default 1
        Iterations each actor runs between two stopping tests of the driver (gram strategy). 1 gives
        exactly the single-process iteration count; larger values trade a few extra iterations for
        fewer round trips.
    timeout_s : float, default 300.0
        Limit on every wait for Ray (actor start, placement group, each ``ray.get``). A wait that runs
        out raises :class:`~idl_ray.errors.DistributedError` instead of hanging.
    progress : bool, default False
        Show a progress bar (tqdm) with the residuals; when tqdm is unavailable, log lines.
    log_every : int, default 50
        Iterations between two progress updates or log lines.
    keep_workers : bool, default False
        Keep the actors (and their reserved resources) alive between solves of the same solver, e.g.
        the two stages of a SIM fit; release them with ``solver.close()`` or a ``with`` block.
    """

    num_workers: int = 2
    use_gpu: bool | None = None
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0
    threads_per_worker: int | None = None
    max_restarts: int = 2
    placement_strategy: str | None = "PACK"
    checkpoint_every: int = 25
    checkpoint_dir: str | None = None
    check_every: int = 1
    timeout_s: float = 300.0
    progress: bool = False
    log_every: int = 50
    keep_workers: bool = False

    def _validate(self) -> None:
        owner = "RayRunConfig"
        check_positive_int(self.num_workers, "num_workers", owner)
        if self.use_gpu is not None and not isinstance(self.use_gpu, bool):
            raise bad_parameter("use_gpu", owner, "True, False or None", self.use_gpu)
        check_positive_float(self.cpus_per_worker, "cpus_per_worker", owner, allow_zero=True)
        check_positive_float(self.gpus_per_worker, "gpus_per_worker", owner)
        if self.gpus_per_worker > 1 and not float(self.gpus_per_worker).is_integer():
            raise bad_parameter(
                "gpus_per_worker", owner, "a fraction <= 1 or a whole number", self.gpus_per_worker
            )
        check_positive_int(self.threads_per_worker, "threads_per_worker", owner, allow_none=True)
        if (
            isinstance(self.max_restarts, bool)
            or not isinstance(self.max_restarts, int)
            or self.max_restarts < 0
        ):
            raise bad_parameter("max_restarts", owner, "an integer >= 0", self.max_restarts)
        if self.placement_strategy is not None and self.placement_strategy not in PLACEMENT_STRATEGIES:
            raise bad_parameter(
                "placement_strategy",
                owner,
                f"one of {list(PLACEMENT_STRATEGIES)} or None",
                self.placement_strategy,
            )
        check_positive_int(self.checkpoint_every, "checkpoint_every", owner)
        if self.checkpoint_dir is not None and not isinstance(self.checkpoint_dir, str):
            raise bad_parameter("checkpoint_dir", owner, "a path string or None", self.checkpoint_dir)
        check_positive_int(self.check_every, "check_every", owner)
        check_positive_float(self.timeout_s, "timeout_s", owner)
        if not isinstance(self.progress, bool):
            raise bad_parameter("progress", owner, "a bool", self.progress)
        check_positive_int(self.log_every, "log_every", owner)
        if not isinstance(self.keep_workers, bool):
            raise bad_parameter("keep_workers", owner, "a bool", self.keep_workers)

    @property
    def threads(self) -> int:
        """Torch threads each actor uses."""
        if self.threads_per_worker is not None:
            return self.threads_per_worker
        return max(1, round(self.cpus_per_worker)) if math.isfinite(self.cpus_per_worker) else 1


def split_run_kwargs(kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split keyword arguments into ``RayRunConfig`` fields and the rest."""
    names = {f.name for f in dataclasses.fields(RayRunConfig)}
    run = {k: v for k, v in kwargs.items() if k in names}
    rest = {k: v for k, v in kwargs.items() if k not in names}
    return run, rest


__all__ = ["PLACEMENT_STRATEGIES", "RayRunConfig", "split_run_kwargs"]
