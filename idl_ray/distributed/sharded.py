"""A SIM stage whose samples stay in shards (object store, Parquet files, a Ray Dataset).

:class:`ShardedProblem` is the distributed counterpart of :class:`~idl_ray.sim.problem.SIMProblem`: the
same settings (``n_constrained``, ``lam``, ``l2``, ``kappa``, ``variant``) plus a list of shard sources
instead of the statistics. The Ray solvers load the sources inside their actors; the statistics are only
ever formed there (and summed, for the gram strategy).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

from idl_ray._validation import check_positive_int
from idl_ray.distributed.shards import (
    DEFAULT_BATCH,
    DatasetShard,
    ParquetShard,
    ShardSource,
    split_rows,
    tensor_sources,
)
from idl_ray.distributed.state_store import MANIFEST, RUN_FILE, shard_paths
from idl_ray.errors import ConfigError
from idl_ray.sim.problem import GramStats, SIMProblem


@dataclasses.dataclass
class ShardedProblem:
    """One SIM stage given as sample shards (see :class:`~idl_ray.sim.problem.SIMProblem` for the maths).

    Parameters
    ----------
    sources : list of ShardSource
        At least one per solver worker; dealt to workers round-robin.
    n_constrained, lam, l2, kappa, variant
        As in :class:`~idl_ray.sim.problem.SIMProblem`.

    Examples
    --------
    >>> problem = ShardedProblem.from_parquet(paths, n_constrained=32, lam=1e-3, kappa=0.9)  # doctest: +SKIP
    >>> W = RayADMMSolver(num_workers=2).solve(problem).weights  # doctest: +SKIP
    """

    sources: list[ShardSource]
    n_constrained: int = 0
    lam: float = 0.0
    l2: float = 0.0
    kappa: float | None = None
    variant: str = "lasso"

    def __post_init__(self) -> None:
        self.sources = list(self.sources)
        if not self.sources or not all(isinstance(s, ShardSource) for s in self.sources):
            raise ConfigError(
                "ShardedProblem needs a non-empty list of shard sources (ObjectRefShard, ParquetShard, "
                f"DatasetShard, StatsShard). Got {self.sources!r}."
            )

    @property
    def settings(self) -> dict[str, Any]:
        """The problem settings, as keyword arguments of :class:`SIMProblem`."""
        return {
            "n_constrained": self.n_constrained,
            "lam": self.lam,
            "l2": self.l2,
            "kappa": self.kappa,
            "variant": self.variant,
        }

    def with_stats(self, stats: GramStats) -> SIMProblem:
        """The single-process problem with these settings and the given (summed) statistics."""
        return SIMProblem(stats=stats, **self.settings)

    @classmethod
    def from_tensors(cls, features: Any, targets: Any, *, num_shards: int, **settings: Any) -> ShardedProblem:
        """Split batch-first samples (features (m, d), targets (m, rows)) into object-store shards."""
        return cls(sources=tensor_sources(features, targets, num_shards), **settings)

    @classmethod
    def from_parquet(
        cls,
        paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
        *,
        num_shards: int | None = None,
        feature_columns: Sequence[str] = ("features",),
        target_columns: Sequence[str] = ("targets",),
        batch_size: int = DEFAULT_BATCH,
        **settings: Any,
    ) -> ShardedProblem:
        """Parquet files (or a directory of them), grouped into ``num_shards`` sources (default: one per file).

        A states directory written by :func:`~idl_ray.distributed.state_store.write_states` is checked
        against its manifest first (incomplete or corrupted: ConfigError); its columns are ``U, Z, X, Y``,
        so stage 1 is ``feature_columns=("X", "U"), target_columns=("Z",)`` (the teacher's unscaled states).
        """
        if isinstance(paths, (str, os.PathLike)):
            root = os.fspath(paths)
            if os.path.isdir(root) and any(
                os.path.exists(os.path.join(root, name)) for name in (MANIFEST, RUN_FILE)
            ):
                files = shard_paths(root)
            elif os.path.isdir(root):
                files = sorted(os.path.join(root, f) for f in os.listdir(root) if f.endswith(".parquet"))
            else:
                files = [root] if os.path.exists(root) else []
        else:
            files = [os.fspath(p) for p in paths]
        if not files:
            raise ConfigError(f"No Parquet files found in {paths!r}.")
        count = (
            len(files) if num_shards is None else check_positive_int(num_shards, "num_shards", "from_parquet")
        )
        if count > len(files):
            raise ConfigError(
                f"num_shards={count} exceeds the {len(files)} Parquet file(s); one file per shard at least."
            )
        groups = [tuple(files[s]) for s in split_rows(len(files), count)]
        sources: list[ShardSource] = [
            ParquetShard(group, tuple(feature_columns), tuple(target_columns), batch_size) for group in groups
        ]
        return cls(sources=sources, **settings)

    @classmethod
    def from_dataset(
        cls,
        dataset: Any,
        *,
        num_shards: int,
        feature_columns: Sequence[str] = ("features",),
        target_columns: Sequence[str] = ("targets",),
        batch_size: int = DEFAULT_BATCH,
        **settings: Any,
    ) -> ShardedProblem:
        """A Ray Dataset split into ``num_shards`` materialised parts of nearly equal rows (none dropped)."""
        check_positive_int(num_shards, "num_shards", "from_dataset")
        dataset = dataset.materialize()
        count = dataset.count()
        if count < num_shards:
            raise ConfigError(f"The dataset has {count} row(s), fewer than num_shards={num_shards}.")
        bounds = [s.stop for s in split_rows(count, num_shards)][:-1]
        parts = dataset.split_at_indices(bounds)
        sources: list[ShardSource] = [
            DatasetShard(part, tuple(feature_columns), tuple(target_columns), batch_size) for part in parts
        ]
        return cls(sources=sources, **settings)


__all__ = ["ShardedProblem"]
