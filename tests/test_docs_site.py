"""The docs site builds with ``mkdocs build --strict`` and the CLI reference lists every flag."""

from __future__ import annotations

import dataclasses
import importlib
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from idl_ray.cli import _jobs, build_parser

REPO = pathlib.Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def test_mkdocs_build_strict(tmp_path) -> None:
    pytest.importorskip("mkdocs", reason="the test extra installs mkdocs: pip install -e '.[test]'")
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "PYTHONPATH": str(REPO)}
    mkdocs = shutil.which("mkdocs", path=str(pathlib.Path(sys.executable).parent)) or "mkdocs"
    done = subprocess.run(
        [mkdocs, "build", "--strict", "--site-dir", str(site)], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert (site / "index.html").is_file()
    for page in (
        "installation",
        "concepts",
        "pipeline",
        "cli",
        "clusters",
        "torchidl",
        "benchmarks",
        "tutorial",
        "api",
    ):
        assert (site / page / "index.html").is_file(), page
    # the clusters page includes clusters/README.md; the API page renders the docstrings
    assert "Without an image" in (site / "clusters" / "index.html").read_text()
    api = (site / "api" / "index.html").read_text()
    for anchor in (
        "implicit.model.ImplicitModel",
        "sim.estimator.SIM.fit",
        "sim.solvers.admm.ADMMSolver",
        "distributed.solvers.RayADMMSolver",
        "jobs.sim_job.SimJobConfig",
    ):
        assert f'id="idl_ray.{anchor}"' in api, anchor


def test_cli_reference_lists_every_command_and_flag() -> None:
    text = (REPO / "docs" / "cli.md").read_text()
    for name, (module, config_name, _) in _jobs().items():
        assert f"## `idl-ray {name}`" in text, name
        config_class = getattr(importlib.import_module(module), config_name)
        section = text.split(f"## `idl-ray {name}`")[1].split("\n## ")[0]
        for field in dataclasses.fields(config_class):
            flag = "--" + field.name.replace("_", "-")
            assert f"`{flag}" in section, f"idl-ray {name} {flag} is not in docs/cli.md"
    commands = build_parser()._subparsers._group_actions[0].choices  # every sub-command, info included
    for name in commands:
        assert f"`idl-ray {name}`" in text, name
