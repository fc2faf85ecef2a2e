"""Exact sparsity targets: "at most k nonzeros per row" or "remove a fraction x of the parameters".

A target replaces ``lam``: the stage is solved with thresholds ``t_ij = tau w_ij`` (w: the stage's own l1
weights, ones by default) and the scale tau is found by bisection, then the model is refitted on the
support it selected.

* ``SparsityTarget(nonzeros_per_row=k)``: rows are independent within a stage, so every row gets its own
  tau_i (one solve per bisection step serves all rows, through per-row ``l1_weights``). Bisection in
  log tau keeps, per row, an upper end (count <= k) and a lower end (count > k) and stops as soon as the
  count is exactly k. A row whose path jumps over k (two entries enter at once) takes the support of its
  upper end plus the largest entries of its lower-end answer (then the largest ``|r_ij|``) up to k.
* ``SparsityTarget(fraction_removed=x)``: one shared tau for the stage (the l1 path then decides how the
  kept entries are shared between rows), bisected until the stage keeps ``K = N - round(x N)`` of its N
  counted entries, with the same completion rule across rows when the path jumps over K.

Then the refit: weights ``inf`` off the support (held at exactly 0) and ``refit_lam`` times the base weights
on it (0 by default), so the refit is the best fit on that support under the kappa bound. Off-support
entries are exactly 0, so the count is met exactly: at most k per row, at least a fraction x removed; it
equals the target unless the refit itself puts an entry of the support at 0 (the kappa projection can).

Counted entries: every column except the bias column (the constant-1 input, last column of B and D), which
is never penalised by the target (weight 0) and never counted: a bias is one number per unit and removing
it saves nothing. Entries whose base weight is inf are held at 0 and count as removed.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import torch

from idl_ray._validation import bad_parameter, check_positive_float, check_positive_int
from idl_ray.errors import ConfigError, ConvergenceWarning
from idl_ray.sim.problem import SIMProblem
from idl_ray.sim.solvers.base import BaseSolver, SolveResult

__all__ = ["SparsityTarget", "TargetFit", "solve_to_target"]

_OWNER = "SparsityTarget"


@dataclasses.dataclass(frozen=True, kw_only=True)
class SparsityTarget:
    """An exact sparsity target for every SIM stage (exactly one of the first two must be set).

    Attributes
    ----------
    nonzeros_per_row : int >= 0 or None
        At most this many nonzeros in every row of [A B] and of [C D] (bias column not counted).
    fraction_removed : float in [0, 1] or None
        Remove this fraction of the counted entries of [A B], and of [C D] (rounded to the nearest count).
    refit_lam : float >= 0
        l1 weight of the final refit on the selected support (0: the best fit on the support).
    max_bisections : int >= 1
        Cap on bisection steps (one solve each) per stage.
    """

    nonzeros_per_row: int | None = None
    fraction_removed: float | None = None
    refit_lam: float = 0.0
    max_bisections: int = 60

    def __post_init__(self) -> None:
        if (self.nonzeros_per_row is None) == (self.fraction_removed is None):
            raise ConfigError(
                "SparsityTarget needs exactly one of 'nonzeros_per_row' and 'fraction_removed'. Got "
                f"nonzeros_per_row={self.nonzeros_per_row!r}, fraction_removed={self.fraction_removed!r}."
            )
        if self.nonzeros_per_row is not None:
            check_positive_int(self.nonzeros_per_row, "nonzeros_per_row", _OWNER, allow_zero=True)
        if self.fraction_removed is not None:
            value = check_positive_float(self.fraction_removed, "fraction_removed", _OWNER, allow_zero=True)
            if value > 1:
                raise bad_parameter("fraction_removed", _OWNER, "a float in [0, 1]", self.fraction_removed)
        check_positive_float(self.refit_lam, "refit_lam", _OWNER, allow_zero=True)
        check_positive_int(self.max_bisections, "max_bisections", _OWNER)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def coerce(cls, value: Any, name: str = "target", owner: str = "SIM") -> SparsityTarget | None:
        """None, a SparsityTarget, or a dict of its fields (as saved in sim.json)."""
        if value is None or isinstance(value, cls):
            return value
        if isinstance(value, dict):
            unknown = sorted(set(value) - {f.name for f in dataclasses.fields(cls)})
            if unknown:
                raise bad_parameter(
                    name, owner, "a SparsityTarget or a dict of its fields", f"keys {unknown}"
                )
            return cls(**value)
        raise bad_parameter(name, owner, "None, a SparsityTarget or a dict", type(value).__name__)


@dataclasses.dataclass
class TargetFit:
    """The refit's solve and what the bisection did.

    Attributes
    ----------
    result : SolveResult of the refit on the support
    problem : SIMProblem of the refit (inf weights off the support, ``refit_lam`` times the base on it)
    support : bool Tensor (rows, d), the selected entries (bias column included when present)
    tau : Tensor (rows,), the threshold scale of each row's upper end
    bisections : int, bisection solves taken
    counted : bool Tensor (rows, d), the entries that count towards the target
    uncertified_bisections : int, bisection solves that stopped before their gap_tol (their support was
        used all the same)
    """

    result: SolveResult
    problem: SIMProblem
    support: torch.Tensor
    tau: torch.Tensor
    bisections: int
    counted: torch.Tensor
    uncertified_bisections: int = 0

    def summary(self) -> dict[str, Any]:
        """JSON-friendly numbers for the fit's stats."""
        W = self.result.weights.detach().to(torch.float64)
        kept = int(((W != 0) & self.counted).sum())
        total = int(self.counted.sum())
        return {
            "bisections": self.bisections,
            "uncertified_bisections": self.uncertified_bisections,
            "support": int((self.support & self.counted).sum()),
            "counted_entries": total,
            "nonzeros": kept,
            "achieved_fraction_removed": 1.0 - kept / total if total else 0.0,
            "max_nonzeros_per_row": int(((W != 0) & self.counted).sum(dim=1).max()),
        }


