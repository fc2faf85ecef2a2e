"""The one exception hierarchy of idl_ray, and its warnings.

Every error a user can trigger derives from :class:`IDLError`. Errors about a bad argument are also
``ValueError`` or ``TypeError`` so generic handlers keep working. Messages name the argument, the value
received and how to fix it (see :func:`idl_ray._validation.bad_parameter`).
"""

from __future__ import annotations


class IDLError(Exception):
    """Base class of every error raised by idl_ray."""


class ConfigError(IDLError, ValueError):
    """An argument or setting has an invalid value (wrong range, unknown name, NaN, ...)."""


class ConfigTypeError(IDLError, TypeError):
    """An argument has the wrong type."""


class ShapeError(ConfigError):
    """Arrays or tensors whose shapes do not fit together."""


class WellPosednessError(IDLError, ValueError):
    """A model or weight matrix violates the well-posedness bound ||A||_inf <= kappa < 1."""


class UnsupportedLayerError(ConfigError):
    """A teacher network contains a layer that SIM cannot represent exactly."""


class SolverError(IDLError, RuntimeError):
    """A solver failed (numerical breakdown, infeasible problem, backend error)."""


class NotFittedError(IDLError, AttributeError):
    """An estimator was used before ``fit``."""


class DistributedError(IDLError, RuntimeError):
    """A Ray-side failure: missing resources, a dead actor that could not be recovered, a time-out."""


class ClusterConfigError(DistributedError, ConfigError):
    """A Ray cluster that cannot serve the request as given (unreachable address, too few resources),
    found before any work: a :class:`DistributedError` for Ray code and bad input (a :class:`ConfigError`,
    exit code 2) for the command line."""


class ConvergenceWarning(UserWarning):
    """An iterative method stopped at its iteration cap before reaching its tolerance."""


class WellPosednessWarning(UserWarning):
    """A result does not satisfy the well-posedness bound (e.g. an unconstrained least-squares fit)."""


__all__ = [
    "ConfigError",
    "ConfigTypeError",
    "ConvergenceWarning",
    "DistributedError",
    "IDLError",
    "NotFittedError",
    "ShapeError",
    "SolverError",
    "UnsupportedLayerError",
    "WellPosednessError",
    "WellPosednessWarning",
]
