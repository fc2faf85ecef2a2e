"""Where a job's teacher comes from (``--teacher``): the user's network, or the default MLP trained here.

``--teacher`` takes

* a TorchScript file (``torch.jit.save``) of a sequential network: its layers (``Linear``, ``ReLU``,
  ``Tanh``, ``LeakyReLU``, ``Flatten``, ``Identity``, ``Dropout``) are rebuilt as a plain
  ``nn.Sequential`` with the same weights, because SIM reads the network's structure with ``torch.fx``,
  which cannot trace a compiled ScriptModule;
* ``package.module:function`` returning an ``nn.Module`` (any network SIM supports);
* a ``state_dict`` file (``torch.save(model.state_dict(), path)``) of the MLP
  :func:`~idl_ray.teachers.mlp_teacher` builds, rebuilt with ``--hidden`` (and ``--activation``).
"""

from __future__ import annotations

import pathlib
import warnings
from typing import Any

import torch
from torch import nn

from idl_ray.errors import ConfigError
from idl_ray.jobs.data_sources import _looks_like_function, load_function

__all__ = ["check_teacher_fits", "load_teacher", "script_to_module"]

_SCRIPT_LAYERS = ("Linear", "ReLU", "Tanh", "LeakyReLU", "Flatten", "Identity", "Dropout")


def load_teacher(
    spec: str, *, hidden: tuple[int, ...], activation: str, input_dim: int
) -> tuple[nn.Module, str]:
    """The user's teacher (in eval mode) and what kind of source it came from."""
    path = pathlib.Path(spec).expanduser()
    if path.is_file():
        return _from_file(path, hidden, activation, input_dim)
    if _looks_like_function(spec):
        model = load_function(spec, "teacher")()
        if not isinstance(model, nn.Module):
            raise ConfigError(
                f"--teacher {spec!r}: the function returned a {type(model).__name__}; it must return a "
                "torch.nn.Module (your trained network)."
            )
        if isinstance(model, torch.jit.ScriptModule):
            return script_to_module(model, spec).eval(), "function (TorchScript)"
        return model.eval(), "function"
    raise ConfigError(
        f"--teacher {spec!r}: no such file, and not a 'module:function'. Give a TorchScript file, a state_dict "
        "file (with --hidden), or 'package.module:function' returning an nn.Module."
    )


def _from_file(path: pathlib.Path, hidden: tuple[int, ...], activation: str, input_dim: int):
    try:
        with warnings.catch_warnings():  # torch >= 2.10 deprecates TorchScript; users still ship it
            warnings.simplefilter("ignore", DeprecationWarning)
            scripted = torch.jit.load(str(path), map_location="cpu")
    except RuntimeError:
        scripted = None
    if scripted is not None:
        return script_to_module(scripted, str(path)).eval(), "torchscript"
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a file that is not a checkpoint
        raise ConfigError(
            f"--teacher {str(path)!r}: neither a TorchScript file nor a state_dict ({exc})."
        ) from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(
            f"--teacher {str(path)!r}: the file holds a {type(state).__name__}, not a state_dict of tensors. "
            "Save it with torch.save(model.state_dict(), path), or save the model with torch.jit.save."
        )
    return _mlp_from_state_dict(state, str(path), hidden, activation, input_dim), "state_dict"


def _mlp_from_state_dict(
    state: dict[str, torch.Tensor], source: str, hidden, activation, input_dim
) -> nn.Module:
    from idl_ray.teachers import mlp_teacher

    weights = [v for k, v in state.items() if k.endswith("weight") and v.ndim == 2]
    if not weights:
        raise ConfigError(
            f"--teacher {source!r}: the state_dict has no 2-D weight matrices (keys {list(state)})."
        )
    shapes = [tuple(w.shape) for w in weights]
    output_dim = shapes[-1][0]
    bias = any(k.endswith("bias") for k in state)
    model = mlp_teacher(input_dim, hidden, output_dim, bias=bias, activation=activation)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        found = [shapes[0][1], *[s[0] for s in shapes[:-1]], output_dim]
        raise ConfigError(
            f"--teacher {source!r}: the state_dict does not fit an MLP {input_dim}-"
            f"{'-'.join(map(str, hidden))}-{output_dim} (--hidden {','.join(map(str, hidden))}); its layer widths "
            f"are {'-'.join(map(str, found))}. Pass --hidden {','.join(map(str, found[1:-1]))}."
        ) from exc
    return model.eval()


def script_to_module(scripted: Any, source: str) -> nn.Sequential:
    """Rebuild a scripted sequential network as an ``nn.Sequential`` with the same weights."""
    layers: list[nn.Module] = []
    children = list(scripted.named_children())
    if not children:
        raise ConfigError(
            f"--teacher {source!r}: the TorchScript module has no sub-layers; SIM needs a sequential network "
            f"of {list(_SCRIPT_LAYERS)}. Pass 'module:function' returning the nn.Module instead."
        )
    for name, child in children:
        kind = getattr(child, "original_name", type(child).__name__)
        state = {k: v.detach().clone() for k, v in child.state_dict().items()}
        if kind == "Linear":
            out_features, in_features = state["weight"].shape
            layer: nn.Module = nn.Linear(in_features, out_features, bias="bias" in state)
            layer.load_state_dict(state)
        elif kind == "LeakyReLU":
            layer = nn.LeakyReLU(float(getattr(child, "negative_slope", 0.01)))
        elif kind == "Flatten":
            layer = nn.Flatten(int(getattr(child, "start_dim", 1)), int(getattr(child, "end_dim", -1)))
        elif kind in ("ReLU", "Tanh", "Identity", "Dropout"):
            layer = getattr(nn, kind)()
        else:
            raise ConfigError(
                f"--teacher {source!r}: layer {name!r} is a {kind}; a TorchScript teacher must be a sequential "
                f"network of {list(_SCRIPT_LAYERS)}. For other networks pass 'module:function' returning the "
                "nn.Module."
            )
        layers.append(layer)
    return nn.Sequential(*layers)


@torch.no_grad()
def check_teacher_fits(teacher: nn.Module, x: torch.Tensor, source: str) -> int:
    """Run the teacher on two samples; returns its output width or says why the data does not fit."""
    try:
        out = teacher(x[:2])
    except Exception as exc:  # shape mismatches surface as RuntimeError from torch
        raise ConfigError(
            f"--teacher {source!r} does not run on the data ({x.shape[1]} features per sample): {exc}. "
            "Check that --data has the width the teacher was trained on."
        ) from exc
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        raise ConfigError(
            f"--teacher {source!r} must return a (samples, outputs) tensor. Got "
            f"{getattr(out, 'shape', type(out).__name__)}."
        )
    return int(out.shape[1])
