"""Driver-side checkpoints of a distributed solve, in memory and optionally on disk.

The driver owns the loop, so it owns the state needed to resume it: the iteration, rho, the consensus
variable and every worker's local variables. A checkpoint is taken every ``checkpoint_every`` iterations
(the workers' states are gathered to the driver); when an actor dies, the driver recreates it, the actor
reloads its shard, and *every* worker is rolled back to the last checkpoint, so the run replays the same
deterministic iterations and ends with the same answer.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from typing import Any

import torch

from idl_ray.errors import DistributedError


@dataclasses.dataclass
class SolveCheckpoint:
    """Everything needed to resume a distributed solve at ``iteration``.

    Attributes
    ----------
    strategy : str
        ``"gram"``, ``"consensus"`` or ``"projected_gd"``.
    iteration : int
    rho : float
        The penalty in force (for gram: the one the workers' states carry).
    pending_rho : float
        The penalty the next iteration uses (residual balancing decides it one check ahead).
    worker_states : list
        One state per worker (``ADMMState`` rows for gram, ``ConsensusLocalState`` for consensus). A gram
        worker's None is the solve's start, which the worker computes again from its rows
        (:func:`~idl_ray.sim.solvers.start.start_state`).
    consensus : Tensor or None
        The consensus variable (consensus strategy) or the iterate (projected gradient).
    history : list of dict
        Residual history up to ``iteration``.
    extra : dict
        Strategy-specific values (e.g. optimiser state).
    """

    strategy: str
    iteration: int
    rho: float
    pending_rho: float
    worker_states: list[Any]
    consensus: torch.Tensor | None = None
    history: list[dict[str, float]] = dataclasses.field(default_factory=list)
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


class Checkpointer:
    """Keeps the latest checkpoint in memory and, when ``directory`` is set, writes it atomically.

    Parameters
    ----------
    every : int
        Iterations between checkpoints.
    directory : str or None
        Where ``<name>.pt`` is written (``torch.save``; replaced atomically each time).
    name : str
        File stem.
    """

    def __init__(self, every: int, directory: str | None = None, name: str = "ray-solve") -> None:
        self.every = every
        self.directory = directory
        self.name = name
        self.latest: SolveCheckpoint | None = None
        self.count = 0
        self.time_s = 0.0
        if directory is not None:
            os.makedirs(directory, exist_ok=True)

    @property
    def path(self) -> str | None:
        return None if self.directory is None else os.path.join(self.directory, f"{self.name}.pt")

    def due(self, iteration: int) -> bool:
        """Whether a checkpoint should be taken at ``iteration``."""
        last = 0 if self.latest is None else self.latest.iteration
        return iteration - last >= self.every

    def save(self, checkpoint: SolveCheckpoint) -> None:
        start = time.perf_counter()
        self.latest = checkpoint
        self.count += 1
        if self.path is not None:
            handle, tmp = tempfile.mkstemp(dir=self.directory, suffix=".tmp")
            os.close(handle)
            torch.save(checkpoint, tmp)
            os.replace(tmp, self.path)
        self.time_s += time.perf_counter() - start

    def restore(self) -> SolveCheckpoint:
        if self.latest is None:
            raise DistributedError("No checkpoint to resume from.")
        return self.latest


def load_checkpoint(path: str) -> SolveCheckpoint:
    """Read a checkpoint written by :class:`Checkpointer` (to inspect or to resume a solve from it)."""
    data = torch.load(path, weights_only=False)  # our own file: it holds dataclasses, not only tensors
    if not isinstance(data, SolveCheckpoint):
        raise DistributedError(f"{path!r} is not an idl_ray solve checkpoint.")
    return data


__all__ = ["Checkpointer", "SolveCheckpoint", "load_checkpoint"]
