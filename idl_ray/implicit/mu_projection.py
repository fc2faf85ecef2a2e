r"""The wider well-posedness condition ``mu_inf(A) <= kappa < 1`` and its exact row projection.

The l-infinity logarithmic norm ("matrix measure") of a square ``A`` is

    mu_inf(A) = max_i ( a_ii + sum_{j != i} |a_ij| ),

so ``mu_inf(A) <= ||A||_inf`` and a large *negative* diagonal is allowed: ``A = [[-5, 3], [0, 0.5]]`` has
``||A||_inf = 8`` but ``mu_inf(A) = 0.5``. Under ``mu_inf(A) <= kappa < 1`` and a monotone 1-Lipschitz
``phi``, ``x = phi(A x + b)`` has a unique solution (El Ghaoui et al. 2021, "Implicit deep learning",
s3; Tsai et al. 2022, SIM) and the diagonal-implicit iteration of
:mod:`~idl_ray.implicit.mu_fixed_point` converges to it.

The set ``{A : mu_inf(A) <= kappa}`` is, like the l1-ball product of ``||A||_inf <= kappa``, a product of
one convex set per row. This module computes, for every row ``v`` (batched), the prox

    z = argmin_z  1/2 ||z - v||^2 + sum_j t_j |z_j|
        subject to  z_d + sum_{j in O} |z_j| <= kappa,

where ``d`` is the row's "diagonal" column and ``O`` the other constrained columns (``j < n``,
``j != d``); columns ``j >= n`` are unconstrained. ``t = 0`` gives the Euclidean projection.

**Solution.** With a multiplier ``mu >= 0`` for the constraint, the Lagrangian separates by entry:

    z_j = soft(v_j, t_j + mu)      (j in O),
    z_d = soft(v_d - mu, t_d)      (the diagonal is shifted, then soft-thresholded),
    z_j = soft(v_j, t_j)           (j >= n),

and ``mu`` is 0 when that point is feasible, else the root of the constraint function

    g(mu) = soft(v_d - mu, t_d) + sum_{j in O} max(|v_j| - t_j - mu, 0) - kappa,

which is continuous, piecewise linear and non-increasing, with slope -1 beyond its last breakpoint
(the set is unbounded in the ``-z_d`` direction, so a root always exists). The root is found exactly:
``g`` is evaluated at every breakpoint (``max(|v_j| - t_j, 0)`` for ``j`` in ``O``,
``v_d - t_d``, ``v_d + t_d``, and 0), batched over rows with a sort and a searchsorted, the bracketing
pair of consecutive breakpoints is picked and ``g`` is interpolated linearly between them (or
extrapolated with slope -1 past the largest). Cost O(rows * n log n), no Python loop over rows.
A final step lowers ``z_d`` of rows within rounding of the bound by a few ulps of the row's absolute
sum, so that ``mu_inf`` computed on the result, in any summation order, is ``<= kappa``.
"""

from __future__ import annotations

import torch

from idl_ray._validation import bad_parameter, check_kappa
from idl_ray.implicit.projection import _rounded_radius

__all__ = ["mu_inf", "mu_inf_rows", "project_onto_mu_ball", "prox_mu_rows"]


