"""Where a job's data comes from: an embedded data set, or the user's own (``--data``).

``--data`` takes

* ``file.npz`` with arrays ``x`` (samples x features), optional ``y`` (class labels) and optional
  ``x_test`` / ``y_test`` (a held-out part; without it a seeded ``test_fraction`` of the samples is held out),
* ``file.npy``: the inputs only,
* a Parquet file or a folder of Parquet files: the inputs are ``--input-column`` (one column of
  vectors, or several scalar columns separated by commas; default ``x``) and the labels
  ``--target-column`` (default ``y`` when there is such a column),
* ``package.module:function`` returning a Ray Dataset (columns as for Parquet), arrays ``x``,
  a pair ``(x, y)``, a mapping with the ``.npz`` keys, or a :class:`~idl_ray.datasets.Split`.

User data is used as given (no standardisation): a user's teacher was trained on it as it is.
Every failure is a :class:`~idl_ray.errors.ConfigError` that names the flag, what was wrong and the fix.
"""

from __future__ import annotations

import dataclasses
import importlib
import pathlib
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from idl_ray.datasets import DATASETS, Split, load_dataset
from idl_ray.errors import ConfigError

__all__ = ["DataSet", "load_data", "load_function"]


@dataclasses.dataclass(frozen=True)
class DataSet:
    """Inputs (and labels when known) split into a fitting part and a held-out part.

    x_train, x_test : (samples, features) float32 tensors
    y_train, y_test : (samples,) int64 class labels, or None when the data has no labels
    source : a short description for reports ("digits", "data.npz", ...)
    """

    x_train: torch.Tensor
    x_test: torch.Tensor
    y_train: torch.Tensor | None
    y_test: torch.Tensor | None
    source: str

    @property
    def num_features(self) -> int:
        return int(self.x_train.shape[1])

    @property
    def has_labels(self) -> bool:
        return self.y_train is not None

    @property
    def num_classes(self) -> int | None:
        if self.y_train is None or self.y_test is None:
            return None
        return int(torch.cat([self.y_train, self.y_test]).max()) + 1

    def to_split(self) -> Split:
        """The labelled :class:`Split` that ``train_classifier`` takes (labels required)."""
        if self.y_train is None or self.y_test is None:
            raise ConfigError(
                f"The data {self.source!r} has no labels, which training the default teacher needs. "
                "Give labels (array 'y' in the .npz, or --target-column for Parquet) or pass your own "
                "trained network with --teacher."
            )
        return Split(self.x_train, self.y_train, self.x_test, self.y_test)

    def describe(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "features": self.num_features,
            "train_samples": len(self.x_train),
            "test_samples": len(self.x_test),
            "labels": self.has_labels,
            "classes": self.num_classes,
        }


def load_data(
    data: str | None,
    *,
    dataset: str = "digits",
    input_column: str | None = None,
    target_column: str | None = None,
    test_fraction: float = 0.25,
    seed: int = 0,
) -> DataSet:
    """Load the data a job runs on: ``data`` (a path or ``module:function``) or the named ``dataset``."""
    if data is None:
        split = load_dataset(dataset, seed=seed)
        return DataSet(split.x_train, split.x_test, split.y_train, split.y_test, dataset)
    if data in DATASETS:
        return load_data(None, dataset=data, seed=seed)
    path = pathlib.Path(data).expanduser()
    if path.exists():
        arrays = _read_path(path, input_column, target_column)
    elif _looks_like_function(data):
        arrays = _from_object(load_function(data, "data")(), data, input_column, target_column)
    else:
        raise ConfigError(
            f"--data {data!r}: no such file or folder, and not a 'module:function'. Give a .npz, .npy or "
            f"Parquet file (or a folder of Parquet files), 'package.module:function', or one of {list(DATASETS)}."
        )
    return _to_dataset(arrays, data, test_fraction, seed)


def _looks_like_function(spec: str) -> bool:
    module, sep, name = spec.partition(":")
    return bool(sep and module and name.isidentifier() and all(p.isidentifier() for p in module.split(".")))


