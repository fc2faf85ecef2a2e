"""Teacher states on disk: Parquet shards plus the teacher's structure, for ``idl-ray extract`` / ``solve``.

Layout of a states folder::

    states/part-00000.parquet ...   one row per sample: u (p), z (n), x (n), y (q) as fixed-size float
                                    lists (batch-first: row k is column k of DESIGN.md's U, Z, X, Y),
                                    and ``label`` when the data had labels
    states/structure.json           shapes, activation, bias flag (TeacherStructure without tensors)
    states/teacher_weights.safetensors   the teacher's exact (A*, B*, C*, D*) (for state rescaling)

This is the in-process writer (one pass, one batch in memory at a time); the Ray Data pipeline of the
streaming-extraction issue is meant to write the same kind of shards from a pool of actors.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from idl_ray.errors import ConfigError
from idl_ray.sim.extraction import SIMStates, TeacherStructure

__all__ = ["StatesWriter", "iter_state_shards", "read_structure"]

FORMAT = "idl_ray.states/1"
_COLUMNS = ("u", "z", "x", "y")


class StatesWriter:
    """Append recorded states batch by batch; a new Parquet file every ``rows_per_file`` rows."""

    def __init__(self, folder: pathlib.Path, *, rows_per_file: int = 50_000) -> None:
        self.folder = folder
        self.rows_per_file = rows_per_file
        self.folder.mkdir(parents=True, exist_ok=True)
        self._writer: Any = None
        self._rows_in_file = 0
        self.files: list[str] = []
        self.rows = 0
        self.structure: TeacherStructure | None = None

    def write(self, states: SIMStates, labels: torch.Tensor | None = None) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.structure = states.structure
        columns: dict[str, Any] = {}
        for name in _COLUMNS:
            values = getattr(states, name.upper()).T.contiguous().cpu().numpy()  # (m, width)
            width = values.shape[1]
            flat = pa.array(values.reshape(-1), type=pa.from_numpy_dtype(values.dtype))
            columns[name] = pa.FixedSizeListArray.from_arrays(flat, width)
        if labels is not None:
            columns["label"] = pa.array(labels.cpu().numpy())
        table = pa.table(columns)
        if self._writer is None or self._rows_in_file >= self.rows_per_file:
            self._close_file()
            name = f"part-{len(self.files):05d}.parquet"
            self._writer = pq.ParquetWriter(str(self.folder / name), table.schema)
            self.files.append(name)
            self._rows_in_file = 0
        self._writer.write_table(table)
        self._rows_in_file += table.num_rows
        self.rows += table.num_rows

    def _close_file(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def close(self) -> None:
        """Finish the last file and write the structure (call once, after the last batch)."""
        from safetensors.torch import save_file

        self._close_file()
        if self.structure is None:
            raise ConfigError("extract: no samples were recorded; the data is empty.")
        s = self.structure
        meta = {
            "format": FORMAT,
            "rows": self.rows,
            "files": self.files,
            **{
                f.name: getattr(s, f.name)
                for f in dataclasses.fields(s)
                if f.name not in ("A", "B", "C", "D")
            },
        }
        (self.folder / "structure.json").write_text(json.dumps(meta, indent=2))
        tensors = {k: getattr(s, k).detach().to(torch.float64).contiguous() for k in ("A", "B", "C", "D")}
        save_file(tensors, str(self.folder / "teacher_weights.safetensors"))


def states_folder(spec: str) -> pathlib.Path:
    """The states folder from ``--states``: an extract run directory or the states folder itself."""
    folder = pathlib.Path(spec).expanduser()
    for candidate in (folder, folder / "states"):
        if (candidate / "structure.json").is_file():
            return candidate
    raise ConfigError(
        f"--states {spec!r}: no states found (structure.json). Pass the run directory `idl-ray extract` "
        "printed, or its states/ folder."
    )


def read_structure(folder: pathlib.Path) -> TeacherStructure:
    """The teacher structure saved next to the shards (with its exact implicit weights)."""
    from safetensors.torch import load_file

    meta = json.loads((folder / "structure.json").read_text())
    if meta.get("format") != FORMAT:
        raise ConfigError(f"{folder / 'structure.json'}: unknown states format {meta.get('format')!r}.")
    tensors = load_file(str(folder / "teacher_weights.safetensors"))
    return TeacherStructure(
        input_shape=tuple(meta["input_shape"]),
        num_inputs=meta["num_inputs"],
        layer_sizes=list(meta["layer_sizes"]),
        layer_shapes=[tuple(s) for s in meta["layer_shapes"]],
        num_outputs=meta["num_outputs"],
        activation=meta["activation"],
        negative_slope=meta["negative_slope"],
        bias=meta["bias"],
        **tensors,
    )


def iter_state_shards(folder: pathlib.Path, *, batch_size: int = 4096) -> Iterator[dict[str, torch.Tensor]]:
    """Batches ``{'u', 'z', 'x', 'y'}`` of (rows, width) tensors, read one Parquet batch at a time."""
    import pyarrow.parquet as pq

    meta = json.loads((folder / "structure.json").read_text())
    for name in meta["files"]:
        parquet = pq.ParquetFile(str(folder / name))
        for batch in parquet.iter_batches(batch_size=batch_size, columns=list(_COLUMNS)):
            out = {}
            for column in _COLUMNS:
                array = batch.column(column)
                width = array.type.list_size
                values = np.array(array.flatten().to_numpy(zero_copy_only=False))  # a writable copy
                out[column] = torch.from_numpy(values.reshape(-1, width))
            yield out
