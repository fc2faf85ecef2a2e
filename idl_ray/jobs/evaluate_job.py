"""Job: evaluate a saved SIM model on data (``idl-ray evaluate``).

``model`` is a run directory of ``idl-ray sim`` (or ``solve``) or a saved model folder
(:meth:`idl_ray.sim.SIM.save`). Given a run directory, what is not set here is taken from the run:
its data settings (``config.yaml``: the same data and held-out split) and its teacher (``teacher.pt``
when the run trained one, else the run's ``--teacher``). Reports accuracy (when the data has labels),
agreement with the teacher, ``||A||_inf`` against kappa, and the fixed-point iterations at inference.
"""

from __future__ import annotations

import dataclasses
import pathlib
import time
from typing import Any, ClassVar

from idl_ray._validation import Options, bad_parameter, check_choice
from idl_ray.datasets import DATASETS
from idl_ray.errors import ConfigError

__all__ = ["EvaluateJobConfig", "run_evaluate_job"]

#: data settings a run directory's config.yaml provides when not given here
_DATA_KEYS = ("dataset", "data", "input_column", "target_column", "test_fraction", "seed")


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvaluateJobConfig(Options):
    """Settings of the ``idl-ray evaluate`` job (None: from the run directory, else the sim defaults)."""

    model: str | None = None
    dataset: str | None = None
    data: str | None = None
    input_column: str | None = None
    target_column: str | None = None
    test_fraction: float | None = None
    seed: int | None = None
    split: str = "test"
    teacher: str | None = None
    hidden: tuple[int, ...] | None = None
    activation: str | None = None
    output_dir: str | None = None
    quiet: bool = False

    FLAG_HELP: ClassVar[dict[str, str]] = {
        "model": "run directory of `idl-ray sim`, or a saved model folder (required)",
        "dataset": "embedded data set (default: the run's)",
        "data": "data to evaluate on (default: the run's); same forms as `idl-ray sim --data`",
        "split": "which part: the held-out 'test' part, 'train', or 'all'",
        "teacher": "teacher to compare with (default: the run's teacher.pt or --teacher)",
        "hidden": "hidden widths to rebuild a state_dict teacher (default: the run's)",
        "output_dir": "write evaluation.json there",
        "quiet": "print nothing",
    }

    def _validate(self) -> None:
        owner = "EvaluateJobConfig"
        if not isinstance(self.model, str) or not self.model:
            raise bad_parameter(
                "model", owner, "a run directory of `idl-ray sim` or a saved model folder", self.model,
                "Pass --model runs/sim-<timestamp> (or the folder SIM.save wrote).",
            )  # fmt: skip
        check_choice(self.split, "split", owner, ("test", "train", "all"))
        if self.dataset is not None:
            check_choice(self.dataset, "dataset", owner, DATASETS)


def _resolve_model(spec: str) -> tuple[pathlib.Path, pathlib.Path | None, dict[str, Any]]:
    """(model folder, the run directory holding its data settings and teacher (or None), those settings)."""
    import yaml

    folder = pathlib.Path(spec).expanduser()
    if (folder / "model" / "sim.json").is_file():
        settings = {}
        if (folder / "config.yaml").is_file():
            settings = yaml.safe_load((folder / "config.yaml").read_text()) or {}
        if settings.get("states"):  # a `solve` run: data and teacher are those of its `extract` run
            from idl_ray.jobs.states_io import states_folder

            extract_dir = states_folder(settings["states"]).parent
            if (extract_dir / "config.yaml").is_file():
                return (
                    folder / "model",
                    extract_dir,
                    yaml.safe_load((extract_dir / "config.yaml").read_text()),
                )
        return folder / "model", folder, settings
    if (folder / "sim.json").is_file():
        return folder, None, {}
    raise ConfigError(
        f"--model {spec!r}: neither a run directory (with model/sim.json) nor a saved model folder "
        "(with sim.json and weights.safetensors). Pass the folder `idl-ray sim` printed at the end."
    )


