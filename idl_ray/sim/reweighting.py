"""Reweighted l1 (Candes, Wakin & Boyd 2008): a few weighted lasso solves as a closer stand-in for l0.

Round 0 solves the stage with its own l1 weights w0 (ones, or the robustness weights of
:mod:`idl_ray.sim.robust_weights`). Round r >= 1 solves it again with, per entry::

    w_ij = w0_ij * c_i / (|W_ij| + eps_i),      eps_i = eps * max_j |W_ij|,
    c_i = sum_j w0_ij |W_ij| / sum_j (w0_ij |W_ij| / (|W_ij| + eps_i))

where W is the previous round's answer. Small entries get large weights and are pushed to 0; large ones get
small weights and are shrunk less (less bias), which is how a log-sum penalty, closer to the count of
nonzeros than the l1 norm, is minimised by majorisation. ``eps`` is relative to each row's largest entry
(scale-free: stage-1 states are rescaled), and ``c_i`` keeps the new weighted penalty of the previous
answer equal to its round-0 penalty ``sum_j w0_ij |W_ij|``, so ``lam`` keeps its meaning from round to round. A row that is entirely 0
keeps ``w0``; entries with ``w0 = inf`` stay held at 0.

Each round goes through the solver's public ``solve``, warm-started from the previous round's answer
(``initial=``; solvers without ``uses_initial`` start cold), and ADMMSolver keeps the eigendecomposition of G
across the rounds, since every round shares the same statistics.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from idl_ray._validation import bad_parameter, check_positive_float, check_positive_int
from idl_ray.sim.problem import SIMProblem
from idl_ray.sim.solvers.base import BaseSolver, SolveResult

__all__ = ["ReweightedFit", "reweighted_solve", "reweighting_weights"]


def reweighting_weights(W: torch.Tensor, eps: float, base: torch.Tensor | None = None) -> torch.Tensor:
    """The next round's l1 weights from the current answer W (rows x d); see the module docstring.

    Parameters
    ----------
    W : Tensor (rows, d), the previous round's weights
    eps : float > 0, relative to each row's largest |W_ij|
    base : Tensor (rows, d) or None, the stage's own weights w0 (None: ones)

    Returns
    -------
    Tensor (rows, d) float64, entries in (0, inf]
    """
    A = W.detach().to(torch.float64).abs()
    base = torch.ones_like(A) if base is None else base.to(A)
    eps_row = eps * A.amax(dim=1, keepdim=True)
    alive = eps_row[:, 0] > 0
    denominator = A + torch.where(alive[:, None], eps_row, torch.ones_like(eps_row))
    finite = torch.where(torch.isinf(base), torch.zeros_like(base), base)  # held entries: W = 0 there
    c = (finite * A).sum(dim=1, keepdim=True) / (finite * A / denominator).sum(dim=1, keepdim=True).clamp_min(
        torch.finfo(A.dtype).tiny
    )
    reweighted = torch.where(torch.isinf(base), base, base * c / denominator)
    return torch.where(alive[:, None], reweighted, base)


@dataclasses.dataclass
class ReweightedFit:
    """The last round's solve, each round's l1 weights and a per-round record.

    ``weights[r]`` is the ``l1_weights`` of round r (None for an unweighted round 0); ``rounds[r]`` holds the
    round's nonzeros, residual (1/m ||T - W Phi||^2), weighted objective and relative gap.
    """

    result: SolveResult
    weights: list[torch.Tensor | None]
    rounds: list[dict[str, Any]]

    def summary(self) -> dict[str, Any]:
        """JSON-friendly numbers for the fit's stats."""
        return {"rounds": len(self.rounds) - 1, "per_round": self.rounds}


def reweighted_solve(
    problem: SIMProblem,
    solver: BaseSolver,
    *,
    rounds: int,
    eps: float = 0.1,
    initial: torch.Tensor | None = None,
) -> ReweightedFit:
    """Solve ``problem``, then ``rounds`` reweighted problems (see the module docstring).

    Parameters
    ----------
    problem : SIMProblem, whose ``l1_weights`` (None: ones) are the base weights w0
    solver : a solver that honours ``l1_weights`` (ADMMSolver, CVXSolver, ...)
    rounds : int >= 0, the number of reweighted solves after the first
    eps : float > 0, the relative smoothing of the weights
    initial : Tensor (rows, d) or None, weights the first solve starts from; every later round starts from
        the previous round's answer (solvers without ``uses_initial`` start cold)

    Returns
    -------
    ReweightedFit
    """
    owner = "reweighted_solve"
    rounds = check_positive_int(rounds, "rounds", owner, allow_zero=True)
    eps = check_positive_float(eps, "eps", owner)
    if not isinstance(problem, SIMProblem):
        raise bad_parameter("problem", owner, "a SIMProblem", type(problem).__name__)
    base = problem.l1_weights
    weights: list[torch.Tensor | None] = [base]
    result = solver.solve(problem, initial=initial)
    records = [_record(problem, result)]
    for _ in range(rounds):
        w = reweighting_weights(result.weights, eps, base)
        current = problem.replace(l1_weights=w)
        result = solver.solve(current, initial=result.weights)
        weights.append(current.l1_weights)
        records.append(_record(current, result))
    return ReweightedFit(result=result, weights=weights, rounds=records)


def _record(problem: SIMProblem, result: SolveResult) -> dict[str, Any]:
    W = result.weights.detach().to(torch.float64)
    return {
        "nonzeros": int((W != 0).sum()),
        "residual": problem.residual(W),
        "objective": result.stats.objective,
        "relative_gap": result.stats.relative_gap,
    }
