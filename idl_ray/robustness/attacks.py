r"""Empirical l-infinity robustness: FGSM and PGD attacks, and accuracy under attack.

Both attacks move an input ``x`` inside the ball ``{x' : ||x' - x||_inf <= eps}`` (intersected with the box
``clip = (lo, hi)`` when given) to increase the loss ``l(model(x'), y)``:

- FGSM (Goodfellow et al. 2015): ``x' = x + eps sign(grad_x l(model(x), y))``.
- PGD (Madry et al. 2018): from ``x`` (or a uniform random point of the ball), ``steps`` times
  ``x' <- P(x' + step_size sign(grad_x' l(model(x'), y)))``, ``P`` the projection onto the ball (and box).
  One step with ``step_size = eps`` and no random start is FGSM.

For an :class:`~idl_ray.implicit.model.ImplicitModel` (or a fitted SIM, attacked through ``sim.to_module()``)
``grad_x`` is the exact gradient of the fixed point, computed by the implicit backward of
:func:`~idl_ray.implicit.functional.implicit_fixed_point`: ``dl/d(BU) = V`` with ``V`` the adjoint fixed
point, then ``dl/dU = V B`` by autograd through ``BU = U B^T``; no iteration is stored.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from idl_ray._validation import check_finite, check_positive_int
from idl_ray.errors import ConfigError, ConfigTypeError, NotFittedError, ShapeError
from idl_ray.robustness.lipschitz import _is_sim

__all__ = ["ATTACK_METHODS", "attack_accuracy", "fgsm", "pgd"]

#: the attacks :func:`attack_accuracy` runs
ATTACK_METHODS = ("fgsm", "pgd")

#: the keyword options each attack takes (besides model, x, y, eps)
_OPTIONS = {
    "fgsm": ("loss", "clip"),
    "pgd": ("steps", "step_size", "random_start", "clip", "generator", "loss"),
}

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# ---------------------------------------------------------------------------------------------- checks
def _as_module(model: Any, owner: str) -> nn.Module:
    """The module to attack: ``model`` itself, or ``model.to_module()`` for a fitted SIM."""
    if isinstance(model, nn.Module):
        return model
    if _is_sim(model):
        if not hasattr(model, "A_"):
            raise NotFittedError(f"{owner}: this SIM is not fitted yet. Call fit(teacher, data) first.")
        return model.to_module()
    raise ConfigTypeError(
        f"The 'model' argument of {owner} must be a torch nn.Module (a teacher, an ImplicitModel) or a fitted "
        f"SIM. Got {type(model).__name__}."
    )


def _model_placement(module: nn.Module) -> tuple[torch.dtype, torch.device] | None:
    """(dtype, device) of the module's first floating-point parameter or buffer (None: it has none)."""
    for t in list(module.parameters()) + list(module.buffers()):
        if t.is_floating_point():
            return t.dtype, t.device
    return None


def _as_tensor(value: Any, name: str, owner: str) -> torch.Tensor:
    if torch.is_tensor(value):
        return value.detach()
    if isinstance(value, (np.ndarray, list, tuple)):
        return torch.as_tensor(np.asarray(value))
    raise ConfigTypeError(
        f"The '{name}' argument of {owner} must be a tensor or array. Got {type(value).__name__}."
    )


