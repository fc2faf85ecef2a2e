"""The weighted objectives of a SIM stage: robustness weights, reweighted l1 and sparsity targets.

:class:`StageWeighting` holds the SIM options that change a stage's l1 penalty, and :func:`solve_stage`
solves one stage under them; :meth:`SIM.fit <idl_ray.sim.estimator.SIM.fit>` calls it for both stages.

Robustness weights. The fitted model's certified l-infinity Lipschitz bound
(:func:`idl_ray.robustness.lipschitz.lipschitz_bound`) is, for ``||A||_inf <= kappa < 1`` and a
1-Lipschitz activation,

    L = ||D||_inf + ||C||_inf ||B||_inf / (1 - kappa),

with ``||M||_inf`` the largest row l1 norm over the *input* columns (the bias column is a constant and does
not enter the bound) and kappa the achieved ``||A||_inf``. ``robust_weight = rho >= 0`` multiplies the l1
weights of every column of [A B] but the bias in stage 1, and of every column of [C D] but the bias in
stage 2, by ``(1 + rho)``: the l1 norm of a row bounds its contribution to ``||B||_inf``, ``||C||_inf``,
``||D||_inf`` and ``||A||_inf``, so every factor of the bound is pushed down and the bound falls as rho grows,
at the cost of training fit. The bias column keeps weight 1.

Why A too: penalising only B (the literal reading of "penalise B, C, D") moves the fit's mass from B into A,
whose norm enters the bound through ``1 / (1 - ||A||_inf)``. Measured on a 8-12-10-3 ReLU teacher (lam 1e-3,
kappa 0.9, 600 Gaussian inputs), B only gave bounds 1.13, 1.05, 0.97, 1.68, 0.36 at rho = 0, 0.5, 1, 3, 10
(``||A||_inf`` rising from 0.46 to the cap 0.9), while A and B together gave 1.13, 0.76, 0.62, 0.29, 0.10
(``||A||_inf`` falling from 0.46 to 0.09) at the same training error (3.6e-4 to 2.0e-3 mean squared).
The weights scale the l1 term, so ``robust_weight`` needs ``lam > 0`` or a sparsity target to act.

Order of composition: robustness weights are the base weights w0 of the stage; then either a sparsity
target (:mod:`idl_ray.sim.targets`, which bisects a scale of w0) or reweighted l1
(:mod:`idl_ray.sim.reweighting`, which multiplies w0 by its round's factors); not both.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from idl_ray._validation import bad_parameter, check_positive_float, check_positive_int
from idl_ray.errors import ConfigError
from idl_ray.sim.problem import SIMProblem
from idl_ray.sim.reweighting import reweighted_solve
from idl_ray.sim.solvers.base import BaseSolver, SolveResult
from idl_ray.sim.targets import SparsityTarget, solve_to_target

__all__ = ["StageWeighting", "robust_l1_weights", "solve_stage"]


@dataclasses.dataclass(frozen=True)
class StageWeighting:
    """The SIM options that change the l1 penalty of a stage (validated when built).

    Attributes
    ----------
    robust_weight : float >= 0, the factor (1 + robust_weight) on every column but the bias
    reweight_rounds : int >= 0, reweighted-l1 rounds after the first solve (0: plain l1)
    reweight_eps : float > 0, the relative smoothing of the reweighting
    target : SparsityTarget or None
    """

    robust_weight: float = 0.0
    reweight_rounds: int = 0
    reweight_eps: float = 0.1
    target: SparsityTarget | None = None

    def __post_init__(self) -> None:
        owner = "SIM"
        object.__setattr__(
            self,
            "robust_weight",
            check_positive_float(self.robust_weight, "robust_weight", owner, allow_zero=True),
        )
        check_positive_int(self.reweight_rounds, "reweight_rounds", owner, allow_zero=True)
        check_positive_float(self.reweight_eps, "reweight_eps", owner)
        object.__setattr__(self, "target", SparsityTarget.coerce(self.target, "target", owner))
        if self.target is not None and self.reweight_rounds:
            raise ConfigError(
                "SIM: 'target' and 'reweight_rounds' are alternatives (a target fixes the sparsity by bisection; "
                f"reweighting changes the penalty). Got target={self.target!r} and "
                f"reweight_rounds={self.reweight_rounds}. Set reweight_rounds=0 or target=None."
            )

    @property
    def active(self) -> bool:
        return bool(self.robust_weight or self.reweight_rounds or self.target is not None)

    def check_for(self, variant: str, lam: float, lam_out: float) -> None:
        """Errors for options that would do nothing or cannot apply to the variant."""
        if self.active and variant not in ("lasso", "elastic_net"):
            raise ConfigError(
                "SIM: robust_weight, reweight_rounds and target reshape the l1 penalty, so they need "
                f"variant='lasso' or 'elastic_net'; got variant={variant!r}."
            )
        if self.robust_weight and self.target is None and lam == 0 and lam_out == 0:
            raise bad_parameter(
                "robust_weight", "SIM", "0 when lam = lam_out = 0 (it scales the l1 penalty)", self.robust_weight,
                "Set lam > 0 or a target.",
            )  # fmt: skip


def robust_l1_weights(
    stage: int, rows: int, dim: int, n: int, robust_weight: float, *, bias: bool
) -> torch.Tensor | None:
    """The stage's base l1 weights for ``robust_weight`` (None when it is 0).

    ``1 + robust_weight`` on every column of [A B] (stage 1) or [C D] (stage 2) except the bias column
    (last, when ``bias``), which keeps 1 (see the module docstring for why A's columns are included).

    Returns
    -------
    Tensor (rows, dim) float64 or None
    """
    if not robust_weight:
        return None
    if stage not in (1, 2) or not 0 <= n <= dim:
        raise bad_parameter("stage", "robust_l1_weights", "1 or 2 with 0 <= n <= dim", (stage, n, dim))
    weights = torch.ones(rows, dim, dtype=torch.float64)
    last = dim - 1 if bias else dim
    weights[:, :last] = 1.0 + robust_weight
    return weights


def solve_stage(
    problem: SIMProblem,
    solver: BaseSolver,
    weighting: StageWeighting,
    *,
    stage: int,
    n: int,
    bias: bool,
    initial: torch.Tensor | None = None,
) -> tuple[SolveResult, SIMProblem]:
    """Solve one SIM stage under ``weighting``; the result (with ``stats.extra["weighting"]``) and the
    problem whose objective the result minimises (the refit's for a target, the last round's for
    reweighting).

    Parameters
    ----------
    problem : SIMProblem of the stage (unweighted)
    solver : BaseSolver (must honour ``l1_weights`` when any option is set)
    weighting : StageWeighting
    stage : 1 or 2
    n : int, the number of hidden states (A's columns in stage 1)
    bias : bool, whether the last column is the bias
    initial : Tensor (rows, d) or None, weights to start from (a lambda path's previous point); a sparsity
        target's bisection starts cold
    """
    if not weighting.active:
        return solver.solve(problem, initial=initial), problem
    base = robust_l1_weights(stage, problem.rows, problem.dim, n, weighting.robust_weight, bias=bias)
    if base is not None:
        problem = problem.replace(l1_weights=base)
    record: dict[str, Any] = {"robust_weight": weighting.robust_weight}
    if weighting.target is not None:
        fit = solve_to_target(problem, solver, weighting.target, bias_column=bias)
        result, solved = fit.result, fit.problem
        record["target"] = {**weighting.target.to_dict(), **fit.summary()}
    elif weighting.reweight_rounds:
        rw = reweighted_solve(
            problem, solver, rounds=weighting.reweight_rounds, eps=weighting.reweight_eps, initial=initial
        )
        result, solved = rw.result, problem.replace(l1_weights=rw.weights[-1])
        record["reweighting"] = {"eps": weighting.reweight_eps, **rw.summary()}
    else:
        result, solved = solver.solve(problem, initial=initial), problem
    result.stats.extra["weighting"] = record
    return result, solved
