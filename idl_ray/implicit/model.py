r"""``ImplicitModel``: an implicit layer trained by gradient descent, well-posed at every forward."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from idl_ray._validation import (
    bad_parameter,
    check_choice,
    check_finite,
    check_kappa,
    check_positive_int,
    check_width,
    reject_unknown_kwargs,
)
from idl_ray.errors import ConfigError, ConfigTypeError, ShapeError, WellPosednessError
from idl_ray.implicit.activations import Activation, resolve_activation
from idl_ray.implicit.fixed_point import FIXED_POINT_METHODS, FixedPointOptions, FixedPointStats
from idl_ray.implicit.functional import implicit_fixed_point
from idl_ray.implicit.mu_projection import mu_inf, project_onto_mu_ball
from idl_ray.implicit.projection import inf_norm, project_onto_kappa_ball

__all__ = ["CONSTRAINTS", "WELL_POSEDNESS", "ImplicitModel", "ImplicitTelemetry"]

_OWNER = "ImplicitModel"


@dataclasses.dataclass
class ImplicitTelemetry:
    """Cumulative counters of a model's solves (reset with :meth:`ImplicitModel.reset_telemetry`).

    Attributes
    ----------
    forward_calls, backward_calls : int
    forward_iterations, backward_iterations : int
        Sum over calls of the iterations each solve ran.
    forward_work, backward_work : int
        Sum over calls of sample-iterations computed.
    forward_unconverged, backward_unconverged : int
        Samples that stopped at the cap above tolerance.
    projections : int
        Forwards at which the stored A violated the bound and was projected.
    """

    forward_calls: int = 0
    forward_iterations: int = 0
    forward_work: int = 0
    forward_unconverged: int = 0
    backward_calls: int = 0
    backward_iterations: int = 0
    backward_work: int = 0
    backward_unconverged: int = 0
    projections: int = 0


def _low_rank_margin(n: int, rank: int, dtype: torch.dtype) -> float:
    # rounding of a length-`rank` dot product plus a length-`n` absolute sum, with room to spare
    return 1.0 - 4.0 * (n + rank + 2) * torch.finfo(dtype).eps


class ImplicitModel(nn.Module):
    r"""Implicit layer: ``X = phi(A X + B U)``, ``Y = C X + D U``, solved as a fixed point.

    Batch-first, one row per sample: with input ``U`` of shape (batch, p) the state solves
    ``X = phi(X A^T + U B^T)`` and the output is ``Y = X C^T + U D^T``. The model is well-posed (unique
    state, convergent iteration) because ``||A||_inf <= kappa < 1`` holds for the ``A`` it uses at every
    forward.

    **Well-posedness on the stored parameter.** ``A`` (or ``L`` for ``rank=r``) is an ordinary
    parameter that receives the exact gradient of the loss. Before each forward, if the stored ``A``
    violates the bound, it is brought back in place (under ``no_grad``): by default
    (``constraint="shrink"``) multiplied by ``kappa / ||A||_inf`` (less a few ulps), or with
    ``constraint="project"`` replaced by its exact Euclidean projection onto ``{A : ||A||_inf <= kappa}``
    (row-wise l1-ball projection, projected gradient). Call :meth:`project_` after ``optimizer.step()``
    to do it eagerly. So ``model.A`` is always the matrix the forward used, and no rescaled hidden copy
    or straight-through gradient exists. For ``rank=r``, ``A = L R^T`` and ``L`` is scaled (all of it
    with ``"shrink"``; with ``"project"`` the rows of ``L`` whose row of ``A`` exceeds ``kappa`` in l1
    norm, not a Euclidean projection of ``A`` but low rank and exact, with a rounding margin of a few
    ulps).

    Forward: fixed point without autograd (``fixed_point="picard"`` or ``"anderson"``), per-sample
    relative-residual stopping ``||f(x) - x|| <= tol ||f(x)||``. Backward: implicit differentiation
    (adjoint fixed point, ``backward_tol``, ``backward_max_iter``); see
    :func:`~idl_ray.implicit.functional.implicit_fixed_point`.

    Args:
        input_dim: number of input features ``p`` (without the bias column).
        output_dim: number of outputs ``q``.
        hidden_dim: state size ``n``.
        activation: ``"relu"`` (default), ``"leaky_relu"``, ``"tanh"``, ``"sigmoid"``, ``"softplus"``,
            ``"identity"``, an :class:`~idl_ray.implicit.activations.Activation`, a ``(phi, dphi)`` pair or a
            torch activation module.
        kappa: well-posedness bound in [0, 1). Default 0.99.
        bias: append a constant 1 as the **last** input feature, so ``B`` is (n, p+1) and ``D`` is
            (q, p+1). Default False.
        no_D: drop the direct term ``D U``. ``D`` is then a zero buffer of shape (q, p[+1]): not trained, not
            used by the forward, but kept in the ``state_dict`` and moved by ``.to()``. Default False.
        rank: if given, ``A = L R^T`` with ``L, R`` of shape (n, rank), ``1 <= rank <= n``.
        constraint: how ``||A||_inf <= kappa`` is kept. ``"shrink"`` (default): ``A`` (or ``L``) is the
            parameter, and a stored ``A`` outside the bound is multiplied in place by
            ``kappa / ||A||_inf`` (less a few ulps): torchidl's scaling, applied to the parameter, so the
            ``A`` stored is the ``A`` used and its gradient is exact. Only the largest row sits at the
            bound, which makes the fixed points faster to reach; the step is a scaling, not the
            Euclidean projection. ``"project"``: projected gradient, see above. ``"rescale"``: the
            trained parameter is ``W`` (or ``L, R``) and
            ``A = W * min(1, kappa / ||W||_inf)``, differentiated exactly through the scaling; ``model.A``
            returns that product. Only the largest row sits at the bound, which often makes the fixed
            points faster to reach, but the scale of ``W`` is free (its gradient shrinks as it grows).
        fixed_point: ``"picard"`` (default), ``"anderson"`` or ``"anderson_batch"``, for forward and
            backward solves (see :mod:`idl_ray.implicit.fixed_point`).
        tol, max_iter: forward stopping tolerance (relative, per sample) and cap. Defaults 1e-5, 300.
            Sample ``i`` stops once ``||f(x_i) - x_i||_2 <= atol + tol * ||f(x_i)||_2``.
        atol: absolute part of that test. Default 0.
        residual_norm: ``"l2"`` (default) or ``"inf"``, the per-sample norm of that test.
        backward_tol, backward_max_iter, backward_atol: the same for the adjoint solve; default to the
            forward values.
        anderson_memory: Anderson history size. Default 5.
        negative_slope: slope of ``"leaky_relu"`` (default 0.01).
        well_posedness: the bound kept on ``A``. ``"inf_norm"`` (default): ``||A||_inf <= kappa``, solved by
            Picard/Anderson on ``X = phi(X A^T + BU)``. ``"mu_inf"``: the wider
            ``mu_inf(A) = max_i (a_ii + sum_{j != i} |a_ij|) <= kappa``, which allows a large negative
            diagonal (``||A||_inf`` may exceed 1); forward and adjoint then use the diagonal-implicit
            iteration of :mod:`~idl_ray.implicit.mu_fixed_point`, which contracts with factor
            ``max_i r_i / (1 - a_ii) < 1``. With ``"mu_inf"``, ``constraint="project"`` is the exact
            Euclidean projection onto ``{A : mu_inf(A) <= kappa}``
            (:func:`~idl_ray.implicit.mu_projection.project_onto_mu_ball`) and ``"shrink"`` multiplies
            ``A`` by ``kappa / mu_inf(A)`` (``mu_inf`` is positively homogeneous); ``"rescale"`` and
            ``rank`` are not available (:class:`ConfigError`).
        device, dtype: where and how parameters are allocated.

    Shape:
        - Input: ``(batch, p)``, or ``(batch, *)`` whose trailing dims flatten to ``p`` features.
        - ``x0`` (optional warm start): ``(batch, n)``.
        - Output: ``(batch, q)``; with ``return_state=True`` also the state ``(batch, n)``.

    Attributes:
        A: (n, n), ``||A||_inf <= kappa`` at every forward: the parameter itself (dense, ``"shrink"`` or ``"project"``),
            else a property computed from ``W`` or ``L, R`` with autograd. Dense A and W are initialised
            uniform in (-1/n, 1/n) (row sums about 0.5), then projected if needed.
        W: (n, n) parameter for ``constraint="rescale"`` (dense).
        L, R: (n, rank) parameters when ``rank`` is set (else None).
        B: (n, p[+1]) parameter, ``C``: (q, n), ``D``: (q, p[+1]) (a zero buffer with ``no_D=True``);
            initialised like ``nn.Linear`` (uniform with bound ``1/sqrt(fan_in)``).
        forward_options, backward_options: :class:`FixedPointOptions` (frozen; replace to change).
        last_forward_stats, last_backward_stats: :class:`FixedPointStats` of the latest solves or None.
        telemetry: :class:`ImplicitTelemetry`, cumulative counters.

    Examples::

        >>> model = ImplicitModel(64, 10, 100, kappa=0.95)
        >>> y = model(torch.randn(32, 64))
        >>> y.shape, model.last_forward_stats.num_converged
        (torch.Size([32, 10]), 32)
        >>> y.sum().backward()
        >>> bool(model.A.abs().sum(1).max() <= 0.95)
        True
    """

    def __init__(
        self,
        input_dim: int,
        output_dim: int,
        hidden_dim: int,
        *,
        activation: Any = "relu",
        kappa: float = 0.99,
        bias: bool = False,
        no_D: bool = False,
        rank: int | None = None,
        constraint: str = "shrink",
        fixed_point: str = "picard",
        tol: float = 1e-5,
        max_iter: int = 300,
        backward_tol: float | None = None,
        backward_max_iter: int | None = None,
        atol: float = 0.0,
        backward_atol: float | None = None,
        residual_norm: str = "l2",
        anderson_memory: int = 5,
        negative_slope: float | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        well_posedness: str = "inf_norm",
        **kwargs: Any,
    ) -> None:
        reject_unknown_kwargs(kwargs, _OWNER, _VALID_KWARGS)
        super().__init__()
        self.input_dim = check_positive_int(input_dim, "input_dim", _OWNER)
        self.output_dim = check_positive_int(output_dim, "output_dim", _OWNER)
        self.hidden_dim = check_positive_int(hidden_dim, "hidden_dim", _OWNER)
        self.kappa = check_kappa(kappa, _OWNER)
        for name, value in (("bias", bias), ("no_D", no_D)):
            if not isinstance(value, bool):
                raise ConfigTypeError(
                    f"The '{name}' parameter of {_OWNER} must be a bool. Got {value!r} instead."
                )
        self.bias = bias
        self.no_D = no_D
        self.rank = check_positive_int(rank, "rank", _OWNER, allow_none=True)
        if self.rank is not None and self.rank > self.hidden_dim:
            raise bad_parameter(
                "rank",
                _OWNER,
                f"an integer in [1, hidden_dim={hidden_dim}]",
                rank,
                "Use rank=None for a dense A.",
            )
        self.constraint = check_choice(constraint, "constraint", _OWNER, CONSTRAINTS)
        self.well_posedness = check_choice(well_posedness, "well_posedness", _OWNER, WELL_POSEDNESS)
        if self.well_posedness == "mu_inf" and (self.rank is not None or self.constraint == "rescale"):
            what = f"rank={self.rank}" if self.rank is not None else "constraint='rescale'"
            raise ConfigError(
                f"{_OWNER}: well_posedness='mu_inf' supports a dense A with constraint='project' or "
                f"'shrink'; got {what}. Use rank=None and constraint='project' (or 'shrink'), or "
                "well_posedness='inf_norm'."
            )
        act_kwargs = {} if negative_slope is None else {"negative_slope": negative_slope}
        self.activation: Activation = resolve_activation(activation, owner=_OWNER, **act_kwargs)
        if fixed_point not in FIXED_POINT_METHODS:
            raise bad_parameter("fixed_point", _OWNER, f"one of {sorted(FIXED_POINT_METHODS)}", fixed_point)
        self.forward_options = FixedPointOptions(
            tol=tol,
            atol=atol,
            norm=residual_norm,
            max_iter=max_iter,
            method=fixed_point,
            anderson_memory=anderson_memory,
        )
        self.backward_options = FixedPointOptions(
            tol=tol if backward_tol is None else backward_tol,
            atol=atol if backward_atol is None else backward_atol,
            norm=residual_norm,
            max_iter=max_iter if backward_max_iter is None else backward_max_iter,
            method=fixed_point,
            anderson_memory=anderson_memory,
        )

        factory = {"device": device, "dtype": dtype}
        n, p, q = self.hidden_dim, self.input_dim + int(bias), self.output_dim
        if self.rank is None:
            # "rescale" trains W and derives A from it; "shrink" and "project" train A itself
            self.register_parameter(
                "W" if self.constraint == "rescale" else "A", nn.Parameter(torch.empty(n, n, **factory))
            )
            self.register_parameter("L", None)
            self.register_parameter("R", None)
        else:
            self.L = nn.Parameter(torch.empty(n, self.rank, **factory))
            self.R = nn.Parameter(torch.empty(n, self.rank, **factory))
        self.B = nn.Parameter(torch.empty(n, p, **factory))
        self.C = nn.Parameter(torch.empty(q, n, **factory))
        if no_D:  # a buffer: .to(device) moves it and the state_dict records it, nothing trains it
            self.register_buffer("D", torch.zeros(q, p, **factory))
        else:
            self.D = nn.Parameter(torch.empty(q, p, **factory))
        self.last_forward_stats: FixedPointStats | None = None
        self.last_backward_stats: FixedPointStats | None = None
        self.telemetry = ImplicitTelemetry()
        self.reset_parameters()

    # ------------------------------------------------------------------ parameters
    def reset_parameters(self) -> None:
        """Re-initialise every parameter (A with row sums about 0.5, then projected onto the bound)."""
        n = self.hidden_dim
        with torch.no_grad():
            if self.rank is None:
                nn.init.uniform_(self._raw_A(), -1.0 / n, 1.0 / n)
            else:
                nn.init.uniform_(self.L, -1.0, 1.0)
                nn.init.uniform_(self.R, -1.0, 1.0)
                rows = (self.L @ self.R.t()).abs().sum(dim=1, keepdim=True)
                self.L.mul_(0.5 / rows.clamp_min(torch.finfo(rows.dtype).tiny))
            for W in (self.B, self.C) if self.no_D else (self.B, self.C, self.D):
                bound = 1.0 / math.sqrt(W.shape[1])
                nn.init.uniform_(W, -bound, bound)
        self.project_()

    def _raw_A(self) -> torch.Tensor:
        params = self._parameters
        if self.rank is not None:
            return params["L"] @ params["R"].t()
        return params["W" if self.constraint == "rescale" else "A"]

    def _stored_A(self) -> torch.Tensor:
        """The A the forward uses (with autograd to the trained parameters)."""
        raw = self._raw_A()
        if self.constraint != "rescale":  # "project", "shrink": the stored A is the A used
            return raw
        # A = W * min(1, kappa' / ||W||_inf), differentiated exactly (no straight-through); kappa' is
        # kappa less a few ulps so that the bound also holds for the rounded product
        n = self.hidden_dim
        kappa = self.kappa * (1.0 - 4.0 * (n + 2) * torch.finfo(raw.dtype).eps)
        norm = raw.abs().sum(dim=1).max().clamp_min(torch.finfo(raw.dtype).tiny)
        return raw * (kappa / norm).clamp(max=1.0)

    @torch.no_grad()
    def project_(self) -> bool:
        """Enforce ``||A||_inf <= kappa`` on the stored parameters in place; True if anything changed.

        ``"project"``, dense: exact Euclidean projection of ``A``; low rank: scale down the rows of ``L``
        whose row of ``A = L R^T`` is too large. ``"shrink"``: scale all of ``A`` (or ``L``) by
        ``kappa / ||A||_inf``. Call it after ``optimizer.step()`` (forward also calls it).
        """
        kappa = self.kappa
        if self.constraint == "rescale":
            return False  # the bound holds by construction
        if self.constraint == "shrink":
            return self._shrink_()
        if self.well_posedness == "mu_inf":  # dense only (checked in __init__)
            if mu_inf(self.A) <= kappa:
                return False
            self.A.copy_(project_onto_mu_ball(self.A, kappa))
            return True
        if self.rank is None:
            if inf_norm(self.A) <= kappa:
                return False
            self.A.copy_(project_onto_kappa_ball(self.A, kappa))
            return True
        rows = (self.L @ self.R.t()).abs().sum(dim=1, keepdim=True)
        over = rows > kappa
        if not bool(over.any()):
            return False
        margin = _low_rank_margin(self.hidden_dim, self.rank, self.L.dtype)
        factor = kappa * margin / rows.clamp_min(torch.finfo(rows.dtype).tiny)
        self.L.mul_(torch.where(over, factor, torch.ones_like(factor)))
        # paranoia for exotic BLAS rounding: shrink again until the computed product is inside
        for _ in range(8):
            rows = (self.L @ self.R.t()).abs().sum(dim=1, keepdim=True)
            over = rows > kappa
            if not bool(over.any()):
                break
            self.L.mul_(torch.where(over, torch.full_like(rows, margin), torch.ones_like(rows)))
        return True

    def _shrink_(self) -> bool:
        """``"shrink"``: multiply ``A`` (dense) or ``L`` (low rank) by ``kappa * margin / ||A||_inf`` when
        the bound is violated; the margin of a few ulps makes the bound hold for the computed product
        (``(n + 2) eps`` covers the rounding of a row's absolute sum; low rank adds the product ``L R^T``)."""
        kappa = self.kappa
        if self.well_posedness == "mu_inf":
            return self._shrink_mu_()
        if self.rank is None:
            target = self.A
            margin = 1.0 - (self.hidden_dim + 2) * torch.finfo(target.dtype).eps
        else:
            target = self.L
            margin = _low_rank_margin(self.hidden_dim, self.rank, target.dtype)
        changed = False
        for _ in range(8):  # one pass in exact arithmetic; more only for exotic rounding
            norm = inf_norm(self._raw_A())
            if norm <= kappa:
                break
            target.mul_(kappa * margin / norm)
            changed = True
        return changed

    def _shrink_mu_(self) -> bool:
        """``"shrink"`` under ``mu_inf``: ``A <- A * kappa' / mu_inf(A)`` when ``mu_inf(A) > kappa``
        (``mu_inf(c A) = c mu_inf(A)`` for ``c > 0``), with ``kappa'`` below ``kappa`` by the rounding of
        the largest absolute row sum, so that the computed ``mu_inf`` is within the bound."""
        A = self.A
        changed = False
        for _ in range(8):
            value = mu_inf(A)
            if value <= self.kappa:
                break
            slack = 4.0 * (self.hidden_dim + 2) * torch.finfo(A.dtype).eps * inf_norm(A)
            A.mul_(max(self.kappa - slack, 0.0) / value)
            changed = True
        return changed

    def __getattr__(self, name: str) -> Any:
        # low rank or "rescale": ``model.A`` is the matrix the forward uses, computed from the trained
        # parameters (dense "shrink" or "project": the registered parameter itself)
        if name == "A":
            params = self.__dict__.get("_parameters", {})
            if "A" not in params and ("L" in params or "W" in params):
                return self._stored_A()
        return super().__getattr__(name)

    # ------------------------------------------------------------------ construction from weights
    @classmethod
    def from_weights(
        cls,
        A: torch.Tensor,
        B: torch.Tensor,
        C: torch.Tensor,
        D: torch.Tensor | None = None,
        *,
        activation: Any = "relu",
        kappa: float = 0.99,
        bias: bool = False,
        **options: Any,
    ) -> ImplicitModel:
        """Build a dense model holding copies of given weights (e.g. fitted by SIM).

        Args:
            A: (n, n) with ``||A||_inf <= kappa`` (``mu_inf(A) <= kappa`` with ``well_posedness="mu_inf"``
                in ``options``), else :class:`WellPosednessError`.
            B: (n, p) or, with ``bias=True``, (n, p + 1) whose last column multiplies the constant 1.
            C: (q, n).
            D: (q, B.shape[1]) or None (then ``no_D=True``).
            activation, kappa, bias: as in the constructor.
            **options: further constructor keywords (``fixed_point``, ``tol``, ``max_iter``, ...).

        The parameters take ``A``'s dtype and device.
        """
        owner = "ImplicitModel.from_weights"
        tensors = {"A": A, "B": B, "C": C} | ({} if D is None else {"D": D})
        for name, t in tensors.items():
            if not torch.is_tensor(t) or t.dim() != 2:
                raise ConfigTypeError(
                    f"The '{name}' argument of {owner} must be a 2-D tensor. Got {t!r:.80}."
                )
            check_finite(t, name, owner)
        n = A.shape[0]
        if A.shape != (n, n):
            raise ShapeError(f"The 'A' argument of {owner} must be square. Got shape {tuple(A.shape)}.")
        if B.shape[0] != n or C.shape[1] != n:
            raise ShapeError(
                f"{owner}: B must have {n} rows and C {n} columns (A is {n} x {n}). "
                f"Got B {tuple(B.shape)}, C {tuple(C.shape)}."
            )
        if D is not None and D.shape != (C.shape[0], B.shape[1]):
            raise ShapeError(
                f"The 'D' argument of {owner} must have shape {(C.shape[0], B.shape[1])} (outputs x inputs). "
                f"Got {tuple(D.shape)}."
            )
        kappa = check_kappa(kappa, owner)
        condition = check_choice(
            options.get("well_posedness", "inf_norm"), "well_posedness", owner, WELL_POSEDNESS
        )
        norm = mu_inf(A) if condition == "mu_inf" else inf_norm(A)
        if norm > kappa:
            name, fix = (
                ("mu_inf(A)", "idl_ray.implicit.mu_projection.project_onto_mu_ball(A, kappa)")
                if condition == "mu_inf"
                else ("||A||_inf", "idl_ray.project_onto_kappa_ball(A, kappa)")
            )
            raise WellPosednessError(
                f"{owner}: {name} = {norm:.6g} exceeds kappa = {kappa:g}. Project A first ({fix}) or pass "
                "a larger kappa < 1."
            )
        p = B.shape[1] - int(bool(bias))
        if p < 1:
            raise ShapeError(f"{owner}: B has {B.shape[1]} column(s); with bias={bias} that leaves no input.")
        for name in ("rank", "constraint"):
            if name in options:
                raise ConfigError(
                    f"{owner} builds a dense model whose parameter A is the given matrix; '{name}' is not "
                    "accepted."
                )
        model = cls(
            p,
            C.shape[0],
            n,
            activation=activation,
            kappa=kappa,
            bias=bias,
            no_D=D is None,
            device=A.device,
            dtype=A.dtype,
            **options,
        )
        with torch.no_grad():
            model.A.copy_(A)
            model.B.copy_(B)
            model.C.copy_(C)
            if D is not None:
                model.D.copy_(D)
        return model

    # ------------------------------------------------------------------ forward
    def _record(self, kind: str, stats: FixedPointStats) -> None:
        t = self.telemetry
        if kind == "forward":
            self.last_forward_stats = stats
            t.forward_calls += 1
            t.forward_iterations += stats.iterations
            t.forward_work += stats.work
            t.forward_unconverged += stats.num_samples - stats.num_converged
        else:
            self.last_backward_stats = stats
            t.backward_calls += 1
            t.backward_iterations += stats.iterations
            t.backward_work += stats.work
            t.backward_unconverged += stats.num_samples - stats.num_converged

    def reset_telemetry(self) -> None:
        """Zero the cumulative counters and forget the last stats."""
        self.telemetry = ImplicitTelemetry()
        self.last_forward_stats = None
        self.last_backward_stats = None

    def prepare_input(self, input: torch.Tensor) -> torch.Tensor:
        """Flatten ``input`` to (batch, p), check its shape, and append the bias column when ``bias=True``."""
        if not torch.is_tensor(input):
            raise ConfigTypeError(
                f"The 'input' argument of {_OWNER} must be a tensor. Got {type(input).__name__}."
            )
        if input.dim() < 2:
            raise ShapeError(
                f"The 'input' argument of {_OWNER} must have shape (batch, {self.input_dim}) (batch first). "
                f"Got shape {tuple(input.shape)}; use input.unsqueeze(0) for a single sample."
            )
        if input.dtype != self.B.dtype:
            if input.is_floating_point() or input.is_complex():
                raise ConfigTypeError(
                    f"The 'input' argument of {_OWNER} is {input.dtype} but the model's parameters are "
                    f"{self.B.dtype}. Convert one to the other: input.to({self.B.dtype}) (may round), or "
                    f"model.to({input.dtype})."
                )
            input = input.to(self.B.dtype)  # integer or bool features are exact in a float dtype
        U = input.flatten(1) if input.dim() > 2 else input
        if U.shape[1] != self.input_dim:
            raise ShapeError(
                f"The 'input' argument of {_OWNER} must have {self.input_dim} features per sample (after "
                f"flattening from dim 1). Got shape {tuple(input.shape)} -> {U.shape[1]} features."
            )
        if self.bias:
            U = torch.cat([U, U.new_ones(U.shape[0], 1)], dim=1)
        return U

    def forward(
        self, input: torch.Tensor, x0: torch.Tensor | None = None, *, return_state: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Solve for the state and return ``Y`` (and the state ``X`` with ``return_state=True``)."""
        U = self.prepare_input(input)
        if x0 is not None:
            check_width(x0, self.hidden_dim, "x0", _OWNER)
            if x0.shape[0] != U.shape[0]:
                raise ShapeError(
                    f"The 'x0' argument of {_OWNER} must have shape ({U.shape[0]}, {self.hidden_dim}). "
                    f"Got {tuple(x0.shape)}."
                )
        BU = F.linear(U, self.B)
        self._check_finite(U, BU)
        if self.project_():
            self.telemetry.projections += 1
        X = implicit_fixed_point(
            self._stored_A(),
            BU,
            self.activation,
            x0=x0,
            forward_options=self.forward_options,
            backward_options=self.backward_options,
            callback=self._record,
            well_posedness=self.well_posedness,
        )
        Y = F.linear(X, self.C) if self.no_D else torch.addmm(F.linear(U, self.D), X, self.C.t())
        return (Y, X) if return_state else Y

    def _check_finite(self, U: torch.Tensor, BU: torch.Tensor) -> None:
        # NaN/Inf in U always reaches U B^T, which is (hidden/input) times smaller to scan; a NaN or
        # an Inf anywhere makes the sum non-finite (one reduction), and finite entries whose sum
        # overflows pass the exact test
        if math.isfinite(float(BU.detach().sum())) or bool(torch.isfinite(BU).all()):
            return
        check_finite(U, "input", _OWNER)
        if not bool(torch.isfinite(self.B.detach()).all()):
            raise ConfigError(
                f"The parameter B of {_OWNER} holds NaN or Inf (training diverged?). Lower the learning "
                "rate, clip gradients, or reload the last good state_dict."
            )
        raise ConfigError(
            f"The input term U B^T of {_OWNER} overflowed to Inf although the input is finite. Scale the "
            "inputs (e.g. standardise features) or use float64."
        )

    def well_posedness_margin(self) -> float:
        """``kappa - ||A||_inf`` (or ``kappa - mu_inf(A)``) of the current A (>= 0 after any forward or
        :meth:`project_`)."""
        with torch.no_grad():
            A = self._stored_A()
            return self.kappa - (mu_inf(A) if self.well_posedness == "mu_inf" else inf_norm(A))

    def lipschitz_bound(self, *, method: str = "norm") -> float:
        """Certified l-infinity Lipschitz bound of ``input -> output`` (bias column left out).

        ``method="norm"``: ``||D||_inf + ||C||_inf ||B||_inf / (1 - ||A||_inf)``; ``"elementwise"``: the tighter
        ``|| |C| M^{-1} |B| + |D| ||_inf``, ``M = diag(1 - a_ii) - |A_offdiag|``. Brings a stored ``A`` outside the
        bound back first, as a forward would. See :func:`idl_ray.robustness.lipschitz_bound`.
        """
        from idl_ray.robustness.lipschitz import lipschitz_bound

        with torch.no_grad():
            self.project_()
        return lipschitz_bound(self, method=method)

    def extra_repr(self) -> str:
        parts = [
            f"input_dim={self.input_dim}",
            f"output_dim={self.output_dim}",
            f"hidden_dim={self.hidden_dim}",
            f"activation={self.activation.name!r}",
            f"kappa={self.kappa}",
            f"bias={self.bias}",
            f"no_D={self.no_D}",
        ]
        if self.rank is not None:
            parts.append(f"rank={self.rank}")
        parts.append(f"constraint={self.constraint!r}")
        if self.well_posedness != "inf_norm":
            parts.append(f"well_posedness={self.well_posedness!r}")
        fo = self.forward_options
        parts.append(f"fixed_point={fo.method!r}, tol={fo.tol:g}, max_iter={fo.max_iter}")
        return ", ".join(parts)


#: the ways ImplicitModel keeps ||A||_inf <= kappa (see the class docstring)
CONSTRAINTS = ("project", "rescale", "shrink")

#: the well-posedness conditions ImplicitModel can keep (``model.well_posedness``)
WELL_POSEDNESS = ("inf_norm", "mu_inf")

_VALID_KWARGS = (
    "activation", "kappa", "bias", "no_D", "rank", "constraint", "fixed_point", "tol", "max_iter", "backward_tol",
    "backward_max_iter", "atol", "backward_atol", "residual_norm", "anderson_memory", "negative_slope", "device", "dtype",
    "well_posedness",
)  # fmt: skip
