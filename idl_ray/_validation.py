"""Argument validation shared by every public entry point.

One message template for every bad argument::

    The 'kappa' parameter of ImplicitModel must be a float in [0, 1). Got 1.5 instead. <fix>

and one base for settings dataclasses (:class:`Options`) whose ``from_dict`` rejects unknown keys and
names the valid ones, so the CLI, config files and Python calls are checked the same way.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

import torch

from idl_ray.errors import ConfigError, ConfigTypeError, ShapeError

T = TypeVar("T", bound="Options")


def bad_parameter(name: str, owner: str, expected: str, got: Any, fix: str = "") -> ConfigError:
    """Build the standard error for a parameter with an invalid value."""
    message = f"The '{name}' parameter of {owner} must be {expected}. Got {got!r} instead."
    if fix:
        message += f" {fix}"
    return ConfigError(message)


def check_kappa(kappa: Any, owner: str) -> float:
    """Return ``kappa`` as a float after checking 0 <= kappa < 1."""
    if isinstance(kappa, bool) or not isinstance(kappa, (int, float)) or not math.isfinite(kappa):
        raise bad_parameter("kappa", owner, "a finite float in [0, 1)", kappa)
    if not 0.0 <= kappa < 1.0:
        raise bad_parameter(
            "kappa",
            owner,
            "a float in [0, 1)",
            kappa,
            "The well-posedness bound ||A||_inf <= kappa needs kappa < 1 for a unique, convergent fixed "
            "point; 0.95 or 0.99 are usual choices.",
        )
    return float(kappa)


def check_positive_int(
    value: Any, name: str, owner: str, *, allow_none: bool = False, allow_zero: bool = False
) -> int | None:
    """Return ``value`` after checking it is an integer >= 1 (>= 0 when allowed; or None when allowed)."""
    if value is None and allow_none:
        return None
    lowest = 0 if allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
        expected = "an integer >= 0" if allow_zero else "a positive integer"
        raise bad_parameter(name, owner, expected + (" or None" if allow_none else ""), value)
    return value


def check_positive_float(value: Any, name: str, owner: str, *, allow_zero: bool = False) -> float:
    """Return ``value`` as a float after checking it is finite and > 0 (or >= 0)."""
    ok = (
        not isinstance(value, bool)
        and isinstance(value, (int, float))
        and math.isfinite(value)
        and (value >= 0 if allow_zero else value > 0)
    )
    if not ok:
        raise bad_parameter(name, owner, "a finite float " + (">= 0" if allow_zero else "> 0"), value)
    return float(value)


def check_choice(value: Any, name: str, owner: str, choices: Iterable[str]) -> str:
    """Return ``value`` after checking it is one of ``choices``; the error lists them."""
    options = sorted(choices)
    if not isinstance(value, str) or value not in options:
        raise bad_parameter(name, owner, f"one of {options}", value)
    return value


def check_finite(tensor: torch.Tensor, name: str, owner: str, *, where: str = "") -> None:
    """Raise if ``tensor`` holds NaN or Inf, saying how many entries are bad and in which rows.

    ``where`` locates the tensor in the user's data (e.g. ``"batch 3 (samples 768-1023)"``).
    """
    if tensor.is_floating_point() or tensor.is_complex():
        bad = ~torch.isfinite(tensor)
        if bool(bad.any()):
            count = int(bad.sum())
            rows = ""
            if tensor.dim() >= 2:
                bad_rows = bad.reshape(bad.shape[0], -1).any(dim=1).nonzero().flatten()[:5].tolist()
                rows = f" (first bad row(s){' of it' if where else ''}: {bad_rows})"
            place = f" in {where}" if where else ""
            raise ConfigError(
                f"The '{name}' argument of {owner} contains {count} NaN or Inf value(s) out of "
                f"{tensor.numel()}{place}{rows}. Clean or impute the data before passing it."
            )


def check_device(device: Any, name: str, owner: str) -> torch.device:
    """``device`` as a ``torch.device`` after checking it exists on this machine (CUDA available, index
    in range), so a missing GPU is reported before any work rather than by the first tensor moved there."""
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise bad_parameter(name, owner, "a torch device such as 'cpu' or 'cuda:0'", device) from exc
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise bad_parameter(
                name,
                owner,
                "a device available on this machine",
                device,
                "CUDA is not available here (torch.cuda.is_available() is False); use 'cpu', or leave the "
                "device unset to pick CUDA only when present.",
            )
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise bad_parameter(
                name,
                owner,
                f"a CUDA device index below {torch.cuda.device_count()} (the GPUs visible here)",
                device,
            )
    return resolved


def check_width(tensor: torch.Tensor, expected: int, name: str, owner: str) -> None:
    """Raise a :class:`ShapeError` if the last dimension of ``tensor`` is not ``expected``."""
    if tensor.dim() == 0 or tensor.shape[-1] != expected:
        raise ShapeError(
            f"The '{name}' argument of {owner} must have {expected} features in its last dimension. "
            f"Got shape {tuple(tensor.shape)} instead."
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class Options:
    """Base of settings dataclasses: frozen, keyword-only, validated, built from dicts strictly.

    Subclasses validate their fields in ``__post_init__`` (via :meth:`_validate`).
    """

    def __post_init__(self) -> None:
        self._validate()

    def _validate(self) -> None:  # pragma: no cover - overridden
        """Check every field; raise :class:`ConfigError` on the first bad one."""

    @classmethod
    def from_dict(cls: type[T], values: Mapping[str, Any] | None) -> T:
        """Build from a mapping, rejecting unknown keys and naming the valid ones."""
        if values is None:
            return cls()
        if not isinstance(values, Mapping):
            raise ConfigTypeError(f"{cls.__name__}.from_dict expects a mapping. Got {type(values).__name__}.")
        valid = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - valid)
        if unknown:
            raise ConfigError(
                f"Unknown option(s) {unknown} for {cls.__name__}.{did_you_mean(unknown, valid)} "
                f"Valid options are {sorted(valid)}."
            )
        fields = {f.name: f for f in dataclasses.fields(cls)}
        # JSON and YAML have no tuples: accept a list where the field holds a tuple
        converted = {
            key: tuple(value) if isinstance(value, list) and isinstance(fields[key].default, tuple) else value
            for key, value in values.items()
        }
        return cls(**converted)

    @classmethod
    def coerce(cls: type[T], value: T | Mapping[str, Any] | None) -> T:
        """``value`` as settings: an instance as it is, None as the defaults, a mapping via :meth:`from_dict`."""
        if isinstance(value, cls):
            return value
        return cls.from_dict(value)

    def to_dict(self) -> dict[str, Any]:
        """The settings as a plain dict (JSON-friendly when the fields are)."""
        return dataclasses.asdict(self)

    def replace(self: T, **changes: Any) -> T:
        """A copy with some fields changed (validated again); unknown names are rejected."""
        valid = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - valid)
        if unknown:
            raise ConfigError(
                f"Unknown option(s) {unknown} for {type(self).__name__}. Valid options are {sorted(valid)}."
            )
        return dataclasses.replace(self, **changes)


def reject_unknown_kwargs(kwargs: Mapping[str, Any], owner: str, valid: Iterable[str]) -> None:
    """Raise for keyword arguments that ``owner`` does not know (never swallow them)."""
    if kwargs:
        raise ConfigError(
            f"Unknown keyword argument(s) {sorted(kwargs)} for {owner}.{did_you_mean(kwargs, valid)} "
            f"Valid ones are {sorted(valid)}."
        )


def did_you_mean(names: Iterable[str], valid: Iterable[str]) -> str:
    """`` Did you mean 'kappa'?`` for misspelt names (empty when nothing is close)."""
    import difflib

    options = sorted(valid)
    close = [m for name in sorted(names) for m in difflib.get_close_matches(str(name), options, n=1)]
    if not close:
        return ""
    return " Did you mean " + " / ".join(repr(m) for m in dict.fromkeys(close)) + "?"


def resolve_settings(
    owner: str, argument: str, label: str, given: Any, values: dict[str, Any], settings_type: type[T]
) -> T:
    """A settings object from ``argument=`` (an instance or a dict) or from keywords, never both."""
    if given is not None and values:
        raise ConfigError(
            f"{owner}: pass either {argument}=... or {label} keywords {sorted(values)}, not both."
        )
    if isinstance(given, dict):
        given = settings_type.from_dict(given)
    if given is None:
        given = settings_type.from_dict(values)
    if not isinstance(given, settings_type):
        raise ConfigTypeError(f"{owner}: {argument} must be a {settings_type.__name__} or a dict.")
    return given
