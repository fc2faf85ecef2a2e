r"""The l-infinity Lipschitz bound of a well-posed implicit model.

For ``X = phi(A X + B U)``, ``Y = C X + D U`` with ``phi`` applied componentwise, monotone and 1-Lipschitz
(ReLU, leaky ReLU with slope in [0, 1], tanh, sigmoid, softplus, identity), two inputs ``U, U'`` give states
whose difference satisfies ``dX = S (A dX + B dU)`` with ``S`` diagonal, entries ``s_i in [0, 1]`` (mean value
theorem, coordinate by coordinate). Row ``i`` reads ``(1 - s_i a_ii) dx_i = s_i (sum_{j != i} a_ij dx_j +
(B dU)_i)``; since ``a_ii < 1`` and ``s / (1 - s a)`` increases in ``s``,

    (1 - a_ii) |dx_i| <= sum_{j != i} |a_ij| |dx_j| + ||b_i||_1 ||dU||_inf.                       (*)

**Norm bound** (``method="norm"``, the paper's). At the row where ``|dx_i| = ||dX||_inf``, (*) gives
``(1 - mu_i) ||dX||_inf <= ||B||_inf ||dU||_inf`` with ``mu_i = a_ii + sum_{j != i} |a_ij| <= k``, so
``||dX||_inf <= ||B||_inf ||dU||_inf / (1 - k)`` with

    k = ||A||_inf = max_i sum_j |a_ij|                          (the usual condition), or
    k = max(0, mu_inf(A)),  mu_inf(A) = max_i (a_ii + sum_{j != i} |a_ij|)   (the wider one, mu_inf <= ||A||_inf),

both requiring ``k < 1`` (and each implying well-posedness for such ``phi``). Hence (Tsai, Decugis, El Ghaoui, Atamturk 2022; El Ghaoui et al. 2021)::

    ||Y(U) - Y(U')||_inf <= L ||U - U'||_inf,   L = ||D||_inf + ||C||_inf ||B||_inf / (1 - k).

**Elementwise bound** (``method="elementwise"``). Stacking (*) over ``i``: ``M |dX| <= |B| 1 ||dU||_inf`` with
``M = diag(1 - a_ii) - |A_offdiag|``. ``M`` is a Z-matrix, strictly row diagonally dominant with positive
diagonal when ``mu_inf(A) < 1`` (so also when ``||A||_inf < 1``): a nonsingular M-matrix, ``M^{-1} >= 0``. So
``|dX| <= M^{-1} |B| 1 ||dU||_inf`` and

    L_elem = || |C| M^{-1} |B| + |D| ||_inf <= L.

The elementwise bound needs only that ``M`` be a nonsingular M-matrix (``a_ii < 1`` and
``rho(diag(1 - a_ii)^{-1} |A_offdiag|) < 1``). That is also a well-posedness condition: solving row ``i`` for
``x_i`` given the others is a map with Lipschitz constant ``1 / (1 - a_ii)``, so the fixed-point map of the
whole state is a contraction in a weighted l-infinity norm. It holds for a feed-forward teacher written as an
implicit model (``A`` strictly block lower-triangular, ``M^{-1} = sum_k |A|^k``, so ``L_elem = || |W_L| ...
|W_1| ||_inf`` for a bias-free ReLU MLP) even where ``||A||_inf >= 1``: the bound compares a teacher and its SIM.

``L_elem`` is never larger than ``L`` (at the largest entry of ``w = M^{-1} |B| 1``, ``(1 - mu_i) ||w|| <=
||B||_inf``) and, unlike ``L``, is invariant under a positive diagonal rescaling of the state
(``A -> S A S^{-1}``, ``B -> S B``, ``C -> C S^{-1}``; an identity of the model for ReLU / leaky ReLU, which
SIM uses to make the teacher feasible): ``L`` of a fitted SIM depends on the scale its states are expressed in.

A constant bias column of ``B`` / ``D`` (``bias=True``) is not an input and is left out of the norms.
"""

from __future__ import annotations

from typing import Any

import torch

from idl_ray.errors import ConfigError, ConfigTypeError, NotFittedError, ShapeError, WellPosednessError

__all__ = ["LIPSCHITZ_METHODS", "WELL_POSEDNESS_CONDITIONS", "lipschitz_bound", "well_posedness_constant"]

#: the well-posedness conditions the bound accepts
WELL_POSEDNESS_CONDITIONS = ("inf_norm", "mu_inf")
#: the bounds :func:`lipschitz_bound` computes
LIPSCHITZ_METHODS = ("norm", "elementwise")
_OWNER = "lipschitz_bound"


def _inf_norm(M: torch.Tensor) -> float:
    return float(M.abs().sum(dim=1).max()) if M.numel() else 0.0


