"""Activations for implicit models: phi and its derivative phi', checked to be monotone and 1-Lipschitz.

Well-posedness under ``||A||_inf <= kappa < 1`` needs a component-wise activation that is monotone
non-decreasing and 1-Lipschitz (``0 <= phi' <= 1``). Every built-in activation satisfies this; a user pair
``(phi, dphi)`` is checked on sample points (a cheap test that catches common mistakes, not a proof).

Activations never write into their argument: the fixed-point kernels and SIM's state extraction rely on
pre-activations staying intact.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from idl_ray._validation import bad_parameter
from idl_ray.errors import ConfigError, ConfigTypeError, UnsupportedLayerError

TensorFn = Callable[[torch.Tensor], torch.Tensor]

__all__ = [
    "ACTIVATIONS",
    "Activation",
    "activation_from_module",
    "check_activation_pair",
    "resolve_activation",
]


@dataclasses.dataclass(frozen=True)
class Activation:
    """A component-wise activation ``phi`` with its derivative ``phi'``.

    Attributes
    ----------
    name : str
        ``"relu"``, ``"leaky_relu"``, ... or ``"custom"`` for a user pair.
    fn : callable
        ``phi``, applied element-wise, returns a new tensor (never in place).
    derivative : callable
        ``phi'`` evaluated at the pre-activation ``Z`` (values in [0, 1]).
    negative_slope : float or None
        The slope for ``leaky_relu``; None otherwise.
    derivative_from_output : callable or None
        ``phi'(z)`` computed from ``x = phi(z)`` (known for the built-ins, as torch's own backward
        formulas use it): the backward pass then needs no extra matmul to recover ``z``. None for
        user pairs.
    """

    name: str
    fn: TensorFn
    derivative: TensorFn
    negative_slope: float | None = None
    derivative_from_output: TensorFn | None = None

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        return self.fn(z)

    def __repr__(self) -> str:
        if self.negative_slope is not None:
            return f"Activation({self.name!r}, negative_slope={self.negative_slope})"
        return f"Activation({self.name!r})"


def _relu_derivative(z: torch.Tensor) -> torch.Tensor:
    return (z > 0).to(z.dtype)


def _leaky_relu_derivative(z: torch.Tensor, slope: float) -> torch.Tensor:
    return torch.where(z > 0, torch.ones_like(z), torch.full_like(z, slope))


def _tanh_derivative(z: torch.Tensor) -> torch.Tensor:
    t = torch.tanh(z)
    return 1.0 - t * t


def _sigmoid_derivative(z: torch.Tensor) -> torch.Tensor:
    s = torch.sigmoid(z)
    return s * (1.0 - s)


def _relu_derivative_from_output(x: torch.Tensor) -> torch.Tensor:
    return (x > 0).to(x.dtype)  # relu(z) > 0 exactly when z > 0


def _tanh_derivative_from_output(x: torch.Tensor) -> torch.Tensor:
    return 1.0 - x * x


def _sigmoid_derivative_from_output(x: torch.Tensor) -> torch.Tensor:
    return x * (1.0 - x)


def _softplus_derivative_from_output(x: torch.Tensor) -> torch.Tensor:
    return -torch.expm1(-x)  # x = log(1 + e^z)  =>  sigmoid(z) = 1 - e^-x


def _identity(z: torch.Tensor) -> torch.Tensor:
    return z


def _ones(z: torch.Tensor) -> torch.Tensor:
    return torch.ones_like(z)


def _leaky_relu(z: torch.Tensor, slope: float) -> torch.Tensor:
    return F.leaky_relu(z, slope)


def _make_leaky_relu(negative_slope: float = 0.01) -> Activation:
    slope = negative_slope
    ok = not isinstance(slope, bool) and isinstance(slope, (int, float)) and 0.0 <= slope <= 1.0
    if not ok:
        raise bad_parameter(
            "negative_slope",
            "leaky_relu",
            "a float in [0, 1]",
            negative_slope,
            "A slope outside [0, 1] makes the activation non-monotone or not 1-Lipschitz.",
        )
    slope = float(slope)
    return Activation(
        "leaky_relu",
        functools.partial(_leaky_relu, slope=slope),
        functools.partial(_leaky_relu_derivative, slope=slope),
        negative_slope=slope,
        # leaky_relu(z) > 0 exactly when z > 0 (slope >= 0), so the same formula applies to the output
        derivative_from_output=functools.partial(_leaky_relu_derivative, slope=slope),
    )


# name -> factory; factories take the activation's own keyword arguments (only leaky_relu has one)
ACTIVATIONS: dict[str, Callable[..., Activation]] = {
    "relu": lambda: Activation("relu", torch.relu, _relu_derivative, None, _relu_derivative_from_output),
    "leaky_relu": _make_leaky_relu,
    "tanh": lambda: Activation("tanh", torch.tanh, _tanh_derivative, None, _tanh_derivative_from_output),
    "sigmoid": lambda: Activation(
        "sigmoid", torch.sigmoid, _sigmoid_derivative, None, _sigmoid_derivative_from_output
    ),
    "softplus": lambda: Activation(
        "softplus", F.softplus, torch.sigmoid, None, _softplus_derivative_from_output
    ),
    "identity": lambda: Activation("identity", _identity, _ones, None, _ones),
}


def check_activation_pair(fn: TensorFn, derivative: TensorFn, *, owner: str = "resolve_activation") -> None:
    """Check a user pair on sample points: phi monotone non-decreasing, 1-Lipschitz, 0 <= phi' <= 1.

    Raises :class:`ConfigError` naming the failed property and a point where it fails.
    """
    z = torch.linspace(-20.0, 20.0, 4001, dtype=torch.float64)
    try:
        y = fn(z.clone())
        d = derivative(z.clone())
    except Exception as exc:  # a user callable can raise anything
        raise ConfigError(
            f"The 'activation' parameter of {owner}: calling the user pair (phi, dphi) on a float64 tensor "
            f"failed with {type(exc).__name__}: {exc}. Both callables must map a tensor to a tensor "
            "of the same shape."
        ) from exc
    if not (torch.is_tensor(y) and torch.is_tensor(d)) or y.shape != z.shape or d.shape != z.shape:
        raise ConfigError(
            f"The 'activation' parameter of {owner}: phi and dphi must return tensors of their input's "
            "shape (they are applied element-wise)."
        )
    y = y.to(torch.float64)
    d = d.to(torch.float64)
    if not (bool(torch.isfinite(y).all()) and bool(torch.isfinite(d).all())):
        raise ConfigError(
            f"The 'activation' parameter of {owner}: phi or dphi returned NaN/Inf on [-20, 20]."
        )
    slopes = torch.diff(y) / torch.diff(z)
    tol = 1e-6
    checks = [
        (slopes < -tol, "monotone non-decreasing (phi(b) >= phi(a) for b > a)", slopes),
        (slopes > 1 + tol, "1-Lipschitz (|phi(b) - phi(a)| <= |b - a|)", slopes),
        (d < -tol, "given with a derivative dphi >= 0", d),
        (d > 1 + tol, "given with a derivative dphi <= 1", d),
    ]
    for bad, what, values in checks:
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ConfigError(
                f"The 'activation' parameter of {owner} must be {what} for the implicit model to be "
                f"well-posed. Got a user pair that fails near z={float(z[i]):.4g} (value {float(values[i]):.4g}). "
                f"Use one of {sorted(ACTIVATIONS)} or fix the pair."
            )


def resolve_activation(spec: Any = "relu", *, owner: str = "resolve_activation", **kwargs: Any) -> Activation:
    """Turn an activation specification into an :class:`Activation`.

    Parameters
    ----------
    spec : str, Activation, (phi, dphi) pair, torch module or function
        A name in :data:`ACTIVATIONS` (``"relu"``, ``"leaky_relu"``, ``"tanh"``, ``"sigmoid"``,
        ``"softplus"``, ``"identity"``), an :class:`Activation`, a user pair of callables (checked with
        :func:`check_activation_pair`), or anything :func:`activation_from_module` accepts
        (``nn.ReLU()``, ``torch.tanh``, ...).
    owner : str
        Who asks, for error messages.
    **kwargs
        Options of a named activation: ``negative_slope`` for ``"leaky_relu"`` (default 0.01).

    Examples
    --------
    >>> resolve_activation("leaky_relu", negative_slope=0.1)
    Activation('leaky_relu', negative_slope=0.1)
    """
    if isinstance(spec, Activation):
        if kwargs:
            raise ConfigError(f"Options {sorted(kwargs)} of {owner} apply to activation names only.")
        return spec
    if isinstance(spec, str):
        factory = ACTIVATIONS.get(spec.lower())
        if factory is None:
            raise bad_parameter(
                "activation", owner, f"one of {sorted(ACTIVATIONS)} or a (phi, dphi) pair", spec
            )
        valid = {"leaky_relu": ["negative_slope"]}.get(spec.lower(), [])
        unknown = sorted(set(kwargs) - set(valid))
        if unknown:
            raise ConfigError(
                f"Unknown option(s) {unknown} for activation {spec!r} of {owner}. Valid options are {valid}."
            )
        return factory(**kwargs)
    if kwargs:
        raise ConfigError(f"Options {sorted(kwargs)} of {owner} apply to activation names only.")
    if isinstance(spec, tuple) and len(spec) == 2 and callable(spec[0]) and callable(spec[1]):
        fn, derivative = spec
        check_activation_pair(fn, derivative, owner=owner)
        return Activation("custom", fn, derivative)
    if isinstance(spec, nn.Module) or callable(spec):
        return activation_from_module(spec)
    raise ConfigTypeError(
        f"The 'activation' parameter of {owner} must be a name in {sorted(ACTIVATIONS)}, an Activation, "
        f"a (phi, dphi) pair of callables or a torch activation module. Got {type(spec).__name__}."
    )


_FUNCTIONS: dict[Any, str] = {
    torch.relu: "relu",
    F.relu: "relu",
    torch.tanh: "tanh",
    F.tanh: "tanh",
    torch.sigmoid: "sigmoid",
    F.sigmoid: "sigmoid",
    F.softplus: "softplus",
    torch.nn.functional.leaky_relu: "leaky_relu",
}


def activation_from_module(module: Any) -> Activation:
    """Map a torch activation (module or function) to an :class:`Activation`.

    Supported: ``nn.ReLU``, ``nn.LeakyReLU(slope)`` with slope in [0, 1], ``nn.Tanh``, ``nn.Sigmoid``,
    ``nn.Softplus`` (``beta=1, threshold=20`` only), ``nn.Identity``, and the functions ``torch.relu``,
    ``F.relu``, ``torch.tanh``, ``F.tanh``, ``torch.sigmoid``, ``F.sigmoid``, ``F.softplus``,
    ``F.leaky_relu`` (default slope 0.01). Anything else raises :class:`UnsupportedLayerError`.
    """
    if isinstance(module, nn.LeakyReLU):
        return _make_leaky_relu(float(module.negative_slope))
    if isinstance(module, nn.Softplus):
        if float(module.beta) != 1.0 or float(module.threshold) != 20.0:
            raise UnsupportedLayerError(
                f"nn.Softplus(beta={module.beta}, threshold={module.threshold}) is not supported: only "
                "beta=1, threshold=20 maps to the 'softplus' activation (beta > 1 is not 1-Lipschitz-safe "
                "here). Use nn.Softplus() or pass a (phi, dphi) pair."
            )
        return ACTIVATIONS["softplus"]()
    for cls, name in (
        (nn.ReLU, "relu"),
        (nn.Tanh, "tanh"),
        (nn.Sigmoid, "sigmoid"),
        (nn.Identity, "identity"),
    ):
        if isinstance(module, cls):
            return ACTIVATIONS[name]()
    try:
        name = _FUNCTIONS.get(module)
    except TypeError:  # unhashable object
        name = None
    if name is not None:
        return ACTIVATIONS[name]()
    known = "nn.ReLU, nn.LeakyReLU, nn.Tanh, nn.Sigmoid, nn.Softplus, nn.Identity, torch.relu, F.relu, ..."
    raise UnsupportedLayerError(
        f"Activation {module!r} ({type(module).__name__}) has no exact implicit-model counterpart. "
        f"Supported: {known}. Pass a (phi, dphi) pair for a custom monotone 1-Lipschitz activation."
    )
