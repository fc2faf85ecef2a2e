"""Progress of a distributed solve (tqdm bar or log lines with the residuals), timings, and a plot.

matplotlib is imported only by :func:`plot_convergence`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from typing import Any

logger = logging.getLogger("idl_ray.distributed")


@dataclasses.dataclass
class ProgressEvent:
    """What a progress callback receives after each stopping test.

    Attributes
    ----------
    strategy : str
    iteration : int
    primal, dual : float, the residuals of the test
    eps_primal, eps_dual : float, their tolerances
    rho : float
    workers : list of actor handles (e.g. to inspect, or to kill one in a fault-tolerance test)
    """

    strategy: str
    iteration: int
    primal: float
    dual: float
    eps_primal: float
    eps_dual: float
    rho: float
    workers: list[Any]


class Timings:
    """Wall-clock seconds per phase: load, gram, factor, iterations, communication, checkpoint, recovery."""

    PHASES = ("startup", "load", "gram", "factor", "iterations", "communication", "checkpoint", "recovery")

    def __init__(self) -> None:
        self.seconds: dict[str, float] = dict.fromkeys(self.PHASES, 0.0)

    def add(self, phase: str, seconds: float) -> None:
        self.seconds[phase] = self.seconds.get(phase, 0.0) + max(0.0, seconds)

    @contextmanager
    def phase(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - start)

    def round_trip(self, wall_s: float, compute_s: Sequence[float], phase: str = "iterations") -> None:
        """Split one synchronous round trip into compute (slowest worker) and communication (the rest)."""
        compute = max(compute_s) if compute_s else 0.0
        self.add(phase, compute)
        self.add("communication", wall_s - compute)

    def as_dict(self) -> dict[str, float]:
        return dict(self.seconds)


class ProgressReporter:
    """A tqdm bar (``progress=True``) or a log line every ``log_every`` iterations, plus a user callback."""

    def __init__(
        self,
        strategy: str,
        max_iter: int,
        *,
        progress: bool,
        log_every: int,
        callback: Callable[[ProgressEvent], None] | None = None,
    ) -> None:
        self.strategy = strategy
        self.log_every = log_every
        self.callback = callback
        self.last_logged = 0
        self.bar = None
        if progress:
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=max_iter, desc=f"Ray ADMM ({strategy})", unit="it", leave=False)
            except ImportError:  # pragma: no cover - tqdm is a dependency
                self.bar = None
        self.progress = progress

    def update(self, event: ProgressEvent) -> None:
        if self.bar is not None:
            self.bar.n = event.iteration
            self.bar.set_postfix(
                primal=f"{event.primal:.2e}", dual=f"{event.dual:.2e}", rho=f"{event.rho:.3g}"
            )
        if event.iteration - self.last_logged >= self.log_every:
            self.last_logged = event.iteration
            level = logging.INFO if self.progress and self.bar is None else logging.DEBUG
            logger.log(
                level,
                "%s iteration %d: primal %.3e (eps %.3e), dual %.3e (eps %.3e), rho %.4g",
                self.strategy,
                event.iteration,
                event.primal,
                event.eps_primal,
                event.dual,
                event.eps_dual,
                event.rho,
            )
        if self.callback is not None:
            self.callback(event)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def plot_convergence(history: Sequence[dict[str, float]], path: str | None = None, *, title: str = "") -> Any:
    """Plot primal and dual residuals (log scale) against the iteration; save to ``path`` when given.

    Parameters
    ----------
    history : list of dict with keys ``iteration``, ``primal``, ``dual`` (``stats.history`` of a solve)
    path : str, optional, an image file to write

    Returns
    -------
    The matplotlib Figure.
    """
    import matplotlib

    if path is not None:
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    iterations = [h["iteration"] for h in history]
    axes.semilogy(iterations, [max(h["primal"], 1e-300) for h in history], label="primal residual")
    axes.semilogy(iterations, [max(h["dual"], 1e-300) for h in history], label="dual residual")
    axes.set_xlabel("iteration")
    axes.set_ylabel("residual")
    axes.set_title(title or "ADMM convergence")
    axes.legend()
    figure.tight_layout()
    if path is not None:
        figure.savefig(path)
        plt.close(figure)
    return figure


__all__ = ["ProgressEvent", "ProgressReporter", "Timings", "plot_convergence"]
