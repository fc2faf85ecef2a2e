"""``idl-ray extract`` then ``idl-ray solve``: the states on disk are the teacher's states, and the
two-step fit equals the one-step ``idl-ray sim`` fit on the same data, teacher and solver."""

from __future__ import annotations

import json

import pytest
import torch

from idl_ray.cli import main
from idl_ray.jobs.data_sources import load_data
from idl_ray.jobs.evaluate_job import EvaluateJobConfig, run_evaluate_job
from idl_ray.jobs.states_io import iter_state_shards, read_structure
from idl_ray.sim import SIM
from idl_ray.sim.extraction import extract_states


@pytest.fixture(scope="module")
def runs(user_files, tmp_path_factory):
    root = tmp_path_factory.mktemp("xs")
    common = [
        "--data",
        str(user_files.npz),
        "--teacher",
        str(user_files.state_dict),
        "--hidden",
        "10",
        "--quiet",
    ]
    assert (
        main(
            [
                "extract",
                *common,
                "--rows-per-file",
                "50",
                "--batch-size",
                "32",
                "--output-dir",
                str(root / "x"),
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "solve",
                "--states",
                str(root / "x"),
                "--solver",
                "admm",
                "--quiet",
                "--output-dir",
                str(root / "s"),
            ]
        )
        == 0
    )
    assert main(["sim", *common, "--solver", "admm", "--output-dir", str(root / "sim")]) == 0
    return root


def test_states_on_disk_are_the_teachers_states(user_files, runs) -> None:
    folder = runs / "x" / "states"
    data = load_data(str(user_files.npz))
    reference = extract_states(user_files.teacher, data.x_train, progress=False)
    report = json.loads((runs / "x" / "report.json").read_text())
    assert report["states"]["rows"] == len(data.x_train) == 180
    # batches of 32 rows, a new file once a file holds >= 50 rows: 64 + 64 + 52
    assert len(report["states"]["files"]) == 3
    batches = list(iter_state_shards(folder, batch_size=64))
    for name in ("u", "z", "x", "y"):
        got = torch.cat([b[name] for b in batches])
        assert torch.equal(got, getattr(reference, name.upper()).T), name
    structure = read_structure(folder)
    assert structure.layer_sizes == reference.structure.layer_sizes and structure.bias
    assert torch.equal(structure.A, reference.structure.A.to(torch.float64))


def test_solve_equals_sim_on_the_same_inputs(runs) -> None:
    two_step = SIM.load(runs / "s" / "model")
    one_step = SIM.load(runs / "sim" / "model")
    for name in ("A", "B", "C", "D"):
        got, want = two_step.weights[name], one_step.weights[name]
        assert torch.allclose(got, want, atol=1e-6, rtol=1e-6), (name, float((got - want).abs().max()))
    report = json.loads((runs / "s" / "report.json").read_text())
    assert report["a_inf_norm"] <= 0.95 + 1e-12
    assert report["agreement_recorded"] >= 0.95
    for name in ("config.yaml", "report.md", "convergence.png", "sparsity.png"):
        assert (runs / "s" / name).is_file(), name


def test_evaluate_a_solve_run_uses_the_extract_runs_data_and_teacher(user_files, runs) -> None:
    report = run_evaluate_job(EvaluateJobConfig(model=str(runs / "s")), log=lambda _: None)
    sim_report = json.loads((runs / "sim" / "report.json").read_text())
    assert report["teacher"] == str(user_files.state_dict)
    assert report["data"]["source"] == str(user_files.npz) and report["data"]["samples"] == 60
    assert report["accuracy"] == pytest.approx(sim_report["sim_accuracy"])
    assert report["agreement"] == pytest.approx(sim_report["agreement"])


def test_solve_bad_states(tmp_path, capsys) -> None:
    assert main(["solve", "--solver", "admm"]) == 2
    assert "'states'" in capsys.readouterr().err
    assert (
        main(["solve", "--states", str(tmp_path), "--solver", "admm", "--output-dir", str(tmp_path / "o")])
        == 2
    )
    assert "--states" in capsys.readouterr().err
