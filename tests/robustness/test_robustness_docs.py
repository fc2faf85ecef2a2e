"""The example of docs/robustness.md runs as written and prints what its comments say."""

from __future__ import annotations

import contextlib
import io
import pathlib

DOC = pathlib.Path(__file__).resolve().parents[2] / "docs" / "robustness.md"


def test_docs_example_runs_and_prints_true() -> None:
    text = DOC.read_text()
    code = text.split("```python\n", 1)[1].split("```", 1)[0]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, str(DOC), "exec"), {})
    assert out.getvalue().split() == ["True", "True", "True"]


def test_lazy_top_level_names() -> None:
    import idl_ray
    from idl_ray.robustness import attack_accuracy, fgsm, lipschitz_bound, pgd

    assert (idl_ray.lipschitz_bound, idl_ray.attack_accuracy, idl_ray.fgsm, idl_ray.pgd) == (
        lipschitz_bound,
        attack_accuracy,
        fgsm,
        pgd,
    )
