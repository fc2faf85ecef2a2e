"""Where an actor's samples come from, and how it turns them into its additive statistics.

A shard source is a small, picklable description (object-store references, Parquet paths, a split of a
Ray Dataset, or precomputed statistics). The driver hands sources to actors once; each actor loads its
sources *inside itself*, streaming batch by batch into :class:`~idl_ray.sim.problem.GramStats`
(G_k = Phi_k Phi_k^T, Rt_k = T_k Phi_k^T, ||t_k||^2, m_k), so the raw samples never travel per iteration
and memory stays bounded whatever the shard size. A recreated actor reloads from the same source.

Layout of samples: batch-first, features (m_k, d) = Phi_k^T with the constrained columns first
(``[X, U]`` for stage 1), targets (m_k, rows) = T_k^T. In Parquet and Ray Datasets each named column is
either a scalar column (one feature) or a list / fixed-size-list column (a vector per sample); the
listed columns are concatenated in order.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import ray
import torch

from idl_ray._validation import bad_parameter, check_positive_int
from idl_ray.errors import ConfigError, ShapeError
from idl_ray.sim.problem import GramStats, as_tensor

DEFAULT_BATCH = 8192
#: limit on an actor's wait for its shard in the object store (the driver's own waits use timeout_s)
FETCH_TIMEOUT_S = 600.0


def _to_2d(values: Any) -> np.ndarray:
    """A numpy (m, width) array from a column's numpy values (scalars, vectors or object arrays)."""
    array = np.asarray(values)
    if array.dtype == object:
        array = (
            np.stack([np.asarray(v, dtype=np.float64).reshape(-1) for v in array]) if len(array) else array
        )
    if array.ndim == 1:
        array = array.reshape(-1, 1)
    return array.reshape(array.shape[0], -1)


def _arrow_column(column: Any) -> np.ndarray:
    """A numpy (m, width) array from a pyarrow column (scalar, list or fixed-size-list)."""
    import pyarrow as pa

    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if (
        pa.types.is_fixed_size_list(column.type)
        or pa.types.is_list(column.type)
        or pa.types.is_large_list(column.type)
    ):
        width = column.type.list_size if pa.types.is_fixed_size_list(column.type) else None
        flat = column.flatten().to_numpy(zero_copy_only=False)
        if width is None:
            width = flat.size // max(len(column), 1)
            if width * len(column) != flat.size:
                raise ShapeError("A Parquet list column has rows of different lengths; cannot form a matrix.")
        return flat.reshape(len(column), width)
    return column.to_numpy(zero_copy_only=False).reshape(-1, 1)


def _writable(batch: Any) -> Any:
    """A batch torch can wrap without warnings: numpy views of shared memory are copied to float64."""
    if isinstance(batch, np.ndarray):
        return torch.from_numpy(np.array(batch, dtype=np.float64))
    return batch


def _batch(columns: dict[str, np.ndarray], names: Sequence[str]) -> np.ndarray:
    missing = [n for n in names if n not in columns]
    if missing:
        raise ConfigError(f"Columns {missing} are not in the data; available columns: {sorted(columns)}.")
    return np.concatenate([columns[n] for n in names], axis=1)


@dataclasses.dataclass(frozen=True)
class ShardSource:
    """Base of shard sources: :meth:`batches` yields batch-first ``(features, targets)`` pairs."""

    def batches(self) -> Iterator[tuple[Any, Any]]:  # pragma: no cover - abstract
        raise NotImplementedError

    def describe(self) -> str:
        return type(self).__name__


@dataclasses.dataclass(frozen=True)
class ObjectRefShard(ShardSource):
    """Samples placed once in the object store: ``features_ref`` -> (m_k, d), ``targets_ref`` -> (m_k, rows).

    The references are nested in this object, so Ray does not resolve them when the actor is created;
    the actor fetches them in :meth:`load`, and again if it is recreated.
    """

    features_ref: Any
    targets_ref: Any
    batch_size: int = DEFAULT_BATCH

    def batches(self) -> Iterator[tuple[Any, Any]]:
        # numpy arrays come back from the object store without a copy (read-only views of shared memory);
        # each batch is copied once, into the float64 the statistics are accumulated in
        features, targets = ray.get([self.features_ref, self.targets_ref], timeout=FETCH_TIMEOUT_S)
        for start in range(0, len(features), self.batch_size):
            stop = start + self.batch_size
            yield _writable(features[start:stop]), _writable(targets[start:stop])

    def describe(self) -> str:
        return "object store"


