"""The optimality certificate of a SIM stage: a duality gap computed from the Gram statistics alone.

For one row w (d) of W the stage problem is (``H = G/m + l2 I``, ``r = Rt/m``, ``c = ||t||^2 / m``)::

    P(w) = 1/2 (w^T H w - 2 r^T w + c) + lam ||w||_1      subject to  ||w_A||_1 <= kappa

where ``w_A`` are the ``n_constrained`` leading entries (the A-part of [A B]). It is the lasso
``1/2 ||y - X w||^2 + h(w)`` with ``X^T X = H``, ``X^T y = r``, ``||y||^2 = c`` (samples scaled by
1/sqrt(m), plus sqrt(l2) I rows for the elastic net), so Fenchel duality gives, for any dual point theta,

    D(theta) = -1/2 ||theta||^2 + theta^T y - h*(X^T theta),
    h*(v) = kappa (||v_A||_inf - lam)_+  +  indicator(||v_B||_inf <= lam)

(``v_A`` unbounded by the indicator only when the kappa bound applies; without it the indicator covers all
of v). We take theta = s e, with e = y - X w the residual (optimal at the optimum) and the largest
s in [0, 1] that makes ``||s v_B||_inf <= lam`` for ``v = X^T e = r - H w``. Everything is a function of
``w^T H w``, ``r^T w``, ``c`` and ``v``, so the certificate needs no samples::

    ||e||^2 = w^T H w - 2 r^T w + c,      theta^T y = s (c - r^T w),      X^T theta = s v.

The residual is a difference of terms that can be 1e6 times larger than itself (small lam on a rank-deficient
Gram gives large weights), so a gap below ``1000 eps`` times those terms is rounding, and is accepted as zero
(:meth:`DualityGap.certified`). Since P >= 0, ``max(D(theta), 0)`` is a lower bound too (it certifies an exact fit, P* = 0, even where the
rescaled dual point is poor). Weak duality makes ``gap = P(w) - D >= P(w) - P*`` a bound on the suboptimality of a feasible w,
and the gap is 0 at the optimum (strong duality: there s = 1). It costs one (rows x d)(d x d) product.

``lam = 0`` with an unpenalised block: dual feasibility asks ``v_B = 0`` exactly, which floating point
only approximates; ``feasibility_tol`` (relative to ``||r||_inf``) is the tolerance on ``||v_B||_inf``
that is accepted as zero there, as interior-point solvers accept a small dual infeasibility. With
lam > 0 no tolerance is used: s rescales the dual point exactly. The bound is then approximate: a violation
``|v_j| <= feasibility_tol ||r||_inf`` can overstate D by up to ``sum_j |v_j| |w*_j|``. Measured once (the
rank-deficient stage-1 test problem at lam = 0, kappa 0.99, solved without polishing its dense supports):
the dual bound of ADMM's unconstrained iterate exceeded Clarabel's feasible objective by 1.9e-11 (2e-9 of
the objective, far inside gap_tol). Making it exact needs the free block's least-squares refit of the
dual point (a pseudo-inverse of H restricted to the unpenalised columns): not done.

Per-entry thresholds (l1 weights, :mod:`~idl_ray.sim.solvers.weights`): with ``h(w) = sum_j t_j |w_j|``
(plus the bound), ``h*(v) = kappa max_{j in A} (|v_j| - t_j)_+ + indicator(|v_j| <= t_j for j in B)``;
an entry with ``t_j = inf`` (held at 0) constrains nothing (it drops out of both terms). The scale s is
then the largest in [0, 1] with ``s |v_j| <= t_j`` on the free block, and an entry with ``t_j = 0`` in the
free block is held to the same rounding tolerance as lam = 0.

**The mu_inf constraint** (``condition="mu_inf"``: ``w_d + sum_{j in O} |w_j| <= kappa`` with ``d`` the
row's diagonal column and ``O`` the other constrained columns). For ``h(w) = lam ||w||_1`` plus that
indicator, a multiplier ``mu >= 0`` on the constraint gives

    h*(v) = kappa * max(0, max_{j in O} (|v_j| - lam), v_d - lam)

when ``v_d >= -lam``, ``|v_j| - lam <= v_d + lam`` for ``j in O`` and ``|v_j| <= lam`` for the free
columns, and ``+inf`` otherwise (the set is unbounded along ``-e_d`` and along ``e_j - sign e_d``
combinations, hence the middle condition). Each condition has the form ``s a <= b`` with ``b >= 0``,
so the largest ``s`` in [0, 1] that meets them all is ``min(1, b / a)`` over the violated ones; at the
optimum ``v`` lies in the subdifferential of ``h`` and ``s = 1``. With per-entry thresholds the same
holds with ``lam`` replaced by ``t_d``, ``t_j`` and ``t_j + t_d`` in the conditions and in the conjugate.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from idl_ray.sim.solvers.weights import Threshold, l1_term

__all__ = ["DualityGap", "duality_gap", "duality_gap_from_product"]

#: gaps below this multiple of the objective's own size are rounding noise: the residual
#: w^T H w - 2 r^T w + c cancels terms of the size of c, so float64 cannot resolve much below 1e-13 of it
_ROUNDING = 1000 * torch.finfo(torch.float64).eps


@dataclasses.dataclass(frozen=True)
class DualityGap:
    """Per-row primal values P(w_i) and dual lower bounds D_i (both shape (rows,), float64).

    ``primal - dual`` bounds each row's suboptimality; the sums are additive over row blocks, so shards
    of rows held by different workers add their sums and apply one test.
    """

    primal: torch.Tensor
    dual: torch.Tensor
    #: per-row size of the terms the objective is computed from, ``(|w^T H w| + 2 |r^T w| + c) / 2`` (c / 2 at
    #: W = 0): the objective is their difference, so its rounding error scales with them, not with itself
    baseline: torch.Tensor | None = None
    #: relative rounding level of the dtype the gap was computed in
    rounding: float = _ROUNDING

    def take(self, mask: torch.Tensor) -> DualityGap:
        """The certificate of the rows ``mask`` (a bool mask or an index tensor)."""
        baseline = None if self.baseline is None else self.baseline[mask]
        return DualityGap(self.primal[mask], self.dual[mask], baseline, self.rounding)

    def set_rows(self, rows: torch.Tensor, other: DualityGap, mask: torch.Tensor | None = None) -> None:
        """Overwrite the entries ``rows`` with ``other``'s (with ``other``'s entries ``mask`` when given), in
        place: a row whose weights changed takes the certificate of its new weights."""
        pick = (lambda x: x) if mask is None else (lambda x: x[mask])
        self.primal[rows] = pick(other.primal)
        self.dual[rows] = pick(other.dual)
        if self.baseline is not None and other.baseline is not None:
            self.baseline[rows] = pick(other.baseline)

    @property
    def gaps(self) -> torch.Tensor:
        """Per-row gaps P_i - D_i (>= 0 up to rounding)."""
        return (self.primal - self.dual).clamp_min(0)

    @property
    def gap(self) -> float:
        """The total gap sum_i (P_i - D_i): a bound on P(W) - P* for the whole stage."""
        return float(self.gaps.sum())

    @property
    def objective(self) -> float:
        """The total primal objective sum_i P_i."""
        return float(self.primal.sum())

    @property
    def relative_gap(self) -> float:
        """gap / max(objective, tiny): a bound on the relative suboptimality (P - P*) / P."""
        return self.gap / max(abs(self.objective), torch.finfo(torch.float64).tiny)

    def certified(self, tol: float, mean_primal: float | None = None) -> torch.Tensor:
        """Rows whose gap is within ``tol`` of the stage's scale: gap_i <= tol (P_i + mean P) / 2.

        The mean term keeps rows with a near-zero objective (a row the model fits exactly) from asking for a
        gap below rounding; summed over rows the test still gives gap <= tol * objective. ``mean_primal``
        is the mean over the whole stage when these gaps are a subset of its rows.
        """
        mean = float(self.primal.abs().mean()) if mean_primal is None else mean_primal
        limit = tol * 0.5 * (self.primal.abs() + mean)
        if self.baseline is not None:  # a gap at the rounding level of its own terms is zero
            limit = limit + self.rounding * (self.baseline.abs() + self.primal.abs())
        return self.gaps <= limit


def duality_gap(
    W: torch.Tensor,
    H: torch.Tensor,
    R: torch.Tensor,
    target_sq: torch.Tensor,
    *,
    lam: Threshold,
    kappa: float | None,
    n_constrained: int,
    feasibility_tol: float = 1e-10,
    dual_point: torch.Tensor | None = None,
    condition: str = "inf_norm",
    diagonal: torch.Tensor | None = None,
) -> DualityGap:
    """The duality gap of each row of W (see the module docstring for the formulas).

    Parameters
    ----------
    W : Tensor, shape (rows, d), feasible weights (``||W[i, :n_constrained]||_1 <= kappa``)
    H : Tensor, shape (d, d), G/m + l2 I
    R : Tensor, shape (rows, d), Rt/m
    target_sq : Tensor, shape (rows,), ||t_i||^2 / m
    lam : float >= 0, or Tensor (rows, d) of per-entry thresholds in [0, inf] (l1 weights times lam)
    kappa : float or None (None: no bound)
    n_constrained : int, the leading columns under the bound
    feasibility_tol : float, relative tolerance on ``||v_B||_inf`` accepted as dual feasible when lam = 0
    dual_point : optional Tensor (rows, d), other weights (feasible or not) whose residual gives a second
        dual point; the better bound is kept per row (any point gives a valid bound, so a solver can offer
        one, e.g. ADMM's unconstrained iterate, without being trusted)
    condition : "inf_norm" (the l1 ball) or "mu_inf" (see the module docstring)
    diagonal : Tensor of int64 (rows,), the diagonal column of each row (``"mu_inf"`` only)

    Returns
    -------
    DualityGap with per-row primal values of W and dual bounds (float64)
    """
    settings = {
        "lam": lam,
        "kappa": kappa,
        "n_constrained": n_constrained,
        "feasibility_tol": feasibility_tol,
    }
    if condition == "mu_inf":
        settings.update(condition=condition, diagonal=diagonal)
    W = W.to(H.dtype)
    gaps = duality_gap_from_product(W, W @ H, R, target_sq, **settings)
    if dual_point is None:
        return gaps
    other = dual_point.to(H.dtype)
    other_dual = duality_gap_from_product(other, other @ H, R, target_sq, **settings).dual
    return dataclasses.replace(gaps, dual=torch.maximum(gaps.dual, other_dual))


def duality_gap_from_product(
    W: torch.Tensor,
    HW: torch.Tensor,
    R: torch.Tensor,
    target_sq: torch.Tensor,
    *,
    lam: Threshold,
    kappa: float | None,
    n_constrained: int,
    feasibility_tol: float = 1e-10,
    condition: str = "inf_norm",
    diagonal: torch.Tensor | None = None,
) -> DualityGap:
    """:func:`duality_gap` given the product ``HW = W H`` (rows x d) instead of H.

    For callers that never hold H: a gradient summed over sample shards gives ``W H - R``, hence ``HW``
    (the Ray projected-gradient and consensus drivers). Same parameters and result as :func:`duality_gap`.
    """
    W = W.to(HW.dtype)
    wHw = (HW * W).sum(dim=1)
    rw = (R * W).sum(dim=1)
    c = target_sq.to(device=W.device, dtype=W.dtype)
    residual_sq = (wHw - 2.0 * rw + c).clamp_min(0)
    primal = 0.5 * residual_sq + l1_term(W, lam)
    V = R - HW
    nc = n_constrained if kappa is not None else 0
    tiny = torch.finfo(W.dtype).tiny
    # with lam > 0 the dual point is rescaled exactly; lam = 0 needs v_B = 0, accepted up to rounding
    zero_tol = feasibility_tol * float(R.abs().max().clamp_min(torch.finfo(R.dtype).tiny))
    t = _entry_thresholds(lam, V)
    if nc > 0 and condition == "mu_inf":
        dual = _mu_dual(V, residual_sq, c, rw, t, float(kappa), nc, diagonal, zero_tol)
    else:
        if nc < W.shape[1]:
            t_free, v_free = t[:, nc:], V[:, nc:].abs()
            limit = torch.where(t_free > 0, t_free, torch.full_like(t_free, zero_tol))
            ratio = torch.where(v_free > limit, t_free / v_free.clamp_min(tiny), torch.ones_like(v_free))
            s = ratio.amin(dim=1).clamp(max=1.0)
        else:
            s = torch.ones_like(primal)
        dual = -0.5 * s * s * residual_sq + s * (c - rw)
        if nc > 0:
            excess = (s[:, None] * V[:, :nc].abs() - t[:, :nc]).clamp_min(0)  # inf t: -inf -> 0
            dual = dual - float(kappa) * excess.amax(dim=1)
    dual = dual.clamp_min(0)  # P >= 0 always (squares and norms): 0 is a valid lower bound too
    return DualityGap(
        primal=primal.to(torch.float64),
        dual=dual.to(torch.float64),
        baseline=(0.5 * (wHw.abs() + 2.0 * rw.abs() + c.abs())).to(torch.float64),
        rounding=max(_ROUNDING, 64 * torch.finfo(W.dtype).eps),
    )


def _entry_thresholds(lam: Threshold, V: torch.Tensor) -> torch.Tensor:
    """Per-entry thresholds shaped like V (rows x d): a float lam is the same threshold everywhere."""
    if isinstance(lam, torch.Tensor):
        return lam.to(device=V.device, dtype=V.dtype).expand_as(V)
    return torch.full_like(V, float(lam))


def _mu_dual(
    V: torch.Tensor,
    residual_sq: torch.Tensor,
    c: torch.Tensor,
    rw: torch.Tensor,
    t: torch.Tensor,
    kappa: float,
    nc: int,
    diagonal: torch.Tensor | None,
    zero_tol: float,
) -> torch.Tensor:
    """D(s e) for the mu_inf constraint: s from the conditions ``s a <= b`` of the module docstring, with
    per-entry thresholds t (rows x d): ``-v_d <= t_d``, ``|v_j| - v_d <= t_j + t_d``
    on the other constrained columns, ``|v_j| <= t_j`` on the free ones (a zero ``b`` accepts a violation up
    to ``zero_tol``; an infinite t, an entry held at 0, constrains nothing)."""
    rows = V.shape[0]
    cols = (torch.arange(rows, device=V.device) if diagonal is None else diagonal.to(V.device)).reshape(
        rows, 1
    )
    v_d = V.gather(1, cols)
    t_d = t.gather(1, cols)
    off = V[:, :nc].abs()
    t_off = t[:, :nc]
    is_diag = torch.zeros_like(off, dtype=torch.bool).scatter(1, cols, True)
    # the diagonal's own entry in the middle condition only repeats -v_d <= 2 t_d, implied by the first
    conditions = [(-v_d, t_d), ((off - v_d).masked_fill(is_diag, -math.inf), t_off + t_d)]
    if nc < V.shape[1]:
        conditions.append((V[:, nc:].abs(), t[:, nc:]))
    s = torch.ones(rows, dtype=V.dtype, device=V.device)
    tiny = torch.finfo(V.dtype).tiny
    for a, b in conditions:
        allowed = torch.where(b > 0, b, torch.full_like(b, zero_tol))
        ratio = torch.where(a > allowed, b / a.clamp_min(tiny), torch.ones_like(a))
        s = torch.minimum(s, ratio.amin(dim=1))
    excess_off = (s[:, None] * off - t_off).masked_fill(is_diag, -math.inf).amax(dim=1)
    excess_d = (s[:, None] * v_d - t_d).squeeze(1)
    conjugate = kappa * torch.maximum(excess_off, excess_d).clamp_min(0)
    return -0.5 * s * s * residual_sq + s * (c - rw) - conjugate