def _check_choice(value: Any, name: str, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ConfigError(
            f"The '{name}' parameter of {_OWNER} must be one of {list(choices)}. Got {value!r}."
        )
    return value


def well_posedness_constant(A: torch.Tensor, condition: str = "inf_norm") -> float:
    """``k`` of the bound: ``||A||_inf`` or ``max(0, mu_inf(A))`` (see the module docstring).

    Parameters
    ----------
    A : Tensor (n, n)
    condition : "inf_norm" or "mu_inf"

    Returns
    -------
    float; the model is certified well-posed when it is below 1.
    """
    _check_choice(condition, "condition", WELL_POSEDNESS_CONDITIONS)
    A = A.detach().to(torch.float64)
    if condition == "inf_norm" or A.numel() == 0:
        return _inf_norm(A)
    diag = torch.diagonal(A)
    mu = diag + A.abs().sum(dim=1) - diag.abs()
    return max(0.0, float(mu.max()))


def _as_matrix(value: Any, name: str) -> torch.Tensor:
    try:
        t = value.detach() if torch.is_tensor(value) else torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ConfigTypeError(
            f"The '{name}' entry of the weights passed to {_OWNER} must be a 2-D tensor or array. "
            f"Got {type(value).__name__}."
        ) from exc
    if t.dim() != 2 or not (t.is_floating_point() or t.dtype in (torch.int32, torch.int64)):
        raise ConfigTypeError(
            f"The '{name}' entry of the weights passed to {_OWNER} must be a 2-D real tensor. "
            f"Got shape {tuple(t.shape)}, dtype {t.dtype}."
        )
    t = t.to(torch.float64)
    if not bool(torch.isfinite(t).all()):
        raise ConfigError(f"The '{name}' entry of the weights passed to {_OWNER} contains NaN or Inf.")
    return t


def _is_sim(model: Any) -> bool:
    """A SIM estimator, recognised without importing idl_ray.sim (any class named SIM in its MRO)."""
    return not isinstance(model, torch.nn.Module) and any(c.__name__ == "SIM" for c in type(model).__mro__)


def _weights_of(model: Any) -> tuple[dict[str, Any], bool, str]:
    """(A, B, C, D), whether the last input column is a bias, and the model's well-posedness condition."""
    condition = getattr(model, "well_posedness", None)
    condition = condition if isinstance(condition, str) else "inf_norm"
    if _is_sim(model):  # the estimator (or a subclass), fitted or not
        if not hasattr(model, "A_"):
            raise NotFittedError(f"{_OWNER}: this SIM is not fitted yet. Call fit(teacher, data) first.")
        return dict(model.weights), bool(model.bias_), condition
    if hasattr(model, "layer_sizes") and all(hasattr(model, k) for k in ("A", "B", "C", "D")):
        return {k: getattr(model, k) for k in ("A", "B", "C", "D")}, bool(model.bias), condition  # a teacher
    if isinstance(model, torch.nn.Module) and all(hasattr(model, k) for k in ("A", "B", "C", "D")):
        with torch.no_grad():
            mats = {k: getattr(model, k) for k in ("A", "B", "C", "D")}
        return mats, bool(getattr(model, "bias", False)), condition
    if isinstance(model, dict):
        missing = sorted({"A", "B", "C", "D"} - set(model))
        if missing:
            raise ConfigError(
                f"The 'model' argument of {_OWNER}: a dict of weights needs keys 'A', 'B', 'C', 'D'; "
                f"missing {missing}."
            )
        return {k: model[k] for k in ("A", "B", "C", "D")}, False, "inf_norm"
    raise ConfigTypeError(
        f"The 'model' argument of {_OWNER} must be a fitted SIM, an ImplicitModel or a dict with 'A', 'B', "
        f"'C', 'D'. Got {type(model).__name__}."
    )


def lipschitz_bound(
    model: Any,
    *,
    condition: str | None = None,
    bias: bool | None = None,
    method: str = "norm",
) -> float:
    r"""Certified upper bound on the l-infinity input-output Lipschitz constant of an implicit model.

    ``method="norm"``: ``L = ||D||_inf + ||C||_inf ||B||_inf / (1 - k)``; ``method="elementwise"``:
    ``|| |C| M^{-1} |B| + |D| ||_inf <= L`` with ``M = diag(1 - a_ii) - |A_offdiag|`` (invariant under a
    positive rescaling of the state). Derivations in the module docstring and ``docs/robustness.md``.

    Parameters
    ----------
    model : fitted SIM, ImplicitModel, TeacherStructure, or dict with "A" (n, n), "B" (n, p), "C" (q, n), "D" (q, p)
        A teacher's structure (``sim.structure_``) needs ``method="elementwise"``. For an ``ImplicitModel`` the stored ``A`` is used: after ``optimizer.step()`` call
        ``model.project_()`` (or use :meth:`ImplicitModel.lipschitz_bound`, which does) first.
    condition : "inf_norm", "mu_inf" or None
        How ``k`` is computed: ``||A||_inf`` or ``max(0, mu_inf(A))``. None takes the model's own
        (``model.well_posedness`` when set), else "inf_norm". The elementwise bound accepts ``k >= 1``
        when ``M`` is a nonsingular M-matrix (e.g. a feed-forward teacher).
    bias : bool or None
        Whether the last column of ``B`` and ``D`` multiplies a constant 1 (then it is left out: it does
        not depend on the input). None takes the model's (``bias_`` / ``bias``; False for a dict).
    method : "norm" (default) or "elementwise"

    Returns
    -------
    float, ``L`` with ``||Y(U) - Y(U')||_inf <= L ||U - U'||_inf`` for all inputs ``U, U'``.

    Raises
    ------
    WellPosednessError
        When ``k >= 1`` (norm) or ``M`` is not a nonsingular M-matrix (elementwise): the model is not
        certified well-posed and no finite bound follows.
    ConfigTypeError, ConfigError, ShapeError, NotFittedError
        For a model of another type, a bad option, inconsistent shapes or an unfitted SIM.

    Examples
    --------
    >>> import torch
    >>> w = {"A": torch.tensor([[0.5]]), "B": torch.tensor([[2.0]]), "C": torch.tensor([[1.0]]),
    ...      "D": torch.tensor([[0.5]])}
    >>> lipschitz_bound(w)  # 0.5 + 1 * 2 / (1 - 0.5)
    4.5
    """
    mats, model_bias, model_condition = _weights_of(model)
    condition = _check_choice(condition or model_condition, "condition", WELL_POSEDNESS_CONDITIONS)
    _check_choice(method, "method", LIPSCHITZ_METHODS)
    if bias is not None and not isinstance(bias, bool):
        raise ConfigTypeError(f"The 'bias' parameter of {_OWNER} must be a bool or None. Got {bias!r}.")
    has_bias = model_bias if bias is None else bias
    A, B, C, D = (_as_matrix(mats[k], k) for k in ("A", "B", "C", "D"))
    n = A.shape[0]
    if A.shape != (n, n) or B.shape[0] != n or C.shape[1] != n or D.shape != (C.shape[0], B.shape[1]):
        raise ShapeError(
            f"{_OWNER}: inconsistent weight shapes A {tuple(A.shape)}, B {tuple(B.shape)}, C {tuple(C.shape)}, "
            f"D {tuple(D.shape)}; expected A (n, n), B (n, p), C (q, n), D (q, p)."
        )
    if has_bias:
        if B.shape[1] < 2:
            raise ShapeError(f"{_OWNER}: with bias=True, B needs an input column besides the bias column.")
        B, D = B[:, :-1], D[:, :-1]
    k = well_posedness_constant(A, condition)
    if method == "norm":
        if k >= 1.0:
            raise WellPosednessError(
                f"{_OWNER} needs a well-posed model: the {condition} constant of A is {k:.6g} >= 1, so no "
                "finite norm bound follows. Project A onto kappa < 1 (idl_ray.project_onto_kappa_ball), use "
                "condition='mu_inf' if it holds, or method='elementwise' (which also covers feed-forward "
                "teachers, whose A is strictly triangular)."
            )
        return _inf_norm(D) + _inf_norm(C) * _inf_norm(B) / (1.0 - k)
    M = -A.abs()
    M.diagonal().copy_(1.0 - torch.diagonal(A))
    if k >= 1.0 and not _is_nonsingular_m_matrix(M):
        raise WellPosednessError(
            f"{_OWNER} needs a well-posed model: the {condition} constant of A is {k:.6g} >= 1 and "
            "M = diag(1 - a_ii) - |A_offdiag| is not a nonsingular M-matrix, so no finite bound follows."
        )
    if C.numel() == 0:
        return 0.0
    w = torch.linalg.solve(M, B.abs().sum(dim=1, keepdim=True))  # M^{-1} |B| 1 >= 0
    return float((C.abs() @ w.clamp_min(0.0) + D.abs().sum(dim=1, keepdim=True)).max())


def _is_nonsingular_m_matrix(M: torch.Tensor) -> bool:
    """For a Z-matrix (off-diagonal <= 0): nonsingular M-matrix iff some x > 0 has M x > 0; when it is one,
    x = M^{-1} 1 is such an x (M^{-1} >= 0 with no zero row), and when x = M^{-1} 1 > 0 it is a witness."""
    if not bool((torch.diagonal(M) > 0).all()):
        return False
    try:
        x = torch.linalg.solve(M, torch.ones(M.shape[0], 1, dtype=M.dtype))
    except RuntimeError:  # singular
        return False
    return bool(torch.isfinite(x).all()) and bool((x > 0).all())
