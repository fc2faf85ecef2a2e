"""examples/tutorial.ipynb runs top to bottom (its cells assert the bound and the Ray / local agreement)."""

from __future__ import annotations

import os
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def test_tutorial_notebook_executes(tmp_path, monkeypatch) -> None:
    nbformat = pytest.importorskip("nbformat", reason="the test extra installs nbformat/nbclient")
    from nbclient import NotebookClient

    monkeypatch.setenv("PYTHONPATH", f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    notebook = nbformat.read(REPO / "examples" / "tutorial.ipynb", as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code"), (
        "commit it clean"
    )
    NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    text = "\n".join(
        output.get("text", "")
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
    )
    assert "ImplicitModel test accuracy 0.9" in text
    assert "SIM test accuracy" in text and "||A||_inf" in text
    assert "same predictions on" in text and "stage-1 objective" in text
