r"""The l-infinity Lipschitz bound of a well-posed implicit model.

For ``X = phi(A X + B U)``, ``Y = C X + D U`` with ``phi`` applied componentwise, monotone and 1-Lipschitz
(ReLU, leaky ReLU with slope <= 1, tanh, sigmoid), two inputs ``U, U'`` give states whose difference
``dX = S (A dX + B dU)`` with ``S`` diagonal, entries in [0, 1]. Row ``i`` of that identity gives
``(1 - s_i a_ii) |dx_i| <= s_i (sum_{j != i} |a_ij| ||dX||_inf + ||B||_inf ||dU||_inf)``; at the row where
``|dx_i| = ||dX||_inf`` this yields ``||dX||_inf <= ||B||_inf ||dU||_inf / (1 - k)`` with

    k = ||A||_inf = max_i sum_j |a_ij|                          (the usual condition), or
    k = max(0, mu_inf(A)),  mu_inf(A) = max_i (a_ii + sum_{j != i} |a_ij|)   (the wider one, mu_inf <= ||A||_inf),

both requiring ``k < 1``. Hence the certified bound (Tsai, Decugis, El Ghaoui, Atamturk 2022, section 4;
El Ghaoui et al. 2021, "Implicit deep learning", section 5)::

    ||Y(U) - Y(U')||_inf <= L ||U - U'||_inf,   L = ||D||_inf + ||C||_inf ||B||_inf / (1 - k).

A constant bias column of ``B`` / ``D`` (``bias=True``) is not an input and is left out of the norms.
"""

from __future__ import annotations

from typing import Any

import torch

from idl_ray.errors import ConfigError, WellPosednessError

__all__ = ["lipschitz_bound", "well_posedness_constant"]

_CONDITIONS = ("inf_norm", "mu_inf")


def _inf_norm(M: torch.Tensor) -> float:
    return float(M.abs().sum(dim=1).max()) if M.numel() else 0.0


def well_posedness_constant(A: torch.Tensor, condition: str = "inf_norm") -> float:
    """``k`` of the bound: ``||A||_inf`` or ``max(0, mu_inf(A))`` (see the module docstring); A is (n, n)."""
    if condition not in _CONDITIONS:
        raise ConfigError(f"condition must be one of {list(_CONDITIONS)}; got {condition!r}.")
    A = A.detach().to(torch.float64)
    if condition == "inf_norm" or A.numel() == 0:
        return _inf_norm(A)
    diag = torch.diagonal(A)
    mu = diag + A.abs().sum(dim=1) - diag.abs()
    return max(0.0, float(mu.max()))


def _weights_of(model: Any) -> tuple[dict[str, torch.Tensor], bool, str]:
    """(A, B, C, D), whether the last input column is a bias, and the well-posedness condition."""
    condition = getattr(model, "well_posedness", None) or "inf_norm"
    if hasattr(model, "A_") and hasattr(model, "bias_"):  # a fitted SIM
        return dict(model.weights), bool(model.bias_), condition
    if all(hasattr(model, name) for name in ("A", "B", "C", "D")) and hasattr(model, "forward"):
        with torch.no_grad():
            mats = {k: getattr(model, k).detach() for k in ("A", "B", "C", "D")}
        return mats, bool(getattr(model, "bias", False)), condition
    if isinstance(model, dict) and {"A", "B", "C", "D"} <= set(model):
        return {k: torch.as_tensor(model[k]) for k in ("A", "B", "C", "D")}, False, "inf_norm"
    raise ConfigError(
        "lipschitz_bound takes a fitted SIM, an ImplicitModel or a dict with 'A', 'B', 'C', 'D'; "
        f"got {type(model).__name__}."
    )


def lipschitz_bound(
    model: Any, *, condition: str | None = None, bias: bool | None = None, exclude_bias: bool = True
) -> float:
    """Certified l-infinity Lipschitz constant bound ``||D||_inf + ||C||_inf ||B||_inf / (1 - k)``.

    Parameters
    ----------
    model : fitted SIM, ImplicitModel, or dict with "A" (n, n), "B" (n, p), "C" (q, n), "D" (q, p)
    condition : "inf_norm" or "mu_inf"; None takes the model's own (``model.well_posedness``), else "inf_norm"
    bias : whether the last column of B and D is a constant bias feature; None takes the model's
    exclude_bias : leave that column out (it does not depend on the input)

    Returns
    -------
    float, an upper bound on ``sup ||Y(U) - Y(U')||_inf / ||U - U'||_inf`` over all input pairs.

    Raises
    ------
    WellPosednessError when ``k >= 1`` (the model is not certified well-posed; no finite bound follows).
    """
    mats, model_bias, model_condition = _weights_of(model)
    condition = condition or model_condition
    has_bias = model_bias if bias is None else bool(bias)
    A, B, C, D = (mats[k].detach().to(torch.float64) for k in ("A", "B", "C", "D"))
    if has_bias and exclude_bias:
        B, D = B[:, :-1], D[:, :-1]
    k = well_posedness_constant(A, condition)
    if k >= 1.0:
        raise WellPosednessError(
            f"lipschitz_bound needs a well-posed model: the {condition} constant of A is {k:.6g} >= 1, so "
            "no finite bound follows. Project A (kappa < 1) or use condition='mu_inf' if it holds."
        )
    return _inf_norm(D) + _inf_norm(C) * _inf_norm(B) / (1.0 - k)
