"""Job: report versions, compute devices and (optionally) the Ray cluster's resources."""

from __future__ import annotations

import platform
from typing import Any


def run_info_job(*, with_ray: bool = False, address: str | None = None, log=print) -> dict[str, Any]:
    """Collect what idl_ray would run on: library versions, torch devices, Ray resources."""
    import numpy
    import torch

    from idl_ray._version import __version__

    report: dict[str, Any] = {
        "idl_ray": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "cuda_available": torch.cuda.is_available(),
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "cpu_threads": torch.get_num_threads(),
    }
    try:
        import ray

        report["ray"] = ray.__version__
    except ImportError:  # pragma: no cover - ray is a dependency
        report["ray"] = None
    if with_ray:
        import ray

        from idl_ray.jobs.common import ensure_ray

        started = ensure_ray(address)
        try:
            report["ray_resources"] = ray.cluster_resources()
        finally:
            if started:
                ray.shutdown()
    for key, value in report.items():
        log(f"{key:>15}: {value}")
    return report
