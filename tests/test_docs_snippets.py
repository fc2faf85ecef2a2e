"""The code blocks of README.md and docs/implicit.md run as written, standalone, without warnings, and
give the same numbers every run."""

from __future__ import annotations

import ast
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def python_blocks(path: pathlib.Path) -> dict[str, str]:
    """``{heading: code}`` of the python blocks, keyed by the nearest heading above each."""
    blocks: dict[str, str] = {}
    heading = ""
    lines = path.read_text().splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
        if line.strip() == "```python":
            end = lines.index("```", i + 1)
            blocks.setdefault(heading, "\n".join(lines[i + 1 : end]))
            i = end
        i += 1
    return blocks


def run_snippet(code: str) -> subprocess.Popen:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("RAY_ADDRESS", None)
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # every warning (a UserWarning from our code, a ConvergenceWarning) fails the snippet; Ray's and
    # torch's own deprecations are not the docs' business
    prelude = (
        "import warnings\nwarnings.simplefilter('error')\n"
        "warnings.filterwarnings('ignore', category=DeprecationWarning)\n"
        "warnings.filterwarnings('ignore', category=FutureWarning)\n"
    )
    return subprocess.Popen(
        [sys.executable, "-c", prelude + code],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
    )


def finish(process: subprocess.Popen, timeout: float = 300) -> str:
    out, err = process.communicate(timeout=timeout)
    assert process.returncode == 0, err[-3000:]
    return out


def test_implicit_quick_starts_run_without_warnings() -> None:
    readme = python_blocks(ROOT / "README.md")["Implicit models"]
    implicit = python_blocks(ROOT / "docs" / "implicit.md")["Quick start"]
    out_readme, out_docs = (finish(p) for p in [run_snippet(readme), run_snippet(implicit)])
    assert out_readme.strip() == "tensor(True)"
    assert "converged" in out_docs


@pytest.mark.slow
def test_readme_sim_snippet_is_standalone_and_reproducible() -> None:
    code = python_blocks(ROOT / "README.md")["SIM"]
    full = run_snippet(code)
    # the teacher is seeded: two fresh processes train the same teacher (its weights, to the last bit)
    teacher_part = (
        code[: code.index("\nsim = ")] + "\nprint(repr([p.sum().item() for p in teacher.parameters()]))"
    )
    first, second = run_snippet(teacher_part), run_snippet(teacher_part)
    assert finish(first) == finish(second)
    assert float(finish(full).split()[0]) > 0.9


@pytest.mark.slow
def test_readme_sparsity_snippet_runs_and_is_sparse_and_more_robust() -> None:
    out = finish(run_snippet(python_blocks(ROOT / "README.md")["Sparsity and robustness"])).splitlines()
    accuracy, nonzeros = out[0].split(" ", 1)
    assert float(accuracy) > 0.9
    counts = ast.literal_eval(nonzeros)  # {'A': ..., 'B': ..., 'C': ..., 'D': ...}
    assert (
        counts["A"] + counts["B"] < 64 * 65 + 32 * 64
    )  # sparser than the teacher's own W1 (with biases), W2
    robust_bound, sparse_bound = (float(v) for v in out[1].split())
    assert robust_bound < sparse_bound  # the robustness weights lower the certified bound
    attacked = ast.literal_eval(out[2])
    assert len(attacked) == 2 and attacked[0] >= attacked[1] > 0.5


@pytest.mark.slow
def test_readme_ray_snippet_is_standalone() -> None:
    code = python_blocks(ROOT / "README.md")["On Ray"]
    assert "ray.init(" in code and re.search(r"^teacher = ", code, re.M)  # defines what it uses
    out = finish(run_snippet(code), timeout=600)
    assert float(out.split()[-1]) > 0.9