def solve_to_target(
    problem: SIMProblem, solver: BaseSolver, target: SparsityTarget, *, bias_column: bool = False
) -> TargetFit:
    """Meet ``target`` exactly on one stage (see the module docstring).

    Parameters
    ----------
    problem : SIMProblem, whose ``l1_weights`` (None: ones) shape the bisection; its ``lam`` is ignored
    solver : a solver that honours ``l1_weights``
    target : SparsityTarget
    bias_column : bool, whether the last column is the bias (never penalised by the target, not counted)

    Returns
    -------
    TargetFit
    """
    if not isinstance(target, SparsityTarget):
        raise bad_parameter("target", "solve_to_target", "a SparsityTarget", type(target).__name__)
    if problem.variant not in ("lasso", "elastic_net"):
        raise ConfigError(
            f"A sparsity target needs the 'lasso' or 'elastic_net' variant; got {problem.variant!r}."
        )
    rows, d = problem.rows, problem.dim
    device = problem.G.device
    base = (
        torch.ones(rows, d, dtype=torch.float64, device=device)
        if problem.l1_weights is None
        else problem.l1_weights.clone()
    )
    free = torch.zeros(d, dtype=torch.bool, device=device)
    if bias_column:
        free[-1] = True
    base[:, free] = 0.0
    counted = ~free[None, :] & torch.isfinite(base)
    counted = counted.expand(rows, d).clone()
    per_row = target.nonzeros_per_row is not None
    if per_row:
        goal = counted.sum(dim=1).clamp(max=int(target.nonzeros_per_row))
    else:
        total = int(counted.sum())
        goal = torch.tensor([total - round(float(target.fraction_removed) * total)], device=device)

    def counts(W: torch.Tensor) -> torch.Tensor:
        nz = ((W != 0) & counted).sum(dim=1)
        return nz if per_row else nz.sum().reshape(1)

    uncertified = 0

    def solve(tau: torch.Tensor) -> torch.Tensor:
        """One bisection solve; only its support is used, so a solve that stops short of gap_tol is kept
        silently (counted in the summary) rather than warned about."""
        nonlocal uncertified
        scale = tau if per_row else tau.expand(rows)
        weights = torch.where(torch.isinf(base), base, scale[:, None] * base)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            result = solver.solve(problem.replace(lam=1.0, l1_weights=weights))
        uncertified += not result.stats.converged
        return result.weights.detach().to(torch.float64)

    # the upper end: a threshold above every counted entry's correlation empties the counted part
    positive = base[counted & (base > 0)]
    smallest = float(positive.min()) if positive.numel() else 1.0
    top = 2.0 * float(problem.Rt.abs().max()) / problem.num_samples / smallest + 1e-300
    groups = goal.numel()
    hi = torch.full((groups,), top, dtype=torch.float64, device=device)
    W_hi = solve(hi)
    bisections = 1
    for _ in range(8):  # free columns can leave correlations above the first guess: widen until met
        over = counts(W_hi) > goal
        if not bool(over.any()):
            break
        hi = torch.where(over, hi * 100.0, hi)
        W_hi = solve(hi)
        bisections += 1
    lo = hi * 1e-8
    W_lo = solve(lo)
    bisections += 1
    done = counts(W_hi) == goal
    lo_meets = counts(W_lo) <= goal  # even a tiny threshold keeps few entries: take that answer
    row_of = (lambda g: g) if per_row else (lambda g: g.expand(rows))
    W_hi = torch.where(row_of(lo_meets & ~done)[:, None], W_lo, W_hi)
    hi = torch.where(lo_meets & ~done, lo, hi)
    done = done | lo_meets
    while bisections < target.max_bisections and not bool(done.all()):
        mid = torch.sqrt(lo * hi)
        W_mid = solve(mid)
        bisections += 1
        c = counts(W_mid)
        upper = (c <= goal) & ~done
        lower = (c > goal) & ~done
        hi = torch.where(upper, mid, hi)
        lo = torch.where(lower, mid, lo)
        W_hi = torch.where(row_of(upper)[:, None], W_mid, W_hi)
        W_lo = torch.where(row_of(lower)[:, None], W_mid, W_lo)
        done = done | (c == goal) & upper | (hi / lo < 1 + 1e-12)
    support = _complete(W_hi, W_lo, problem.Rt, counted, goal, per_row) | free[None, :]
    # base is 0 on the free (bias) column and inf only off the counted entries, which are off the support
    refit = torch.where(support, target.refit_lam * base, torch.inf)
    refit_problem = problem.replace(lam=1.0, l1_weights=refit)
    result = solver.solve(refit_problem)
    tau = hi if per_row else hi.expand(rows)
    return TargetFit(
        result=result,
        problem=refit_problem,
        support=support,
        tau=tau,
        bisections=bisections,
        counted=counted,
        uncertified_bisections=uncertified,
    )


