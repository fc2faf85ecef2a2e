"""Solution polishing: the exact optimum on an identified support (OSQP's polish, for the l1 problem).

Once an iterative solver has nearly found which entries of a row w are nonzero (the support S), with which
signs sigma, and whether the kappa bound is active, the optimality conditions on S are linear::

    H_SS w_S + nu a_S = r_S - lam sigma_S,          a_S = sigma_S on the constrained entries, 0 elsewhere
    a_S^T w_S = kappa                               (only when the bound is active; nu >= 0)

with every other entry 0, and the point is optimal when the entries off S satisfy |v_j| <= lam (+ nu on the
constrained block), v = r - H w. A few passes of a primal active-set method fix a nearly right support:
entries whose sign flips leave S, entries off S that violate their condition join it (the largest
violations first, with the sign of v_j), the bound switches between active and inactive as nu and the
constraint dictate. Callers accept a polished row only if it lowers both the objective and the duality gap
(:mod:`~idl_ray.sim.solvers.certificate`), so polishing never returns a worse or infeasible point.

H_SS is singular when the support is larger than the rank of H (upsampled images): the system is solved
with a relative ridge of ``1e-12`` and two steps of iterative refinement against the unregularised matrix.

Per-entry thresholds (l1 weights): ``lam sigma_S`` becomes ``t_S * sigma_S`` and the condition off S is
``|v_j| <= t_j``; entries with ``t_j = inf`` are never added to S (their condition always holds).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch

from idl_ray.sim.solvers.admm_kernels import prox
from idl_ray.sim.solvers.certificate import DualityGap
from idl_ray.sim.solvers.weights import Threshold, take_rows, threshold_scale

__all__ = ["Polished", "polish_if_better", "polish_rows"]

#: active-set passes per row (each one solve of the support's KKT system)
_MAX_PASSES = 20
#: entries added to the support per pass (the largest violations first)
_MAX_ADDED = 8
#: polishing is tried on rows whose relative gap is below this
POLISH_BELOW = 1e-2


def _solve_on_support(
    H: torch.Tensor,
    r: torch.Tensor,
    S: torch.Tensor,
    sigma: torch.Tensor,
    a: torch.Tensor | None,
    kappa: float | None,
    lam: Threshold,
) -> tuple[torch.Tensor, float]:
    """w_S (and nu, 0.0 without the bound) from the KKT system on support S (lam: a float or the row's
    per-entry thresholds, shape (d,), finite on S)."""
    k = S.numel()
    H_SS = H[S][:, S]
    c = r[S] - (lam[S] if isinstance(lam, torch.Tensor) else lam) * sigma
    if a is None:
        K, rhs = H_SS, c
    else:
        K = torch.zeros(k + 1, k + 1, dtype=H.dtype, device=H.device)
        K[:k, :k] = H_SS
        K[:k, k] = a
        K[k, :k] = a
        rhs = torch.cat([c, c.new_tensor([float(kappa)])])
    ridge = 1e-12 * float(H_SS.diagonal().abs().max().clamp_min(torch.finfo(H.dtype).tiny))
    K_reg = K + ridge * torch.eye(K.shape[0], dtype=K.dtype, device=K.device)
    if a is not None:
        K_reg[k, k] = -ridge
    # an exactly singular system (float32 rounding can swamp the ridge) is no error: NaN means "no answer"
    lu, pivots, info = torch.linalg.lu_factor_ex(K_reg)
    if int(info) > 0:
        return torch.full((k,), math.nan, dtype=H.dtype, device=H.device), math.nan
    x = torch.linalg.lu_solve(lu, pivots, rhs[:, None])[:, 0]
    for _ in range(2):
        x = x + torch.linalg.lu_solve(lu, pivots, (rhs - K @ x)[:, None])[:, 0]
    if a is None:
        return x, 0.0
    return x[:k], float(x[k])


def _polish_row(
    H: torch.Tensor,
    r: torch.Tensor,
    w: torch.Tensor,
    *,
    lam: Threshold,
    kappa: float | None,
    n_constrained: int,
) -> torch.Tensor | None:
    """Active-set refinement from w's support: solve on S; drop entries whose sign flips; add the entries
    off S that violate their optimality condition (|v_j| <= lam, + nu on the constrained block, with
    v = r - H w); until neither happens (an optimum) or the passes run out (None)."""
    S = torch.nonzero(w if not isinstance(lam, torch.Tensor) else w * torch.isfinite(lam)).flatten()
    sigma = torch.sign(w[S])
    constrained = kappa is not None and n_constrained > 0
    active = constrained and float(w[:n_constrained].abs().sum()) >= float(kappa) * (1 - 1e-9)
    tolerance = 1e-9 * max(threshold_scale(lam), float(r.abs().max()), torch.finfo(r.dtype).tiny)
    for _ in range(_MAX_PASSES):
        if S.numel() == 0:
            w_S, nu = S.new_zeros(0, dtype=w.dtype), 0.0
        else:
            a = torch.where(S < n_constrained, sigma, torch.zeros_like(sigma)) if active else None
            if a is not None and not bool((a != 0).any()):
                return None
            w_S, nu = _solve_on_support(H, r, S, sigma, a, kappa, lam)
            if not bool(torch.isfinite(w_S).all()):
                return None
            keep = torch.sign(w_S) == sigma
            if not bool(keep.all()):
                S, sigma = S[keep], sigma[keep]
                continue
            if active and nu < 0:
                active, nu = False, 0.0
                continue
        candidate = torch.zeros_like(w)
        candidate[S] = w_S
        if constrained and not active and float(candidate[:n_constrained].abs().sum()) > float(kappa):
            active = True
            continue
        v = r - candidate @ H
        bound = lam.to(v).clone() if isinstance(lam, torch.Tensor) else torch.full_like(v, lam)
        if constrained:
            bound[:n_constrained] += max(nu, 0.0)
        violation = v.abs() - bound
        violation[S] = 0
        worst = torch.nonzero(violation > tolerance).flatten()
        if worst.numel() == 0:
            if constrained and float(candidate[:n_constrained].abs().sum()) > float(kappa) * (1 + 1e-12):
                return None
            return candidate
        order = torch.argsort(violation[worst], descending=True)[:_MAX_ADDED]
        added = worst[order]
        S = torch.cat([S, added])
        sigma = torch.cat([sigma, torch.sign(v[added])])
    return None


def polish_rows(
    H: torch.Tensor,
    R: torch.Tensor,
    W: torch.Tensor,
    *,
    lam: Threshold,
    kappa: float | None,
    n_constrained: int,
    rows: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Polish the rows of W on their supports (see the module docstring).

    Parameters
    ----------
    H : Tensor (d, d), R : Tensor (rows, d), W : Tensor (rows, d) with the supports and signs to use
    lam, kappa, n_constrained : the stage's settings (lam: a float or per-entry thresholds aligned with R)
    rows : optional 1-D tensor of row indices to polish (default: all)

    Returns
    -------
    candidate : Tensor (rows, d), polished rows where ``ok`` and W's rows elsewhere
    ok : bool Tensor (rows,), where a sign-consistent candidate was found
    """
    if rows is None and W.shape[0] > 1:  # every pass for all rows at once (the same algorithm)
        from idl_ray.sim.solvers.polish_batched import polish_rows_batched

        return polish_rows_batched(H, R, W, lam=lam, kappa=kappa, n_constrained=n_constrained)
    candidate = W.clone()
    ok = torch.zeros(W.shape[0], dtype=torch.bool, device=W.device)
    indices = range(W.shape[0]) if rows is None else rows.tolist()
    for i in indices:
        lam_i = lam[i] if isinstance(lam, torch.Tensor) else lam
        polished = _polish_row(H, R[i], W[i], lam=lam_i, kappa=kappa, n_constrained=n_constrained)
        if polished is not None:
            candidate[i] = polished
            ok[i] = True
    return candidate, ok


