"""The robustness part of a run's report: Lipschitz bounds and, on request, accuracy under attack.

``report["robustness"]`` (see :func:`robustness_report`)::

    {"lipschitz_bound": {"sim": L, "sim_elementwise": L_e, "teacher_elementwise": L_t},
     "attacks": {"eps": [...], "pgd_steps": 10,
                 "teacher": {"fgsm": [...], "pgd": [...]}, "sim": {"fgsm": [...], "pgd": [...]}},
     "note": "..."}                                   # why attacks were skipped, when they were

The teacher's bound is the elementwise one of its exact implicit form (``sim.structure_``): its ``A`` is
strictly triangular, so the norm bound (which needs ``||A||_inf < 1``) may not exist for it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["PGD_STEPS", "robustness_markdown", "robustness_report"]

#: PGD iterations of the job's attacks (step 2.5 eps / steps, random start from a seeded generator)
PGD_STEPS = 10


def _bound(model: Any, method: str) -> float | None:
    from idl_ray.errors import WellPosednessError
    from idl_ray.robustness import lipschitz_bound

    try:
        return lipschitz_bound(model, method=method)
    except WellPosednessError:
        return None


def robustness_report(
    sim: Any,
    teacher: torch.nn.Module,
    x_test: torch.Tensor,
    y_test: torch.Tensor | None,
    attack_eps: Sequence[float] = (),
    *,
    seed: int = 0,
) -> dict[str, Any]:
    """Lipschitz bounds of the SIM (norm and elementwise) and the teacher, and FGSM / PGD accuracy of both
    at each ``attack_eps`` on the held-out data (l-infinity, no input box)."""
    from idl_ray.robustness import attack_accuracy

    structure = getattr(sim, "structure_", None)
    out: dict[str, Any] = {
        "lipschitz_bound": {
            "sim": _bound(sim, "norm"),
            "sim_elementwise": _bound(sim, "elementwise"),
            "teacher_elementwise": None if structure is None else _bound(structure, "elementwise"),
        }
    }
    if not attack_eps:
        return out
    if y_test is None or y_test.is_floating_point():
        out["note"] = "attacks skipped: they need held-out class labels"
        return out
    eps = [float(e) for e in attack_eps]
    attacks: dict[str, Any] = {"eps": eps, "pgd_steps": PGD_STEPS}
    for name, model in (("teacher", teacher), ("sim", sim.to_module())):
        pgd = attack_accuracy(
            model,
            x_test,
            y_test,
            eps,
            method="pgd",
            steps=PGD_STEPS,
            generator=torch.Generator().manual_seed(seed),
        )
        attacks[name] = {"fgsm": attack_accuracy(model, x_test, y_test, eps, method="fgsm"), "pgd": pgd}
    out["attacks"] = attacks
    return out


def robustness_markdown(section: dict[str, Any]) -> list[str]:
    """The ``## Robustness`` lines of ``report.md``."""

    def fmt(value: Any) -> str:
        return "n/a" if value is None else f"{value:.4g}"

    bounds = section.get("lipschitz_bound", {})
    lines = [
        "",
        "## Robustness",
        "",
        "Certified l-infinity Lipschitz bounds (see docs/robustness.md):",
        "",
        "| model | bound |",
        "| --- | --- |",
        f"| SIM, \\|\\|D\\|\\| + \\|\\|C\\|\\| \\|\\|B\\|\\| / (1 - \\|\\|A\\|\\|) | {fmt(bounds.get('sim'))} |",
        f"| SIM, elementwise | {fmt(bounds.get('sim_elementwise'))} |",
        f"| teacher, elementwise | {fmt(bounds.get('teacher_elementwise'))} |",
    ]
    attacks = section.get("attacks")
    if attacks:
        eps = attacks["eps"]
        lines += [
            "",
            f"Held-out accuracy under l-infinity attacks (PGD: {attacks['pgd_steps']} steps, random start):",
            "",
            "| model | attack | " + " | ".join(f"eps={e:g}" for e in eps) + " |",
            "| --- | --- | " + " | ".join("---" for _ in eps) + " |",
        ]
        for name in ("teacher", "sim"):
            for method in ("fgsm", "pgd"):
                cells = " | ".join(f"{a:.3f}" for a in attacks[name][method])
                lines.append(f"| {'SIM' if name == 'sim' else 'teacher'} | {method.upper()} | {cells} |")
    if section.get("note"):
        lines += ["", section["note"]]
    return lines
