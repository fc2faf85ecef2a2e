r"""Fixed points under the wider condition ``mu_inf(A) <= kappa < 1``: the diagonal-implicit iteration.

Plain Picard ``x <- phi(A x + b)`` contracts in the infinity norm with factor ``||A||_inf``; under
``mu_inf(A) = max_i (a_ii + r_i) <= kappa < 1`` (``r_i = sum_{j != i} |a_ij|``) alone it may diverge
(``A = [[-3]]``, ``phi`` the identity: ``x <- -3x + b``). We split off the diagonal and solve it exactly
at every step (a nonlinear Jacobi iteration), batch-first::

    x_i <- psi_i(c_i),   c_i = sum_{j != i} a_ij x_j + b_i,   psi_i(c) = the x with x = phi(a_ii x + c).

**psi is well defined and Lipschitz.** ``a_ii <= kappa - r_i < 1``. For a monotone 1-Lipschitz ``phi``
(``0 <= phi' <= 1``), ``h(x) = x - phi(a_ii x + c)`` has slope ``1 - a_ii phi' >= min(1, 1 - a_ii) > 0``,
so it has exactly one root, and by the implicit function theorem
``psi_i'(c) = phi' / (1 - a_ii phi')``, which is increasing in ``phi' in [0, 1]``, hence
``0 <= psi_i' <= 1 / (1 - a_ii)``.

**The map contracts.** For two states ``x, y``,
``|psi_i(c_i(x)) - psi_i(c_i(y))| <= r_i ||x - y||_inf / (1 - a_ii)``, so the map is a contraction in
the infinity norm with factor

    rho = max_i r_i / (1 - a_ii) <= max_i (kappa - a_ii) / (1 - a_ii) < 1

(``(kappa - a) / (1 - a)`` decreases in ``a``: ``rho <= kappa`` when the diagonal is ``>= 0``, and
``rho`` approaches 1 only as a diagonal goes to -infinity). Banach's theorem gives a unique fixed point,
which also solves ``x = phi(A x + b)``, and linear convergence at rate ``rho`` from any start. The same
argument proves uniqueness for the original equation. :func:`jacobi_rate` computes ``rho``.

Closed forms of ``psi``: ReLU ``relu(c) / (1 - a)``; leaky ReLU with slope ``s``: ``c / (1 - a)`` for
``c > 0`` and ``s c / (1 - s a)`` otherwise; identity ``c / (1 - a)``. Other activations: a safeguarded
Newton solve (bracketed, to machine precision) per entry.

**Adjoint.** The backward pass solves ``V = J * (V A + G)`` (:func:`~idl_ray.implicit.fixed_point.solve_adjoint`),
whose transpose is not row-dominant, so Picard may diverge there too. The same splitting,

    v_i <- S_i (sum_{j != i} v_j a_ji + g_i),     S_i = J_i / (1 - J_i a_ii),

contracts in the weighted 1-norm ``||w||_1`` with ``w_i = v_i / S_i`` (entries with ``S_i = 0`` are 0
after one step): ``w <- A_off^T S w + g`` and ``||A_off^T S||_1 = max_j S_j r_j <= rho`` (``S_j`` is
``psi_j'``). Both iterations run on the existing kernels (Picard, Anderson) as a
:class:`~idl_ray.implicit.fixed_point.RowMap`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from idl_ray.errors import WellPosednessError
from idl_ray.implicit.activations import Activation, resolve_activation
from idl_ray.implicit.fixed_point import (
    FixedPointOptions,
    FixedPointStats,
    RowMap,
    _check_square,
    run_adjoint,
    run_forward,
)

__all__ = ["diagonal_solver", "jacobi_rate", "solve_adjoint_mu", "solve_fixed_point_mu"]

_NEWTON_STEPS = 200


def jacobi_rate(A: torch.Tensor) -> float:
    """``rho = max_i r_i / (1 - a_ii)``, the contraction factor of the diagonal-implicit iteration
    (``inf`` if some ``a_ii >= 1``). ``rho < 1`` whenever ``mu_inf(A) < 1``."""
    n = _check_square(A, "jacobi_rate")
    if n == 0:
        return 0.0
    diag = torch.diagonal(A)
    if bool((diag >= 1).any()):
        return float("inf")
    off = A.abs().sum(dim=1) - diag.abs()
    return float((off / (1 - diag)).max())


def _split(A: torch.Tensor, owner: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(diagonal, A with a zero diagonal); refuses a diagonal entry >= 1 (no unique psi)."""
    diag = torch.diagonal(A).clone()
    if diag.numel() and bool((diag >= 1).any()):
        worst = float(diag.max())
        raise WellPosednessError(
            f"{owner}: A has a diagonal entry {worst:.6g} >= 1, so mu_inf(A) >= 1 and x = phi(a x + c) has no "
            "unique solution. Project A with idl_ray.implicit.mu_projection.project_onto_mu_ball(A, kappa)."
        )
    off = A - torch.diag_embed(diag)
    return diag, off


