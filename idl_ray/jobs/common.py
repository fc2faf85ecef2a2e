"""Helpers shared by the jobs: reports, output folders, Ray start-up."""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any


def write_report(report: dict[str, Any], output_dir: str | None, name: str) -> pathlib.Path | None:
    """Write ``report`` as ``<output_dir>/<name>.json`` (no-op without an output folder)."""
    if not output_dir:
        return None
    folder = pathlib.Path(output_dir).expanduser().resolve()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    path.write_text(json.dumps(report, indent=2, default=str))
    return path


def ensure_ray(address: str | None, num_cpus: int | None = None) -> bool:
    """Connect to Ray: an existing cluster when ``address`` is given (or when running inside a Ray
    job, where RAY_ADDRESS is set), else a local one on loopback. Returns True when this call started
    Ray, so the caller knows to shut it down."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address or os.environ["RAY_ADDRESS"], log_to_driver=False)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    return True
