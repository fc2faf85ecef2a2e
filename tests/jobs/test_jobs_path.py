"""``idl-ray sim --path`` through the CLI in-process: the path table, plot and best model in the run dir."""

from __future__ import annotations

import csv
import json

import pytest

from idl_ray.cli import build_parser, main, options_from_args
from idl_ray.errors import ConfigError
from idl_ray.jobs.sim_job import SimJobConfig


@pytest.fixture(scope="module")
def path_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("path-run") / "run"
    argv = ["sim", "--path", "--solver", "admm", "--hidden", "24", "--teacher-epochs", "15"]
    argv += ["--n-lams", "6", "--lam-ratio", "1e-5", "--kappa", "0.9", "--quiet", "--output-dir", str(folder)]
    assert main(argv) == 0
    return folder


def test_path_files_are_written(path_run) -> None:
    for name in ("path.csv", "path.json", "report.json", "report.md", "config.yaml"):
        assert (path_run / name).is_file(), name
    pytest.importorskip("matplotlib")
    assert (path_run / "path.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_path_table_matches_report(path_run) -> None:
    report = json.loads((path_run / "report.json").read_text())
    with (path_run / "path.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert report["job"] == "sim-path" and len(rows) == 6 == len(report["rows"])
    lams = [float(r["lam"]) for r in rows]
    assert lams == sorted(lams, reverse=True) and lams[0] == pytest.approx(report["lam_max"])
    assert lams[-1] == pytest.approx(1e-5 * report["lam_max"])
    assert int(rows[0]["nnz"]) == 0 and int(rows[-1]["nnz"]) > 0
    assert all(float(r["A_inf"]) <= 0.9 + 1e-12 for r in rows)
    assert "## Lambda path" in (path_run / "report.md").read_text()


def test_best_model_is_saved_and_within_the_drop(path_run) -> None:
    from idl_ray.sim import SIM

    report = json.loads((path_run / "report.json").read_text())
    best = report["best"]
    teacher = report["teacher"]["accuracy"]
    assert best is not None and best["accuracy"] >= teacher - 0.01
    qualifying = [r for r in report["rows"] if r["accuracy"] >= teacher - 0.01]
    assert best["nnz"] == min(r["nnz"] for r in qualifying)
    model = SIM.load(path_run / "model")
    assert int((model.A_ != 0).sum()) == best["nnz_A"]


def test_path_flags_parse_and_are_checked() -> None:
    args = build_parser().parse_args(["sim", "--path", "--n-lams", "7", "--lam-ratio", "0.01"])
    config = options_from_args(SimJobConfig, args)
    assert (config.path, config.n_lams, config.lam_ratio) == (True, 7, 0.01)
    with pytest.raises(ConfigError, match="'lam_ratio'"):
        SimJobConfig(path=True, lam_ratio=3.0)
    with pytest.raises(ConfigError, match="'n_lams'"):
        SimJobConfig(path=True, n_lams=0)
    with pytest.raises(ConfigError, match="'solver'"):
        SimJobConfig(path=True, solver="lstsq")
