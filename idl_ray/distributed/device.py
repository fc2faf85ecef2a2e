"""The torch device of an actor, taken from what Ray assigned to it, never assumed.

Ray gives a GPU actor a list of accelerator ids (``ray.get_runtime_context().get_accelerator_ids()``)
and, unless told otherwise, restricts ``CUDA_VISIBLE_DEVICES`` to them, so the first assigned GPU is
``cuda:0`` inside the actor. :func:`device_from_assignment` does that mapping as a pure function, so it
can be tested on the ids Ray reports without a GPU.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from idl_ray.errors import DistributedError


def device_from_assignment(
    gpu_ids: Sequence[str | int],
    visible_devices: str | None,
    *,
    cuda_available: bool,
    cuda_count: int | None = None,
) -> torch.device:
    """Map the GPU ids Ray assigned to an actor to the torch device it should use.

    Parameters
    ----------
    gpu_ids : sequence of str or int
        The ids from ``get_accelerator_ids()["GPU"]`` (or ``ray.get_gpu_ids()``); empty for a CPU actor.
    visible_devices : str or None
        The actor's ``CUDA_VISIBLE_DEVICES``. When set, CUDA renumbers the listed devices from 0, so the
        device index is the position of the first assigned id in that list; when unset, the id itself.
    cuda_available : bool
        ``torch.cuda.is_available()`` inside the actor.
    cuda_count : int, optional
        ``torch.cuda.device_count()``, to check the index exists.

    Returns
    -------
    torch.device
        ``cpu`` without assigned GPUs, ``cuda:<index>`` otherwise.

    Raises
    ------
    DistributedError
        Ray assigned a GPU but torch cannot use CUDA there, or the id is not visible.

    Examples
    --------
    >>> device_from_assignment([], None, cuda_available=False)
    device(type='cpu')
    >>> device_from_assignment(["3"], "3", cuda_available=True)
    device(type='cuda', index=0)
    >>> device_from_assignment(["3"], "1,3", cuda_available=True)
    device(type='cuda', index=1)
    """
    ids = [str(i).strip() for i in gpu_ids]
    if not ids:
        return torch.device("cpu")
    if not cuda_available:
        raise DistributedError(
            f"Ray assigned GPU id(s) {ids} to this actor but torch cannot use CUDA here "
            f"(torch {torch.__version__}, torch.cuda.is_available() is False). Install a CUDA build of "
            "torch on the workers, or run with use_gpu=False."
        )
    first = ids[0]
    if visible_devices is not None and visible_devices.strip() != "":
        listed = [v.strip() for v in visible_devices.split(",")]
        if first not in listed:
            raise DistributedError(
                f"Ray assigned GPU {first} but CUDA_VISIBLE_DEVICES={visible_devices!r} does not list it; "
                "do not override CUDA_VISIBLE_DEVICES inside Ray workers."
            )
        index = listed.index(first)
    else:
        try:
            index = int(first)
        except ValueError as exc:
            raise DistributedError(
                f"GPU id {first!r} is not an index and CUDA_VISIBLE_DEVICES is unset; cannot map it."
            ) from exc
    if cuda_count is not None and index >= cuda_count:
        raise DistributedError(
            f"Ray assigned GPU {first} (cuda:{index}) but torch sees only {cuda_count} device(s)."
        )
    return torch.device("cuda", index)


def assigned_gpu_ids() -> list[str]:
    """The GPU ids Ray assigned to the calling worker (empty outside GPU actors)."""
    import ray

    ids = ray.get_runtime_context().get_accelerator_ids().get("GPU", [])
    return [str(i) for i in ids]


def actor_device() -> torch.device:
    """The device of the calling Ray actor, from its assignment (call inside the actor)."""
    available = torch.cuda.is_available()
    return device_from_assignment(
        assigned_gpu_ids(),
        os.environ.get("CUDA_VISIBLE_DEVICES"),
        cuda_available=available,
        cuda_count=torch.cuda.device_count() if available else None,
    )


__all__ = ["actor_device", "assigned_gpu_ids", "device_from_assignment"]