def load_function(spec: str, flag: str) -> Callable[..., Any]:
    """Import ``package.module:function`` (the current folder is importable, as for ``python -m``)."""
    import sys

    module_name, _, name = spec.partition(":")
    if "" not in sys.path and str(pathlib.Path.cwd()) not in sys.path:
        sys.path.insert(0, str(pathlib.Path.cwd()))
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(
            f"--{flag} {spec!r}: cannot import module {module_name!r} ({exc}). Check the name and that the "
            "module is on PYTHONPATH (or in the current folder / the job's working_dir)."
        ) from exc
    function = getattr(module, name, None)
    if not callable(function):
        raise ConfigError(f"--{flag} {spec!r}: module {module_name!r} has no function {name!r}.")
    return function


# ---------------------------------------------------------------- readers (all return a dict of arrays)
def _read_path(path: pathlib.Path, input_column: str | None, target_column: str | None) -> dict[str, Any]:
    suffix = path.suffix.lower()
    if path.is_dir() or suffix in (".parquet", ".pq"):
        return _read_parquet(path, input_column, target_column)
    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
        if "x" not in arrays:
            raise ConfigError(
                f"--data {str(path)!r}: the .npz has arrays {sorted(arrays)} but needs 'x' (inputs); optional "
                "'y', 'x_test', 'y_test'. Save it with np.savez(path, x=..., y=...)."
            )
        unknown = sorted(set(arrays) - {"x", "y", "x_test", "y_test"})
        if unknown:
            raise ConfigError(
                f"--data {str(path)!r}: unknown arrays {unknown} in the .npz; the known ones are "
                "'x', 'y', 'x_test', 'y_test'."
            )
        return arrays
    if suffix == ".npy":
        return {"x": np.load(path, allow_pickle=False)}
    raise ConfigError(
        f"--data {str(path)!r}: unknown file type {suffix!r}. Use .npz, .npy, .parquet or a folder of Parquet files."
    )


def _read_parquet(path: pathlib.Path, input_column: str | None, target_column: str | None) -> dict[str, Any]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for unreadable input
        raise ConfigError(f"--data {str(path)!r}: not readable as Parquet ({exc}).") from exc
    columns = {name: table.column(name) for name in table.column_names}
    return _columns_to_arrays(columns, str(path), input_column, target_column, _arrow_to_numpy)


def _arrow_to_numpy(column: Any) -> np.ndarray:
    """A column as numpy: scalars as (rows,), lists of equal length as (rows, width)."""
    import pyarrow as pa

    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    kind = column.type
    if pa.types.is_fixed_size_list(kind):
        return np.asarray(column.flatten().to_numpy(zero_copy_only=False)).reshape(
            len(column), kind.list_size
        )
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        lengths = np.diff(np.asarray(column.offsets))
        if len(lengths) and (lengths == lengths[0]).all() and column.null_count == 0:
            flat = np.asarray(column.flatten().to_numpy(zero_copy_only=False))
            return flat.reshape(len(column), int(lengths[0]))
        raise ConfigError(
            "--input-column: a list column must hold vectors of one length and no nulls; found lengths "
            f"{sorted(set(lengths.tolist()))[:5]} and {column.null_count} nulls."
        )
    return column.to_numpy(zero_copy_only=False)


def _columns_to_arrays(
    columns: Mapping[str, Any],
    source: str,
    input_column: str | None,
    target_column: str | None,
    to_numpy: Callable[[Any], np.ndarray],
) -> dict[str, Any]:
    names = [c.strip() for c in (input_column or "x").split(",") if c.strip()]
    missing = [n for n in names if n not in columns]
    if missing:
        raise ConfigError(
            f"--input-column: column(s) {missing} not found in {source!r}; its columns are {sorted(columns)}. "
            "Name one column of vectors, or several scalar columns separated by commas."
        )
    parts = [to_numpy(columns[n]) for n in names]
    parts = [p[:, None] if p.ndim == 1 else p.reshape(len(p), -1) for p in parts]
    arrays: dict[str, Any] = {"x": np.concatenate(parts, axis=1)}
    if target_column is not None and target_column not in columns:
        raise ConfigError(
            f"--target-column: column {target_column!r} not found in {source!r}; its columns are "
            f"{sorted(columns)}."
        )
    target = target_column or ("y" if "y" in columns and "y" not in names else None)
    if target is not None:
        arrays["y"] = to_numpy(columns[target])
    return arrays