def diagonal_solver(activation: Activation, diag: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """``psi``: ``c -> x`` with ``x = phi(diag * x + c)`` element-wise (``diag`` broadcast over rows).

    Parameters
    ----------
    activation : Activation, monotone and 1-Lipschitz
    diag : Tensor, shape (n,), entries < 1

    Returns
    -------
    callable mapping a (batch, n) tensor to a new (batch, n) tensor.
    """
    inv = 1.0 / (1.0 - diag)
    if activation.name == "relu":
        return lambda c: torch.relu(c).mul_(inv)
    if activation.name == "identity":
        return lambda c: c * inv
    if activation.name == "leaky_relu":
        s = float(activation.negative_slope)
        neg = s / (1.0 - s * diag)
        return lambda c: c * torch.where(c > 0, inv, neg)
    return lambda c: _newton(activation, diag, c)


def _newton(activation: Activation, a: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Root of ``h(x) = x - phi(a x + c)`` per entry by Newton's method kept inside a bracket.

    ``h`` increases with slope in ``[m, M]``, ``m = min(1, 1 - a)``, ``M = max(1, 1 - a)``; from
    ``x0 = phi(c)``, ``|h(x0)| = |phi(c) - phi(a x0 + c)| <= |a x0|``, so the root lies within
    ``|h(x0)| / m`` of ``x0`` and that interval is the starting bracket.
    """
    phi, dphi = activation.fn, activation.derivative
    m = torch.clamp(1.0 - a, max=1.0).expand_as(c)
    x = phi(c)
    h = x - phi(a * x + c)
    width = h.abs() / m
    lo, hi = x - width, x + width
    eps = torch.finfo(c.dtype).eps
    for _ in range(_NEWTON_STEPS):
        z = a * x + c
        h = x - phi(z)
        lo = torch.where(h < 0, x, lo)
        hi = torch.where(h > 0, x, hi)
        done = (h.abs() <= 4 * eps * (x.abs() + 1)) | (hi - lo <= 4 * eps * (x.abs() + 1))
        if bool(done.all()):
            break
        step = x - h / (1.0 - a * dphi(z))
        bad = (step <= lo) | (step >= hi) | ~torch.isfinite(step)
        x = torch.where(done, x, torch.where(bad, 0.5 * (lo + hi), step))
    return x


def solve_fixed_point_mu(
    A: torch.Tensor,
    BU: torch.Tensor,
    activation: Any = "relu",
    options: FixedPointOptions | dict[str, Any] | None = None,
    *,
    x0: torch.Tensor | None = None,
) -> tuple[torch.Tensor, FixedPointStats]:
    r"""Solve ``X = phi(X A^T + BU)`` by the diagonal-implicit iteration (converges under mu_inf(A) < 1).

    Same arguments, defaults and stopping test as
    :func:`~idl_ray.implicit.fixed_point.solve_fixed_point` (the residual is that of the split map,
    whose fixed points are those of the original one); ``options.method`` picks Picard or Anderson.

    Returns
    -------
    X : Tensor, shape (batch, n)
    stats : FixedPointStats

    Examples
    --------
    >>> import torch
    >>> A = torch.tensor([[-3.0, 1.0], [0.5, 0.2]], dtype=torch.float64)  # ||A||_inf = 4, mu_inf = 0.7
    >>> BU = torch.tensor([[1.0, -2.0]], dtype=torch.float64)
    >>> X, stats = solve_fixed_point_mu(A, BU, "relu", {"tol": 1e-12})
    >>> bool(torch.allclose(X, torch.relu(X @ A.T + BU), atol=1e-10)), stats.all_converged
    (True, True)
    """
    owner = "solve_fixed_point_mu"
    act = activation if isinstance(activation, Activation) else resolve_activation(activation, owner=owner)

    def build(A_: torch.Tensor):
        diag, off = _split(A_, owner)
        psi = diagonal_solver(act, diag)
        return RowMap(off.t(), BU.detach(), psi), psi

    return run_forward(owner, A, BU, options, x0, build, label=" (diagonal-implicit, mu_inf)")


def solve_adjoint_mu(
    A: torch.Tensor,
    J: torch.Tensor,
    G: torch.Tensor,
    options: FixedPointOptions | dict[str, Any] | None = None,
    *,
    v0: torch.Tensor | None = None,
) -> tuple[torch.Tensor, FixedPointStats]:
    r"""Solve the adjoint ``V = J * (V A + G)`` by the diagonal splitting (converges under mu_inf(A) < 1).

    Iterates ``V <- S * (V A_off + G)`` with ``S = J / (1 - J diag(A))`` (see the module docstring).

    Parameters
    ----------
    A : Tensor (n, n); J, G : Tensors (batch, n), ``0 <= J <= 1``; options : FixedPointOptions or dict
    v0 : Tensor (batch, n), optional (default ``S * G``)

    Returns
    -------
    V : Tensor (batch, n)
    stats : FixedPointStats
    """
    owner = "solve_adjoint_mu"

    def build(A_: torch.Tensor, J_: torch.Tensor):
        diag, off = _split(A_, owner)
        S = J_ / (1.0 - J_ * diag)
        return RowMap(off, G.detach(), None, S), S

    return run_adjoint(owner, A, J, G, options, v0, build, label=" (diagonal-implicit, mu_inf)")
