"""Basic optimal solutions: the sparsest optimum of a row on a rank-deficient Gram (a crossover step).

When rank(H) = r < d the lasso optimum of a row is often not unique: every optimal w has the same fitted
value ``F w`` (``H = F^T F``, F r x d) and the same penalty ``sum_j t_j |w_j|``, and lives on the set E of
entries whose dual constraint is active, with the signs sigma of the dual there. An interior point converges
to the centre of that optimal face (every weakly active entry nonzero: ~500 nonzeros per row on the 28x28
digits teacher), ADMM to some point of it. SIM exists to make networks sparse, so we return a *vertex* of the
face instead. With ``u = sigma * w_E >= 0`` the face is the polytope

    { u >= 0 :  F_E diag(sigma) u = F w,   t_E^T u = t^T |w|,   [a_E^T u = kappa when the bound is active] }

and its vertices have at most r + 2 nonzeros. From the current point ``u0 = |w_E|`` a column-pivoted QR of the
constraint matrix with columns scaled by u0 picks r + 2 independent columns, largest entries first; the
solution on them is a vertex when it is >= 0. The candidate is then scored by the solver's certificate and
kept only where it still certifies (and is sparser), so the step never costs optimality.

Cost per row: one pivoted QR of an (r + 2) x |E| matrix (LAPACK geqp3 via SciPy, on the CPU).
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
    from scipy.linalg import qr
    from threadpoolctl import threadpool_limits

    F_np = F.detach().to("cpu", torch.float64).numpy()
    W_cpu = W.detach().to("cpu", torch.float64)
    candidates = W_cpu.clone()
    found = torch.zeros(W.shape[0], dtype=torch.bool)
    nc = n_constrained if kappa is not None else 0
    with threadpool_limits(limits=torch.get_num_threads(), user_api="blas"):
        for i in range(W_cpu.shape[0]):
            w = W_cpu[i]
            support = torch.nonzero(w).flatten()
            if support.numel() <= _WORTH * F_np.shape[0]:  # a vertex has <= rank + 2: little to remove
                continue
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
            M = np.vstack(rows)
            target = M @ u0
            _, R_, pivots = qr(M * u0, mode="economic", pivoting=True)
            diagonal = np.abs(np.diag(R_))
            rank = int((diagonal > _RANK_TOL * diagonal[0]).sum()) if diagonal.size and diagonal[0] > 0 else 0
            if rank == 0 or rank >= len(u0):
                continue
            chosen = pivots[:rank]
            u, *_ = np.linalg.lstsq(M[:, chosen], target, rcond=None)
            if u.min() < -1e-12 * max(u.max(), 1e-300):
                continue  # not a vertex of the face (a negative entry): keep W's row
            row = torch.zeros_like(w)
            row[support[chosen]] = torch.from_numpy(signs[chosen] * np.clip(u, 0.0, None))
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
