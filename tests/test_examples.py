"""Every script in examples/ runs (small settings) and prints what its docstring promises.

``examples/submit_job.py`` needs a cluster: it is run against the test head in ``test_job_submission.py``;
``examples/tutorial.ipynb`` is executed in ``test_tutorial.py``.
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"

pytestmark = pytest.mark.slow

#: script -> (small-settings arguments, regexes the output must match)
CASES = {
    "train_implicit_digits.py": (["--epochs", "2", "--hidden", "24"], [r"test accuracy: 0\.(8|9)\d+"]),
    "sim_digits.py": ([], [r"SIM\s+test accuracy: 0\.9\d+", r"\|\|A\|\|_inf = 0\.\d+"]),
    "sim_ray_digits.py": (
        [],
        [r"RayADMMSolver\s+SIM test accuracy 0\.[89]\d+", r"ADMMSolver\s+SIM test accuracy"],
    ),
    "sim_solvers.py": (
        ["--epochs", "5", "--hidden", "12", "--samples", "300"],
        [rf"^{name}\s+0\.\d+\s+0\.9\d+" for name in ("admm", "cvx", "projected_gd", "ray-admm", "ray-cvx")],
    ),
    "sim_streaming.py": (
        ["--samples", "600", "--epochs", "10"],
        [r"streamed SIM test accuracy: 0\.9\d+", r"predictions agree on (9\d|100)\.\d+% of the test digits"],
    ),
    "train_on_ray.py": (
        ["--workers", "1", "--epochs", "1", "--more-epochs", "1", "--hidden", "16"],
        [r"run folder .*, 2 epochs", r"\|\|A\|\|_inf = 0\.\d+ <= kappa"],
    ),
    "tune_implicit.py": (["--samples", "2", "--epochs", "1"], [r"best: \{.*\} with eval accuracy 0\.\d+"]),
    "your_data_pipeline.py": (
        ["--epochs", "5"],
        [r"one step : agreement with the teacher (0\.9\d+|1\.0000)", r"\$ idl-ray evaluate --model"],
    ),
}


def test_every_example_is_covered() -> None:
    scripts = {p.name for p in EXAMPLES.glob("*.py")}
    assert scripts == {*CASES, "submit_job.py"}


@pytest.mark.parametrize("script", sorted(CASES))
def test_example_runs(script, tmp_path) -> None:
    args, patterns = CASES[script]
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    if script == "your_data_pipeline.py":
        args = [*args, "--workdir", str(tmp_path)]
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for pattern in patterns:
        assert re.search(pattern, done.stdout, flags=re.MULTILINE), (pattern, done.stdout[-3000:])
