"""Basic optimal solutions: the sparsest optimum of a row on a rank-deficient Gram (a crossover step).

When rank(H) = r < d the lasso optimum of a row is often not unique: every optimal w has the same fitted
value ``F w`` (``H = F^T F``, F r x d) and the same penalty ``sum_j t_j |w_j|``, and lives on the set E of
entries whose dual constraint is active, with the signs sigma of the dual there. An interior point converges
to the centre of that optimal face (every weakly active entry nonzero: ~500 nonzeros per row on the 28x28
digits teacher), ADMM to some point of it. SIM exists to make networks sparse, so we return a *vertex* of the
face instead. With ``u = sigma * w_E >= 0`` the face is the polytope

    { u >= 0 :  F_E diag(sigma) u = F w,   t_E^T u = t^T |w|,   [a_E^T u = kappa when the bound is active] }

and its vertices have at most r + 2 nonzeros (the t row is left out where t_E = 0, at lam = 0: it holds for
every u). From the current point ``u0 = |w_E|`` we *purify* (the crossover of interior-point LP codes): a
column-pivoted QR of the constraint matrix M with columns scaled by u0 picks a basis B of r + 2 (or fewer)
independent columns, largest entries first; the basic solution ``x_B = M_B^+ target`` is a vertex when it is
>= 0. When it is not, u moves towards it (every point of that segment satisfies ``M u = target``) until a basic
entry reaches 0; that column leaves the basis, the nonbasic column with the largest ``u_j |(M_B^+ M_j)_k|``
enters (the exchange keeps B a basis), and the step repeats: at most |E| - r rounds (on the 28x28 digits
teachers at lam > 0: 4-10 per row on average, at most 74; at lam = 0, where the least-squares rows are dense,
~70 on average and at most ~120; the first basis alone is a vertex for ~60% of the rows). The candidate is then
scored by the solver's certificate and kept only where it still certifies (and is sparser), so the step never
costs optimality.

Cost: per row, one pivoted QR of an (r + 2) x |E| matrix (LAPACK geqp3 via SciPy, on the CPU) for the first
basis; then every row's rounds run in one lockstep batch (:func:`_purify`), each round a (rows x r)(r x d)
product and one rank-one update of the rows' ``M_B^{-1}`` (rows x (r + 2) x (r + 2)), like the simplex method's
(for the 96 rows of the 28x28 teacher's stage 1 at lam = 0: the rounds 0.37 s, the whole step 0.6 s, where
with a row at a time, per-round Python and SciPy calls, the step took 1.3 s). Each LAPACK call runs on one
thread (on the 2-core VM, BLAS threads inside each call next to torch's OpenMP threads had doubled this step at
torch's default 2 threads: 0.41 -> 0.82 s for the 64 rows of the 28x28 teacher's stage 1).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np
import torch

from idl_ray.sim.solvers.admm_kernels import GramFactor
from idl_ray.sim.solvers.certificate import DualityGap
from idl_ray.sim.solvers.weights import Threshold, take_rows

__all__ = ["move_to_vertices", "vertex_candidates"]

#: columns whose pivoted-QR diagonal is below this fraction of the first are dependent
_RANK_TOL = 1e-10
#: rows are tried only with more than this multiple of rank(H) nonzeros (a vertex has at most rank + 2)
_WORTH = 1.25
#: basis exchanges per row at most (each removes one entry; at most 122 seen on the 28x28 digits teachers)
_MAX_ROUNDS = 256
#: the first basis is sought among this multiple of (rank + 2) of the largest entries' columns first
_FIRST_COLUMNS = 2
#: a bound counts as active when ||w_A||_1 is within this relative distance of kappa
_ACTIVE_BOUND = 1e-9


def vertex_candidates(
    F: torch.Tensor,
    W: torch.Tensor,
    *,
    lam: Threshold,
    kappa: float | None,
    n_constrained: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A vertex of each row's optimal face through W (see the module docstring).

    Parameters
    ----------
    F : Tensor (r, d), a thin factor of H (``F^T F = H``)
    W : Tensor (rows, d), (nearly) optimal rows
    lam : float or per-entry thresholds (rows x d) aligned with W; kappa, n_constrained : the bound

    Returns
    -------
    candidates : Tensor (rows, d), the vertex where found and W's row elsewhere
    found : bool Tensor (rows,), rows with a vertex sparser than W's row
    """
    qualifies = (W != 0).sum(dim=1) > _WORTH * F.shape[0]  # a vertex has <= rank + 2: little to remove
    if not bool(qualifies.any()):  # SciPy's import alone costs 0.2-0.3 s in a fresh process
        return W.clone(), torch.zeros(W.shape[0], dtype=torch.bool, device=W.device)
    from scipy.linalg import qr
    from threadpoolctl import threadpool_limits

    F64 = F.detach().to(W.device, torch.float64)
    F_np = F64.cpu().numpy()
    W_cpu = W.detach().to("cpu", torch.float64)
    nc = n_constrained if kappa is not None else 0
    starts: list[_Start] = []
    # each LAPACK call on one thread: the QR of a ~135 x 850 matrix gains nothing from threads, and BLAS
    # threads next to torch's OpenMP ones doubled this step on 2 cores (docs/benchmarks/sim.md, fifth session)
    with threadpool_limits(limits=1, user_api="blas"):
        for i in torch.nonzero(qualifies.cpu()).flatten().tolist():
            w = W_cpu[i]
            support = torch.nonzero(w).flatten()
            t = take_rows(lam, i)
            t_row = (
                t.to("cpu", torch.float64)[support].numpy()
                if isinstance(t, torch.Tensor)
                else np.full(support.numel(), float(t))
            )
            u0 = w[support].abs().numpy()
            signs = torch.sign(w[support]).numpy()
            extras = [t_row] if bool((t_row != 0).any()) else []  # lam = 0: t^T u = 0 holds for every u
            if nc > 0 and abs(float(w[:nc].abs().sum()) - kappa) <= _ACTIVE_BOUND * max(kappa, 1e-300):
                extras.append((support < nc).to(torch.float64).numpy())
            M = np.vstack([F_np[:, support.numpy()] * signs, *extras])
            first = _first_basis(M, u0, M @ u0, qr)
            if first is not None:
                starts.append(
                    _Start(i, support, signs, np.array(extras).reshape(len(extras), len(u0)), u0, *first)
                )
    candidates = W.detach().to(torch.float64).clone()
    found = torch.zeros(W.shape[0], dtype=torch.bool, device=W.device)
    if starts:
        # one batch for every row; a zero column d pads the shorter bases and the missing extra rows
        padded = torch.cat([F64, torch.zeros_like(F64[:, :1])], dim=1)
        vertices, reached = _purify(padded, *_batch(starts, W.shape[1] + 1, F64.shape[0], W.device))
        rows = torch.tensor([begun.row for begun in starts], device=W.device)
        candidates[rows[reached]] = vertices[reached, :-1]
        found[rows[reached]] = True
    return candidates.to(W.dtype), found


