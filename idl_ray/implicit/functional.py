r"""Differentiable fixed point by implicit differentiation.

:func:`implicit_fixed_point` returns ``X`` with ``X = phi(X A^T + BU)`` (batch-first rows) and
back-propagates through it without storing the iterations: with ``Z = X A^T + BU``, ``J = phi'(Z)`` and
upstream gradient ``G = dL/dX``, the adjoint ``V = dL/dZ`` solves ``V = J * (V A + G)`` (the same kind of
fixed point, solved by the same kernels with its own tolerance and cap), and

    dL/dA = V^T X,        dL/d(BU) = V.

Gradients for ``B``, ``U``, low-rank factors of ``A``, ... follow by ordinary autograd around this call.
The starting point ``x0`` does not change the fixed point, so it gets no gradient.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.autograd.function import once_differentiable

from idl_ray._validation import check_choice
from idl_ray.implicit.activations import Activation, resolve_activation
from idl_ray.implicit.fixed_point import FixedPointOptions, FixedPointStats, solve_adjoint, solve_fixed_point
from idl_ray.implicit.mu_fixed_point import solve_adjoint_mu, solve_fixed_point_mu

__all__ = ["ImplicitFixedPointFunction", "implicit_fixed_point"]

StatsCallback = Callable[[str, FixedPointStats], None]


class ImplicitFixedPointFunction(torch.autograd.Function):
    """``X = phi(X A^T + BU)``: forward by a fixed-point solve, backward by the adjoint fixed point."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        A: torch.Tensor,
        BU: torch.Tensor,
        x0: torch.Tensor | None,
        activation: Activation,
        forward_options: FixedPointOptions,
        backward_options: FixedPointOptions,
        callback: StatsCallback | None,
        well_posedness: str = "inf_norm",
    ) -> torch.Tensor:
        solve = solve_fixed_point_mu if well_posedness == "mu_inf" else solve_fixed_point
        X, stats = solve(A, BU, activation, forward_options, x0=x0)
        if callback is not None:
            callback("forward", stats)
        ctx.save_for_backward(A, BU, X)
        ctx.activation = activation
        ctx.backward_options = backward_options
        ctx.callback = callback
        ctx.well_posedness = well_posedness
        return X

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, G: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        A, BU, X = ctx.saved_tensors
        J = _activation_derivative(ctx.activation, A, BU, X)
        adjoint = solve_adjoint_mu if ctx.well_posedness == "mu_inf" else solve_adjoint
        V, stats = adjoint(A, J, G.contiguous(), ctx.backward_options)
        if ctx.callback is not None:
            ctx.callback("backward", stats)
        grad_A = V.t() @ X if ctx.needs_input_grad[0] else None
        grad_BU = V if ctx.needs_input_grad[1] else None
        return grad_A, grad_BU, None, None, None, None, None, None


def _activation_derivative(
    activation: Activation, A: torch.Tensor, BU: torch.Tensor, X: torch.Tensor
) -> torch.Tensor:
    """``J = phi'(Z)`` for the returned state ``X``. Built-in activations read it off ``X = phi(Z)``
    itself (``Z`` is the pre-activation of the last iteration, within the tolerance of the fixed point);
    for a user pair, ``Z = X A^T + BU`` costs one matmul."""
    if activation.derivative_from_output is not None:
        return activation.derivative_from_output(X)
    return activation.derivative(torch.addmm(BU, X, A.t()))


def implicit_fixed_point(
    A: torch.Tensor,
    BU: torch.Tensor,
    activation: Any = "relu",
    *,
    x0: torch.Tensor | None = None,
    forward_options: FixedPointOptions | dict[str, Any] | None = None,
    backward_options: FixedPointOptions | dict[str, Any] | None = None,
    callback: StatsCallback | None = None,
    well_posedness: str = "inf_norm",
) -> torch.Tensor:
    r"""Differentiable solution of ``X = phi(X A^T + BU)``.

    Parameters
    ----------
    A : Tensor (n, n)
        Should satisfy ``||A||_inf <= kappa < 1`` (or ``mu_inf(A) <= kappa < 1`` with
        ``well_posedness="mu_inf"``).
    BU : Tensor (batch, n)
    activation : str, Activation or (phi, dphi)
    x0 : Tensor (batch, n), optional
        Warm start of the forward solve (no gradient flows to it).
    forward_options, backward_options : FixedPointOptions or dict, optional
    callback : callable(kind, stats), optional
        Called with ``("forward", stats)`` after the solve and ``("backward", stats)`` after the adjoint.
    well_posedness : {"inf_norm", "mu_inf"}, default "inf_norm"
        ``"inf_norm"``: Picard/Anderson on ``X = phi(X A^T + BU)`` and on the adjoint. ``"mu_inf"``: the
        diagonal-implicit iteration of :mod:`~idl_ray.implicit.mu_fixed_point` for both, which converges
        under the wider condition ``mu_inf(A) < 1`` (even where ``||A||_inf > 1``).

    Returns
    -------
    X : Tensor (batch, n)

    Examples
    --------
    >>> import torch
    >>> A = (0.1 * torch.randn(5, 5, dtype=torch.float64)).requires_grad_()
    >>> BU = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    >>> opts = {"tol": 1e-12}
    >>> torch.autograd.gradcheck(
    ...     lambda a, b: implicit_fixed_point(a, b, "tanh", forward_options=opts, backward_options=opts), (A, BU)
    ... )
    True
    """
    act = activation if isinstance(activation, Activation) else resolve_activation(activation)
    fwd = FixedPointOptions.coerce(forward_options)
    bwd = FixedPointOptions.coerce(backward_options)
    condition = check_choice(well_posedness, "well_posedness", "implicit_fixed_point", ("inf_norm", "mu_inf"))
    return ImplicitFixedPointFunction.apply(A, BU, x0, act, fwd, bwd, callback, condition)