@dataclasses.dataclass(frozen=True)
class ParquetShard(ShardSource):
    """Samples in Parquet files, read with pyarrow batch by batch (bounded memory).

    Parameters
    ----------
    paths : tuple of str
        Parquet files (all with the same schema).
    feature_columns, target_columns : tuple of str
        Columns concatenated (in order) into the features (constrained ones first) and the targets.
    batch_size : int
        Rows per read batch.
    """

    paths: tuple[str, ...]
    feature_columns: tuple[str, ...] = ("features",)
    target_columns: tuple[str, ...] = ("targets",)
    batch_size: int = DEFAULT_BATCH

    def batches(self) -> Iterator[tuple[Any, Any]]:
        import pyarrow.parquet as pq

        columns = list(dict.fromkeys([*self.feature_columns, *self.target_columns]))
        for path in self.paths:
            if not os.path.exists(path):
                raise ConfigError(f"Parquet shard {path!r} does not exist (seen from the actor's node).")
            parquet = pq.ParquetFile(path)
            missing = [c for c in columns if c not in parquet.schema_arrow.names]
            if missing:
                raise ConfigError(
                    f"Parquet shard {path!r} has no column(s) {missing}; its columns are "
                    f"{parquet.schema_arrow.names}. Set feature_columns / target_columns to match."
                )
            for record_batch in parquet.iter_batches(batch_size=self.batch_size, columns=columns):
                arrays = {name: _arrow_column(record_batch.column(name)) for name in columns}
                yield (
                    _writable(_batch(arrays, self.feature_columns)),
                    _writable(_batch(arrays, self.target_columns)),
                )

    def describe(self) -> str:
        return f"parquet x{len(self.paths)}"


@dataclasses.dataclass(frozen=True)
class DatasetShard(ShardSource):
    """A (materialised) Ray Dataset, e.g. one part of ``dataset.split(num_workers)``, read batch by batch."""

    dataset: Any
    feature_columns: tuple[str, ...] = ("features",)
    target_columns: tuple[str, ...] = ("targets",)
    batch_size: int = DEFAULT_BATCH

    def batches(self) -> Iterator[tuple[Any, Any]]:
        for batch in self.dataset.iter_batches(batch_size=self.batch_size, batch_format="numpy"):
            arrays = {name: _to_2d(values) for name, values in batch.items()}
            yield (
                _writable(_batch(arrays, self.feature_columns)),
                _writable(_batch(arrays, self.target_columns)),
            )

    def describe(self) -> str:
        return "ray dataset"


@dataclasses.dataclass(frozen=True)
class StatsShard(ShardSource):
    """Precomputed statistics (G_k, Rt_k, ...) of a shard, placed in the object store."""

    stats_ref: Any

    def batches(self) -> Iterator[tuple[Any, Any]]:  # statistics have no batches; see load_sources
        raise NotImplementedError("StatsShard holds statistics, not samples.")

    def fetch(self) -> GramStats:
        return ray.get(self.stats_ref, timeout=FETCH_TIMEOUT_S)

    def describe(self) -> str:
        return "statistics"


def _accumulate(stats: GramStats | None, features: Any, targets: Any, device: Any) -> GramStats:
    F = as_tensor(features, "features", "a shard source").to(device)
    T = as_tensor(targets, "targets", "a shard source").to(device)
    if stats is None:
        return GramStats.from_batch(F, T)
    return stats.add(F, T)


def load_sources(sources: Sequence[ShardSource], device: Any = "cpu") -> tuple[GramStats, float, float]:
    """The statistics of several sources added together (what one actor holds).

    Returns
    -------
    (stats, load_s, gram_s): the summed statistics, the seconds spent reading batches (object store,
    Parquet, Dataset) and the seconds spent accumulating them into G_k and Rt_k.
    """
    stats: GramStats | None = None
    load_s = gram_s = 0.0
    for source in sources:
        if isinstance(source, StatsShard):
            start = time.perf_counter()
            part = source.fetch().to(device)
            load_s += time.perf_counter() - start
            stats = part if stats is None else stats.merge(part)
            continue
        iterator = iter(source.batches())
        while True:
            start = time.perf_counter()
            try:
                features, targets = next(iterator)
            except StopIteration:
                load_s += time.perf_counter() - start
                break
            middle = time.perf_counter()
            load_s += middle - start
            stats = _accumulate(stats, features, targets, device)
            gram_s += time.perf_counter() - middle
    if stats is None:
        raise ConfigError(
            f"The solver actor's shard sources {[s.describe() for s in sources]} hold no samples."
        )
    return stats, load_s, gram_s


