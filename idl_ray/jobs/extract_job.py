"""Job: record a teacher's states on data and write them as Parquet shards (``idl-ray extract``).

The data and teacher options are those of ``idl-ray sim``; the states of the fitting part of the data
are written to ``<run dir>/states/`` (see :mod:`idl_ray.jobs.states_io`) for ``idl-ray solve``. This
runs in-process, one batch in memory at a time (the Ray Data pipeline of the streaming-extraction work
is not on this branch).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, ClassVar

from idl_ray._validation import Options, bad_parameter, check_positive_int
from idl_ray.jobs.common import check_teacher_settings

__all__ = ["ExtractJobConfig", "run_extract_job"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExtractJobConfig(Options):
    """Settings of the ``idl-ray extract`` job (data and teacher as for ``idl-ray sim``)."""

    dataset: str = "digits"
    data: str | None = None
    input_column: str | None = None
    target_column: str | None = None
    test_fraction: float = 0.25
    teacher: str | None = None
    hidden: tuple[int, ...] = (64, 32)
    teacher_epochs: int = 30
    activation: str = "relu"
    seed: int = 0
    batch_size: int = 256
    rows_per_file: int = 50_000
    output_dir: str | None = None
    quiet: bool = False

    FLAG_HELP: ClassVar[dict[str, str]] = {
        "data": "your data (as for `idl-ray sim --data`); the states of its fitting part are written",
        "teacher": "your trained network (as for `idl-ray sim --teacher`); default: an MLP trained here",
        "batch_size": "samples recorded per batch",
        "rows_per_file": "rows per Parquet file",
        "output_dir": "run directory (default: runs/extract-<UTC timestamp>/); states go to its states/",
        "quiet": "no progress bars or step logs; print only the run directory",
    }

    def _validate(self) -> None:
        owner = "ExtractJobConfig"
        check_teacher_settings(self, owner)
        check_positive_int(self.batch_size, "batch_size", owner)
        check_positive_int(self.rows_per_file, "rows_per_file", owner)
        fraction = self.test_fraction
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
            raise bad_parameter("test_fraction", owner, "a float in (0, 1)", fraction)


def run_extract_job(config: ExtractJobConfig, *, log=print) -> dict[str, Any]:
    """Record the states and write the run directory; returns the report (``report.json``)."""
    import warnings

    import torch

    from idl_ray.jobs.data_sources import load_data
    from idl_ray.jobs.report import console_summary
    from idl_ray.jobs.run_dir import make_run_dir, write_config, write_json
    from idl_ray.jobs.sim_job import prepare_teacher
    from idl_ray.jobs.states_io import StatesWriter
    from idl_ray.sim.extraction import StateRecorder, progress_bar

    say = (lambda _: None) if config.quiet else log
    total_start = time.perf_counter()
    folder = make_run_dir("extract", config.output_dir)
    write_config(folder, config.to_dict(), command="extract")
    say(f"run directory: {folder}")
    data = load_data(
        config.data,
        dataset=config.dataset,
        input_column=config.input_column,
        target_column=config.target_column,
        test_fraction=config.test_fraction,
        seed=config.seed,
    )
    teacher, teacher_info = prepare_teacher(config, data, log=say)
    files = {"config": "config.yaml", "report": "report.json", "states": "states"}
    if teacher_info["source"] == "trained":
        with warnings.catch_warnings():  # torch >= 2.10 deprecates TorchScript; --teacher still reads it
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.jit.save(torch.jit.script(teacher), str(folder / "teacher.pt"))
        files["teacher"] = "teacher.pt"

    start = time.perf_counter()
    recorder = StateRecorder(teacher)
    writer = StatesWriter(folder / "states", rows_per_file=config.rows_per_file)
    x, y = data.x_train, data.y_train
    starts = range(0, len(x), config.batch_size)
    for i in progress_bar(starts, total=len(starts), desc="extract states", enabled=not config.quiet):
        block = slice(i, i + config.batch_size)
        writer.write(recorder.record(x[block]), None if y is None else y[block])
    writer.close()
    extraction_time = time.perf_counter() - start
    structure = writer.structure
    assert structure is not None
    report = {
        "job": "extract",
        "run_dir": str(folder),
        "config": config.to_dict(),
        "data": data.describe(),
        "teacher": teacher_info,
        "headline": {
            "samples": writer.rows,
            "hidden units (n)": structure.num_hidden,
            "inputs (p, incl. bias)": structure.num_inputs,
            "outputs (q)": structure.num_outputs,
            "Parquet files": len(writer.files),
            "extraction time (s)": extraction_time,
        },
        "states": {"rows": writer.rows, "files": writer.files, "layer_sizes": structure.layer_sizes},
        "times_s": {"extraction": extraction_time, "total": time.perf_counter() - total_start},
        "files": files,
    }
    write_json(folder, "report.json", report)
    log(console_summary(report, folder) if not config.quiet else str(folder))
    return report
