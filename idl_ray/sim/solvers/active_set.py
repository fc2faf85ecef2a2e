"""The dual active-set method (Goldfarb-Idnani) for many lasso rows on one low-rank Gram.

For one row with thresholds t > 0 (lam, or per-entry l1 weights times lam; ``t_j = inf`` holds ``w_j`` at 0)
and ``H = F^T F`` (F: r x d, the range factor of :class:`~idl_ray.sim.solvers.admm_kernels.GramFactor`),
``r = F^T b``, the stage objective is, up to a constant,

    P(w) = 1/2 ||F w - b||^2 + sum_j t_j |w_j|      subject to  sum_{j in A} |w_j| <= kappa

(A: the ``n_constrained`` leading entries, when there is a bound). A multiplier nu >= 0 of the bound raises
the thresholds of A to ``t_j + nu``, and the dual of the lasso with thresholds t' is the projection of b onto
a polytope of R^r::

    min_u 1/2 ||u - b||^2   subject to   |f_j^T u| <= t'_j  for every column f_j of F,

with ``u* = b - F w*`` and w* the signed multipliers of the active constraints. The dual has an identity
Hessian whatever the conditioning of H, and only r dimensions (r = 123 for d = 881 on the 28x28 digits
teacher).

1. **Goldfarb and Idnani's dual method** (Math. Programming 27, 1983) solves it at nu = 0: start at the
   unconstrained minimum u = b, add the violated constraint farthest from its hyperplane, and move u along
   the direction that keeps the active constraints tight, dropping an active constraint when its multiplier
   reaches 0 (a partial step), until none is violated.
2. **The bound, by homotopy in nu**: a row whose answer has ``sum_A |w_j| > kappa`` follows its solution as
   nu grows. With the active set fixed, u and the multipliers are linear in nu (``du/dnu = -q``,
   ``dy/dnu = -N^{+} q`` with ``q = N^{+T} a``, a marking the active constraints of A), and
   ``sum_A |w_j|`` falls at the rate ``||q||^2``; the step ends where it reaches kappa, where a multiplier
   reaches 0 (that constraint leaves) or where an inactive constraint becomes tight (it joins), as in LARS.
   A joining normal dependent on the active ones (duplicated pixel columns) is an exchange; where the
   exchange would take ``sum_A |w_j|`` past kappa at fixed nu the optimum lies inside a face, not at a
   vertex, and the row is left to the caller (not ``finished``).

The active normals stay linearly independent, so each answer has at most r nonzeros: a vertex of the
optimal face (the sparse optimum that :mod:`~idl_ray.sim.solvers.vertex` otherwise recovers from an
interior point's dense answer).

Every row runs in lockstep (one batched step: two (rows x k x r) products over the k occupied slots, the
pick's (rows x r)(r x d) product, the complement's product with the k active columns of B (sparse on CPU) and a
rank-one update), so the cost is the largest number of steps any row needs
times one step: 147-382 steps for the 96 rows of the 28x28 digits teacher's stage 1 over lam in
[1e-6, 1e-2]; rows that finish leave the batch. N^+ of the active normals N (k x r) is kept per row by Greville's
rank-one updates (adding column n with z = (I - N N^+) n: rows of N^+ lose ``(N^+ n) z^T / z^T n``, the new
row is ``z^T / z^T n``; dropping row g of N^+: the others lose ``(N^+ g) g^T / g^T g``). These accumulate
rounding, so the result is the active set, its signs and approximate weights: callers polish it on its support
(:mod:`~idl_ray.sim.solvers.polish`, an exact solve) and certify it before taking it. The rounding can also
make a row cycle near rank(H), chasing violations of ~1e-9 through drops and re-adds; every non-degenerate
step raises the dual objective ||u - b||^2, so a row that has set no new maximum for ``_STALLED_STEPS`` steps
is left unfinished (to the interior point). The cycling came from nearly dependent normals admitted to the
active set (``_DEPENDENT_TOL``); with that tolerance at 1e-10 it no longer occurs on the digits teachers, and
the guard stays as a safety net (at 1e-12 one row of the 28x28 teacher's stage 1 at lam 1e-5 ran alone from
step 332 to the step guard at 592; the cycling guard stopped it at 413). In phase 2 a joining normal's
dependence is decided on an exact N^+: where its part z orthogonal to the active normals has drifted (z^T n !=
z^T z), N^+ is recomputed first (:func:`_checked_complement`); otherwise a normal parallel to an active one
(duplicated pixel columns) could join, N turned singular and its row went to the interior point (11 rows of
the 28x28 teacher at kappa 0.5, lam 1e-2; none now). Zero thresholds (lam = 0) make constraints equalities,
which this iteration does not handle (:func:`dual_active_set_applies`). A guessed support (a lambda path's
previous point) can start a row (:func:`_warm`): 12-17 steps instead of 87-206 on the 28x28 teacher's stage 2
along a path.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from collections.abc import Callable
from typing import Any

import torch

from idl_ray.sim.solvers.admm_kernels import GramFactor
from idl_ray.sim.solvers.weights import Threshold

__all__ = ["ActiveSetResult", "dual_active_set", "dual_active_set_applies", "max_steps_for"]

#: a constraint counts as violated when |f_j^T u| exceeds t_j by more than this fraction of t_j
_VIOLATION_TOL = 1e-10
#: a new normal whose part orthogonal to the active ones has a squared norm below this fraction of its own
#: is dependent on them (a partial step then drops an active constraint). Admitting such a normal makes N N^T
#: as ill-conditioned as the fraction, and N^+'s rank-one updates then carry errors of ~1e-16 / fraction: at
#: 1e-12 they reached 1e-4 on the 28x28 teachers (z^T n of a normal after its exchange came out at -4e-4 of
#: n^T n, so the exchange could not finish and the row went to the interior point; and rows cycled in phase 1).
#: 1e-10 finished most of those rows (docs/benchmarks/sim.md, twelfth session); 1e-9 sent others to it
_DEPENDENT_TOL = 1e-10
#: in the homotopy on nu, an inactive constraint whose slack closes at a rate below this (relative to
#: 1 + |its value's rate|) stays inactive: rounding of a column that moves with the active ones
_RATE_TOL = 1e-9
#: a row of the homotopy whose nu has not moved for this many steps is left (degenerate pivots cycling)
_IDLE_STEPS = 20
#: a row of phase 1 whose dual objective ||u - b||^2 has not reached a new maximum for this many steps is left
#: (rounding-driven cycling: in exact arithmetic every non-degenerate step raises it)
_STALLED_STEPS = 40
#: rows x r x r x (N^+ and temporaries) float64 bytes per batch of rows at most (larger blocks run in batches)
_BATCH_BYTES = 256 * 2**20


@dataclasses.dataclass(frozen=True)
class ActiveSetResult:
    """``weights`` (rows x d, the signed multipliers: approximate values, exact support and signs),
    ``finished`` (rows whose iteration ended with no violated constraint, and on the bound where it is
    active) and ``steps`` (the most any batch took, both phases)."""

    weights: torch.Tensor
    finished: torch.Tensor
    steps: int


def dual_active_set_applies(lam: Threshold) -> bool:
    """Every threshold > 0 (infinite ones allowed): the dual constraints are then inequalities."""
    if isinstance(lam, torch.Tensor):
        return bool((lam > 0).all())
    return float(lam) > 0


def max_steps_for(rank: int) -> int:
    """A guard on the steps: a row needs (adds + drops) ~ 0.5-3.3 r steps on the digits teachers (8x8 and
    28x28, every lam). Past 4 r + 100 a row is cycling (near rank(H) the rank-one updates' rounding makes
    violations of ~1e-9 that a dependent normal's drops chase: seen once, 809 steps at lam 1e-6); it is
    left unfinished, to the interior point."""
    return 4 * rank + 100


def dual_active_set(
    factor: GramFactor,
    R: torch.Tensor,
    *,
    lam: Threshold,
    kappa: float | None = None,
    n_constrained: int = 0,
    max_steps: int | None = None,
    start: torch.Tensor | None = None,
    bounded: torch.Tensor | None = None,
) -> ActiveSetResult:
    """Solve the rows of R (n x d, r = Rt/m rows) by the dual active-set method (module docstring).

    Parameters
    ----------
    factor : GramFactor of H (rank r > 0)
    R : Tensor (n, d)
    lam : float > 0, or per-entry thresholds (n, d) in (0, inf]
    kappa, n_constrained : the bound ``sum_{j < n_constrained} |w_j| <= kappa`` (None: no bound)
    max_steps : guard on the steps of each phase of each batch (default :func:`max_steps_for` the rank);
        rows still iterating then are not ``finished``
    start : optional Tensor (n, d), a guess of each row's answer (e.g. the previous point of a lambda path):
        a row whose guessed support and signs give a valid start (:func:`_warm`) begins there instead of
        at u = b; any other row starts cold. The answer does not depend on it, only the steps.
    bounded : optional bool Tensor (n,), the rows the bound applies to (default: every row); the others
        are plain lasso rows (rows of several stages solved in one batch, :mod:`~idl_ray.sim.solvers.joint`)

    Returns
    -------
    ActiveSetResult (weights in R's dtype and device)
    """
    if not dual_active_set_applies(lam):
        raise ValueError("dual_active_set needs every threshold > 0 (lam > 0)")
    if bounded is not None and tuple(bounded.shape) != (R.shape[0],):
        raise ValueError(
            f"bounded must have shape ({R.shape[0]},), one flag per row of R; got {tuple(bounded.shape)}"
        )
    Q, s = factor.range_basis()
    Q = Q.to(torch.float64)
    root = s.to(torch.float64).sqrt()
    B = Q * root  # (d, r): row j is f_j
    norms = _column_norms(B)  # for both phases
    n, d, r = R.shape[0], Q.shape[0], root.numel()
    steps_cap = max_steps if max_steps is not None else max_steps_for(r)
    b = (R.to(torch.float64) @ Q) / root  # F^T b = r on the range of H
    has_bound = kappa is not None and n_constrained > 0
    in_bound = torch.arange(d, device=R.device) < (n_constrained if has_bound else 0)
    bounded_rows = (
        torch.ones(n, dtype=torch.bool, device=R.device) if bounded is None else bounded.to(R.device)
    )
    batch = max(1, _BATCH_BYTES // (2 * r * r * 8))
    weights = torch.zeros(n, d, dtype=torch.float64, device=R.device)
    finished = torch.zeros(n, dtype=torch.bool, device=R.device)
    steps = 0
    for first in range(0, n, batch):
        rows = slice(first, min(first + batch, n))
        count = b[rows].shape[0]
        t = (
            lam[rows].to(torch.float64)
            if isinstance(lam, torch.Tensor)
            else torch.full((count, d), float(lam), dtype=torch.float64, device=R.device)
        )
        state = _Rows.start(B, b[rows], t)
        if start is not None:
            _warm(state, B, start[rows].to(device=R.device, dtype=torch.float64))
        k = _project(state, B, norms, steps_cap)
        if has_bound:
            over = torch.nonzero(
                state.finished
                & bounded_rows[rows]
                & (_bound_excess(state.y, _bounded_slots(state, in_bound), float(kappa)) > 0)
            ).flatten()
            if over.numel():  # only these rows take part in phase 2
                rows_over = state.take(over)
                k += _follow_the_bound(rows_over, B, norms, in_bound, float(kappa), steps_cap)
                state.put(over, rows_over)
        weights[rows], finished[rows], steps = state.weights(), state.finished, max(steps, k)
    return ActiveSetResult(weights=weights.to(R.dtype), finished=finished, steps=steps)


@dataclasses.dataclass
class _Rows:
    """The lockstep state of a batch of rows: the point b each row projects (m x r), the dual point u
    (m x r), N^+ of the active normals (m x slots x r, slots = r; an empty slot is a zero row; the normals
    themselves are -sign f_member), the multipliers y, constraint index and sign per slot, the thresholds t
    (m x d), and per row whether it is still iterating (``live``) and whether it ended well (``finished``)."""

    b: torch.Tensor
    u: torch.Tensor
    Pinv: torch.Tensor
    y: torch.Tensor
    member: torch.Tensor
    sign: torch.Tensor
    in_set: torch.Tensor
    t: torch.Tensor
    live: torch.Tensor
    finished: torch.Tensor
    #: 1 + the highest slot a row has occupied (slots fill from the first free one; drops leave it): the
    #: products need no more slots (~60-85% of r over a solve on the digits teachers)
    top: int = 0

    @classmethod
    def start(cls, B: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> _Rows:
        m, r = b.shape
        dev, dt = b.device, b.dtype
        return cls(
            b=b,
            u=b.clone(),
            Pinv=torch.zeros(m, r, r, dtype=dt, device=dev),
            y=torch.zeros(m, r, dtype=dt, device=dev),
            member=torch.full((m, r), -1, dtype=torch.long, device=dev),
            sign=torch.zeros(m, r, dtype=dt, device=dev),
            in_set=torch.zeros(m, B.shape[0], dtype=torch.bool, device=dev),
            t=t.clone(),
            live=torch.ones(m, dtype=torch.bool, device=dev),
            finished=torch.zeros(m, dtype=torch.bool, device=dev),
        )

    def take(self, index: torch.Tensor) -> _Rows:
        """The rows ``index`` (copies)."""
        return _Rows(**{name: getattr(self, name)[index] for name in _ROW_FIELDS}, top=self.top)

    def put(self, index: torch.Tensor, rows: _Rows) -> None:
        """Write ``rows`` (from :meth:`take`) back at ``index``."""
        for name in _ROW_FIELDS:
            getattr(self, name)[index] = getattr(rows, name)
        self.top = max(self.top, rows.top)

    def scratch(self) -> torch.Tensor:
        """A zero (m x d) buffer for :meth:`complement`, kept between steps (and left zero by it): a fresh
        one each step costs more than the product it feeds (a large allocation is page-faulted in)."""
        buffer = getattr(self, "_scratch", None)
        if buffer is None or buffer.shape != self.t.shape:
            buffer = self._scratch = torch.zeros_like(self.t)
        return buffer

    def weights(self) -> torch.Tensor:
        """w (m x d): the signed multipliers of the active constraints."""
        m, d = self.in_set.shape
        occupied = self.member >= 0
        rows = torch.arange(m, device=self.y.device)[:, None].expand_as(self.member)[occupied]
        out = torch.zeros(m, d, dtype=self.y.dtype, device=self.y.device)
        out[rows, self.member[occupied]] = (self.sign * self.y)[occupied]
        return out

    def update(
        self,
        add: torch.Tensor,
        drop: torch.Tensor,
        *,
        z: torch.Tensor,
        zn: torch.Tensor,
        rv: torch.Tensor,
        leaving: torch.Tensor,
        joining: torch.Tensor,
        joining_sign: torch.Tensor,
        joining_y: torch.Tensor,
        k: int,
        next_normal: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """Greville's updates of N^+ (one in-place rank-one update for both kinds of rows) and the slots:
        rows ``add`` take constraint ``joining`` (z = (I - N N^+) normal, zn = z^T normal, rv = N^+ normal on
        the first ``k`` slots) with multiplier ``joining_y``; rows ``drop`` lose slot ``leaving``; ``k``: the
        slots' span when rv was formed (:meth:`complement`).

        With ``next_normal`` (m x r) it also returns N^+ next_normal after the update (m x :attr:`top`), from
        the pass over N^+ that forms the dropped rows' N^+ g (one batched product with two vectors per row,
        not a second pass): (N^+ - a c^T) n = N^+ n - a (c^T n), a new slot's entry z^T n / zn, a dropped
        slot's 0."""
        tiny = torch.finfo(z.dtype).tiny
        Pinv = self.Pinv[:, :k]  # a view: the slots in use
        base = None  # N^+ next_normal before the update
        # rows that add: a = N^+ n / z^T n, c = z; rows that drop slot l: a = N^+ g / ||g||^2, c = g (row l of
        # N^+; row l is then 0 up to rounding, and set to 0 below); other rows: a = 0
        not_adding = torch.where(add, zn, math.inf)
        dropping = bool(drop.any())
        if dropping:
            g = self._slot_rows(leaving)  # row `leaving` of N^+ (m x r)
            vectors = g[:, None] if next_normal is None else torch.stack([next_normal, g], dim=1)
            products = torch.bmm(vectors, Pinv.transpose(1, 2))  # one pass over N^+ for both
            through = products[:, -1]  # N^+ g, whose entry l is g^T g
            if next_normal is not None:
                base = products[:, 0]
            numerator = torch.where(drop[:, None], through, rv)
            denominator = torch.where(drop, (g * g).sum(dim=1), not_adding)
            c = torch.where(drop[:, None], g, z)
        else:
            if next_normal is not None:
                base = _times(Pinv, next_normal)
            numerator, denominator, c = rv, not_adding, z
        a = numerator / denominator.clamp_min(tiny)[:, None]
        following = cn = None
        if base is not None:
            cn = torch.linalg.vecdot(c, next_normal)  # c^T n
            following = base.addcmul_(a, cn[:, None], value=-1.0)
        Pinv.addcmul_(a[:, :, None], c[:, None, :], value=-1.0)
        if dropping:
            rows = torch.nonzero(drop).flatten()
            slot = leaving[rows]
            self.in_set[rows, self.member[rows, slot]] = False
            self.member[rows, slot], self.y[rows, slot], self.sign[rows, slot] = -1, 0.0, 0.0
            self._set_slot_rows(rows, slot, 0.0)
            if following is not None:
                following[rows, slot] = 0.0
        rows = torch.nonzero(add).flatten()
        if rows.numel():
            slot = self.member.index_select(0, rows).argmin(dim=1)  # the first free slot (member -1)
            inverse_zn = 1.0 / zn[rows]
            self._set_slot_rows(rows, slot, z[rows] * inverse_zn[:, None])
            self.member[rows, slot], self.sign[rows, slot] = joining[rows], joining_sign[rows]
            self.y[rows, slot] = joining_y[rows]
            self.in_set[rows, joining[rows]] = True
            self.top = max(self.top, int(slot.max()) + 1)
            if following is not None:
                if following.shape[1] < self.top:
                    following = torch.nn.functional.pad(following, (0, self.top - following.shape[1]))
                following[rows, slot] = cn[rows] * inverse_zn
        return following

    def _slot_rows(self, slot: torch.Tensor) -> torch.Tensor:
        """Row ``slot[i]`` of row i's N^+ (m x r)."""
        rows = torch.arange(self.Pinv.shape[0], device=slot.device)
        return self._flat_pinv().index_select(0, self._flat_index(rows, slot))

    def _set_slot_rows(self, rows: torch.Tensor, slot: torch.Tensor, values: torch.Tensor | float) -> None:
        """Set row ``slot[i]`` of row ``rows[i]``'s N^+ to ``values[i]`` (or to a number)."""
        flat = self._flat_index(rows, slot)
        if isinstance(values, torch.Tensor):
            self._flat_pinv().index_copy_(0, flat, values)
        else:
            self._flat_pinv().index_fill_(0, flat, values)

    def _flat_pinv(self) -> torch.Tensor:
        """N^+ as (m r) x r rows: slot rows are read and written through it (advanced indexing of the 3-D
        array costs ~8x more)."""
        return self.Pinv.view(-1, self.Pinv.shape[2])

    def _flat_index(self, rows: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
        return rows * self.Pinv.shape[1] + slot

    def complement(
        self, normal: torch.Tensor, B: torch.Tensor, rv: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """(rv, z, zn, k) of new normals (m x r): rv = N^+ n on the first k slots (m x k, k = :attr:`top`;
        given when known, :meth:`update`), the part z of n orthogonal to the active normals, z^T n, and k.

        N^T rv = sum_k rv_k (-sign_k) f_{member_k} is the product of B with the slots' coefficients on their
        columns (:func:`_plus_rows_of`; cheaper than keeping N: no m x r x r array to read or update)."""
        k = self.top
        if rv is None:
            rv = _times(self.Pinv[:, :k], normal)
        columns = self.member[:, :k].clamp_min(0)  # an empty slot has sign 0: it adds nothing
        # n - N^T rv (the normals are -sign f)
        z = _plus_rows_of(normal, columns, self.sign[:, :k] * rv, B, self.scratch)
        return rv, z, torch.linalg.vecdot(z, normal), k


def _plus_rows_of(
    base: torch.Tensor,
    columns: torch.Tensor,
    coefficients: torch.Tensor,
    B: torch.Tensor,
    scratch: Callable[[], torch.Tensor],
    *,
    sparse: bool | None = None,
) -> torch.Tensor:
    """``base[i] + sum_s coefficients[i, s] B[columns[i, s]]`` for every row i (base: m x r, columns and
    coefficients: m x k, B: d x r); a repeated column adds up (empty slots: any column, coefficient 0).

    On CPU the coefficients form a sparse m x d matrix with k entries per row (CSR), and the product reads k
    rows of B per row: on the 28x28 digits teacher (d = 881, r = 123, k = 30-119 of the 96 rows) 150-480 us
    against 560-700 us for the dense (m x d)(d x r) product, and 7% off a whole dual active-set solve over
    13 stage problems, with the same steps and answers. Elsewhere (a GPU's dense products are fast) the
    coefficients are scattered into the zero (m x d) buffer ``scratch()`` for a dense product, which is left
    zero again. ``sparse``: force one way (None: by the device)."""
    m, k = columns.shape
    if k == 0:
        return base.clone()
    if sparse is None:
        sparse = base.device.type == "cpu"
    if sparse:
        _silence_the_csr_beta_warning()
        starts = torch.arange(0, m * k + 1, k, device=base.device)
        rows = torch.sparse_csr_tensor(
            starts,
            columns.reshape(-1),
            coefficients.reshape(-1),
            size=(m, B.shape[0]),
            check_invariants=False,
        )
        return torch.addmm(base, rows, B)
    dense = scratch()
    dense.scatter_add_(1, columns, coefficients)
    out = torch.addmm(base, dense, B)
    dense.scatter_(1, columns, 0.0)
    return out


@functools.cache
def _silence_the_csr_beta_warning() -> None:
    """torch warns once per process that sparse CSR tensors are in beta (the product used here is not): that
    one warning is spent here, on a 1 x 1 tensor, instead of a global warnings filter around every step."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        torch.sparse_csr_tensor(
            torch.tensor([0, 1]), torch.tensor([0]), torch.tensor([0.0]), size=(1, 1), check_invariants=False
        )


def _times(P: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """P v per row (P: m x k x r, v: m x r -> m x k), as v^T P^T: ~25% faster than ``bmm(P, v[:, :, None])`` on
    CPU at the digits teachers' sizes (both read P once; torch's batched matrix-vector kernel is the slower)."""
    return torch.bmm(v[:, None, :], P.transpose(1, 2))[:, 0, :]


_ROW_FIELDS = tuple(f.name for f in dataclasses.fields(_Rows) if f.name != "top")


#: passes of the warm start (each drops the entries whose multiplier came out negative)
_WARM_PASSES = 3


def _on_active_set(
    F_S: torch.Tensor, sigma: torch.Tensor, real: torch.Tensor, b: torch.Tensor, t_S: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The exact Goldfarb-Idnani state of rows whose active set is given: columns F_S (q x k x r, padded rows
    0 where ``real`` is False), signs sigma (q x k, 0 on padding), b (q x r), thresholds t_S (q x k).

    With the normals N = -diag(sigma) F_S, the active constraints are tight, N u = -t_S, at
    ``u = b + N^T y`` for ``N N^T y = -t_S - N b``; ``N^+ = (N N^T)^{-1} N``. One Cholesky of N N^T (the active
    columns' Gram with signs; padding an identity block). Returns (y, N^+, u, info): ``info > 0`` where N N^T
    is singular (dependent normals: the state is not valid there)."""
    N = -sigma[:, :, None] * F_S
    gram = torch.bmm(N, N.transpose(1, 2)) + torch.diag_embed((~real).to(N.dtype))
    t_S = torch.where(real, t_S, torch.zeros_like(t_S))  # padding may hold an infinite threshold: no inf * 0
    rhs = torch.where(real, -t_S - torch.bmm(N, b[:, :, None])[:, :, 0], torch.zeros_like(t_S))
    L, info = torch.linalg.cholesky_ex(gram)
    y = torch.cholesky_solve(rhs[:, :, None], L)[:, :, 0] * real
    u = b + torch.bmm(N.transpose(1, 2), y[:, :, None])[:, :, 0]
    return y, torch.cholesky_solve(N, L), u, info


def _warm(state: _Rows, B: torch.Tensor, guess: torch.Tensor) -> None:
    """Start rows from a guessed support S and signs sigma (the nonzeros of ``guess``, m x d) where that is a
    valid Goldfarb-Idnani state (:func:`_on_active_set`: the constraints of S tight, independent normals) with
    every multiplier ``y_j = sigma_j w_j >= 0``. Entries whose multiplier comes out negative leave S and the
    system is solved again (``_WARM_PASSES`` times); a row that is still invalid, or whose normals are
    dependent, keeps the cold start."""
    b = state.b
    r = b.shape[1]
    support = (guess != 0) & torch.isfinite(state.t)
    for _ in range(_WARM_PASSES):
        counts = support.sum(dim=1)
        usable = (counts > 0) & (counts <= r)
        if not bool(usable.any()):
            return
        rows = torch.nonzero(usable).flatten()
        kmax = int(counts[rows].max())
        order = torch.sort(support[rows].to(torch.int8), dim=1, descending=True, stable=True).indices
        idx = order[:, :kmax]  # the support's columns first, padded with other columns
        real = torch.arange(kmax, device=b.device)[None, :] < counts[rows][:, None]
        sigma = torch.sign(guess[rows].gather(1, idx)) * real
        y, Pinv, u, info = _on_active_set(
            B[idx] * real[:, :, None], sigma, real, b[rows], state.t[rows].gather(1, idx)
        )
        negative = (y < 0) & real
        singular = info > 0
        good = ~singular & ~negative.any(dim=1)
        if bool(good.any()):
            g = rows[good]
            state.Pinv[g, :kmax] = Pinv[good]
            state.member[g, :kmax] = torch.where(real[good], idx[good], -1)
            state.sign[g, :kmax] = sigma[good]
            state.y[g, :kmax] = y[good]
            state.in_set[g] = support[g]
            state.top = max(state.top, kmax)
            state.u[g] = u[good]
        # drop the negative entries of the other rows and try again; done rows and singular ones stop
        retry = rows[~good & ~singular]
        if retry.numel() == 0:
            return
        drop = negative[~good & ~singular]
        cleared = torch.zeros_like(support[retry])
        cleared.scatter_(1, idx[~good & ~singular], drop)
        support[rows[good]] = False
        support[rows[singular]] = False
        support[retry] &= ~cleared


#: every this many steps, rows between two pivots get their state recomputed (:func:`_recompute`)
_RECOMPUTE_EVERY = 100


def _recompute(state: _Rows, B: torch.Tensor, rows_mask: torch.Tensor, *, pinv_only: bool = False) -> None:
    """Recompute N^+, y and u of the rows ``rows_mask`` (none half-way through an add) from their active sets
    (:func:`_on_active_set`), where that is valid (independent normals, every y >= 0). With ``pinv_only`` N^+
    alone, wherever N N^T is regular (it depends on the normals only: y and u are kept, and a row may be
    half-way through an exchange).

    Greville's rank-one updates accumulate rounding, most near rank(H): on the bias-free 28x28 teacher at
    lam 1e-6 two rows whose supports reached ~110 of rank 133 chased violations of ~1e-9 through hundreds of
    drops (809 steps, then the interior point); recomputed every 100 steps they finish in 414 with every
    other row's steps unchanged. In phase 2 (t holds nu on the bounded block) it finishes one more row at
    lam 1e-2 on both 28x28 teachers (one fewer to the interior point)."""
    rows = torch.nonzero(rows_mask).flatten()
    if rows.numel() == 0 or state.top == 0:
        return
    k = state.top
    member = state.member[rows, :k]
    real = member >= 0
    columns = member.clamp_min(0)
    y, Pinv, u, info = _on_active_set(
        B[columns] * real[:, :, None],
        state.sign[rows, :k],
        real,
        state.b[rows],
        state.t[rows].gather(1, columns),
    )
    if pinv_only:
        regular = info == 0
        state.Pinv[rows[regular], :k] = Pinv[regular]
        return
    valid = (info == 0) & ~((y < 0) & real).any(dim=1) & torch.isfinite(u).all(dim=1)
    if bool(valid.any()):
        kept = rows[valid]
        state.Pinv[kept, :k], state.y[kept, :k], state.u[kept] = Pinv[valid], y[valid], u[valid]


#: z^T n and z^T z of a new normal's part z orthogonal to the active ones are equal for an exact N^+; where they
#: differ by more than this fraction of n^T n, N^+ is recomputed before the normal's dependence is decided
_ORTHOGONALITY_TOL = 1e-11


def _checked_complement(
    state: _Rows, normal: torch.Tensor, B: torch.Tensor, rows_mask: torch.Tensor, squared_norm: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """:meth:`_Rows.complement` of the new normals, with N^+ recomputed first (:func:`_recompute`) for the
    rows ``rows_mask`` whose z has lost its orthogonality to the active normals (z^T n != z^T z): there the
    updates' rounding would decide the dependence, and a normal parallel to an active one (duplicated pixel
    columns) could join, leaving N singular. ``squared_norm``: n^T n of the rows ``rows_mask``' normals."""
    rv, z, zn, k = state.complement(normal, B)
    drift = (zn - torch.linalg.vecdot(z, z)).abs()
    stale = rows_mask & (drift > _ORTHOGONALITY_TOL * squared_norm)
    if bool(stale.any()):
        _recompute(state, B, stale, pinv_only=True)
        rv, z, zn, k = state.complement(normal, B)
    return rv, z, zn, k


def _stop(whole: _Rows, state: _Rows, positions: torch.Tensor | None) -> None:
    """End an iteration: no row is live any more; a compacted batch is written back into ``whole``."""
    state.live[:] = False
    if positions is not None:
        whole.put(positions, state)


def _compacted(
    whole: _Rows, state: _Rows, positions: torch.Tensor | None, extras: tuple[torch.Tensor | None, ...]
) -> tuple[_Rows, torch.Tensor | None, tuple[torch.Tensor | None, ...]]:
    """Once a quarter of the batch is done, write it back into ``whole`` and go on with its live rows (and
    their per-row ``extras``): the easy rows of a stage (e.g. the 32 second-layer rows of the digits teacher's
    stage 1, ~40 steps) then stop costing the hard ones' steps. ``positions``: the batch's rows in ``whole``
    (None: all of them)."""
    live = state.live
    if 4 * int(live.sum()) > 3 * live.numel():
        return state, positions, extras
    keep = torch.nonzero(live).flatten()
    if positions is not None:
        whole.put(positions, state)
    positions = keep if positions is None else positions[keep]
    return state.take(keep), positions, tuple(None if x is None else x[keep] for x in extras)


def _smallest_ratio(
    numerator: torch.Tensor, denominator: torch.Tensor, where: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, min over the entries ``where`` of numerator / denominator (inf where there is none) and
    its index: the ratio test of a step (the first multiplier to reach 0)."""
    if numerator.shape[1] == 0:  # no slot in use yet
        rows = numerator.shape[0]
        return (
            torch.full((rows,), math.inf, dtype=numerator.dtype, device=numerator.device),
            torch.zeros(rows, dtype=torch.long, device=numerator.device),
        )
    return torch.where(where, numerator / denominator, math.inf).min(dim=1)  # 0/0 elsewhere: masked


def _column_norms(B: torch.Tensor) -> torch.Tensor:
    """||f_j|| of the rows of B (d x r), kept off 0 (a zero column's constraint is never violated)."""
    return B.norm(dim=1).clamp_min(torch.finfo(B.dtype).tiny)


def _pick_offset(t: torch.Tensor, inverse_norms: torch.Tensor) -> torch.Tensor:
    """-t_j (1 + tol) / ||f_j||: added to |f_j^T u| / ||f_j|| it gives constraint j's violation as a distance
    (> 0: violated; thresholds t and the columns' inverse norms, broadcast alike)."""
    return t * (-(1.0 + _VIOLATION_TOL)) * inverse_norms


def _dependent(zn: torch.Tensor, squared_norm: torch.Tensor) -> torch.Tensor:
    """New normals n (squared norms n^T n) whose part orthogonal to the active ones (z^T n = zn) is below
    ``_DEPENDENT_TOL`` of their own: dependent on them."""
    return zn <= _DEPENDENT_TOL * squared_norm


def _project(whole: _Rows, B: torch.Tensor, norms: torch.Tensor, max_steps: int) -> int:
    """Phase 1, Goldfarb-Idnani at the thresholds ``whole.t``: every live row ends with no violated constraint
    (``finished``) or at the guard (not live, not finished). Returns the steps taken. The batch is compacted
    as rows finish (:func:`_compacted`)."""
    state, positions = whole, None
    m = state.u.shape[0]
    dev, dt = state.u.device, state.u.dtype
    tiny = torch.finfo(dt).tiny
    inverse_norms = 1.0 / norms
    squared_norms = norms * norms  # n^T n of a normal -s f_p
    need = torch.ones(m, dtype=torch.bool, device=dev)  # rows whose next constraint is to be picked
    p = torch.zeros(m, dtype=torch.long, device=dev)  # the constraint being added
    s = torch.zeros(m, dtype=dt, device=dev)
    slack = torch.zeros(m, dtype=dt, device=dev)  # its slack t_p - s f_p^T u (< 0 while violated)
    y_new = torch.zeros(m, dtype=dt, device=dev)  # its multiplier so far
    # |f_j^T u| above t_j (1 + tol) is a violation, by the distance (|f_j^T u| - t_j (1 + tol)) / ||f_j||:
    # the offset -t_j (1 + tol) / ||f_j||, -inf on the active constraints (kept so as they join and leave)
    offset = _pick_offset(state.t, inverse_norms)
    offset.masked_fill_(state.in_set, -math.inf)
    distance_buffer = torch.empty_like(offset)
    # the dual objective's best value so far, and the steps since it last rose (cycling, _STALLED_STEPS)
    best_objective = torch.zeros(m, dtype=dt, device=dev)
    stalled = torch.zeros(m, dtype=torch.long, device=dev)
    steps = 0
    # the last step's update of N^+, applied once the next normals are known: the pass over N^+ that forms
    # the dropped rows' N^+ g then also gives N^+ of the next normals (rv), instead of a pass of its own
    pending: dict[str, Any] | None = None
    while True:
        pick = need & state.live
        if steps and steps % _RECOMPUTE_EVERY == 0:
            if pending is not None:
                state.update(**pending)
                pending = None
            _recompute(state, B, pick)
        idx = torch.nonzero(pick).flatten()
        if idx.numel():
            every = idx.numel() == state.u.shape[0]
            # fresh (the other rows' f^T u is not needed until they pick)
            values = (state.u if every else state.u.index_select(0, idx)) @ B.T  # f_j^T u
            distance = torch.abs(values, out=distance_buffer[: idx.numel()]).mul_(inverse_norms)
            distance += offset if every else offset.index_select(0, idx)  # > 0: violated, by this distance
            best, j = distance.max(dim=1)
            clean = best <= 0
            state.finished[idx] = clean
            state.live[idx] = ~clean
            value = values.gather(1, j[:, None])[:, 0]
            p[idx] = j
            s[idx] = torch.sign(value)
            slack[idx] = state.t[idx, j] - value.abs()
            y_new[idx] = 0.0
        # GI's form: normal^T u >= -t_p (rows no longer live take no step, whatever their normal)
        normal = B.index_select(0, p).mul_(s[:, None]).neg_()
        rv = None if pending is None else state.update(**pending, next_normal=normal)
        pending = None
        if not bool(state.live.any()) or steps >= max_steps:
            _stop(whole, state, positions)
            return steps
        state, positions, (need, p, s, slack, y_new, offset, normal, rv, best_objective, stalled) = (
            _compacted(
                whole,
                state,
                positions,
                (need, p, s, slack, y_new, offset, normal, rv, best_objective, stalled),
            )
        )
        steps += 1
        rv, z, zn, k = state.complement(normal, B, rv)  # rv: how the active multipliers change
        y = state.y[:, :k]  # a view
        dependent = _dependent(zn, squared_norms.index_select(0, p))
        full = torch.div(slack, zn.clamp_min(tiny)).neg_().masked_fill_(dependent, math.inf)
        partial, leaving = _smallest_ratio(y, rv, rv > 0)  # an empty slot has rv = 0
        step = torch.minimum(partial, full)
        state.live &= torch.isfinite(step)  # no step: rounding made the problem look infeasible
        live = state.live
        step.masked_fill_(~live, 0.0)
        y.addcmul_(step[:, None], rv, value=-1.0)
        y_new += step
        move = step.masked_fill(dependent, 0.0)
        state.u.addcmul_(move[:, None], z)
        slack.addcmul_(move, zn)
        offset_from_b = state.u - state.b
        objective = torch.linalg.vecdot(offset_from_b, offset_from_b)
        rose = objective > best_objective
        best_objective = torch.maximum(best_objective, objective)
        stalled = torch.where(rose, 0, stalled + 1)
        state.live &= stalled <= _STALLED_STEPS  # cycling: left, not finished
        live = state.live
        add = (full <= partial) & live
        drop = live & ~add
        # the next pick needs the active sets now (update marks in_set, after the pick)
        adding, dropping = torch.nonzero(add).flatten(), torch.nonzero(drop).flatten()
        offset[adding, p[adding]] = -math.inf
        left = state.member[dropping, leaving[dropping]]
        offset[dropping, left] = _pick_offset(state.t[dropping, left], inverse_norms[left])
        pending = {
            "add": add, "drop": drop, "z": z, "zn": zn, "rv": rv, "leaving": leaving, "joining": p.clone(),
            "joining_sign": s.clone(), "joining_y": y_new.clone(), "k": k,
        }  # fmt: skip
        need = add


def _bounded_slots(state: _Rows, in_bound: torch.Tensor, k: int | None = None) -> torch.Tensor:
    """a (m x k, float; k: all slots by default): 1 on the slots holding a constraint of the bounded block,
    0 elsewhere."""
    member = state.member if k is None else state.member[:, :k]
    return ((member >= 0) & in_bound[member.clamp_min(0)]).to(state.y.dtype)


def _bound_excess(y: torch.Tensor, bounded_slots: torch.Tensor, kappa: float) -> torch.Tensor:
    """sum over the active constraints of the bounded block of their multipliers (= |w_j|), minus kappa:
    multipliers y and :func:`_bounded_slots` over the same slots (slots past the span in use hold no y)."""
    return (y * bounded_slots).sum(dim=1) - kappa


def _follow_the_bound(
    state: _Rows, B: torch.Tensor, norms: torch.Tensor, in_bound: torch.Tensor, kappa: float, max_steps: int
) -> int:
    """Phase 2: finished rows with ``sum_A |w_j| > kappa`` follow nu up until it equals kappa (module
    docstring); rows left on the way (the guard, nu stalled for ``_IDLE_STEPS`` steps, an optimum inside a
    face that the bound cuts, a dependent normal no exchange admits) are no longer ``finished``.
    Returns the steps taken."""
    dt = state.u.dtype
    tiny = torch.finfo(dt).tiny
    bound_f = in_bound.to(dt)
    squared_norms = norms * norms  # n^T n of a normal -s f_j

    state.live = state.finished & (_bound_excess(state.y, _bounded_slots(state, in_bound), kappa) > 0)
    state.finished &= ~state.live
    # a constraint that turned tight with a normal dependent on the active ones joins in exchange for one of
    # them (the ratio test of a degenerate pivot): the leaving one goes first, it joins the next step
    pending = torch.zeros_like(state.live)
    pending_j = torch.zeros(state.live.shape, dtype=torch.long, device=state.u.device)
    pending_sign = torch.zeros_like(state.u[:, 0])
    pending_y = torch.zeros_like(state.u[:, 0])
    nu = torch.zeros_like(state.u[:, 0])
    idle = torch.zeros_like(state.live, dtype=torch.long)  # consecutive steps that did not move nu
    Bu = state.u @ B.T  # f_j^T u, kept up to date along the pieces
    whole, positions = state, None
    steps = 0
    while True:
        if not bool(state.live.any()) or steps >= max_steps:
            _stop(whole, state, positions)
            return steps
        state, positions, (pending, pending_j, pending_sign, pending_y, nu, idle, Bu) = _compacted(
            whole, state, positions, (pending, pending_j, pending_sign, pending_y, nu, idle, Bu)
        )
        steps += 1
        if steps % _RECOMPUTE_EVERY == 0:  # rows with an exchange pending are half-way through a pivot
            _recompute(state, B, state.live & ~pending)
            Bu = state.u @ B.T
        if bool(pending.any()):
            normal = -pending_sign[:, None] * B[pending_j]
            normal[~pending] = 0.0
            squared = squared_norms.index_select(0, pending_j)
            rv, z, zn, k = _checked_complement(state, normal, B, pending, squared)
            still = pending & _dependent(zn, squared)
            state.live &= ~still
            join = pending & ~still
            state.update(
                join, torch.zeros_like(join), z=z, zn=zn, rv=rv, leaving=pending_j, joining=pending_j,
                joining_sign=pending_sign, joining_y=pending_y, k=k,
            )  # fmt: skip
            pending[:] = False
        live = state.live
        k = state.top
        Pinv, y = state.Pinv[:, :k], state.y[:, :k]  # views: the slots in use
        bounded_slots = _bounded_slots(state, in_bound, k)
        q = torch.bmm(bounded_slots[:, None, :], Pinv)[:, 0, :]  # N^{+T} a   (m x r)
        rate = _times(Pinv, q)  # -dy/dnu      (m x k)
        Bq = q @ B.T  # -d(f_j^T u)/dnu  (m x d)
        excess = _bound_excess(y, bounded_slots, kappa)
        target = excess.clamp_min(0) / (q * q).sum(dim=1).clamp_min(tiny)
        to_drop, leaving = _smallest_ratio(y, rate, rate > 0)  # an empty slot has rate 0
        # an inactive constraint s f_j^T u <= t_j + nu a_j becomes tight after delta = slack / (-(a_j + s Bq_j)):
        # with a_j >= 0 its slack closes for one sign at most, s = -sign(Bq_j), at the rate |Bq_j| - a_j
        free = ~state.in_set & torch.isfinite(state.t)
        magnitude = Bq.abs()
        # a constraint that moves with the active ones (a duplicated column) has a rate of 0 up to rounding
        significant = magnitude * _RATE_TOL + _RATE_TOL
        closing = magnitude.sub_(bound_f)  # the slack's rate of decrease
        toward = torch.sign(Bq)  # -s
        slack = torch.addcmul(state.t, toward, Bu).clamp_min_(0)  # t_j - s f_j^T u
        ok = (closing > significant) & free
        best_join, joining = slack.div_(closing).masked_fill_(~ok, math.inf).min(dim=1)
        joining_sign = -toward.gather(1, joining[:, None])[:, 0]
        step = torch.minimum(target, torch.minimum(to_drop, best_join))
        stuck = ~torch.isfinite(step) & live
        state.live &= ~stuck
        live = state.live
        step = torch.where(live, step, torch.zeros_like(step))
        y -= step[:, None] * rate
        state.u -= step[:, None] * q
        Bu -= step[:, None] * Bq
        state.t += step[:, None] * bound_f
        # degenerate pivots that do not move nu can cycle: a row that makes no progress for long is left
        idle = torch.where(step > _RATE_TOL * nu.clamp_min(tiny), torch.zeros_like(idle), idle + 1)
        nu += step
        state.live &= idle <= _IDLE_STEPS
        live = state.live
        done = live & (target <= torch.minimum(to_drop, best_join))
        state.finished |= done
        state.live &= ~done
        drop = state.live & (to_drop <= best_join)
        add = state.live & ~drop
        normal = -joining_sign[:, None] * B[joining]
        normal[~add] = 0.0
        squared = squared_norms.index_select(0, joining)
        rv, z, zn, k = _checked_complement(state, normal, B, add, squared)
        dependent = add & _dependent(zn, squared)
        if bool(dependent.any()):  # n = N c: the slot with the smallest y_k / c_k (c_k > 0) leaves
            y = state.y[:, :k]
            theta, out = _smallest_ratio(y, rv, dependent[:, None] & (rv > 0))
            none = dependent & torch.isinf(theta)
            state.live &= ~none
            exchange = dependent & ~none
            theta = torch.where(exchange, theta, torch.zeros_like(theta))
            # a degenerate pivot moves along the optimal face at this nu, and sum_A |w_j| with it; where it
            # would cross kappa the optimum is inside the face (not a vertex): leave the row to other methods
            # (the slots are those of the step's start: no pivot since, and the same span k)
            moved = (bounded_slots * rv).sum(dim=1) - bound_f[joining]
            after = _bound_excess(y, bounded_slots, kappa) - theta * moved
            crossing = exchange & (after < 0)
            state.live &= ~crossing
            exchange &= ~crossing
            theta = torch.where(exchange, theta, torch.zeros_like(theta))
            y -= theta[:, None] * torch.where(exchange[:, None], rv, torch.zeros_like(rv))
            leaving = torch.where(exchange, out, leaving)
            drop = drop | exchange
            pending = exchange.clone()
            pending_j = torch.where(exchange, joining, pending_j)
            pending_sign = torch.where(exchange, joining_sign, pending_sign)
            pending_y = theta
        add &= ~dependent
        state.update(
            add, drop, z=z, zn=zn, rv=rv, leaving=leaving, joining=joining, joining_sign=joining_sign,
            joining_y=torch.zeros_like(step), k=k,
        )  # fmt: skip
