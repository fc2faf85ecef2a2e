"""``idl-ray sim --attack-eps``: Lipschitz bounds and attacked accuracy in report.json and report.md."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

from idl_ray.cli import main
from idl_ray.robustness import attack_accuracy, lipschitz_bound
from idl_ray.sim import SIM


def test_sim_job_reports_bounds_and_attacked_accuracy(user_files, tmp_path) -> None:
    out = tmp_path / "run"
    args = [
        "sim",
        "--data",
        str(user_files.npz_split),
        "--teacher",
        str(user_files.state_dict),
        "--hidden",
        "10",
    ]
    args += ["--solver", "admm", "--quiet", "--output-dir", str(out), "--attack-eps", "0,0.05,0.2"]
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    section = report["robustness"]
    sim = SIM.load(out / "model")
    bounds = section["lipschitz_bound"]
    assert bounds["sim"] == pytest.approx(lipschitz_bound(sim)) and bounds["sim"] > 0
    assert bounds["sim_elementwise"] == pytest.approx(lipschitz_bound(sim, method="elementwise"))
    assert bounds["sim_elementwise"] <= bounds["sim"]
    assert bounds["teacher_elementwise"] > 0
    assert report["headline"]["Lipschitz bound (SIM)"] == bounds["sim"]
    attacks = section["attacks"]
    assert attacks["eps"] == [0.0, 0.05, 0.2]
    # eps = 0 is the clean accuracy of the teacher (and of the SIM's module, within its fixed-point tolerance)
    assert attacks["teacher"]["fgsm"][0] == pytest.approx(report["teacher_accuracy"])
    assert attacks["sim"]["pgd"][0] == pytest.approx(report["sim_accuracy"], abs=0.02)
    for name, method in itertools.product(("teacher", "sim"), ("fgsm", "pgd")):
        accs = attacks[name][method]
        assert all(b <= a for a, b in itertools.pairwise(accs)), (name, method, accs)
    # the reported FGSM numbers are those of an independent call on the same held-out data
    data = dict(np.load(user_files.npz_split))
    x_test = torch.as_tensor(data["x_test"], dtype=torch.float32)
    y_test = torch.as_tensor(data["y_test"])
    expected = attack_accuracy(sim.to_module(), x_test, y_test, [0.0, 0.05, 0.2])
    assert attacks["sim"]["fgsm"] == pytest.approx(expected, abs=1.5 / len(y_test))
    markdown = (out / "report.md").read_text()
    assert "## Robustness" in markdown and "| SIM | PGD |" in markdown and "eps=0.05" in markdown


def test_sim_job_without_attacks_still_reports_the_bound(user_files, tmp_path) -> None:
    out = tmp_path / "run"
    args = ["sim", "--data", str(user_files.npz), "--teacher", str(user_files.state_dict), "--hidden", "10"]
    assert main([*args, "--solver", "lstsq", "--quiet", "--output-dir", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert "attacks" not in report["robustness"]
    assert report["robustness"]["lipschitz_bound"]["sim"] == pytest.approx(
        lipschitz_bound(SIM.load(out / "model"))
    )


@pytest.mark.parametrize("value", ["-0.1", "nan", "inf"])
def test_bad_attack_eps_exits_2_naming_the_option(value: str, tmp_path, capsys) -> None:
    assert main(["sim", "--attack-eps", f"0.1,{value}", "--output-dir", str(tmp_path / "run")]) == 2
    assert "attack_eps" in capsys.readouterr().err