def _teacher_spec(
    config: EvaluateJobConfig, run_dir: pathlib.Path | None, settings: dict[str, Any]
) -> str | None:
    if config.teacher is not None:
        return config.teacher
    if run_dir is not None and (run_dir / "teacher.pt").is_file():
        return str(run_dir / "teacher.pt")
    return settings.get("teacher")


def run_evaluate_job(config: EvaluateJobConfig, *, log=print) -> dict[str, Any]:
    """Evaluate ``config.model`` and return the report (also ``output_dir/evaluation.json`` when given)."""
    import torch

    from idl_ray.implicit.projection import inf_norm
    from idl_ray.jobs.data_sources import load_data
    from idl_ray.jobs.metrics import compare_outputs
    from idl_ray.jobs.run_dir import make_run_dir, write_json
    from idl_ray.jobs.teacher_sources import check_teacher_fits, load_teacher
    from idl_ray.sim import SIM

    say = (lambda _: None) if config.quiet else log
    start = time.perf_counter()
    model_dir, run_dir, settings = _resolve_model(config.model)
    folder = make_run_dir("evaluate", config.output_dir) if config.output_dir else None
    defaults = {"dataset": "digits", "data": None, "input_column": None, "target_column": None,
                "test_fraction": 0.25, "seed": 0}  # fmt: skip
    chosen = {
        key: getattr(config, key) if getattr(config, key) is not None else settings.get(key, defaults[key])
        for key in _DATA_KEYS
    }
    data = load_data(chosen.pop("data"), **chosen)
    sim = SIM.load(model_dir)
    if data.num_features != sim.input_dim:
        raise ConfigError(
            f"--data: the model at {str(model_dir)!r} takes {sim.input_dim} features per sample but the data "
            f"{data.source!r} has {data.num_features}. Evaluate it on data of the width it was fitted on."
        )
    x, y = {
        "test": (data.x_test, data.y_test),
        "train": (data.x_train, data.y_train),
        "all": (
            torch.cat([data.x_train, data.x_test]),
            None if data.y_train is None else torch.cat([data.y_train, data.y_test]),
        ),
    }[config.split]

    teacher_spec = _teacher_spec(config, run_dir, settings)
    teacher_out = None
    if teacher_spec is not None:
        teacher, _ = load_teacher(
            teacher_spec,
            hidden=tuple(config.hidden or settings.get("hidden") or (64, 32)),
            activation=config.activation or settings.get("activation") or "relu",
            input_dim=data.num_features,
        )
        check_teacher_fits(teacher, x, teacher_spec)
        with torch.no_grad():
            teacher_out = teacher(x)
    outputs = sim.predict(x)
    metrics = compare_outputs(outputs, teacher_out, y)
    a_inf = inf_norm(sim.A_)
    report = {
        "job": "evaluate",
        "model": str(model_dir.resolve()),
        "data": {**data.describe(), "split": config.split, "samples": len(x)},
        "teacher": teacher_spec,
        **metrics,
        "a_inf_norm": a_inf,
        "kappa": sim.kappa_,
        "well_posed": a_inf <= sim.kappa_ + 1e-12,
        "inference_iterations": sim.inference_stats_,
        "time_s": time.perf_counter() - start,
    }
    if folder is not None:
        write_json(folder, "evaluation.json", report)
        report["output"] = str(folder / "evaluation.json")
    lines = [f"idl-ray evaluate: {report['model']} on {data.source} ({config.split}, {len(x)} samples)"]
    for key in ("accuracy", "teacher_accuracy", "agreement", "relative_output_error"):
        if report[key] is not None:
            lines.append(f"  {key.replace('_', ' '):<22}  {report[key]:.4g}")
    lines.append(f"  {'||A||_inf':<22}  {a_inf:.4g} (kappa {sim.kappa_:g})")
    if folder is not None:
        lines.append(f"  written to: {report['output']}")
    say("\n".join(lines))
    return report
