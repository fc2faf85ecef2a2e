"""Basic optimal solutions: the sparsest optimum of a row on a rank-deficient Gram (a crossover step).

When rank(H) = r < d the lasso optimum of a row is often not unique: every optimal w has the same fitted
value ``F w`` (``H = F^T F``, F r x d) and the same penalty ``sum_j t_j |w_j|``, and lives on the set E of
entries whose dual constraint is active, with the signs sigma of the dual there. An interior point converges
to the centre of that optimal face (every weakly active entry nonzero: ~500 nonzeros per row on the 28x28
digits teacher), ADMM to some point of it. SIM exists to make networks sparse, so we return a *vertex* of the
face instead. With ``u = sigma * w_E >= 0`` the face is the polytope

    { u >= 0 :  F_E diag(sigma) u = F w,   t_E^T u = t^T |w|,   [a_E^T u = kappa when the bound is active] }

and its vertices have at most r + 2 nonzeros. From the current point ``u0 = |w_E|`` we *purify* (the crossover
of interior-point LP codes): a column-pivoted QR of the constraint matrix M with columns scaled by u0 picks a
basis B of r + 2 (or fewer) independent columns, largest entries first; the basic solution ``x_B = M_B^+ target``
is a vertex when it is >= 0. When it is not, u moves towards it (every point of that segment satisfies
``M u = target``) until a basic entry reaches 0; that column leaves the basis, the nonbasic column with the
largest ``u_j |(M_B^+ M_j)_k|`` enters (the exchange keeps B a basis), and the step repeats: at most |E| - r
rounds, each a rank-one update of an (r + 2) x (r + 2) QR (on the 28x28 digits teachers at lam > 0: 4-10 per row
on average, at most 74; at lam = 0, where the least-squares rows are dense, ~70 on average; the first basis alone
is a vertex for ~60% of the rows). The candidate is then scored by the solver's certificate and kept only
where it still certifies (and is sparser), so the step never costs optimality.

Cost per row: one pivoted QR of an (r + 2) x |E| matrix (LAPACK geqp3 via SciPy, on the CPU) plus the rounds.
Each LAPACK call runs on one thread (on the 2-core VM, BLAS threads inside each call next to torch's OpenMP
threads had doubled this step at torch's default 2 threads: 0.41 -> 0.82 s for the 64 rows of the 28x28
teacher's stage 1).
"""

from __future__ import annotations

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

    F_np = F.detach().to("cpu", torch.float64).numpy()
    W_cpu = W.detach().to("cpu", torch.float64)
    candidates = W_cpu.clone()
    found = torch.zeros(W.shape[0], dtype=torch.bool)
    nc = n_constrained if kappa is not None else 0
    # each LAPACK call on one thread: the QR of a ~135 x 850 matrix gains nothing from threads, and BLAS
    # threads next to torch's OpenMP ones doubled this step on 2 cores (docs/benchmarks/sim.md, fifth session)
    with threadpool_limits(limits=1, user_api="blas"):
        for i in torch.nonzero(qualifies.cpu()).flatten().tolist():
            w = W_cpu[i]
            support = torch.nonzero(w).flatten()
            t = take_rows(lam, i)
            t_row = t.to("cpu", torch.float64)[support] if isinstance(t, torch.Tensor) else None
            u0 = w[support].abs().numpy()
            signs = torch.sign(w[support]).numpy()
            rows = [
                F_np[:, support.numpy()] * signs,
                (t_row.numpy() if t_row is not None else np.full(len(u0), t)),
            ]
            if nc > 0 and abs(float(w[:nc].abs().sum()) - kappa) <= _ACTIVE_BOUND * max(kappa, 1e-300):
                rows.append((support < nc).to(torch.float64).numpy())
            u = _purified(np.vstack(rows), u0, qr)
            if u is None:
                continue
            row = torch.zeros_like(w)
            row[support] = torch.from_numpy(signs * u)
            candidates[i] = row
            found[i] = True
    return candidates.to(device=W.device, dtype=W.dtype), found.to(W.device)


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


