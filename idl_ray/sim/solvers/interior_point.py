"""A batched primal-dual interior point on the reduced dual of a SIM stage: the finisher of the Gram-form ADMM.

First-order methods crawl on the rank-deficient Grams of upsampled images (rank(G) ~ 120 of d ~ 900): the
lasso optimum is far from unique there and ADMM's iterates drift along the optimal face while the duality
gap stays at 1e-5 after thousands of steps. An interior point does not care about the conditioning: about
20-30 Newton steps reach a certified optimum at every lam (issue 9). Its steps are costly (one r x r
Cholesky per row, ``rows r^2 d`` flops to form it), so the ADMM of :mod:`~idl_ray.sim.solvers.row_block`
runs first and hands over only the rows it has not certified.

**The reduced dual.** With ``H = F^T F`` (``F = diag(sqrt(s)) Q^T``, r x d, from the eigendecomposition of H
that the ADMM already holds, eigenvalues below ``GramFactor.RANK_CUT`` dropped) and ``F^T b = r``, a row's
problem is ``min_w 1/2 ||F w - b||^2 + h(w)`` with ``h(w) = sum_j t_j |w_j| + indicator(sum_{j in A} |w_j|
<= kappa)`` (A: the ``n_constrained`` leading columns, absent without a bound). Its Fenchel dual over
``theta in R^r`` (:mod:`~idl_ray.sim.solvers.certificate`) is the quadratic program::

    minimise_{theta, tau}   1/2 ||theta||^2 - b^T theta + kappa tau
    subject to               |f_j^T theta| <= t_j             for j in B (the free columns)
                             |f_j^T theta| <= t_j + tau       for j in A,       tau >= 0

(``tau = max_{j in A} (|f_j^T theta| - t_j)_+``, the conjugate of the bound). Its multipliers z+, z- >= 0 on
the upper and lower constraints are the primal weights, ``w = z+ - z-``, and stationarity in theta gives
``theta = b - F w``, the residual. A column with ``t_j = inf`` (an entry held at 0) has no constraint and
``w_j = 0``.

**Free weights (lam = 0).** A zero threshold on an unbounded column makes its dual constraint the equality
``f_j^T theta = 0``, which has no interior. When those columns are the same in every row (a scalar lam = 0:
every unbounded weight is free), theta is confined to the orthogonal complement of their span,
``theta = N phi``, and the same program runs in phi over the other columns (``F' = N^T F``); the free
weights are then the least-squares fit of the rest (:class:`_FreeColumns`). A zero threshold on a bounded
column needs nothing (its constraint ``|f_j^T theta| <= tau`` has an interior); :func:`interior_point_applies`
says which thresholds the iteration handles.

**The iteration** is Mehrotra's predictor-corrector (infeasible start, one step length for primal and dual,
0.99 of the way to the boundary), batched over rows. Eliminating the slacks and multipliers leaves, per row,
the (r + 1) x (r + 1) system::

    [ I + F diag(D+ + D-) F^T      -F ((D+ - D-) a) ] [ d theta ]
    [ -((D+ - D-) a)^T F^T     sum_A (D+ + D-) + D_tau ] [ d tau   ]  =  rhs,       D = z / s

solved by one Cholesky of the leading block (>= I: never singular) and a Schur complement for tau. Cost per
iteration: ``rows r^2 d`` flops (forming the blocks from the products ``f_k f_l``, formed once, when they fit
:data:`MEMORY_BUDGET_BYTES`; else twice that, in chunks of rows) plus ``rows r^3 / 3``.

**Stopping** is the solver's own certificate: after every iteration the weights (A-parts scaled onto the
kappa ball, a no-op up to rounding) are scored by the duality gap of the full problem (the caller's
``certify``), each row keeps its best-gap iterate, and certified rows leave the batch. The interior point
never decides optimality itself, so a truncated spectrum or an inexact Newton step can cost iterations but
never a wrong certificate.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable

import torch

from idl_ray.sim.solvers.admm_kernels import GramFactor
from idl_ray.sim.solvers.certificate import DualityGap
from idl_ray.sim.solvers.weights import Threshold

__all__ = [
    "MEMORY_BUDGET_BYTES",
    "SPARSE_STEPS",
    "InteriorPointResult",
    "interior_point_applies",
    "interior_point_cost",
    "interior_point_rows",
    "positive_thresholds",
    "steps_worth_a_hand_over",
]

#: the largest rows x r x d float64 intermediate one chunk of rows may form
MEMORY_BUDGET_BYTES = 256 * 2**20
#: the products f_k f_l are formed once only for more rows than this (see _NormalBlocks)
_PRODUCTS_FROM_ROWS = 16
#: starting multipliers (primal weights) and bound variable tau: both of the order of a fitted weight
_START = 0.01
#: fraction of the step to the boundary
_TO_BOUNDARY = 0.99
#: D = z / s is kept within [1 / cap, cap] so the Newton blocks stay representable near the end
_SCALING_CAP = 1e14
#: a constraint whose smaller slack is at least this fraction of its band is inactive (its weight is 0)
_INACTIVE = 1e-3
#: cuts tried, largest first, on a row certified only with its raw multipliers (relative to its largest entry)
_SMALL = (1e-6, 1e-9, 1e-12)
#: a cut at least this large counts as sparse (smaller cuts only remove rounding)
_SPARSE_CUT = 1e-9
#: extra Newton steps a row certified only with its raw multipliers may take to certify a sparse point
#: (by default; none when the vertex step follows)
SPARSE_STEPS = 3
#: a row whose complementarity fell below this has converged as far as float64 allows
_MU_FLOOR = 1e-30

#: (weights of the rows, their row indices) -> (their DualityGap, bool mask of certified rows)
Certify = Callable[[torch.Tensor, torch.Tensor], tuple[DualityGap, torch.Tensor]]


@dataclasses.dataclass(frozen=True)
class InteriorPointResult:
    """Best iterate per row and its certificate.

    ``weights`` (rows x d, feasible), ``gaps`` their DualityGap, ``certified`` (rows,) bool,
    ``iterations`` the Newton steps taken (the most any row took), ``time_s``.
    """

    weights: torch.Tensor
    gaps: DualityGap
    certified: torch.Tensor
    iterations: int
    time_s: float


def positive_thresholds(lam: Threshold) -> bool:
    """Every finite threshold is > 0 (then every optimum's support is where the dual constraint is active,
    and supports larger than rank(H) mark a non-unique optimum)."""
    if isinstance(lam, torch.Tensor):
        finite = lam[torch.isfinite(lam)]
        return bool(finite.numel() == 0 or float(finite.min()) > 0)
    return float(lam) > 0


def interior_point_applies(lam: Threshold, n_constrained: int = 0, kappa: float | None = None) -> bool:
    """Whether the interior point applies to these thresholds: each finite one >= 0, and a zero threshold
    only on a bounded column (``j < n_constrained`` with a bound: its dual constraint is ``|f_j^T theta| <=
    tau``, which has an interior) or on an unbounded column that is zero in every row (a *free* weight,
    eliminated from the dual: see the module docstring). A zero elsewhere is an equality in one row's dual
    only, which the batched iteration does not handle (ADMM keeps those rows)."""
    nc = n_constrained if kappa is not None and float(kappa) > 0 else 0
    if not isinstance(lam, torch.Tensor):
        return float(lam) >= 0
    finite = torch.isfinite(lam)
    if bool((lam[finite] < 0).any()):
        return False
    zero = lam == 0
    loose = zero & ~zero.all(dim=0, keepdim=True)
    loose[:, :nc] = False
    return not bool(loose.any())


def interior_point_cost(rows: int, rank: int, d: int, iterations: int = 25) -> float:
    """Flops of ``iterations`` interior-point steps on ``rows`` rows (forming and factoring the blocks)."""
    return float(iterations) * rows * (2.0 * rank * rank * d + rank**3 / 3.0)


#: a first-order solver hands a row over once its steps have cost 1 / this (by flops) of the interior point's
#: predicted cost for the row
HAND_OVER_SHARE = 32.0


def steps_worth_a_hand_over(rank: int, d: int, step_flops: float) -> int:
    """First-order steps (``step_flops`` per row each) after which handing a row to the interior point pays
    (ski rental): when they have cost ``1 / HAND_OVER_SHARE`` of its predicted cost for the row (the ADMM's
    and FISTA's rule; 0 on a Gram of rank 0)."""
    if rank == 0:
        return 0
    return math.ceil(interior_point_cost(1, rank, d) / (HAND_OVER_SHARE * step_flops))


def interior_point_rows(
    factor: GramFactor,
    R: torch.Tensor,
    *,
    lam: Threshold,
    kappa: float | None,
    n_constrained: int,
    certify: Certify,
    max_iter: int = 50,
    sparse_steps: int = SPARSE_STEPS,
) -> InteriorPointResult:
    """Solve the rows of R (a block's uncertified rows) by the batched interior point of the module docstring.

    Parameters
    ----------
    factor : GramFactor of H (d x d), the matrix of the problem (its eigendecomposition gives F)
    R : Tensor (rows, d), the rows' linear terms (Rt/m)
    lam : float >= 0, or Tensor (rows, d) of per-entry thresholds in [0, inf] (inf: entry held at 0)
    kappa : float in [0, 1) or None (no bound); n_constrained : int, the bounded leading columns
    certify : ``(W_rows, rows) -> (DualityGap, certified mask)`` of the full problem, rows indexing R
    max_iter : int, Newton steps at most
    sparse_steps : int >= 0, extra steps a row certified only with its raw (dense) multipliers takes to
        certify a sparse point; 0 when the caller moves certified rows to vertices anyway
        (:mod:`~idl_ray.sim.solvers.vertex`), which makes them sparse without more Newton steps

    Returns
    -------
    InteriorPointResult (weights in R's dtype and device)

    Examples
    --------
    >>> import torch
    >>> from idl_ray.sim.solvers.certificate import duality_gap
    >>> Phi = torch.randn(6, 200, dtype=torch.float64); T = torch.randn(3, 200, dtype=torch.float64)
    >>> H, R, c = Phi @ Phi.T / 200, T @ Phi.T / 200, (T * T).sum(1) / 200
    >>> def certify(W, rows):
    ...     gaps = duality_gap(W, H, R[rows], c[rows], lam=0.1, kappa=0.5, n_constrained=3)
    ...     return gaps, gaps.certified(1e-9)
    >>> result = interior_point_rows(GramFactor(H), R, lam=0.1, kappa=0.5, n_constrained=3, certify=certify)
    >>> bool(result.certified.all()), bool(result.weights[:, :3].abs().sum(1).max() <= 0.5)
    (True, True)
    """
    start = time.perf_counter()
    out_dtype, device = R.dtype, R.device
    dtype = torch.float64
    rows, d = R.shape
    Q, s = factor.range_basis()
    Q, s = Q.to(device=device, dtype=dtype), s.to(device=device, dtype=dtype)
    F = factor.range_factor().to(device=device, dtype=dtype)  # r x d, F^T F = H on its range
    b = (R.to(dtype) @ Q) / s.sqrt()  # rows x r, F^T b = r
    t = (
        lam.to(device=device, dtype=dtype).clone()
        if isinstance(lam, torch.Tensor)
        else torch.full((rows, d), float(lam), dtype=dtype, device=device)
    )
    nc = n_constrained if kappa is not None else 0
    if nc > 0 and float(kappa) == 0.0:  # the bound holds w_A = 0: those entries have no constraint
        t[:, :nc] = math.inf
        nc = 0
    # free weights (zero threshold, no bound: the same columns in every row) leave the dual; w_free is the
    # least-squares fit of what the other weights leave (see _FreeColumns)
    free = _FreeColumns(F, t, nc)
    F_kept, b_kept, t_kept = free.reduce(F, b, t)

    def expand(W_kept: torch.Tensor, rows_: torch.Tensor) -> torch.Tensor:
        return free.expand(W_kept, b[rows_]).to(out_dtype)

    if F_kept.shape[0] == 0 or F_kept.shape[1] == 0:  # the free columns fit everything: w_kept = 0 is optimal
        best = _Best.empty(rows, d, device)
        everyone = torch.arange(rows, device=device)
        W = expand(torch.zeros(rows, F_kept.shape[1], dtype=dtype, device=device), everyone)
        gaps, ok = certify(W, everyone)
        best.keep(W, gaps, ok, everyone)
        best.certified |= ok
        iterations = 0
    else:
        best, iterations = _iterate(
            F_kept, b_kept, t_kept, nc, kappa, certify, expand, d, max_iter, sparse_steps
        )
    return InteriorPointResult(
        weights=best.weights.to(out_dtype),
        gaps=best.gaps,
        certified=best.certified,
        iterations=iterations,
        time_s=time.perf_counter() - start,
    )


def _iterate(
    F: torch.Tensor,
    b: torch.Tensor,
    t: torch.Tensor,
    nc: int,
    kappa: float | None,
    certify: Certify,
    expand: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    d: int,
    max_iter: int,
    sparse_steps: int,
) -> tuple[_Best, int]:
    """Newton steps until every row is certified (sparse), stuck or at ``max_iter``: the best full-width
    (d) iterate of every row and the steps taken."""
    rows = b.shape[0]
    device = b.device
    best = _Best.empty(rows, d, device)
    bound = float(kappa) if nc else None
    state = _State.start(b, t, nc, F.shape[0])
    blocks = _NormalBlocks(F, rows)
    done = torch.zeros(rows, dtype=torch.bool, device=device)
    late = torch.zeros(rows, dtype=torch.int64, device=device)
    stuck = torch.zeros_like(done)
    iterations = 0
    for iteration in range(max_iter + 1):
        active = torch.nonzero(~done & ~stuck).flatten()
        if active.numel() == 0:
            break
        W, gaps, ok, sparse = _certified_weights(state, active, bound, nc, certify, expand)
        best.keep(W, gaps, ok, active)
        # a row certified only with its O(mu) entries takes a few more steps to certify its sparse point
        late[active[ok & ~sparse]] += 1
        finished = sparse | (ok & (late[active] > sparse_steps))
        best.certified[active[ok]] = True
        done[active[finished]] = True
        active = active[~finished]
        if active.numel() == 0 or iteration == max_iter:
            break
        stuck[active] = state.converged(active)
        active = active[~stuck[active]]
        if active.numel() == 0:
            break
        for part in active.split(blocks.chunk_rows):
            state.newton_step(part, F, b, t, bound or 0.0, nc, blocks)
        iterations = iteration + 1
    return best, iterations


def _certified_weights(
    state: _State,
    rows: torch.Tensor,
    kappa: float | None,
    nc: int,
    certify: Certify,
    expand: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> tuple[torch.Tensor, DualityGap, torch.Tensor, torch.Tensor]:
    """The rows' weights with the exact zeros of a sparse optimum where they still certify.

    Two candidates every step: the raw multipliers and the same with inactive entries set to 0
    (:meth:`_State.weights`); the cleaned one wins where it certifies or has the smaller gap. A row certified
    only raw then tries its entries below ``_SMALL`` of its largest set to 0, the largest cut first, and
    takes the first that still certifies: sparsity never costs the certificate.

    Returns (weights, their gaps, certified, certified sparse: cleaned or cut at >= ``_SPARSE_CUT``).
    """
    raw = expand(state.weights(rows, kappa, nc, clean=False), rows)
    clean = expand(state.weights(rows, kappa, nc, clean=True), rows)
    gaps_raw, ok_raw = certify(raw, rows)
    gaps_clean, ok_clean = certify(clean, rows)
    take = ok_clean | (~ok_raw & (gaps_clean.gaps <= gaps_raw.gaps))
    W = torch.where(take[:, None], clean, raw)
    gaps = _where(take, gaps_clean, gaps_raw)
    ok = ok_clean | ok_raw
    sparse = ok_clean.clone()
    pending = torch.nonzero(ok & ~ok_clean).flatten()
    for cut in _SMALL:
        if pending.numel() == 0:
            break
        candidate = W[pending]
        small = candidate.abs() <= cut * candidate.abs().amax(dim=1, keepdim=True)
        changes = (small & (candidate != 0)).any(dim=1)
        pending, candidate, small = pending[changes], candidate[changes], small[changes]
        if pending.numel() == 0:
            break
        candidate = candidate.masked_fill(small, 0.0)
        cut_gaps, cut_ok = certify(candidate, rows[pending])
        won = pending[cut_ok]
        W[won] = candidate[cut_ok]
        gaps.set_rows(won, cut_gaps, cut_ok)
        sparse[won] = cut >= _SPARSE_CUT
        pending = pending[~cut_ok]
    return W, gaps, ok, sparse


def _where(mask: torch.Tensor, a: DualityGap, b: DualityGap) -> DualityGap:
    """Row-wise choice between two certificates of the same rows (a new object)."""
    baseline = None if a.baseline is None or b.baseline is None else torch.where(mask, a.baseline, b.baseline)
    return DualityGap(
        primal=torch.where(mask, a.primal, b.primal),
        dual=torch.where(mask, a.dual, b.dual),
        baseline=baseline,
        rounding=a.rounding,
    )


@dataclasses.dataclass
class _Best:
    """Each row's best iterate so far (full width, float64), its certificate and whether it is certified."""

    weights: torch.Tensor
    gaps: DualityGap
    certified: torch.Tensor

    @classmethod
    def empty(cls, rows: int, d: int, device: torch.device) -> _Best:
        unset = torch.full((rows,), math.inf, dtype=torch.float64, device=device)
        return cls(
            weights=torch.zeros(rows, d, dtype=torch.float64, device=device),
            gaps=DualityGap(primal=unset, dual=torch.zeros_like(unset), baseline=torch.zeros_like(unset)),
            certified=torch.zeros(rows, dtype=torch.bool, device=device),
        )

    def keep(self, W: torch.Tensor, gaps: DualityGap, ok: torch.Tensor, rows: torch.Tensor) -> None:
        """Store W's rows (in place) where they are certified (``ok``: the sparse point the row leaves with)
        or their gap beats the best so far."""
        improved = ok | (gaps.gaps < self.gaps.gaps[rows])
        self.weights[rows[improved]] = W[improved].to(self.weights.dtype)
        self.gaps.set_rows(rows[improved], gaps, improved)


class _FreeColumns:
    """Weights with a zero threshold and no bound, in every row (lam = 0 on the unbounded columns).

    Their dual constraints are equalities, ``f_j^T theta = 0``: theta lies in the orthogonal complement of
    ``range(F_free)``, spanned by the columns of N (r x r', from an SVD of F_free), and with ``theta = N phi``
    the dual is the same quadratic program in phi over the other ("kept") columns, with ``F' = N^T F_kept``
    and ``b' = N^T b``. The free weights are then the least-squares fit of what the kept ones leave,
    ``w_free = F_free^+ (b - F_kept w_kept)``, which makes ``b - F w = N phi``: the optimum of the full row.
    Without free columns every method is the identity.
    """

    def __init__(self, F: torch.Tensor, t: torch.Tensor, nc: int) -> None:
        zero = (t == 0).all(dim=0)
        zero[:nc] = False  # a bounded column keeps its constraint |f_j^T theta| <= t_j + tau
        self.free = torch.nonzero(zero).flatten()
        self.kept = torch.nonzero(~zero).flatten()
        self.N: torch.Tensor | None = None
        if self.free.numel() == 0:
            return
        F_free = F[:, self.free]
        U, S, Vh = torch.linalg.svd(F_free, full_matrices=True)
        # the rank cut of the eigendecomposition F comes from, on singular values (F's are its square roots)
        cut = float(S.max()) * math.sqrt(GramFactor.RANK_CUT) if S.numel() else 0.0
        rank = int((S > cut).sum())
        self.N = U[:, rank:]  # r x r', orthonormal, orthogonal to every free column
        # F_free^+ = V_k S_k^-1 U_k^T, stored transposed for row-major products: (r, free)
        self.pinv_T = (U[:, :rank] / S[:rank]) @ Vh[:rank]
        self.F_kept = F[:, self.kept]

    def reduce(self, F: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(F', b', t') of the reduced dual over the kept columns."""
        if self.N is None:
            return F, b, t
        return self.N.T @ self.F_kept, b @ self.N, t[:, self.kept]

    def expand(self, W_kept: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Full-width weights (rows x d) from the kept ones and the rows' b (rows x r)."""
        if self.N is None:
            return W_kept
        d = self.kept.numel() + self.free.numel()
        W = torch.zeros(W_kept.shape[0], d, dtype=W_kept.dtype, device=W_kept.device)
        W[:, self.kept] = W_kept
        W[:, self.free] = (b - W_kept @ self.F_kept.T) @ self.pinv_T
        return W


@dataclasses.dataclass
class _State:
    """The interior-point iterate of every row (see the module docstring for the variables).

    theta (rows, r); tau, s_tau, z_tau (rows, 1) (unused without a bound); s+, s-, z+, z- (rows, d);
    ``live`` (rows, d) float: 1 where the column has a constraint (finite threshold), 0 where it is held at 0.
    """

    theta: torch.Tensor
    tau: torch.Tensor
    s_tau: torch.Tensor
    z_tau: torch.Tensor
    s_plus: torch.Tensor
    s_minus: torch.Tensor
    z_plus: torch.Tensor
    z_minus: torch.Tensor
    live: torch.Tensor
    bounded: bool
    mu: torch.Tensor

    @classmethod
    def start(cls, b: torch.Tensor, t: torch.Tensor, nc: int, r: int) -> _State:
        """theta = 0, tau = w = 0.01 (split evenly), slacks at their constraint (shifted off zero)."""
        rows, d = t.shape
        live = torch.isfinite(t).to(b.dtype)
        t.nan_to_num_(posinf=0.0)  # held entries: any finite value, they are masked out
        bounded = nc > 0
        a = _bounded_columns(d, nc, b)
        tau = torch.full((rows, 1), _START if bounded else 0.0, dtype=b.dtype, device=b.device)
        finite = t[live > 0]
        floor = max(float(finite.abs().max()) if finite.numel() else 0.0, 1e-8) * 1e-2
        slack = (t + a * tau).clamp_min(floor) * live + (1 - live)
        z = _START * live
        return cls(
            theta=torch.zeros(rows, r, dtype=b.dtype, device=b.device),
            tau=tau,
            s_tau=tau.clone() if bounded else torch.ones_like(tau),
            z_tau=torch.ones_like(tau),
            s_plus=slack,
            s_minus=slack.clone(),
            z_plus=z,
            z_minus=z.clone(),
            live=live,
            bounded=bounded,
            mu=torch.ones(rows, dtype=b.dtype, device=b.device),
        )

    def weights(self, rows: torch.Tensor, kappa: float | None, nc: int, *, clean: bool) -> torch.Tensor:
        """w = z+ - z- of the rows ``rows`` (with ``clean``: the entries of inactive constraints set to 0),
        A-parts scaled onto the kappa ball (feasible exactly).

        Complementary slackness makes w_j = 0 wherever the dual constraint is strictly inactive,
        ``|f_j^T theta| < t_j (+ tau)``; the interior point leaves O(mu / slack) there instead. An entry whose
        smaller slack is at least ``_INACTIVE`` of its band ``t_j (+ tau)`` is set to 0, so the answer has the
        exact zeros of a sparse optimum; nearly active entries are kept whatever their size (on a rank-deficient
        Gram many are weakly active and the optimum spreads over them). A wrong call only costs a gap, which the
        certificate sees.
        """
        zp, zm = self.z_plus[rows], self.z_minus[rows]
        sp, sm = self.s_plus[rows], self.s_minus[rows]
        W = (zp - zm) * self.live[rows]
        if clean:
            W = W * (torch.minimum(sp, sm) < _INACTIVE * 0.5 * (sp + sm))
        if kappa is not None and nc > 0:
            norms = W[:, :nc].abs().sum(dim=1).clamp_min(torch.finfo(W.dtype).tiny)
            W[:, :nc] = W[:, :nc] * (kappa / norms).clamp(max=1.0)[:, None]
        return W

    def converged(self, rows: torch.Tensor) -> torch.Tensor:
        """Rows whose complementarity is at the float64 floor: more steps cannot change them."""
        return self.mu[rows] < _MU_FLOOR

    def newton_step(
        self,
        rows: torch.Tensor,
        F: torch.Tensor,
        b_all: torch.Tensor,
        t_all: torch.Tensor,
        kappa: float,
        nc: int,
        blocks: _NormalBlocks,
    ) -> None:
        """One Mehrotra predictor-corrector step of the rows ``rows`` (in place)."""
        bounded = self.bounded
        d = F.shape[1]
        a = _bounded_columns(d, nc, F)
        live = self.live[rows]
        b, t = b_all[rows], t_all[rows]
        theta, tau, s_tau, z_tau = self.theta[rows], self.tau[rows], self.s_tau[rows], self.z_tau[rows]
        sp, sm, zp, zm = self.s_plus[rows], self.s_minus[rows], self.z_plus[rows], self.z_minus[rows]
        count = 2 * live.sum(dim=1, keepdim=True) + (1 if bounded else 0)

        v = theta @ F
        r_theta = theta - b + (zp - zm) @ F.T
        shift = a * tau
        r_plus = (v - shift + sp - t) * live
        r_minus = (-v - shift + sm - t) * live
        comp = (sp * zp + sm * zm).sum(dim=1, keepdim=True)
        if bounded:
            r_tau = kappa - ((zp + zm) * a).sum(dim=1, keepdim=True) - z_tau
            r_nu = s_tau - tau
            comp = comp + s_tau * z_tau
        mu = comp / count
        self.mu[rows] = mu[:, 0]
        Dp = (zp / sp).clamp(1 / _SCALING_CAP, _SCALING_CAP) * live
        Dm = (zm / sm).clamp(1 / _SCALING_CAP, _SCALING_CAP) * live
        delta = Dp + Dm
        eye = torch.eye(F.shape[0], dtype=F.dtype, device=F.device)
        M = blocks.normal_matrices(delta)
        M.diagonal(dim1=1, dim2=2).add_(1.0)
        L, info = torch.linalg.cholesky_ex(M)
        if bool((info > 0).any()):  # only rounding can make M (>= I) fail: a relative ridge fixes it
            M = M + 1e-12 * M.diagonal(dim1=1, dim2=2).amax(dim=1)[:, None, None] * eye
            L, _ = torch.linalg.cholesky_ex(M)
        if bounded:
            c = ((Dp - Dm) * a) @ F.T
            D_tau = z_tau / s_tau
            e = (delta * a).sum(dim=1, keepdim=True) + D_tau
            Mc = _cholesky_solve(L, c)
            schur = (e - (c * Mc).sum(dim=1, keepdim=True)).clamp_min(torch.finfo(F.dtype).tiny)

        def direction(rc_plus, rc_minus, rc_tau):
            gp = Dp * r_plus + rc_plus / sp * live
            gm = Dm * r_minus + rc_minus / sm * live
            Mr = _cholesky_solve(L, -r_theta - (gp - gm) @ F.T)
            if bounded:
                g_tau = D_tau * r_nu + rc_tau / s_tau
                rhs_tau = -r_tau + ((gp + gm) * a).sum(dim=1, keepdim=True) + g_tau
                d_tau = (rhs_tau + (c * Mr).sum(dim=1, keepdim=True)) / schur
                d_theta = Mr + Mc * d_tau
                dz_tau = g_tau - D_tau * d_tau
                ds_tau = (rc_tau - s_tau * dz_tau) / z_tau
            else:
                d_theta, d_tau = Mr, torch.zeros_like(tau)
                dz_tau = ds_tau = torch.zeros_like(tau)
            fd = d_theta @ F
            dzp = (Dp * (fd - a * d_tau) + gp) * live
            dzm = (Dm * (-fd - a * d_tau) + gm) * live
            dsp = (rc_plus - sp * dzp) / zp.clamp_min(torch.finfo(F.dtype).tiny) * live
            dsm = (rc_minus - sm * dzm) / zm.clamp_min(torch.finfo(F.dtype).tiny) * live
            return d_theta, d_tau, dzp, dzm, dsp, dsm, dz_tau, ds_tau

        def step_length(step):
            _, _, dzp, dzm, dsp, dsm, dz_tau, ds_tau = step
            pairs = [(sp, dsp), (sm, dsm), (zp, dzp), (zm, dzm), (s_tau, ds_tau), (z_tau, dz_tau)]
            lengths = [_to_boundary(x, dx) for x, dx in pairs]
            return torch.stack(lengths).amin(dim=0).clamp(max=1.0)[:, None]

        affine = direction(-sp * zp, -sm * zm, -s_tau * z_tau)
        alpha = step_length(affine)
        _, _, dzp, dzm, dsp, dsm, dz_tau, ds_tau = affine
        comp_affine = ((sp + alpha * dsp) * (zp + alpha * dzp) + (sm + alpha * dsm) * (zm + alpha * dzm)).sum(
            dim=1, keepdim=True
        )
        if bounded:
            comp_affine = comp_affine + (s_tau + alpha * ds_tau) * (z_tau + alpha * dz_tau)
        sigma_mu = ((comp_affine / count) / mu.clamp_min(torch.finfo(F.dtype).tiny)).clamp(0, 1) ** 3 * mu
        step = direction(
            (-sp * zp - dsp * dzp + sigma_mu) * live,
            (-sm * zm - dsm * dzm + sigma_mu) * live,
            -s_tau * z_tau - ds_tau * dz_tau + sigma_mu,
        )
        alpha = _TO_BOUNDARY * step_length(step)
        d_theta, d_tau, dzp, dzm, dsp, dsm, dz_tau, ds_tau = step
        self.theta[rows] = theta + alpha * d_theta
        self.s_plus[rows] = sp + alpha * dsp
        self.s_minus[rows] = sm + alpha * dsm
        self.z_plus[rows] = zp + alpha * dzp
        self.z_minus[rows] = zm + alpha * dzm
        if bounded:
            self.tau[rows] = tau + alpha * d_tau
            self.s_tau[rows] = s_tau + alpha * ds_tau
            self.z_tau[rows] = z_tau + alpha * dz_tau


class _NormalBlocks:
    """The lower triangle of ``F diag(delta_i) F^T`` (r x r) for a batch of rows' delta (rows x d): all a
    Cholesky factorisation reads.

    When the products ``f_k f_l`` (d x r(r+1)/2, k >= l) fit :data:`MEMORY_BUDGET_BYTES` and more than
    :data:`_PRODUCTS_FROM_ROWS` rows share them, they are formed once and every step is one GEMM ``delta P``
    copied into the lower triangle: no rows x r x d intermediate is written per step (on the 28x28 digits
    teacher that write was as costly as the product). Otherwise the batched product
    ``(F sqrt(delta)) (F sqrt(delta))^T`` runs in chunks of rows within the same budget (for a few rows the
    GEMM is bound by reading P, 50 MB at r = 123, and forming P costs as much as ten steps).
    """

    def __init__(self, F: torch.Tensor, rows: int) -> None:
        r, d = F.shape
        self.r = r
        lower = torch.tril_indices(r, r, device=F.device)
        self.flat_lower = lower[0] * r + lower[1]
        pairs = lower.shape[1]
        self.F = F
        self.P: torch.Tensor | None = None
        if 8 * d * pairs <= MEMORY_BUDGET_BYTES and rows > _PRODUCTS_FROM_ROWS:
            self.P = (F[lower[0]] * F[lower[1]]).T.contiguous()  # d x pairs
            self.chunk_rows = max(1, int(MEMORY_BUDGET_BYTES // max(8 * (pairs + r * r), 1)))
        else:
            self.chunk_rows = max(1, int(MEMORY_BUDGET_BYTES // max(8 * r * d, 1)))

    def normal_matrices(self, delta: torch.Tensor) -> torch.Tensor:
        """(rows, r, r) ``F diag(delta_i) F^T``, exact in the lower triangle (the upper may be 0)."""
        if self.P is None:
            X = self.F[None] * delta.sqrt()[:, None, :]
            return torch.bmm(X, X.transpose(1, 2))
        M = torch.zeros(delta.shape[0], self.r * self.r, dtype=delta.dtype, device=delta.device)
        M.index_copy_(1, self.flat_lower, delta @ self.P)
        return M.view(delta.shape[0], self.r, self.r)


def _cholesky_solve(L: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """x (rows, r) with L L^T x = rhs, L (rows, r, r) lower triangular: two triangular solves (a third of
    ``torch.cholesky_solve``'s time on small batched systems)."""
    y = torch.linalg.solve_triangular(L, rhs[:, :, None], upper=False)
    return torch.linalg.solve_triangular(L.mT, y, upper=True)[:, :, 0]


def _bounded_columns(d: int, nc: int, like: torch.Tensor) -> torch.Tensor:
    """The indicator a (d,) of the bounded columns."""
    a = torch.zeros(d, dtype=like.dtype, device=like.device)
    a[:nc] = 1.0
    return a


def _to_boundary(x: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    """Per row, the largest step keeping x + step dx >= 0 (inf when no entry decreases)."""
    ratio = torch.where(dx < 0, -x / dx.clamp(max=-torch.finfo(x.dtype).tiny), torch.full_like(x, math.inf))
    return ratio.amin(dim=1)