def _check_data(x: Any, y: Any, owner: str, module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = _as_tensor(x, "x", owner), _as_tensor(y, "y", owner)
    if x.dim() < 1 or x.shape[0] == 0:
        raise ShapeError(
            f"The 'x' argument of {owner} is empty (shape {tuple(x.shape)}); pass at least one sample."
        )
    if y.dim() < 1 or y.shape[0] != x.shape[0]:
        raise ShapeError(
            f"The 'x' and 'y' arguments of {owner} must hold the same number of samples (batch first). "
            f"Got x {tuple(x.shape)}, y {tuple(y.shape)}."
        )
    if not x.is_floating_point():
        x = x.to(torch.get_default_dtype())
    placement = _model_placement(module)
    if placement is not None:
        x = x.to(device=placement[1], dtype=placement[0])
        y = y.to(placement[1])
    check_finite(x, "x", owner)
    return x, y


def _check_eps(eps: Any, owner: str) -> float:
    ok = not isinstance(eps, bool) and isinstance(eps, (int, float, np.floating, np.integer))
    if not ok or not math.isfinite(float(eps)) or float(eps) < 0:
        raise ConfigError(
            f"The 'eps' parameter of {owner} must be a finite float >= 0 (the l-infinity radius of the "
            f"perturbation). Got {eps!r} instead."
        )
    return float(eps)


def _check_clip(clip: Any, owner: str) -> tuple[float, float] | None:
    if clip is None:
        return None
    try:
        lo, hi = (float(v) for v in clip)
    except (TypeError, ValueError) as exc:
        raise ConfigError(
            f"The 'clip' parameter of {owner} must be None or a pair (lo, hi). Got {clip!r}."
        ) from exc
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ConfigError(f"The 'clip' parameter of {owner} must be finite with lo < hi. Got {clip!r}.")
    return lo, hi


def _default_loss(outputs: torch.Tensor, y: torch.Tensor, owner: str) -> torch.Tensor:
    """Summed cross-entropy for integer labels (batch,), summed squared error for targets of the output's shape."""
    if not (y.is_floating_point() or y.is_complex()):
        if y.dim() != 1 or outputs.dim() != 2:
            raise ShapeError(
                f"{owner}: class labels 'y' must have shape (batch,) and the model's outputs (batch, classes). "
                f"Got y {tuple(y.shape)}, outputs {tuple(outputs.shape)}."
            )
        return F.cross_entropy(outputs, y.to(outputs.device).long(), reduction="sum")
    if y.shape != outputs.shape:
        raise ShapeError(
            f"{owner}: real targets 'y' must have the model's output shape {tuple(outputs.shape)}. Got "
            f"{tuple(y.shape)}; pass integer class labels for a classifier."
        )
    return F.mse_loss(outputs, y.to(outputs), reduction="sum")


def _input_gradient(module: nn.Module, x: torch.Tensor, y: torch.Tensor, loss: LossFn | None, owner: str):
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        out = module(x)
        value = _default_loss(out, y, owner) if loss is None else loss(out, y)
        if not torch.is_tensor(value) or value.numel() != 1:
            raise ConfigError(f"The 'loss' of {owner} must return a scalar tensor. Got {value!r:.80}.")
        (grad,) = torch.autograd.grad(value.sum(), x)
    return grad


def _into_box(x: torch.Tensor, clip: tuple[float, float] | None) -> torch.Tensor:
    return x if clip is None else x.clamp(clip[0], clip[1])


# ---------------------------------------------------------------------------------------------- attacks
def fgsm(
    model: Any,
    x: Any,
    y: Any,
    eps: float,
    *,
    loss: LossFn | None = None,
    clip: tuple[float, float] | None = None,
) -> torch.Tensor:
    r"""Fast gradient sign attack: ``x' = clip(x + eps sign(grad_x l(model(x), y)))``.

    Parameters
    ----------
    model : nn.Module or fitted SIM
        A teacher, an ImplicitModel (gradient by implicit differentiation), or a fitted SIM (its
        ``to_module()``).
    x : Tensor (batch, ...)
        Inputs, moved to the model's parameter dtype and device. The model is used as it is: put it in
        ``eval()`` mode first when it has dropout or batch norm.
    y : Tensor (batch,) of class labels, or real targets of the model's output shape
    eps : float >= 0
        l-infinity radius.
    loss : callable(outputs, y) -> scalar, optional
        Default: summed cross-entropy for integer labels, summed squared error for real targets.
    clip : (lo, hi), optional
        Keep the perturbed inputs in this box (e.g. (0, 1) for pixel intensities).

    Returns
    -------
    Tensor, the perturbed inputs, the shape of ``x``, ``||x' - x||_inf <= eps``.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Linear(3, 2)
    >>> x, y = torch.zeros(4, 3), torch.tensor([0, 1, 0, 1])
    >>> float((fgsm(net, x, y, 0.1) - x).abs().max())
    0.10000000149011612
    """
    owner = "fgsm"
    module = _as_module(model, owner)
    x, y = _check_data(x, y, owner, module)
    eps = _check_eps(eps, owner)
    box = _check_clip(clip, owner)
    grad = _input_gradient(module, x, y, loss, owner)
    return _into_box(x + eps * grad.sign(), box).detach()


def pgd(
    model: Any,
    x: Any,
    y: Any,
    eps: float,
    *,
    steps: int = 10,
    step_size: float | None = None,
    random_start: bool = True,
    clip: tuple[float, float] | None = None,
    generator: torch.Generator | None = None,
    loss: LossFn | None = None,
) -> torch.Tensor:
    r"""Projected gradient (sign) ascent on the loss inside the l-infinity ball of radius ``eps``.

    Parameters
    ----------
    model, x, y, eps, loss, clip : as in :func:`fgsm`
    steps : int >= 1
    step_size : float > 0, optional
        Default ``2.5 eps / steps`` (Madry et al.).
    random_start : bool
        Start from a uniform random point of the ball (else from ``x``).
    generator : torch.Generator, optional
        For the random start (on the inputs' device).

    Returns
    -------
    Tensor, the perturbed inputs, ``||x' - x||_inf <= eps``, inside ``clip``.
    """
    owner = "pgd"
    module = _as_module(model, owner)
    x, y = _check_data(x, y, owner, module)
    eps = _check_eps(eps, owner)
    box = _check_clip(clip, owner)
    steps = check_positive_int(steps, "steps", owner)
    if step_size is None:
        step_size = 2.5 * eps / steps
    elif isinstance(step_size, bool) or not isinstance(step_size, (int, float)) or not step_size > 0:
        raise ConfigError(f"The 'step_size' parameter of pgd must be a float > 0 or None. Got {step_size!r}.")
    if not isinstance(random_start, bool):
        raise ConfigTypeError(f"The 'random_start' parameter of pgd must be a bool. Got {random_start!r}.")
    lo, hi = x - eps, x + eps
    if box is not None:
        lo, hi = lo.clamp_min(box[0]), hi.clamp_max(box[1])
    adv = x.clone()
    if random_start and eps > 0:
        noise = torch.rand(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        adv = torch.minimum(torch.maximum(x + eps * (2 * noise - 1), lo), hi)
    for _ in range(steps):
        grad = _input_gradient(module, adv, y, loss, owner)
        adv = torch.minimum(torch.maximum(adv + step_size * grad.sign(), lo), hi)
    return adv.detach()


# ---------------------------------------------------------------------------------------------- accuracy
def attack_accuracy(
    model: Any,
    x: Any,
    y: Any,
    eps: float | Sequence[float],
    method: str = "fgsm",
    batch_size: int = 512,
    **kwargs: Any,
) -> float | list[float]:
    r"""Classification accuracy under an l-infinity attack of radius ``eps``.

    Parameters
    ----------
    model : nn.Module or fitted SIM
    x : Tensor (m, ...)
    y : Tensor (m,) of integer class labels
    eps : float >= 0, or a sequence of them
        ``eps = 0`` gives the clean accuracy.
    method : "fgsm" or "pgd"
    batch_size : int
        Samples attacked at a time.
    **kwargs
        Options of :func:`fgsm` (``loss``, ``clip``) or :func:`pgd` (``steps``, ``step_size``,
        ``random_start``, ``clip``, ``generator``, ``loss``).

    Returns
    -------
    float for one ``eps``; for a sequence, a list in the same order. In a sequence a sample counts as broken
    at ``eps`` when the attack broke it at any ``eps' <= eps`` of the sequence (the smaller ball lies inside
    the larger one), so the list never increases with ``eps``.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Linear(2, 2)
    >>> x, y = torch.randn(8, 2), torch.randint(0, 2, (8,))
    >>> accs = attack_accuracy(net, x, y, [0.0, 0.5], method="pgd", steps=5)
    >>> accs[1] <= accs[0]
    True
    """
    owner = "attack_accuracy"
    if not isinstance(method, str) or method not in ATTACK_METHODS:
        raise ConfigError(
            f"The 'method' parameter of {owner} must be one of {list(ATTACK_METHODS)}. Got {method!r}."
        )
    batch_size = check_positive_int(batch_size, "batch_size", owner)
    single = not isinstance(eps, (Sequence, np.ndarray)) or isinstance(eps, str)
    radii = [_check_eps(e, owner) for e in ([eps] if single else list(eps))]
    if not radii:
        raise ConfigError(f"The 'eps' parameter of {owner} is an empty sequence; pass at least one radius.")
    module = _as_module(model, owner)
    x, y = _check_data(x, y, owner, module)
    if y.is_floating_point() or y.is_complex() or y.dim() != 1:
        raise ConfigError(
            f"{owner} measures classification accuracy: 'y' must be integer class labels of shape (batch,). "
            f"Got dtype {y.dtype}, shape {tuple(y.shape)}."
        )
    attack = fgsm if method == "fgsm" else pgd
    unknown = sorted(set(kwargs) - set(_OPTIONS[method]))
    if unknown:
        raise ConfigError(
            f"Unknown option(s) {unknown} of {owner} with method={method!r}. Valid: {list(_OPTIONS[method])}."
        )
    order = sorted(range(len(radii)), key=radii.__getitem__)
    correct = torch.zeros(len(radii), dtype=torch.long)
    for start in range(0, x.shape[0], batch_size):
        xb, yb = x[start : start + batch_size], y[start : start + batch_size]
        alive = torch.ones(xb.shape[0], dtype=torch.bool)
        for i in order:  # increasing eps: a sample broken at a smaller radius stays broken
            adv = attack(module, xb, yb, radii[i], **kwargs)
            with torch.no_grad():
                pred = module(adv).argmax(dim=1).cpu()
            alive &= pred == yb.cpu().to(pred.dtype)
            correct[i] += int(alive.sum())
    accs = (correct.double() / x.shape[0]).tolist()
    return accs[0] if single else accs
