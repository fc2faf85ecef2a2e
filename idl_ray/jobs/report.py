"""What a run leaves for people: plots (PNG), ``report.md`` that embeds them, the console summary.

Plots use matplotlib's object API (``Figure`` + the Agg canvas), never ``pyplot``, so no global backend
state changes in the caller's process. matplotlib is an optional extra (``pip install 'idl_ray[plot]'``):
without it :func:`write_plots` says so and returns no plots; everything else is still written.
"""

from __future__ import annotations

import math
import pathlib
from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["PLOT_HINT", "console_summary", "write_plots", "write_report_md"]

PLOT_HINT = "plots skipped: matplotlib is not installed. Install it with: pip install 'idl_ray[plot]'"

#: history keys that are convergence measures (plotted on a log scale); others (rho, step) are not
_RESIDUAL_KEYS = (
    "primal",
    "dual",
    "gap",
    "residual",
    "objective",
    "loss",
    "primal_residual",
    "dual_residual",
)


def _matplotlib_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def write_plots(
    folder: pathlib.Path, stats: Mapping[str, Any], weights: Mapping[str, torch.Tensor], *, log=print
) -> dict[str, str]:
    """Write ``convergence.png`` and ``sparsity.png``; returns {plot name: file name} (empty without matplotlib)."""
    if not _matplotlib_available():
        log(PLOT_HINT)
        return {}
    return {
        "convergence": convergence_plot(stats, folder / "convergence.png").name,
        "sparsity": sparsity_plot(weights, folder / "sparsity.png").name,
    }


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def convergence_plot(stats: Mapping[str, Any], path: pathlib.Path) -> pathlib.Path:
    """Residuals (or gap / objective) per iteration, one panel per solver stage, log scale.

    ``stats`` maps a stage name to its :class:`~idl_ray.sim.solvers.base.SolverStats` (or its dict).
    A stage without per-iteration history (a direct or cvxpy solve) gets a panel that says so.
    """
    stages = list(stats.items())
    figure = _figure(5.0 * max(1, len(stages)), 3.8)
    for k, (stage, stage_stats) in enumerate(stages):
        record = stage_stats if isinstance(stage_stats, Mapping) else stage_stats.to_dict()
        axes = figure.add_subplot(1, max(1, len(stages)), k + 1)
        history = record.get("history") or []
        series = _series(history)
        if series:
            for name, (xs, ys) in series.items():
                axes.semilogy(xs, ys, marker=".", label=name)
            axes.set_xlabel("iteration")
            axes.legend(fontsize=8)
        else:
            lines = [f"{record.get('solver')}: no per-iteration history", f"status {record.get('status')}"]
            if record.get("objective") is not None:
                lines.append(f"objective {record['objective']:.6g}")
            if record.get("constraint_norm") is not None:
                lines.append(f"max row l1 norm of the bounded block {record['constraint_norm']:.4g}")
            axes.text(0.5, 0.5, "\n".join(lines), ha="center", va="center", transform=axes.transAxes)
            axes.set_xticks([])
            axes.set_yticks([])
        axes.set_title(f"{stage}: {record.get('status')}, {record.get('iterations')} it", fontsize=10)
        axes.grid(True, which="both", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
    return path


def _series(history: list[Mapping[str, Any]]) -> dict[str, tuple[list[float], list[float]]]:
    keys = [k for k in _RESIDUAL_KEYS if any(k in h for h in history)]
    out: dict[str, tuple[list[float], list[float]]] = {}
    for key in keys:
        xs, ys = [], []
        for i, h in enumerate(history):
            value = h.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value) and value > 0:
                xs.append(float(h.get("iteration", i + 1)))
                ys.append(float(value))
        if xs:
            out[key] = (xs, ys)
    return out


def sparsity_plot(weights: Mapping[str, torch.Tensor], path: pathlib.Path) -> pathlib.Path:
    """The nonzero pattern of each matrix (A, B, C, D), black where the entry is nonzero."""
    names = [n for n in ("A", "B", "C", "D") if n in weights]
    figure = _figure(4.0 * len(names), 4.2)
    for k, name in enumerate(names):
        matrix = weights[name].detach().cpu()
        axes = figure.add_subplot(1, len(names), k + 1)
        nonzero = (matrix != 0).numpy()
        axes.imshow(nonzero, cmap="Greys", interpolation="nearest", aspect="auto", vmin=0, vmax=1)
        density = float(nonzero.mean()) if nonzero.size else 0.0
        axes.set_title(f"{name} {tuple(matrix.shape)}: {density:.1%} nonzero", fontsize=10)
        axes.set_xlabel("column")
        axes.set_ylabel("row")
    figure.tight_layout()
    figure.savefig(path)
    return path


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _cell(text: str) -> str:
    """A Markdown table cell: pipes escaped (``||A||_inf`` would end the cell)."""
    return text.replace("|", "\\|")


def write_report_md(
    folder: pathlib.Path, report: Mapping[str, Any], plots: Mapping[str, str]
) -> pathlib.Path:
    """``report.md``: the headline numbers, the certificate per stage, times, and the plots embedded."""
    lines = [f"# idl-ray {report['job']} run", ""]
    lines += ["| quantity | value |", "| --- | --- |"]
    for key, value in report.get("headline", {}).items():
        lines.append(f"| {_cell(key)} | {_cell(_fmt(value))} |")
    certificate = report.get("certificate") or {}
    if certificate:
        lines += ["", "## Solver certificate", "", "| stage | status | converged | iterations | objective |"]
        lines.append("| --- | --- | --- | --- | --- |")
        for stage, cert in certificate.items():
            lines.append(
                f"| {stage} | {cert.get('status')} | {cert.get('converged')} | {cert.get('iterations')} | "
                f"{_fmt(cert.get('objective'))} |"
            )
    sparsity = report.get("sparsity") or {}
    if sparsity:
        lines += ["", "## Sparsity (fraction of zero entries)", "", "| matrix | zeros |", "| --- | --- |"]
        lines += [f"| {k} | {v:.1%} |" for k, v in sparsity.items()]
    times = report.get("times_s") or {}
    if times:
        lines += ["", "## Time per stage", "", "| stage | seconds |", "| --- | --- |"]
        lines += [f"| {k} | {v:.3g} |" for k, v in times.items()]
    if report.get("robustness"):
        from idl_ray.jobs.robustness_report import robustness_markdown

        lines += robustness_markdown(report["robustness"])
    lines += ["", "## Plots", ""]
    if plots:
        for name, file in plots.items():
            lines += [f"![{name}]({file})", ""]
    else:
        lines += [PLOT_HINT, ""]
    lines += ["Settings: [config.yaml](config.yaml); all numbers: [report.json](report.json).", ""]
    path = folder / "report.md"
    path.write_text("\n".join(lines))
    return path


def console_summary(report: Mapping[str, Any], folder: pathlib.Path) -> str:
    """The short report printed at the end of a run, ending with the run directory."""
    headline = report.get("headline", {})
    width = max((len(k) for k in headline), default=0)
    lines = [f"idl-ray {report['job']}: done"]
    lines += [f"  {k:<{width}}  {_fmt(v)}" for k, v in headline.items()]
    lines.append(f"  run directory: {folder}")
    return "\n".join(lines)
