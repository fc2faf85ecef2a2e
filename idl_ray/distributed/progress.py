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
    primal, dual : float or None, the residuals of the test (consensus; None for gram)
    eps_primal, eps_dual : float or None, their tolerances
    rho : float
    workers : list of actor handles (e.g. to inspect, or to kill one in a fault-tolerance test)
    relative_gap : float or None, the certified relative suboptimality at the latest check
    """

    strategy: str
    iteration: int
    primal: float | None
    dual: float | None
    eps_primal: float | None
    eps_dual: float | None
    rho: float
    workers: list[Any]
    relative_gap: float | None = None


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
        if event.relative_gap is not None:
            postfix = {"gap": f"{event.relative_gap:.2e}", "rho": f"{event.rho:.3g}"}
            line = f"relative gap {event.relative_gap:.3e}, rho {event.rho:.4g}"
        else:
            postfix = {
                "primal": f"{event.primal:.2e}",
                "dual": f"{event.dual:.2e}",
                "rho": f"{event.rho:.3g}",
            }
            line = (
                f"primal {event.primal:.3e} (eps {event.eps_primal:.3e}), dual {event.dual:.3e} "
                f"(eps {event.eps_dual:.3e}), rho {event.rho:.4g}"
            )
        if self.bar is not None:
            self.bar.n = event.iteration
            self.bar.set_postfix(**postfix)
        if event.iteration - self.last_logged >= self.log_every:
            self.last_logged = event.iteration
            level = logging.INFO if self.progress and self.bar is None else logging.DEBUG
            logger.log(level, "%s iteration %d: %s", self.strategy, event.iteration, line)
        if self.callback is not None:
            self.callback(event)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def plot_convergence(history: Sequence[dict[str, float]], path: str | None = None, *, title: str = "") -> Any:
    """Plot the convergence record (log scale) against the iteration; save to ``path`` when given.

    Parameters
    ----------
    history : list of dict with key ``iteration`` and any of ``relative_gap`` (certified solvers),
        ``primal`` and ``dual`` (residuals of the consensus strategy) (``stats.history`` of a solve)
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
    labels = {"relative_gap": "relative duality gap", "primal": "primal residual", "dual": "dual residual"}
    for key, label in labels.items():
        points = [(h["iteration"], h[key]) for h in history if h.get(key) is not None]
        if points:
            axes.semilogy([p[0] for p in points], [max(p[1], 1e-300) for p in points], label=label)
    axes.set_xlabel("iteration")
    axes.set_ylabel("gap / residual")
    axes.set_title(title or "ADMM convergence")
    axes.legend()
    figure.tight_layout()
    if path is not None:
        figure.savefig(path)
        plt.close(figure)
    return figure


__all__ = ["ProgressEvent", "ProgressReporter", "Timings", "plot_convergence"]
