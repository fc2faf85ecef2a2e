"""Helpers shared by the jobs: reports, output folders, Ray start-up."""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

from idl_ray._validation import bad_parameter
from idl_ray.errors import ClusterConfigError, DistributedError


def write_report(report: dict[str, Any], output_dir: str | None, name: str) -> pathlib.Path | None:
    """Write ``report`` as ``<output_dir>/<name>.json`` (no-op without an output folder)."""
    if not output_dir:
        return None
    folder = pathlib.Path(output_dir).expanduser().resolve()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    path.write_text(json.dumps(report, indent=2, default=str))
    return path


def prepare_output_dir(output_dir: str | None, owner: str) -> pathlib.Path | None:
    """Create ``output_dir`` (and its parents) before any work, so a path that cannot hold the results
    (an existing file, a read-only place) fails at once instead of after the whole run."""
    if not output_dir:
        return None
    folder = pathlib.Path(output_dir).expanduser()
    if folder.exists() and not folder.is_dir():
        raise bad_parameter(
            "output_dir",
            owner,
            "a folder (created if missing)",
            output_dir,
            "It is an existing file; pass a folder path (--output-dir DIR).",
        )
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise bad_parameter(
            "output_dir", owner, "a folder that can be created", output_dir, f"{exc.strerror or exc}."
        ) from None
    if not os.access(folder, os.W_OK):
        raise bad_parameter("output_dir", owner, "a writable folder", output_dir)
    return folder.resolve()


#: seconds to wait for a TCP connection to a Ray address before giving up
CONNECT_TIMEOUT_S = 5.0


def check_reachable(address: str, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """Raise :class:`DistributedError` unless ``host:port`` (or ``ray://host:port``) accepts a TCP
    connection within ``timeout_s``: ``ray.init`` itself retries an unreachable GCS for minutes."""
    import socket

    text = address.strip()
    client = text.startswith("ray://")
    if client:
        text = text[len("ray://") :]
    if text in ("auto", "local") or "://" in text:
        return  # resolved by Ray itself (a local cluster file, or a new local instance)
    host, sep, port_text = text.rpartition(":")
    if not sep:
        host, port_text = text, "10001" if client else "6379"
    host = host.strip("[]") or "127.0.0.1"
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ClusterConfigError(
            f"The Ray address {address!r} is not host:port (e.g. 127.0.0.1:6379, ray://head:10001 or auto)."
        )
    try:
        with socket.create_connection((host, int(port_text)), timeout=timeout_s):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ClusterConfigError(
            f"Cannot reach a Ray cluster at {address!r} ({reason}; waited at most {timeout_s:g} s). Check that the "
            "head node is running (ray start --head) and that host and port are its GCS address "
            "(default port 6379; ray:// client addresses use 10001), or omit --address for a local Ray."
        ) from None


def ensure_ray(address: str | None, num_cpus: int | None = None) -> bool:
    """Connect to Ray: an existing cluster when ``address`` is given (or when running inside a Ray
    job, where RAY_ADDRESS is set), else a local one on loopback. Returns True when this call started
    Ray, so the caller knows to shut it down. An unreachable address fails within seconds."""
    import logging

    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    if address or os.environ.get("RAY_ADDRESS"):
        target = address or os.environ["RAY_ADDRESS"]
        check_reachable(target)
        try:
            ray.init(address=target, log_to_driver=False, logging_level=logging.ERROR)
        except ConnectionError as exc:
            raise DistributedError(
                f"Could not connect to the Ray cluster at {target!r}: {str(exc).splitlines()[0]}"
            ) from None
    else:
        # no INFO/WARNING lines from Ray on stderr (start-up, token auth): the job's own output is what
        # the user reads, and an error stays one line
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    return True


#: activations of the default MLP teacher a job trains
TEACHER_ACTIVATIONS = ("relu", "tanh", "leaky_relu")


def check_teacher_settings(config: Any, owner: str) -> None:
    """The teacher settings the sim and extract jobs share: the embedded ``dataset``, the MLP's ``hidden``
    widths, its ``teacher_epochs`` and ``activation`` (one message per bad value, naming the field)."""
    from idl_ray._validation import bad_parameter, check_choice, check_positive_int
    from idl_ray.datasets import DATASETS

    check_choice(config.dataset, "dataset", owner, DATASETS)
    hidden = config.hidden
    if not hidden or any(isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in hidden):
        raise bad_parameter("hidden", owner, "a non-empty tuple of positive layer widths", hidden)
    check_positive_int(config.teacher_epochs, "teacher_epochs", owner)
    check_choice(config.activation, "activation", owner, TEACHER_ACTIVATIONS)