def move_to_vertices(
    factor: GramFactor,
    W: torch.Tensor,
    rows: torch.Tensor,
    *,
    lam: Threshold,
    kappa: float | None,
    n_constrained: int,
    certify: Callable[[torch.Tensor, torch.Tensor], tuple[DualityGap, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor, DualityGap | None]:
    """Move the (certified) rows ``rows`` of W to vertices of their optimal faces where these still certify.

    Parameters
    ----------
    factor : GramFactor of H; W : Tensor (n, d); rows : 1-D index tensor into W
    lam : float or thresholds aligned with W; kappa, n_constrained : the bound
    certify : ``(weights, rows) -> (DualityGap, certified mask)`` of candidate weights for those rows

    Returns
    -------
    W : Tensor (n, d), a new tensor when a row moved (W itself otherwise)
    moved : the rows that moved (every one sparser: a vertex has at most rank + 2 nonzeros, and only rows
        with more than 1.25 rank are tried)
    gaps : DualityGap of the moved rows, or None when none moved
    """
    if rows.numel() == 0 or not 0 < factor.rank < W.shape[1]:
        return W, rows[:0], None
    candidates, found = vertex_candidates(
        factor.range_factor(), W[rows], lam=take_rows(lam, rows), kappa=kappa, n_constrained=n_constrained
    )
    if not bool(found.any()):
        return W, rows[:0], None
    rows, candidates = rows[found], candidates[found]
    gaps, ok = certify(candidates, rows)
    if not bool(ok.any()):
        return W, rows[:0], None
    W = W.clone()
    W[rows[ok]] = candidates[ok]
    return W, rows[ok], gaps.take(ok)


@dataclasses.dataclass
class _Start:
    """A row's face and first basis: its support's columns (indices into d) with their signs, the extra
    constraint rows on them (e x |support|: t, the bound's indicator), the point u0 = |w| there, the basis
    (positions in the support) and P (basis x (r + e)): M_B^{-1} on the range of M."""

    row: int
    support: torch.Tensor
    signs: np.ndarray
    extras: np.ndarray
    u0: np.ndarray
    basis: np.ndarray
    P: np.ndarray


def _batch(starts: list[_Start], d: int, r: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Stack the rows' faces into the arrays of :func:`_purify`, over d columns whose last is a zero column:
    sigma (m x d, 0 off the support), extras (m x e x d), u0 (m x d), basis (m x k) and P (m x k x (r + e)),
    with k and e the most any row has; a shorter basis is padded with the zero column (its row of P is 0:
    its value stays 0 and it never leaves), missing extra rows with zeros (and zero columns of P)."""
    m = len(starts)
    e = max(begun.extras.shape[0] for begun in starts)
    k = max(begun.basis.size for begun in starts)
    sigma, u0 = np.zeros((m, d)), np.zeros((m, d))
    extras = np.zeros((m, e, d))
    basis = np.full((m, k), d - 1, dtype=np.int64)
    P = np.zeros((m, k, r + e))
    for index, begun in enumerate(starts):
        columns = begun.support.numpy()
        sigma[index, columns] = begun.signs
        extras[index, : begun.extras.shape[0]][:, columns] = begun.extras
        u0[index, columns] = begun.u0
        basis[index, : begun.basis.size] = columns[begun.basis]
        P[index, : begun.basis.size, : r + begun.extras.shape[0]] = begun.P
    return tuple(torch.from_numpy(a).to(device) for a in (sigma, extras, u0, basis, P))


def _first_basis(
    M: np.ndarray, u: np.ndarray, target: np.ndarray, qr: Callable
) -> tuple[np.ndarray, np.ndarray] | None:
    """Independent columns of M, largest ``u_j ||M_j||`` first, whose span holds ``target`` (a pivoted QR of
    M diag(u)), and P = R^{-1} Q_k^T (k x rows of M) from ``M_B = Q_k R`` (Q_k: the first k columns of Q, a
    basis of the range of M): P y gives the basic solution of any y in that range. None when u is already
    basic (independent columns).

    The pivoted QR runs on the ``_FIRST_COLUMNS`` x (rows of M) largest columns first (a third of the time
    on the 28x28 digits teacher) and on all of them when those do not span ``target``.
    """
    from scipy.linalg import solve_triangular

    scaled = np.linalg.norm(M, axis=0) * u
    candidates = (
        [np.argsort(-scaled)[: _FIRST_COLUMNS * M.shape[0]]] if len(u) > _FIRST_COLUMNS * M.shape[0] else []
    )
    for columns in [*candidates, np.arange(len(u))]:
        Q, R_, pivots = qr(
            M[:, columns] * u[columns], mode="full", pivoting=True, overwrite_a=True, check_finite=False
        )
        diagonal = np.abs(np.diag(R_))
        if not diagonal.size or diagonal[0] <= 0:
            return None
        rank = int((diagonal > _RANK_TOL * diagonal[0]).sum())
        if rank >= len(u):
            return None
        basis = columns[pivots[:rank]]
        R = R_[:rank, :rank] / u[basis]  # M_B = Q_k R (the pivoted QR had M_B diag(u_B) = Q R_)
        P = solve_triangular(R, Q[:, :rank].T, check_finite=False)
        if np.linalg.norm(M[:, basis] @ (P @ target) - target) <= 1e3 * _RANK_TOL * np.linalg.norm(target):
            return basis, P
    return None


def _purify(
    F: torch.Tensor,
    sigma: torch.Tensor,
    extras: torch.Tensor,
    u0: torch.Tensor,
    basis: torch.Tensor,
    P: torch.Tensor,
    max_rounds: int = _MAX_ROUNDS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Vertices of ``{u >= 0 : M_i u = M_i u0_i}`` for a batch of rows by basis exchanges from a first basis
    (the module docstring), every row in lockstep: one batched round costs a (m x r)(r x d) product for the
    entering column's scores and one rank-one update of P, where a row at a time cost ~180 us of Python and
    SciPy calls per round (1.3 s for the 96 rows of the 28x28 teacher's stage 1 at lam = 0).

    Row i's constraint matrix is ``M_i = [F diag(sigma_i); extras_i]`` ((r + e) x d; its columns off the
    support are 0 and never enter). P_i (k x (r + e)) maps a vector of the range of M_i to its coefficients
    on the basis (``M_B^{-1}`` there); an exchange of basis position l for column j updates it as the
    simplex method does: with ``a = P M_j``, ``P <- P - (a - e_l) P_l / a_l``.

    Parameters
    ----------
    F : Tensor (r, d) whose last column is 0: the column that pads shorter bases (:func:`_batch`) and takes
        the place of a column that leaves with none to replace it
    sigma, u0 : Tensor (m, d); extras : Tensor (m, e, d); basis : long Tensor (m, k); P : Tensor (m, k, r + e)
    max_rounds : exchanges per row at most (rows still exchanging then give no vertex)

    Returns
    -------
    vertices : Tensor (m, d), signed (sigma times the vertex), where found
    found : bool Tensor (m,)
    """
    m, d = u0.shape
    r, e, k = F.shape[0], extras.shape[1], basis.shape[1]
    dev = u0.device
    target = torch.cat([(sigma * u0) @ F.T, (extras * u0[:, None, :]).sum(dim=2)], dim=1)  # M u0
    found = torch.zeros(m, dtype=torch.bool, device=dev)
    vertices = torch.zeros_like(u0)
    # the batch: positions of its rows in the output, then the per-row arrays (compacted as rows finish)
    batch = [torch.arange(m, device=dev), torch.ones(m, dtype=torch.bool, device=dev), u0.clone()]
    batch += [torch.bmm(P, target[:, :, None])[:, :, 0], basis.clone(), P.clone(), sigma, extras]
    for _ in range(max_rounds + 1):
        rows, live, u, x, basis, P, row_sigma, row_extras = batch
        u_basis = u.gather(1, basis)
        step = x - u_basis  # toward the basic solution x (m x k)
        falling = step < -_RANK_TOL * u.amax(dim=1, keepdim=True)  # smaller moves are rounding (x >= 0 below)
        alpha, leaving = torch.where(falling, u_basis / torch.where(falling, -step, 1.0), math.inf).min(dim=1)
        vertex = live & (alpha >= 1.0)  # the basic solution is >= 0
        if bool(vertex.any()):
            done = rows[vertex]
            found[done] = True
            vertices[done] = _values(
                F, sigma[done], extras[done], target[done], basis[vertex], x[vertex], P[vertex]
            )
        live &= ~vertex
        if not bool(live.any()):
            break
        if 4 * int(live.sum()) <= 3 * live.numel():  # go on with the rows still exchanging
            keep = live
            batch = [a[keep] for a in batch]
            rows, live, u, x, basis, P, row_sigma, row_extras = batch
            alpha, leaving, step, u_basis = alpha[keep], leaving[keep], step[keep], u_basis[keep]
        alpha = torch.where(live, alpha, 0.0)
        # move u toward x until the first basic entry reaches 0: that position leaves
        u.mul_(1.0 - alpha[:, None])  # the nonbasic entries; the basic ones are set just below
        u.scatter_(
            1, basis, torch.where(live[:, None], (u_basis + alpha[:, None] * step).clamp_min_(0.0), u_basis)
        )
        out_column = basis.gather(1, leaving[:, None])
        u.scatter_(1, out_column, torch.where(live[:, None], 0.0, u.gather(1, out_column)))
        # P_l, the leaving position's row of M_B^{-1}: its product with a column is that column's coefficient
        # on the leaving one, which the entering column must have; among them the largest u_j |coefficient|
        count = u.shape[0]
        P_l = P.reshape(count * k, r + e).index_select(0, torch.arange(count, device=dev) * k + leaving)
        magnitude = (P_l[:, :r] @ F) * row_sigma
        if e:
            magnitude += torch.bmm(P_l[:, None, r:], row_extras)[:, 0]
        magnitude.abs_()
        best, entering = (magnitude * u).scatter_(1, basis, 0.0).max(dim=1)  # nonbasic columns only
        a = torch.bmm(P, _columns(F, row_sigma, row_extras, entering[:, None]))[:, :, 0]  # on the basis
        pivot = a.gather(1, leaving[:, None])[:, 0]
        # nothing can replace it (the face is thinner there): the basis loses that column (the zero column d
        # takes its place) and P becomes the pseudo-inverse of the others, P - (P P_l) P_l^T / ||P_l||^2
        shrink = live & (best <= _RANK_TOL * magnitude.amax(dim=1) * u.amax(dim=1))
        if bool(shrink.any()):
            through = torch.bmm(P, P_l[:, :, None])[:, :, 0]
            a = torch.where(shrink[:, None], through, a)
            pivot = torch.where(shrink, (P_l * P_l).sum(dim=1), pivot)
            entering = torch.where(shrink, d - 1, entering)
        a.scatter_add_(1, leaving[:, None], shrink.to(a.dtype)[:, None] - 1.0)  # an exchange takes a - e_l
        coefficients = torch.where(live[:, None], a / torch.where(live, pivot, 1.0)[:, None], 0.0)
        x.addcmul_(coefficients, x.gather(1, leaving[:, None]), value=-1.0)
        P.addcmul_(coefficients[:, :, None], P_l[:, None, :], value=-1.0)
        basis.scatter_(1, leaving[:, None], torch.where(live, entering, out_column[:, 0])[:, None])
        live &= (basis < d - 1).any(dim=1)  # a basis emptied by shrinking has no vertex to give
    return vertices, found


def _values(
    F: torch.Tensor,
    sigma: torch.Tensor,
    extras: torch.Tensor,
    target: torch.Tensor,
    basis: torch.Tensor,
    x: torch.Tensor,
    P: torch.Tensor,
) -> torch.Tensor:
    """Signed vertices (m x d) from basic solutions x (m x k) on ``basis``, refined once against the rounding
    of P's updates: x + P (target - M_B x), then clipped at 0 (the ratio test leaves -1e-10-sized entries)."""
    residual = target - torch.bmm(_columns(F, sigma, extras, basis), x[:, :, None])[:, :, 0]
    refined = (x + torch.bmm(P, residual[:, :, None])[:, :, 0]).clamp_min_(0.0)
    return torch.zeros_like(sigma).scatter_(1, basis, refined * sigma.gather(1, basis))


def _columns(
    F: torch.Tensor, sigma: torch.Tensor, extras: torch.Tensor, columns: torch.Tensor
) -> torch.Tensor:
    """Columns ``columns`` (m x c indices) of each row's ``M_i = [F diag(sigma_i); extras_i]``: m x (r + e) x c."""
    picked = F.T[columns].transpose(1, 2) * sigma.gather(1, columns)[:, None, :]
    e = extras.shape[1]
    if not e:
        return picked
    return torch.cat([picked, extras.gather(2, columns[:, None, :].expand(-1, e, -1))], dim=1)