def split_rows(count: int, parts: int) -> list[slice]:
    """``parts`` contiguous, nearly equal slices of ``range(count)`` (empty slices when parts > count)."""
    base, extra = divmod(count, parts)
    slices, start = [], 0
    for k in range(parts):
        stop = start + base + (1 if k < extra else 0)
        slices.append(slice(start, stop))
        start = stop
    return slices


def tensor_sources(
    features: Any, targets: Any, num_shards: int, *, batch_size: int = DEFAULT_BATCH
) -> list[ShardSource]:
    """Split batch-first samples into ``num_shards`` contiguous shards, each put once in the object store."""
    check_positive_int(num_shards, "num_shards", "tensor_sources")
    F = as_tensor(features, "features", "tensor_sources")
    T = as_tensor(targets, "targets", "tensor_sources")
    if F.dim() != 2 or T.dim() != 2 or F.shape[0] != T.shape[0]:
        raise ShapeError(
            f"tensor_sources expects features (m, d) and targets (m, rows) with the same m. Got "
            f"{tuple(F.shape)} and {tuple(T.shape)}."
        )
    if F.shape[0] < num_shards:
        raise bad_parameter("num_shards", "tensor_sources", f"at most the {F.shape[0]} samples", num_shards)
    # numpy, not torch, in the object store: workers then read the shard in place (zero-copy)
    return [
        ObjectRefShard(ray.put(F[s].cpu().numpy()), ray.put(T[s].cpu().numpy()), batch_size)
        for s in split_rows(F.shape[0], num_shards)
    ]


def write_parquet_shards(
    features: Any,
    targets: Any,
    directory: str | os.PathLike[str],
    num_files: int,
    *,
    feature_column: str = "features",
    target_column: str = "targets",
    dtype: Any = np.float32,
) -> list[str]:
    """Write batch-first samples as ``num_files`` Parquet files (fixed-size-list columns); return the paths.

    The layout :class:`ParquetShard` reads by default, and a convenient way to stage states on shared
    storage for a cluster.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    F = np.ascontiguousarray(
        as_tensor(features, "features", "write_parquet_shards").cpu().numpy(), dtype=dtype
    )
    T = np.ascontiguousarray(as_tensor(targets, "targets", "write_parquet_shards").cpu().numpy(), dtype=dtype)
    if F.ndim != 2 or T.ndim != 2 or F.shape[0] != T.shape[0]:
        raise ShapeError(
            f"write_parquet_shards expects features (m, d) and targets (m, rows); got {F.shape}, {T.shape}."
        )
    os.makedirs(directory, exist_ok=True)
    paths = []
    for k, rows in enumerate(split_rows(F.shape[0], num_files)):
        f, t = F[rows], T[rows]
        table = pa.table(
            {
                feature_column: pa.FixedSizeListArray.from_arrays(pa.array(f.reshape(-1)), F.shape[1]),
                target_column: pa.FixedSizeListArray.from_arrays(pa.array(t.reshape(-1)), T.shape[1]),
            }
        )
        path = os.path.join(os.fspath(directory), f"part-{k:05d}.parquet")
        pq.write_table(table, path)
        paths.append(path)
    return paths


def assign(sources: Sequence[ShardSource], num_workers: int) -> list[list[ShardSource]]:
    """Deal sources to workers round-robin; every worker must get at least one."""
    if len(sources) < num_workers:
        raise ConfigError(
            f"{len(sources)} shard source(s) cannot feed {num_workers} workers; give at least one source per "
            "worker (more files or shards) or use fewer workers."
        )
    return [list(sources[k::num_workers]) for k in range(num_workers)]


__all__ = [
    "DatasetShard",
    "ObjectRefShard",
    "ParquetShard",
    "ShardSource",
    "StatsShard",
    "assign",
    "load_sources",
    "split_rows",
    "tensor_sources",
    "write_parquet_shards",
]
