"""``idl-ray sim --path``: a lambda path in the run directory (the rest of the job is :mod:`sim_job`).

The run directory gets ``path.csv`` and ``path.json`` (one row per lam: nonzeros of A/B/C/D, ||A||_inf,
held-out accuracy, Lipschitz bound, certificate, time; see :class:`idl_ray.sim.path.SIMPath`),
``path.png`` (accuracy vs fraction of nonzeros and vs the Lipschitz bound, with the teacher's point),
``model/`` (the sparsest point within ``max_accuracy_drop`` of the teacher's accuracy, when the data has
labels and a point qualifies), ``report.json`` and ``report.md``.
"""

from __future__ import annotations

import pathlib
import time
from typing import Any

from idl_ray.errors import ConfigError

__all__ = ["run_path"]


def run_path(
    config: Any,
    solver: Any,
    folder: pathlib.Path,
    data: Any,
    teacher: Any,
    teacher_info: dict[str, Any],
    times: dict[str, float],
    *,
    log=print,
) -> dict[str, Any]:
    """Fit the path on the job's data and teacher, write the files, return the report."""
    from idl_ray.jobs.report import PLOT_HINT, _matplotlib_available, console_summary, write_report_md
    from idl_ray.jobs.run_dir import write_json
    from idl_ray.sim import SIM

    say = (lambda _: None) if config.quiet else log
    total_start = time.perf_counter() - sum(times.values())
    has_labels = data.y_test is not None
    sim = SIM(activation=config.activation, kappa=config.kappa, progress=False)
    start = time.perf_counter()
    try:
        path = sim.fit_path(
            teacher,
            data.x_train,
            n_lams=config.n_lams,
            lam_ratio=config.lam_ratio,
            solver=solver,
            test_data=(data.x_test, data.y_test) if has_labels else None,
        )
    finally:
        close = getattr(solver, "close", None)
        if close is not None:  # a Ray solver kept its actors for the path
            close()
    times["path"] = time.perf_counter() - start
    times["extraction"] = path.extraction_time_s
    say(
        f"path: {len(path)} points from lam {path.lams[0]:.3g} to {path.lams[-1]:.3g} in {times['path']:.3g} s"
    )

    files = {
        "config": "config.yaml",
        "report": "report.json",
        "path_csv": path.to_csv(folder / "path.csv").name,
        "path_json": path.to_json(folder / "path.json").name,
    }
    plots: dict[str, str] = {}
    if has_labels and _matplotlib_available():
        plots["path"] = path.plot(folder / "path.png").name
    elif has_labels:
        say(PLOT_HINT)
    best: dict[str, Any] | None = None
    if has_labels:
        try:
            k = path.best_index(config.max_accuracy_drop)
        except ConfigError as exc:
            say(f"no model saved: {exc}")
        else:
            path.models[k].save(folder / "model")
            files["model"] = "model"
            best = {"index": k, **path.rows[k]}
    times["total"] = time.perf_counter() - total_start
    headline: dict[str, Any] = {
        "points": len(path),
        "lam_max": path.lam_max,
        "teacher accuracy": path.teacher.get("accuracy"),
        "path time (s)": times["path"],
        "mean time per point (s)": sum(row["time_s"] for row in path.rows) / len(path),
    }
    if best is not None:
        headline.update(
            {
                f"best lam (<= {config.max_accuracy_drop:g} accuracy drop)": best["lam"],
                "best accuracy": best["accuracy"],
                "best fraction of nonzeros": best["frac_nonzero"],
                "best Lipschitz bound": best["lipschitz"],
            }
        )
    report = {
        "job": "sim-path",
        "run_dir": str(folder),
        "config": config.to_dict(),
        "data": data.describe(),
        "teacher": {**teacher_info, **path.teacher},
        "headline": headline,
        "lam_max": path.lam_max,
        "rows": path.rows,
        "best": best,
        "times_s": times,
        "plots": plots,
        "files": {**files, "report_md": "report.md"},
    }
    write_json(folder, "report.json", report)
    write_report_md(folder, report, plots)
    _append_table(folder / "report.md", path)
    log(console_summary(report, folder) if not config.quiet else str(folder))
    return report


def _append_table(report_md: pathlib.Path, path: Any) -> None:
    """The path table in report.md (after the plots): one line per lam."""
    columns = ["lam", "nnz", "frac_nonzero", "A_inf", "accuracy", "lipschitz", "relative_gap_1", "time_s"]
    columns = [c for c in columns if c in path.columns()]
    lines = ["", "## Lambda path", "", "| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    for row in path.rows:
        cells = [_fmt(row.get(c)) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    with report_md.open("a") as handle:
        handle.write("\n".join(lines) + "\n")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)