def _from_object(
    value: Any, spec: str, input_column: str | None, target_column: str | None
) -> dict[str, Any]:
    if isinstance(value, Split):
        return {"x": value.x_train, "y": value.y_train, "x_test": value.x_test, "y_test": value.y_test}
    if hasattr(value, "iter_batches") and hasattr(
        value, "schema"
    ):  # a Ray Dataset (duck-typed: no ray import)
        batches = list(value.iter_batches(batch_format="numpy"))
        if not batches:
            raise ConfigError(f"--data {spec!r}: the Ray Dataset is empty.")
        columns = {name: np.concatenate([b[name] for b in batches]) for name in batches[0]}
        return _columns_to_arrays(columns, spec, input_column, target_column, np.asarray)
    if isinstance(value, Mapping):
        if "x" not in value:
            raise ConfigError(
                f"--data {spec!r}: the mapping it returned has keys {sorted(value)}; 'x' is needed."
            )
        return dict(value)
    if isinstance(value, tuple) and len(value) == 2:
        return {"x": value[0], "y": value[1]}
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return {"x": value}
    raise ConfigError(
        f"--data {spec!r}: the function returned a {type(value).__name__}; return a Ray Dataset, an array x, "
        "a pair (x, y), a dict with 'x' (and 'y', 'x_test', 'y_test') or an idl_ray.datasets.Split."
    )


# ---------------------------------------------------------------- checks and splitting
def _as_inputs(value: Any, name: str, source: str) -> torch.Tensor:
    array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
    if array.dtype.kind not in "fiub":
        raise ConfigError(f"--data {source!r}: '{name}' must be numeric. Got dtype {array.dtype}.")
    if array.ndim == 1:
        array = array[:, None]
    array = array.reshape(len(array), -1).astype(np.float32)
    if len(array) == 0:
        raise ConfigError(f"--data {source!r}: '{name}' has no samples.")
    if not np.isfinite(array).all():
        raise ConfigError(
            f"--data {source!r}: '{name}' holds {int((~np.isfinite(array)).sum())} NaN/Inf values; clean them first."
        )
    return torch.from_numpy(array)


def _as_labels(value: Any, name: str, source: str, samples: int) -> torch.Tensor:
    array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
    array = array.reshape(-1) if array.ndim == 2 and 1 in array.shape else array
    if array.ndim != 1 or len(array) != samples:
        raise ConfigError(
            f"--data {source!r}: '{name}' must hold one class label per sample ({samples}). Got shape {array.shape}."
        )
    if array.dtype.kind == "f" and np.all(np.isfinite(array)) and np.all(array == np.round(array)):
        array = array.astype(np.int64)
    if array.dtype.kind not in "iu" or (len(array) and array.min() < 0):
        raise ConfigError(
            f"--data {source!r}: '{name}' must be integer class labels 0..K-1. Got dtype {array.dtype}"
            + (f", minimum {array.min()}" if array.dtype.kind in "iuf" and len(array) else "")
            + "."
        )
    return torch.from_numpy(array.astype(np.int64))


def _to_dataset(arrays: dict[str, Any], source: str, test_fraction: float, seed: int) -> DataSet:
    x = _as_inputs(arrays["x"], "x", source)
    y = None if arrays.get("y") is None else _as_labels(arrays["y"], "y", source, len(x))
    if arrays.get("x_test") is not None:
        x_test = _as_inputs(arrays["x_test"], "x_test", source)
        if x_test.shape[1] != x.shape[1]:
            raise ConfigError(
                f"--data {source!r}: 'x_test' has {x_test.shape[1]} features but 'x' has {x.shape[1]}."
            )
        y_test = (
            None
            if arrays.get("y_test") is None
            else _as_labels(arrays["y_test"], "y_test", source, len(x_test))
        )
        if (y is None) != (y_test is None):
            raise ConfigError(
                f"--data {source!r}: give labels for both 'x' and 'x_test' ('y' and 'y_test') or neither."
            )
        return DataSet(x, x_test, y, y_test, source)
    if len(x) < 2:
        raise ConfigError(f"--data {source!r}: needs at least 2 samples to hold some out. Got {len(x)}.")
    order = torch.from_numpy(np.random.default_rng(seed).permutation(len(x)))
    n_test = min(len(x) - 1, max(1, round(test_fraction * len(x))))
    test, train = order[:n_test], order[n_test:]
    return DataSet(x[train], x[test], None if y is None else y[train], None if y is None else y[test], source)
