"""A Parquet sink for teacher states, and the readers that fit from it.

:func:`write_states` runs the teacher on a ``ray.data.Dataset`` through the actor pool of
:mod:`idl_ray.distributed.extraction` and writes the states, in dataset order, as Parquet shards. One
directory per run::

    <path>/_run.json                the write's settings (written first; identifies an interrupted run)
    <path>/structure.safetensors    the teacher's exact implicit weights A*, B*, C*, D* (float64)
    <path>/part-00000.parquet ...   shard k holds rows [k R, (k + 1) R) of the dataset, R = rows_per_shard
    <path>/_manifest.json           written LAST: its presence means the directory is complete

Schema of every shard (one row per sample; ``dtype`` is float32 or float64, as written)::

    row : int64                         the sample's position in the dataset
    U   : fixed_size_list<dtype>[p]     inputs flattened, plus a last 1 when the teacher has biases
    Z   : fixed_size_list<dtype>[n]     pre-activations of all hidden layers, in layer order
    X   : fixed_size_list<dtype>[n]     X = phi(Z)
    Y   : fixed_size_list<dtype>[q]     teacher outputs

These are the teacher's own states (no rescaling). ``_manifest.json`` records the format
(``"idl_ray.states/1"``), the widths, dtype, row count, the teacher's shapes and activation, and every
shard's file, first row and row count. A shard is written to a hidden temporary file and renamed, so a
file named ``part-*.parquet`` is always whole; rerunning :func:`write_states` on an interrupted directory
keeps the finished shards (only the missing ones are written).

Reading back: :meth:`SIM.fit_states <idl_ray.sim.estimator.SIM.fit_states>` (rescaling and
``regenerate_states`` as in ``SIM.fit``), or :meth:`ShardedProblem.from_parquet
<idl_ray.distributed.sharded.ShardedProblem.from_parquet>` with ``feature_columns=("X", "U")`` and
``target_columns=("Z",)`` (stage 1) or ``("Y",)`` (stage 2), which checks the manifest first. A directory
without a manifest, or whose shards do not match it, is rejected with a :class:`ConfigError` saying why.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from idl_ray._validation import check_positive_int
from idl_ray.errors import ConfigError
from idl_ray.sim.extraction import TeacherStructure
from idl_ray.sim.problem import GramStats, SampleData
from idl_ray.sim.stages import regenerated_features, stage_batch

__all__ = ["FORMAT", "fit_states", "iter_states", "load_structure", "read_manifest", "write_states"]

FORMAT = "idl_ray.states/1"
MANIFEST = "_manifest.json"
RUN_FILE = "_run.json"
STRUCTURE_FILE = "structure.safetensors"
STATE_COLUMNS = ("U", "Z", "X", "Y")
_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def _shard_name(k: int) -> str:
    return f"part-{k:05d}.parquet"


def _write_json(path: Path, value: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=2))
    os.replace(tmp, path)


def _shard_rows(path: Path) -> int | None:
    """Rows of a finished shard file, or None if it is missing or unreadable."""
    import pyarrow.parquet as pq

    try:
        return int(pq.ParquetFile(path).metadata.num_rows)
    except Exception:
        return None


def _write_shard(path: Path, batch: dict[str, np.ndarray], first_row: int, dtype: np.dtype) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    b = len(batch["U"])
    columns = {"row": pa.array(np.arange(first_row, first_row + b, dtype=np.int64))}
    for name in STATE_COLUMNS:
        values = np.ascontiguousarray(batch[name], dtype=dtype)
        columns[name] = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1])
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(pa.table(columns), tmp)
    os.replace(tmp, path)  # a part-*.parquet file is always whole


def write_states(
    teacher: Any,
    dataset: Any,
    path: str | os.PathLike[str],
    *,
    input_column: str | None = None,
    dtype: torch.dtype = torch.float32,
    rows_per_shard: int = 65536,
    stream: Any = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write a teacher's states on a ``ray.data.Dataset`` as Parquet shards (schema: module docstring).

    Parameters
    ----------
    teacher : nn.Module, or a picklable zero-argument callable returning one (called once per actor)
    dataset : ray.data.Dataset of inputs (one tensor column, or ``input_column``)
    path : directory of this run (created; one directory per run)
    input_column : str, optional, the column of inputs
    dtype : torch.float32 (default) or torch.float64, the teacher's and the stored states' dtype
    rows_per_shard : int, default 65536, rows per Parquet file (the driver holds one shard at a time)
    stream : StreamConfig or dict, optional, the actor pool (see :mod:`idl_ray.distributed.extraction`)
    overwrite : bool, default False
        Start afresh, removing this format's files in ``path``. Without it, a complete directory is
        returned as it is and an interrupted one is resumed (its finished shards are kept).

    Returns
    -------
    dict, the manifest, plus ``"written"`` / ``"kept"``: the shard indices written / kept by this call.
    """
    from idl_ray.distributed.extraction import stream_states

    check_positive_int(rows_per_shard, "rows_per_shard", "write_states")
    if dtype not in (torch.float32, torch.float64):
        raise ConfigError(
            f"The 'dtype' argument of write_states must be torch.float32 or float64. Got {dtype}."
        )
    root = Path(path)
    if overwrite and root.is_dir():
        for item in root.iterdir():
            if item.name in (MANIFEST, RUN_FILE, STRUCTURE_FILE) or item.name.startswith(("part-", ".part-")):
                item.unlink()
    if (root / MANIFEST).exists():
        return {**read_manifest(root), "written": [], "kept": "all"}
    start = time.perf_counter()
    batches, structure, column = stream_states(
        teacher, dataset, input_column=input_column, dtype=dtype, stream=stream, rows=rows_per_shard
    )
    dtype_name = str(dtype).replace("torch.", "")
    run = {
        "format": FORMAT,
        "rows_per_shard": rows_per_shard,
        "dtype": dtype_name,
        "widths": {
            "U": structure.num_inputs,
            "Z": structure.num_hidden,
            "X": structure.num_hidden,
            "Y": structure.num_outputs,
        },
    }
    root.mkdir(parents=True, exist_ok=True)
    if (root / RUN_FILE).exists():
        previous = json.loads((root / RUN_FILE).read_text())
        if previous != run:
            raise ConfigError(
                f"{root} holds an interrupted write with other settings ({previous}); this call has {run}. "
                "Resume with the same settings, pass overwrite=True, or write to another directory."
            )
    else:
        _write_json(root / RUN_FILE, run)
    from safetensors.torch import save_file

    save_file({k: getattr(structure, k).contiguous() for k in "ABCD"}, str(root / STRUCTURE_FILE))
    shards, written, kept, first = [], [], [], 0
    np_dtype = np.dtype(dtype_name)
    for k, batch in enumerate(batches):
        b = len(batch["U"])
        file = root / _shard_name(k)
        if _shard_rows(file) == b:
            kept.append(k)
        else:
            _write_shard(file, batch, first, np_dtype)
            written.append(k)
        shards.append({"file": file.name, "first_row": first, "num_rows": b})
        first += b
    manifest = {
        **run,
        "num_rows": first,
        "input_column": column,
        "structure": {
            "file": STRUCTURE_FILE,
            "input_shape": list(structure.input_shape),
            "layer_sizes": list(structure.layer_sizes),
            "layer_shapes": [list(s) for s in structure.layer_shapes],
            "num_outputs": structure.num_outputs,
            "activation": structure.activation,
            "negative_slope": structure.negative_slope,
            "bias": structure.bias,
        },
        "shards": shards,
        "write_time_s": time.perf_counter() - start,
    }
    _write_json(root / MANIFEST, manifest)  # last: the directory is complete from here on
    return {**manifest, "written": written, "kept": kept}