def mu_inf_rows(
    W: torch.Tensor,
    n_constrained: int | None = None,
    row_offset: int = 0,
    *,
    diagonal: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-row ``w_d + sum_{j < n, j != d} |w_j|`` with ``d = row_offset + r`` for row ``r``.

    Parameters
    ----------
    W : Tensor, shape (rows, d_total)
    n_constrained : int, optional
        ``n``, the constrained leading columns (default: all of ``W``'s columns).
    row_offset : int
        Column of row 0's diagonal (row blocks of a larger matrix pass their first row's index).
    diagonal : Tensor of int64, shape (rows,), optional
        The diagonal column of each row (overrides ``row_offset``; for arbitrary subsets of rows).

    Returns
    -------
    Tensor, shape (rows,)
    """
    n = W.shape[1] if n_constrained is None else n_constrained
    block = W[:, :n]
    rows = block.shape[0]
    if rows == 0 or n == 0:
        return block.new_zeros(rows)
    cols = _diagonal_columns(rows, row_offset, diagonal, W.device)
    diag = block.gather(1, cols.unsqueeze(1)).squeeze(1)
    return block.abs().sum(dim=1) - diag.abs() + diag


def _diagonal_columns(
    rows: int, row_offset: int, diagonal: torch.Tensor | None, device: torch.device
) -> torch.Tensor:
    if diagonal is not None:
        return diagonal.to(device=device, dtype=torch.int64).reshape(rows)
    return torch.arange(rows, device=device) + row_offset


def mu_inf(A: torch.Tensor) -> float:
    """``mu_inf(A) = max_i (a_ii + sum_{j != i} |a_ij|)`` of a square matrix (-inf for an empty one).

    Examples
    --------
    >>> import torch
    >>> mu_inf(torch.tensor([[-5.0, 3.0], [0.0, 0.5]]))
    0.5
    """
    if A.dim() != 2 or A.shape[0] != A.shape[1]:
        raise bad_parameter("A", "mu_inf", "a square 2-D tensor (n, n)", tuple(A.shape))
    if A.numel() == 0:
        return float("-inf")
    return float(mu_inf_rows(A.detach()).max())


def _soft(v: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    return torch.sign(v) * (v.abs() - t).clamp_min(0)


def prox_mu_rows(
    V: torch.Tensor,
    kappa: float,
    n_constrained: int,
    *,
    threshold: float | torch.Tensor = 0.0,
    row_offset: int = 0,
    diagonal: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""Row-wise prox of ``sum_j t_j |z_j| + indicator(z_d + sum_{j<n, j != d} |z_j| <= kappa)``.

    Row ``r`` of ``V`` has its diagonal at column ``row_offset + r`` (which must be ``< n_constrained``);
    see the module docstring for the maths.

    Parameters
    ----------
    V : Tensor, shape (rows, d_total)
    kappa : float
        The bound (any real; ``check_kappa`` is the caller's business).
    n_constrained : int
        ``n``: columns ``0..n-1`` are constrained (the A-part of ``[A B]``).
    threshold : float or Tensor broadcastable to ``V``, >= 0
        Per-entry l1 weights ``t`` (0: the Euclidean projection).
    row_offset : int
        Diagonal column of row 0.
    diagonal : Tensor of int64, shape (rows,), optional
        The diagonal column of each row (overrides ``row_offset``; for arbitrary subsets of rows).

    Returns
    -------
    Tensor of ``V``'s shape; ``mu_inf_rows(Z, n, row_offset) <= kappa`` up to a few ulps of each row's
    absolute sum.
    """
    rows, width = V.shape
    n = n_constrained
    if rows == 0:
        return V.clone()
    if not 0 < n <= width:
        raise bad_parameter("n_constrained", "prox_mu_rows", f"an int in [1, {width}]", n)
    if diagonal is None and (row_offset < 0 or row_offset + rows > n):
        raise bad_parameter(
            "row_offset", "prox_mu_rows", f"an int with row_offset + rows <= n_constrained = {n}", row_offset
        )
    t = torch.as_tensor(threshold, dtype=V.dtype, device=V.device).expand(rows, width)
    cols = _diagonal_columns(rows, row_offset, diagonal, V.device).unsqueeze(1)
    v_d = V.gather(1, cols)  # (rows, 1)
    t_d = t.gather(1, cols)
    # u_j = max(|v_j| - t_j, 0) for the off-diagonal constrained entries, 0 at the diagonal
    u = (V[:, :n].abs() - t[:, :n]).clamp_min(0).scatter(1, cols, 0.0)
    u_sorted, _ = torch.sort(u, dim=1)  # ascending
    u_cum = torch.cat([u.new_zeros(rows, 1), u_sorted.cumsum(dim=1)], dim=1)  # (rows, n + 1)
    total = u_cum[:, -1:]

    def g(mu: torch.Tensor) -> torch.Tensor:
        # sum_j max(u_j - mu, 0) = (sum of u_j > mu) - mu * #{u_j > mu}
        below = torch.searchsorted(u_sorted, mu.contiguous(), right=True)  # #{u_j <= mu}
        count = (n - below).to(V.dtype)
        tail = total - u_cum.gather(1, below)
        return _soft(v_d - mu, t_d) + (tail - mu * count) - kappa

    g0 = g(V.new_zeros(rows, 1))
    active = g0 > 0
    if bool(active.any()):
        points = torch.cat([u, (v_d - t_d).clamp_min(0), (v_d + t_d).clamp_min(0)], dim=1)
        points, _ = torch.sort(torch.cat([V.new_zeros(rows, 1), points], dim=1), dim=1)  # ascending, >= 0
        values = g(points)  # non-increasing along each row; values[:, 0] = g(0)
        # last breakpoint with g >= 0 (index 0 qualifies for active rows)
        k = ((values >= 0).to(torch.int64).cumprod(dim=1)).sum(dim=1, keepdim=True) - 1
        k = k.clamp_min(0)
        last = points.shape[1] - 1
        b_lo = points.gather(1, k)
        g_lo = values.gather(1, k)
        k_hi = (k + 1).clamp_max(last)
        b_hi = points.gather(1, k_hi)
        g_hi = values.gather(1, k_hi)
        inside = (k < last) & (g_lo > g_hi)
        step = torch.where(inside, g_lo * (b_hi - b_lo) / torch.where(inside, g_lo - g_hi, 1.0), g_lo)
        # past the largest breakpoint only z_d moves: slope -1, so mu = b + g(b)
        mu = torch.where(active, b_lo + step, torch.zeros_like(b_lo))
    else:
        mu = V.new_zeros(rows, 1)
    Z = _soft(V, t)
    Z[:, :n] = _soft(V[:, :n], t[:, :n] + mu)
    z_d = _soft(v_d - mu, t_d)
    Z.scatter_(1, cols, z_d)
    return _lower_diagonal(Z, kappa, n, cols)


def _lower_diagonal(Z: torch.Tensor, kappa: float, n: int, cols: torch.Tensor) -> torch.Tensor:
    """Lower the diagonal of rows whose computed ``mu_inf`` is within rounding of ``kappa`` or above it
    (the diagonal is the one entry the set lets go to -infinity). The target is ``kappa`` less
    ``(n + 2) eps`` times the row's absolute sum, the rounding of any summation order, so the bound also
    holds when the row value is recomputed elsewhere (another order, a slice of a larger matrix)."""
    eps = torch.finfo(Z.dtype).eps
    kappa = _rounded_radius(kappa, Z.dtype) if kappa >= 0 else kappa  # 0.99 in float32 is above 0.99
    for _ in range(4):
        rows_mu = mu_inf_rows(Z, n, diagonal=cols.squeeze(1)).unsqueeze(1)
        margin = (n + 2) * eps * Z[:, :n].abs().sum(dim=1, keepdim=True)
        excess = rows_mu - (kappa - margin)
        over = excess > 0
        if not bool(over.any()):
            break
        z_d = Z.gather(1, cols)
        Z.scatter_(1, cols, torch.where(over, z_d - excess, z_d))
    return Z


def project_onto_mu_ball(A: torch.Tensor, kappa: float) -> torch.Tensor:
    """Euclidean projection of a square ``A`` onto ``{A : mu_inf(A) <= kappa}`` (exact, row-wise).

    Parameters
    ----------
    A : Tensor, shape (n, n)
    kappa : float in [0, 1)

    Returns
    -------
    Tensor of A's shape, ``mu_inf(result) <= kappa`` (up to a few ulps); rows already inside unchanged.

    Examples
    --------
    >>> import torch
    >>> P = project_onto_mu_ball(torch.tensor([[-5.0, 3.0], [1.0, 2.0]], dtype=torch.float64), 0.5)
    >>> round(mu_inf(P), 12), P[0].tolist()
    (0.5, [-5.0, 3.0])
    """
    if A.dim() != 2 or A.shape[0] != A.shape[1]:
        raise bad_parameter("A", "project_onto_mu_ball", "a square 2-D tensor (n, n)", tuple(A.shape))
    kappa = check_kappa(kappa, "project_onto_mu_ball")
    if A.shape[0] == 0:
        return A.clone()
    return prox_mu_rows(A, kappa, A.shape[0])
