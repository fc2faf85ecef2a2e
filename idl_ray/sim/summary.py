"""What a fitted SIM looks like: sparsity, well-posedness, solve costs (returned by ``SIM.summary()``)."""

from __future__ import annotations

import dataclasses
from typing import Any

__all__ = ["SIMSummary"]

#: a converged stage with a relative gap above this was certified at the rounding level of an exact fit (every
#: solver's gap tolerance is far below it: 1e-7 by default)
_EXACT_FIT_GAP = 1e-3


@dataclasses.dataclass
class SIMSummary:
    """What a fitted SIM looks like: sparsity, well-posedness, costs."""

    hidden: int
    inputs: int
    outputs: int
    bias: bool
    activation: str
    kappa: float
    a_inf_norm: float
    sparsity: dict[str, float]
    nonzeros: dict[str, int]
    solver: str
    solve_time_s: dict[str, float]
    iterations: dict[str, int | None]
    objective: dict[str, float | None]
    extraction_time_s: float
    scales: dict[str, float] | None
    inference_iterations: dict[str, float] | None
    relative_gap: dict[str, float | None] = dataclasses.field(default_factory=dict)
    converged: dict[str, bool | None] = dataclasses.field(default_factory=dict)
    #: certified l-inf Lipschitz bounds of input -> output (idl_ray.robustness.lipschitz_bound)
    lipschitz_bound: float | None = None
    lipschitz_bound_elementwise: float | None = None
    #: the bound kept on A ("inf_norm" or "mu_inf") and, for "mu_inf", mu_inf(A) itself
    well_posedness: str = "inf_norm"
    mu_inf: float | None = None
    #: stage 2's rows were solved by the dual active-set method in stage 1's batch (its time is stage 1's)
    joint_active_set: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def _gap_text(self, stage: str) -> str:
        """One stage's certificate for :meth:`__str__`. A converged stage whose relative gap is large is a fit
        exact to rounding (lam = 0 on a teacher the model represents exactly: an objective of ~1e-11, where
        the gap is rounding too): the absolute numbers say so instead of a bare ratio of two rounding errors."""
        gap, ok, objective = (
            self.relative_gap.get(stage),
            self.converged.get(stage),
            self.objective.get(stage),
        )
        if gap is None:
            return ""
        text = f"stage {stage[-1]} {gap:.2g}"
        if ok and gap > _EXACT_FIT_GAP and objective is not None:
            text += f" (absolute {gap * abs(objective):.2g} on an objective of {objective:.2g}: exact to rounding)"
        return text + ("" if ok else " (NOT converged)")

    def __str__(self) -> str:
        lines = [
            f"SIM: n={self.hidden} hidden, p={self.inputs} inputs{' (incl. bias)' if self.bias else ''}, "
            f"q={self.outputs} outputs, activation={self.activation}",
            f"  ||A||_inf = {self.a_inf_norm:.6g} (kappa = {self.kappa:g})"
            if self.mu_inf is None
            else f"  mu_inf(A) = {self.mu_inf:.6g} (kappa = {self.kappa:g}; ||A||_inf = {self.a_inf_norm:.6g})",
            "  sparsity (fraction of zeros): " + ", ".join(f"{k} {v:.1%}" for k, v in self.sparsity.items()),
            f"  solver {self.solver}: stage 1 {self.solve_time_s.get('stage1', 0):.3g} s "
            f"({self.iterations.get('stage1')} it), stage 2 {self.solve_time_s.get('stage2', 0):.3g} s "
            f"({self.iterations.get('stage2')} it); extraction {self.extraction_time_s:.3g} s",
        ]
        if self.joint_active_set:
            lines.append("  (both stages' rows in one active-set batch: its time is counted in stage 1)")
        if any(v is not None for v in self.relative_gap.values()):
            parts = [self._gap_text(stage) for stage in ("stage1", "stage2")]
            lines.append(
                "  certified relative gap (objective - optimum <= gap): " + ", ".join(p for p in parts if p)
            )
        if self.lipschitz_bound is not None:
            elementwise = self.lipschitz_bound_elementwise
            lines.append(
                f"  l-inf Lipschitz bound: {self.lipschitz_bound:.4g} (||D|| + ||C|| ||B|| / (1 - k))"
                + ("" if elementwise is None else f", {elementwise:.4g} (elementwise)")
            )
        if self.scales:
            lines.append(f"  state rescaling: min {self.scales['min']:.3g}, max {self.scales['max']:.3g}")
        if self.inference_iterations:
            lines.append(
                "  fixed point at inference: "
                f"max {self.inference_iterations['max']:.0f}, mean {self.inference_iterations['mean']:.1f} "
                "iterations per sample"
            )
        return "\n".join(lines)