def read_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest of a complete states directory, after checking every shard against it."""
    root = Path(path)
    if not root.is_dir():
        raise ConfigError(f"{root} is not a directory of states written by write_states.")
    if not (root / MANIFEST).exists():
        parts = sorted(p.name for p in root.glob("part-*.parquet"))
        if (root / RUN_FILE).exists() or parts:
            raise ConfigError(
                f"{root} holds an incomplete state write: no {MANIFEST} ({len(parts)} shard file(s) present). "
                "Rerun write_states with the same arguments to finish it (finished shards are kept)."
            )
        raise ConfigError(f"{root} is not a states directory written by write_states (no {MANIFEST}).")
    try:
        manifest = json.loads((root / MANIFEST).read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{root / MANIFEST} is corrupted (not JSON: {exc}); rewrite the states.") from exc
    if manifest.get("format") != FORMAT:
        raise ConfigError(f"{root / MANIFEST} has format {manifest.get('format')!r}; expected {FORMAT!r}.")
    for shard in manifest["shards"]:
        rows = _shard_rows(root / shard["file"])
        if rows != shard["num_rows"]:
            state = (
                "is missing"
                if not (root / shard["file"]).exists()
                else ("cannot be read as Parquet" if rows is None else f"has {rows} rows")
            )
            raise ConfigError(
                f"{root} is corrupted: shard {shard['file']} {state}; the manifest says {shard['num_rows']} "
                "rows. Rewrite the states (write_states(..., overwrite=True))."
            )
    if not (root / STRUCTURE_FILE).exists():
        raise ConfigError(f"{root} is corrupted: {STRUCTURE_FILE} is missing. Rewrite the states.")
    return manifest


def shard_paths(path: str | os.PathLike[str]) -> list[str]:
    """The shard files of a complete states directory, in row order (checked against the manifest)."""
    root = Path(path)
    return [os.fspath(root / s["file"]) for s in read_manifest(root)["shards"]]


def load_structure(path: str | os.PathLike[str], manifest: dict[str, Any] | None = None) -> TeacherStructure:
    """The teacher's :class:`TeacherStructure` stored with its states."""
    from safetensors.torch import load_file

    root = Path(path)
    manifest = read_manifest(root) if manifest is None else manifest
    s = manifest["structure"]
    weights = load_file(str(root / s["file"]))
    return TeacherStructure(
        input_shape=tuple(s["input_shape"]),
        num_inputs=manifest["widths"]["U"],
        layer_sizes=list(s["layer_sizes"]),
        layer_shapes=[tuple(x) for x in s["layer_shapes"]],
        num_outputs=s["num_outputs"],
        activation=s["activation"],
        negative_slope=s["negative_slope"],
        bias=bool(s["bias"]),
        **{k: weights[k] for k in "ABCD"},
    )


