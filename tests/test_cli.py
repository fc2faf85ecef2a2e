"""The idl-ray command: flags generated from job configs, JSON configs, errors, the train job."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from idl_ray.cli import build_parser, main, options_from_args
from idl_ray.errors import ConfigError
from idl_ray.jobs.sim_job import SimJobConfig
from idl_ray.jobs.train_job import TrainJobConfig, run_train_job


def test_flags_parse_into_validated_config() -> None:
    args = build_parser().parse_args(["sim", "--hidden", "16,8", "--kappa", "0.5", "--no-use-gpu"])
    config = options_from_args(SimJobConfig, args)
    assert config.hidden == (16, 8)
    assert config.kappa == 0.5
    assert config.use_gpu is False
    assert config.solver == SimJobConfig().solver


def test_json_config_is_merged_and_flags_win(tmp_path) -> None:
    path = tmp_path / "job.json"
    path.write_text(json.dumps({"kappa": 0.7, "lam": 0.01}))
    args = build_parser().parse_args(["sim", "--config", str(path), "--kappa", "0.6"])
    config = options_from_args(SimJobConfig, args)
    assert (config.kappa, config.lam) == (0.6, 0.01)


def test_unknown_key_in_json_config_is_rejected(tmp_path, capsys) -> None:
    path = tmp_path / "job.json"
    path.write_text(json.dumps({"kapa": 0.7}))
    assert main(["sim", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "kapa" in err and "kappa" in err


def test_bad_value_exits_2_with_message(capsys) -> None:
    assert main(["train", "--kappa", "1.5"]) == 2
    assert "'kappa' parameter" in capsys.readouterr().err


def test_config_validation_names_the_argument() -> None:
    with pytest.raises(ConfigError, match="hidden"):
        SimJobConfig(hidden=(16, 0))
    with pytest.raises(ConfigError, match="solver"):
        SimJobConfig(solver="mosek")


def test_train_job_learns_and_respects_kappa() -> None:
    report = run_train_job(TrainJobConfig(epochs=3, hidden_dim=40, kappa=0.8), log=lambda _: None)
    assert report["test_accuracy"] > 0.85
    assert report["A_inf_norm"] <= 0.8


def test_train_job_takes_the_constraint_flag() -> None:
    assert TrainJobConfig().constraint == "shrink"  # the model's default
    args = build_parser().parse_args(
        ["train", "--constraint", "project", "--epochs", "1", "--hidden-dim", "20"]
    )
    config = options_from_args(TrainJobConfig, args)
    assert config.constraint == "project"
    report = run_train_job(config.replace(kappa=0.7), log=lambda _: None)
    assert report["config"]["constraint"] == "project" and report["A_inf_norm"] <= 0.7
    assert report["workers"] == 0 and "metrics" not in report  # single process, no Ray
    with pytest.raises(ConfigError, match=r"'constraint'.*shrink"):
        TrainJobConfig(constraint="clip")


def test_train_job_writes_its_report(tmp_path) -> None:
    assert main(["train", "--epochs", "1", "--hidden-dim", "10", "--output-dir", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "train_report.json").read_text())
    assert report["job"] == "train" and report["A_inf_norm"] <= report["config"]["kappa"]


def test_train_job_workers_flags_are_checked() -> None:
    args = build_parser().parse_args(
        ["train", "--workers", "2", "--use-gpu", "--name", "run", "--max-failures", "1"]
    )
    config = options_from_args(TrainJobConfig, args)
    assert (config.workers, config.use_gpu, config.name, config.max_failures) == (2, True, "run", 1)
    with pytest.raises(ConfigError, match=r"'workers'.*>= 0.*Got -1"):
        TrainJobConfig(workers=-1)
    with pytest.raises(
        ConfigError, match=r"\['name', 'storage_path'\] apply to training on Ray Train workers"
    ):
        TrainJobConfig(storage_path="/tmp/runs", name="run")
    with pytest.raises(ConfigError, match=r"'device' applies to workers=0 only.*--use-gpu"):
        TrainJobConfig(workers=2, device="cuda")
    with pytest.raises(ConfigError, match="'max_failures'"):
        TrainJobConfig(workers=2, max_failures=-2)


def test_console_entry_point_runs() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "idl_ray", "info"], capture_output=True, text=True, check=True, timeout=120
    )
    assert "torch" in out.stdout and "cuda_available" in out.stdout


def test_yaml_config_in_clusters_folder_is_valid() -> None:
    from idl_ray.jobs.sim_job import make_solver

    args = build_parser().parse_args(["sim", "--config", "clusters/local.yaml"])
    config = options_from_args(SimJobConfig, args)
    assert config == SimJobConfig(workers=2, strategy="gram")
    # spelled out, the defaults: the same solver as a run without the file
    assert make_solver(config)._params == make_solver(SimJobConfig())._params


def test_each_ray_solver_takes_its_own_strategies() -> None:
    from idl_ray.jobs.sim_job import make_solver
    from idl_ray.jobs.solve_job import SolveJobConfig

    assert make_solver(SimJobConfig(solver="ray-pgd", strategy="data"))._params["strategy"] == "data"
    assert make_solver(SimJobConfig(solver="ray-pgd"))._params["strategy"] == "gram"
    assert (
        make_solver(SimJobConfig(solver="ray-admm", strategy="consensus"))._params["strategy"] == "consensus"
    )
    for config, solver, strategy in (
        (SimJobConfig, "ray-pgd", "consensus"),
        (SimJobConfig, "ray-admm", "data"),
        (SolveJobConfig, "ray-pgd", "consensus"),
    ):
        extra = {"states": "runs/extract"} if config is SolveJobConfig else {}
        with pytest.raises(ConfigError, match=rf"'strategy'.*with solver='{solver}'.*'{strategy}'"):
            config(solver=solver, strategy=strategy, **extra)


def test_sim_job_writes_model_and_report(tmp_path) -> None:
    from idl_ray.jobs.sim_job import run_sim_job
    from idl_ray.sim import SIM

    config = SimJobConfig(hidden=(32,), teacher_epochs=10, solver="admm", kappa=0.9, output_dir=str(tmp_path))
    report = run_sim_job(config, log=lambda _: None)
    assert report["sim_accuracy"] >= report["teacher_accuracy"] - 0.03
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["sim_accuracy"] == report["sim_accuracy"]
    loaded = SIM.load(tmp_path / "model")
    assert float(loaded.A_.abs().sum(dim=1).max()) <= 0.9