def _first_basis(
    M: np.ndarray, u: np.ndarray, target: np.ndarray, qr: Callable, solve_triangular: Callable
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Independent columns of M, largest ``u_j ||M_j||`` first, whose span holds ``target`` (a pivoted QR of
    M diag(u)), with the full QR ``M_B = Q R``; None when u is already basic (independent columns).

    The pivoted QR runs on the ``_FIRST_COLUMNS`` x (rows of M) largest columns first (a third of the time
    on the 28x28 digits teacher) and on all of them when those do not span ``target``.
    """
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
        R = R_[:, :rank] / u[basis]  # M_B = Q R (the pivoted QR had M_B diag(u_B) = Q R_)
        x_basis = solve_triangular(R[:rank], Q[:, :rank].T @ target)
        if np.linalg.norm(M[:, basis] @ x_basis - target) <= 1e3 * _RANK_TOL * np.linalg.norm(target):
            return basis, Q, R
    return None


def _purified(M: np.ndarray, u0: np.ndarray, qr: Callable) -> np.ndarray | None:
    """A vertex of ``{u >= 0 : M u = M u0}`` reached from u0 > 0 by basis exchanges (the module docstring),
    or None when u0 is already one (full column rank) or the rounds run out."""
    from scipy.linalg import qr_delete, qr_update
    from scipy.linalg.blas import dtrsv

    # the Cython function under SciPy's batching decorator (~6 us of its ~25 us per call; 2-D inputs only here)
    qr_update = getattr(qr_update, "__wrapped__", qr_update)

    def solve_triangular(R_k: np.ndarray, b: np.ndarray, trans: str = "N") -> np.ndarray:
        # BLAS trsv directly: SciPy's solve_triangular validates its inputs on every call, ~10x the solve
        # itself at these sizes (thousands of calls per stage at lam = 0)
        return dtrsv(R_k, b, lower=0, trans=0 if trans == "N" else 1)

    u = u0.copy()
    target = M @ u
    started = _first_basis(M, u, target, qr, solve_triangular)
    if started is None:
        return None
    basis, Q, R = started
    rank = len(basis)
    for _ in range(min(len(u) - rank, _MAX_ROUNDS) + 1):
        k = len(basis)
        x_basis = solve_triangular(R[:k], Q[:, :k].T @ target)
        step = x_basis - u[basis]
        falling = step < -_RANK_TOL * u.max()  # smaller moves are rounding: x is clipped at 0 below
        ratios = np.where(falling, u[basis] / np.where(falling, -step, 1.0), np.inf)
        leaving = int(np.argmin(ratios))
        if ratios[leaving] >= 1.0:  # the basic solution is >= 0: a vertex
            x = np.zeros_like(u)
            x[basis] = np.clip(x_basis, 0.0, None)
            return x
        alpha = ratios[leaving]
        moved = np.clip(u[basis] + alpha * step, 0.0, None)
        u *= 1.0 - alpha  # the nonbasic entries; the basic ones are set just below
        u[basis] = moved
        u[basis[leaving]] = 0.0
        # e_k^T M_B^+ M: the coefficient of the leaving column in every column's expansion on the basis
        unit = np.zeros(k)
        unit[leaving] = 1.0
        magnitude = np.abs((Q[:, :k] @ solve_triangular(R[:k], unit, trans="T")) @ M)
        score = magnitude * u
        score[basis] = 0.0  # nonbasic columns only
        entering = int(np.argmax(score))
        if score[entering] <= _RANK_TOL * magnitude.max() * u.max():
            # nothing can replace it: the face is thinner here
            Q, R = qr_delete(Q, R, leaving, which="col", check_finite=False)
            basis = np.delete(basis, leaving)
            if basis.size == 0:
                return None
        else:
            Q, R = qr_update(Q, R, M[:, entering] - M[:, basis[leaving]], unit, check_finite=False)
            basis[leaving] = entering
    return None
