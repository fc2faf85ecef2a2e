"""The installed ``idl-ray`` command, run as a process: bad input is one line on stderr and exit code 2,
before any expensive work; nothing hangs."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _command() -> list[str]:
    """The console script next to this interpreter (else ``python -m idl_ray``, the same entry point)."""
    script = pathlib.Path(sys.executable).with_name("idl-ray")
    if script.exists():
        return [str(script)]
    found = shutil.which("idl-ray")
    return [found] if found else [sys.executable, "-m", "idl_ray"]


def idl_ray(*args: str, cwd: pathlib.Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    env.pop("RAY_ADDRESS", None)
    return subprocess.run(
        [*_command(), *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd or ROOT
    )


def assert_one_line_error(out: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit code 2, one ``idl-ray <cmd>: error: ...`` line on stderr, no traceback; returns it."""
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
    assert "Traceback" not in out.stderr, out.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("idl-ray "), out.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def test_unreachable_address_fails_in_seconds_before_the_teacher_is_trained() -> None:
    start = time.monotonic()
    out = idl_ray("sim", "--address", "127.0.0.1:1", "--teacher-epochs", "1", "--hidden", "8", timeout=90)
    elapsed = time.monotonic() - start
    assert_one_line_error(out, "127.0.0.1:1", "ray start --head")
    assert "teacher" not in out.stdout  # checked before any training
    assert elapsed < 60


def test_info_with_an_unreachable_address_fails_in_seconds() -> None:
    out = idl_ray("info", "--address", "127.0.0.1:1", timeout=90)
    assert_one_line_error(out, "127.0.0.1:1")


@pytest.mark.parametrize("case", ["missing", "folder", "bad_yaml", "bad_json", "txt_read_as_json", "list"])
def test_bad_config_files_are_one_line_errors(case, tmp_path) -> None:
    path = {
        "missing": tmp_path / "nope.yaml",
        "folder": tmp_path,
        "bad_yaml": tmp_path / "job.yaml",
        "bad_json": tmp_path / "job.json",
        "txt_read_as_json": tmp_path / "job.txt",
        "list": tmp_path / "list.yaml",
    }[case]
    text = {
        "bad_yaml": "kappa: [0.9\nlam: 1",
        "bad_json": '{"kappa": 0.9,',
        "txt_read_as_json": "kappa: 0.9\n",
        "list": "- 1\n- 2\n",
    }.get(case)
    if text is not None:
        path.write_text(text)
    needle = {
        "missing": "no such file",
        "folder": "is a folder",
        "bad_yaml": "not valid YAML at line",
        "bad_json": "not valid JSON",
        "txt_read_as_json": ".yaml or .yml",
        "list": "mapping of settings",
    }[case]
    line = assert_one_line_error(idl_ray("sim", "--config", str(path)), needle)
    assert str(path) in line


# prefixes of --teacher-epochs and --dataset that are not flags of their own (--teacher and --data are)
@pytest.mark.parametrize("flag", ["--teacher-ep", "--datas"])
def test_abbreviated_flags_are_refused(flag) -> None:
    out = idl_ray("sim", flag, "3")
    assert out.returncode == 2
    assert f"unrecognized arguments: {flag} 3" in out.stderr.splitlines()[-1]


def test_missing_cuda_device_is_refused_before_training() -> None:
    device = "cuda" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"
    out = idl_ray("train", "--device", device, "--epochs", "1")
    assert_one_line_error(out, "'device'", repr(device))
    assert "epoch" not in out.stdout


def test_output_dir_that_is_a_file_is_refused_before_any_work(tmp_path) -> None:
    existing = tmp_path / "results"
    existing.write_text("keep me")
    for command in (["sim", "--solver", "admm"], ["train"]):
        out = idl_ray(
            *command,
            "--output-dir",
            str(existing),
            "--teacher-epochs" if command[0] == "sim" else "--epochs",
            "1",
        )
        assert_one_line_error(out, "'output_dir'", "existing file")
        assert out.stdout.strip() == ""  # nothing ran
    assert existing.read_text() == "keep me"


def test_train_output_dir_receives_the_report_and_model(tmp_path) -> None:
    out = idl_ray("train", "--epochs", "1", "--hidden-dim", "8", "--output-dir", str(tmp_path / "run"))
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads((tmp_path / "run" / "train_report.json").read_text())
    assert report["config"]["hidden_dim"] == 8 and 0.0 <= report["test_accuracy"] <= 1.0
    state = torch.load(tmp_path / "run" / "implicit_model.pt")
    assert state["A"].shape == (8, 8)
    assert float(state["A"].abs().sum(dim=1).max()) <= report["config"]["kappa"] + 1e-6


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["train", "--kappa", "1.5"], ["'kappa'"]),
        (["sim", "--solver", "admm", "--workers", "3"], ["'workers'", "ray-*"]),
        (["sim", "--solver", "cvx", "--use-gpu"], ["'use_gpu'"]),
        (["sim", "--solver", "admm", "--strategy", "consensus"], ["'strategy'", "ray-admm"]),
        (["sim", "--solver", "lstsq", "--address", "auto"], ["'address'"]),
        (["sim", "--solver", "mosek"], ["'solver'", "ray-admm"]),
        (["train", "--fixed-point", "newton"], ["'fixed_point'", "anderson"]),
    ]
    + (
        [(["sim", "--solver", "admm", "--use-gpu"], ["'use_gpu'", "CUDA"])]
        if not torch.cuda.is_available()
        else []
    ),
)
def test_bad_values_and_ignored_options_are_one_line_errors(args, needles) -> None:
    assert_one_line_error(idl_ray(*args), *needles)


def test_help_lists_the_allowed_values() -> None:
    sim_help = idl_ray("sim", "--help").stdout
    for value in ("ray-admm", "lstsq", "consensus", "leaky_relu", "digits"):
        assert value in sim_help
    assert "--cpus-per-worker" in sim_help  # the flag the resource error suggests
    train_help = idl_ray("train", "--help").stdout
    for value in ("anderson", "shrink", "picard"):
        assert value in train_help


def test_a_cluster_too_small_for_the_workers_is_reported_before_the_teacher() -> None:
    out = idl_ray(
        "sim", "--workers", "2", "--cpus-per-worker", "100000", "--teacher-epochs", "1", timeout=180
    )
    assert_one_line_error(out, "CPU(s)", "--cpus-per-worker", "--workers")
    assert "teacher" not in out.stdout