@dataclasses.dataclass(frozen=True)
class Polished:
    """Rows that polishing improved: ``positions`` index the gaps given to :func:`polish_if_better`
    (and its ``rows``), ``weights`` are the polished rows (len(positions) x d), ``gaps`` their certificate."""

    positions: torch.Tensor
    weights: torch.Tensor
    gaps: DualityGap


def polish_if_better(
    H: torch.Tensor,
    R: torch.Tensor,
    W: torch.Tensor,
    gaps: DualityGap,
    *,
    rows: torch.Tensor,
    certificate: Callable[[torch.Tensor, torch.Tensor], DualityGap],
    lam: Threshold,
    kappa: float | None,
    n_constrained: int,
    eligible: torch.Tensor | None = None,
    below: float = POLISH_BELOW,
) -> Polished | None:
    """Polish the rows ``rows`` of W whose relative gap is below ``below``; keep only improvements.

    A polished row is accepted only when it is sign-consistent (:func:`polish_rows`), is projected onto the
    kappa bound (a no-op up to rounding) and both its duality gap and its objective are no larger than
    the current row's: polishing never returns a worse or infeasible point. Shared by the accelerated ADMM
    (:class:`~idl_ray.sim.solvers.row_block.RowBlockADMM`), FISTA and the Ray drivers.

    Parameters
    ----------
    H : Tensor (d, d), R : Tensor (n, d), W : Tensor (n, d): the rows' problem data and current weights
        (H may be the restriction to a set of columns holding every support, with R and W restricted alike)
    gaps : DualityGap of the rows ``rows`` (len(rows) entries, aligned with ``rows``)
    rows : 1-D index tensor into R and W
    certificate : ``(weights, rows) -> DualityGap`` of candidate weights (len(rows) x d) for those rows
    lam, kappa, n_constrained : the stage's settings (lam: a float or thresholds aligned with R's rows)
    eligible : optional bool mask aligned with ``rows`` (default: all)
    below : float, only rows with gap / primal below this are tried

    Returns
    -------
    Polished, or None when no row improved
    """
    relative = gaps.gaps / gaps.primal.abs().clamp_min(torch.finfo(torch.float64).tiny)
    mask = relative < below
    if eligible is not None:
        mask = mask & eligible
    positions = torch.nonzero(mask).flatten()
    if positions.numel() == 0:
        return None
    chosen = rows[positions]
    candidate, found = polish_rows(
        H, R[chosen], W[chosen], lam=take_rows(lam, chosen), kappa=kappa, n_constrained=n_constrained
    )
    if not bool(found.any()):
        return None
    candidate = prox(candidate, 0.0, kappa, n_constrained)  # exact bound after rounding
    new = certificate(candidate, chosen)
    # a smaller gap, and an objective no larger up to rounding (a polished optimum can sit 1e-14 above the
    # iterate it replaces: both are optimal to rounding, and only the polished one is certified)
    slack = new.rounding * gaps.primal[positions].abs()
    if new.baseline is not None:
        slack = slack + new.rounding * new.baseline
    better = found & (new.gaps < gaps.gaps[positions]) & (new.primal <= gaps.primal[positions] + slack)
    if not bool(better.any()):
        return None
    return Polished(positions=positions[better], weights=candidate[better], gaps=new.take(better))