def _complete(
    W_hi: torch.Tensor,
    W_lo: torch.Tensor,
    Rt: torch.Tensor,
    counted: torch.Tensor,
    goal: torch.Tensor,
    per_row: bool,
) -> torch.Tensor:
    """The counted support of W_hi, completed up to the goal with W_lo's largest entries off it (then the
    largest |Rt|), per row or across the stage."""
    support = (W_hi != 0) & counted
    key_lo = torch.where(counted & ~support, W_lo.abs(), torch.full_like(W_lo, -1.0))
    key_r = torch.where(counted & ~support, Rt.abs().to(W_lo), torch.full_like(W_lo, -1.0))
    if per_row:
        missing = (goal - support.sum(dim=1)).clamp_min(0)
        for i in torch.nonzero(missing).flatten().tolist():
            order = _lexicographic(key_lo[i], key_r[i])[: int(missing[i])]
            support[i, order] = True
        return support
    missing = int(goal[0]) - int(support.sum())
    if missing > 0:
        order = _lexicographic(key_lo.flatten(), key_r.flatten())[:missing]
        flat = support.flatten().clone()
        flat[order] = True
        support = flat.reshape(support.shape)
    return support


def _lexicographic(primary: torch.Tensor, secondary: torch.Tensor) -> torch.Tensor:
    """Indices of the candidate entries (keys >= 0), sorted by primary then secondary, largest first."""
    order = torch.argsort(secondary, descending=True, stable=True)
    order = order[torch.argsort(primary[order], descending=True, stable=True)]
    return order[primary[order] >= 0]
