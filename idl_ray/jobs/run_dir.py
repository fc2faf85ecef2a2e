"""A job's run directory: ``runs/<job>-<timestamp>/`` by default, or ``--output-dir``.

It holds the effective settings (``config.yaml``, which ``--config`` reloads to the same settings),
``report.json``, the fitted model and, when matplotlib is installed, the plots and ``report.md``.
"""

from __future__ import annotations

import datetime
import json
import pathlib
from typing import Any

from idl_ray.errors import ConfigError

__all__ = ["make_run_dir", "write_config", "write_json"]


def make_run_dir(job: str, output_dir: str | None, *, root: str | pathlib.Path = "runs") -> pathlib.Path:
    """Create and return the run directory (``root/<job>-<UTC timestamp>`` unless ``output_dir`` is given).

    A default name that already exists gets a ``-2``, ``-3``... suffix, so two runs started in the same
    second never share a directory.
    """
    if output_dir:
        from idl_ray.jobs.common import prepare_output_dir

        return prepare_output_dir(output_dir, f"idl-ray {job}")
    else:
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
        base = pathlib.Path(root) / f"{job}-{stamp}"
        folder, k = base, 1
        while folder.exists():
            k += 1
            folder = base.with_name(f"{base.name}-{k}")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"--output-dir: cannot create {str(folder)!r} ({exc}). Choose a writable path."
        ) from exc
    return folder.resolve()


def _plain(value: Any) -> Any:
    """YAML/JSON-friendly copy: tuples become lists."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def write_config(folder: pathlib.Path, settings: dict[str, Any], *, command: str) -> pathlib.Path:
    """Write ``config.yaml``: the effective settings, reloadable with ``idl-ray <command> --config``."""
    import yaml

    path = folder / "config.yaml"
    header = f"# Effective settings of this run; rerun with `idl-ray {command} --config {path.name}`.\n"
    path.write_text(header + yaml.safe_dump(_plain(settings), sort_keys=False))
    return path


def write_json(folder: pathlib.Path, name: str, payload: dict[str, Any]) -> pathlib.Path:
    """Write ``folder/name`` as indented JSON (non-JSON values as strings)."""
    path = folder / name
    path.write_text(json.dumps(payload, indent=2, default=str))
    return path