def iter_states(
    path: str | os.PathLike[str], *, columns: Sequence[str] = STATE_COLUMNS, batch_size: int = 65536
) -> Iterator[dict[str, np.ndarray]]:
    """Batches ``{column: (b, width) array}`` of a complete states directory, in row order."""
    import pyarrow.parquet as pq

    from idl_ray.distributed.shards import _arrow_column

    for file in shard_paths(path):
        for record_batch in pq.ParquetFile(file).iter_batches(batch_size=batch_size, columns=list(columns)):
            yield {name: _arrow_column(record_batch.column(name)) for name in columns}


def fit_states(sim: Any, path: str | os.PathLike[str], solver: Any, cfg: dict[str, Any]) -> Any:
    """``SIM.fit_states``: the stage statistics from a states directory (two passes with regeneration)."""
    start = time.perf_counter()
    manifest = read_manifest(path)
    structure = load_structure(path, manifest)
    scales = sim._setup(structure, cfg)
    dtype = cfg["dtype"]
    keep = solver.needs_samples or cfg["variant"] == "exact"
    stats: GramStats | None = None
    feats: list[torch.Tensor] = []
    targs: list[torch.Tensor] = []
    for batch in iter_states(path):
        U, Z, X, Y = (
            torch.from_numpy(np.require(batch[k], requirements="W")).to(dtype) for k in STATE_COLUMNS
        )
        features, targets = stage_batch(U, Z, X, Y, scales)
        stats = GramStats.accumulate(stats, features, targets)
        if keep:
            feats.append(features)
            targs.append(targets)
    assert stats is not None  # a manifest lists at least one shard
    samples = SampleData(torch.cat(feats), torch.cat(targs)) if keep else None

    def regenerate(A: torch.Tensor, B: torch.Tensor) -> tuple[GramStats, SampleData | None]:
        from idl_ray.sim.stages import fixed_point_weights

        act = sim._activation_object(structure)
        condition = cfg.get("well_posedness", "inf_norm")
        Ad, Bd = fixed_point_weights(A, B, cfg["kappa"], dtype, cfg["device"], condition)
        out: GramStats | None = None
        f2: list[torch.Tensor] = []
        t2: list[torch.Tensor] = []
        for batch in iter_states(path, columns=("U", "Y")):
            U, Y = (torch.from_numpy(np.require(batch[k], requirements="W")).to(dtype) for k in ("U", "Y"))
            features = regenerated_features(Ad, Bd, U, act, cfg["fixed_point"], condition)
            out = GramStats.accumulate(out, features, Y)
            if keep:
                f2.append(features.cpu())
                t2.append(Y)
        assert out is not None
        return out, (SampleData(torch.cat(f2), torch.cat(t2)) if keep else None)

    return sim._fit_stages(
        structure, scales, stats, samples, solver, cfg, regenerate, time.perf_counter() - start
    )
