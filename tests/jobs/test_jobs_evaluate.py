"""``idl-ray evaluate``: a saved model on data, from a run directory or a model folder."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest
import torch

from idl_ray.cli import main
from idl_ray.jobs.evaluate_job import EvaluateJobConfig, run_evaluate_job
from idl_ray.sim import SIM


@pytest.fixture(scope="module")
def user_run(user_files, tmp_path_factory) -> tuple[pathlib.Path, dict]:
    """A sim run on the user's .npz with the user's state_dict teacher."""
    out = tmp_path_factory.mktemp("evalrun") / "run"
    args = ["sim", "--data", str(user_files.npz), "--teacher", str(user_files.state_dict), "--hidden", "10"]
    assert main([*args, "--solver", "admm", "--quiet", "--output-dir", str(out)]) == 0
    return out, json.loads((out / "report.json").read_text())


def test_run_directory_reuses_the_runs_data_split_and_teacher(user_run) -> None:
    folder, sim_report = user_run
    report = run_evaluate_job(EvaluateJobConfig(model=str(folder)), log=lambda _: None)
    # the same held-out samples and the same teacher as the sim job: the same numbers
    assert report["data"]["samples"] == sim_report["data"]["test_samples"]
    assert report["teacher"] == sim_report["config"]["teacher"]
    assert report["accuracy"] == pytest.approx(sim_report["sim_accuracy"])
    assert report["agreement"] == pytest.approx(sim_report["agreement"])
    assert report["a_inf_norm"] == pytest.approx(sim_report["a_inf_norm"]) and report["well_posed"]


def test_model_folder_on_given_data_matches_an_independent_computation(
    user_files, user_run, tmp_path
) -> None:
    folder, _ = user_run
    data = tmp_path / "fresh.npz"
    rng = np.random.default_rng(7)
    x = (user_files.x[rng.integers(0, len(user_files.x), 90)] + 0.1 * rng.normal(size=(90, 12))).astype(
        np.float32
    )
    with torch.no_grad():
        y_teacher = user_files.teacher(torch.from_numpy(x)).argmax(dim=1).numpy()
    labels = y_teacher.copy()
    labels[:9] = (labels[:9] + 1) % 3  # 10% wrong labels: accuracy and agreement must differ
    np.savez(data, x=x[:60], y=labels[:60], x_test=x[60:], y_test=labels[60:])
    config = EvaluateJobConfig(
        model=str(folder / "model"), data=str(data), split="all", teacher=str(user_files.torchscript),
        output_dir=str(tmp_path / "eval"),
    )  # fmt: skip
    report = run_evaluate_job(config, log=lambda _: None)
    predicted = SIM.load(folder / "model").predict(torch.from_numpy(x)).argmax(dim=1).cpu().numpy()
    # the data loader keeps x then x_test in order for split="all"
    assert report["data"]["samples"] == 90
    assert report["accuracy"] == pytest.approx(float(np.mean(predicted == labels)))
    assert report["agreement"] == pytest.approx(float(np.mean(predicted == y_teacher)))
    assert report["teacher_accuracy"] == pytest.approx(0.9)
    saved = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    assert saved["accuracy"] == report["accuracy"]


def test_cli_prints_the_numbers(user_run, capsys) -> None:
    folder, _ = user_run
    assert main(["evaluate", "--model", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "agreement" in out and "||A||_inf" in out


def test_bad_inputs_exit_2(user_run, tmp_path, capsys) -> None:
    folder, _ = user_run
    assert main(["evaluate"]) == 2
    assert "'model'" in capsys.readouterr().err
    assert main(["evaluate", "--model", str(tmp_path)]) == 2
    assert "neither a run directory" in capsys.readouterr().err
    # digits has 64 features, the model takes 12
    assert main(["evaluate", "--model", str(folder), "--dataset", "digits", "--data", "digits"]) == 2
    err = capsys.readouterr().err
    assert "12 features" in err and "64" in err
