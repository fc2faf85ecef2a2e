"""The run directory ``idl-ray sim`` leaves: files, real PNG plots, a config that reloads, report.md."""

from __future__ import annotations

import json
import pathlib
import struct
import sys

import numpy as np
import pytest

from idl_ray.cli import build_parser, main, options_from_args
from idl_ray.jobs.sim_job import SimJobConfig

SMALL = ["--hidden", "8", "--teacher-epochs", "2", "--solver", "admm"]


def png_size(path: pathlib.Path) -> tuple[int, int]:
    """(width, height) from the PNG header (checks the signature too)."""
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])


@pytest.fixture(scope="module")
def default_run(tmp_path_factory) -> tuple[pathlib.Path, str]:
    """One run without --output-dir, started from a fresh working folder."""
    import os

    cwd = tmp_path_factory.mktemp("cwd")
    previous = os.getcwd()
    os.chdir(cwd)
    try:
        from contextlib import redirect_stdout
        from io import StringIO

        buffer = StringIO()
        with redirect_stdout(buffer):
            code = main(["sim", *SMALL, "--no-quiet"])
    finally:
        os.chdir(previous)
    assert code == 0
    runs = list((cwd / "runs").iterdir())
    assert len(runs) == 1
    return runs[0], buffer.getvalue()


def test_default_run_directory_and_console(default_run) -> None:
    folder, console = default_run
    assert folder.name.startswith("sim-") and folder.parent.name == "runs"
    for name in (
        "config.yaml",
        "report.json",
        "report.md",
        "convergence.png",
        "sparsity.png",
        "teacher.pt",
        "teacher_state_dict.pt",
        "model/sim.json",
        "model/weights.safetensors",
    ):
        assert (folder / name).is_file(), name
    # the console ends with the short report and the path
    tail = console.strip().splitlines()
    assert tail[-1].strip() == f"run directory: {folder}"
    assert any("SIM accuracy" in line for line in tail[-10:])
    assert any("||A||_inf" in line for line in tail[-10:])


def test_report_json_holds_the_numbers(default_run) -> None:
    folder, _ = default_run
    report = json.loads((folder / "report.json").read_text())
    from idl_ray.sim import SIM

    model = SIM.load(folder / "model")
    a_inf = float(model.A_.abs().sum(dim=1).max())
    assert report["a_inf_norm"] == pytest.approx(a_inf, rel=1e-12) and a_inf <= 0.95
    zeros = {k: float((v == 0).double().mean()) for k, v in model.weights.items()}
    assert report["sparsity"] == pytest.approx(zeros)
    for stage in ("stage1", "stage2"):
        cert = report["certificate"][stage]
        assert cert["status"] in ("optimal", "max_iter", "optimal_inaccurate") and cert["iterations"] > 0
        assert cert["converged"] is (cert["status"] == "optimal")
    assert set(report["times_s"]) >= {
        "data",
        "teacher",
        "extraction",
        "stage1",
        "stage2",
        "evaluation",
        "total",
    }
    assert report["times_s"]["total"] >= report["times_s"]["stage1"] + report["times_s"]["stage2"]
    assert 0 <= report["sim_accuracy"] <= 1 and 0 <= report["agreement"] <= 1


def test_plots_are_real_images(default_run) -> None:
    from matplotlib.image import imread

    folder, _ = default_run
    for name, min_width in (("convergence.png", 600), ("sparsity.png", 1000)):
        width, height = png_size(folder / name)
        assert min_width <= width <= 4000 and 250 <= height <= 2000, (name, width, height)
        pixels = imread(folder / name)
        assert pixels.shape[:2] == (height, width)
        assert float(np.std(pixels[..., :3])) > 0.05, f"{name} looks blank"
    md = (folder / "report.md").read_text()
    assert "![convergence](convergence.png)" in md and "![sparsity](sparsity.png)" in md
    assert "\\|\\|A\\|\\|_inf" in md  # pipes escaped inside the table


def test_config_reloads_to_the_same_settings(default_run) -> None:
    folder, _ = default_run
    args = build_parser().parse_args(["sim", "--config", str(folder / "config.yaml")])
    reloaded = options_from_args(SimJobConfig, args)
    saved = json.loads((folder / "report.json").read_text())["config"]
    assert reloaded == SimJobConfig.from_dict(saved)
    assert reloaded.hidden == (8,) and reloaded.solver == "admm" and reloaded.output_dir is None


def test_without_matplotlib_everything_else_is_written(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    out = tmp_path / "run"
    assert main(["sim", *SMALL, "--output-dir", str(out)]) == 0
    console = capsys.readouterr().out
    assert "pip install 'idl_ray[plot]'" in console
    assert not list(out.glob("*.png"))
    for name in ("config.yaml", "report.json", "report.md", "model/sim.json"):
        assert (out / name).is_file(), name
    assert "pip install 'idl_ray[plot]'" in (out / "report.md").read_text()
    assert json.loads((out / "report.json").read_text())["plots"] == {}


def test_output_dir_that_is_a_file_is_bad_input(tmp_path, capsys) -> None:
    target = tmp_path / "taken"
    target.write_text("")
    assert main(["sim", *SMALL, "--output-dir", str(target)]) == 2
    assert "--output-dir" in capsys.readouterr().err


def test_quiet_prints_only_the_path(tmp_path, capsys) -> None:
    out = tmp_path / "run"
    assert main(["sim", *SMALL, "--quiet", "--output-dir", str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == str(out.resolve())
    assert "it/s" not in captured.err  # no progress bars


def test_convergence_plot_with_and_without_history(tmp_path) -> None:
    """ADMM-style history is drawn; a direct/cvxpy stage gets a panel with its certificate instead."""
    from matplotlib.image import imread

    from idl_ray.jobs.report import convergence_plot
    from idl_ray.sim.solvers.base import SolverStats

    history = [
        {"iteration": 10 * k, "primal": 10.0**-k, "dual": 2 * 10.0**-k, "rho": 1.0} for k in range(1, 8)
    ]
    stats = {
        "stage1": SolverStats(solver="admm", iterations=70, status="optimal", history=history),
        "stage2": SolverStats(solver="cvx", iterations=3, status="optimal", objective=0.5, history=[]),
    }
    path = convergence_plot(stats, tmp_path / "c.png")
    width, height = png_size(path)
    assert width >= 800 and height >= 300
    pixels = imread(path)
    left, right = pixels[:, : width // 2, :3], pixels[:, width // 2 :, :3]

    # the left panel holds coloured curves, the right one only black text on white
    def coloured(part):
        return float((part.max(axis=2) - part.min(axis=2) > 0.3).mean())

    assert coloured(left) > 0.002 and coloured(right) == 0.0
