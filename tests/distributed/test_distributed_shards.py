"""Shards loaded inside the actors: real Parquet files written with pyarrow, and a Ray Dataset."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from distributed_helpers import TIMEOUT_S, random_problem, relative_gap

from idl_ray.distributed import RayADMMSolver, ShardedProblem, write_parquet_shards
from idl_ray.distributed.shards import ParquetShard, load_sources, split_rows
from idl_ray.errors import ConfigError, DistributedError
from idl_ray.sim.problem import SIMProblem
from idl_ray.sim.solvers.admm import ADMMSolver

TOL = dict(gap_tol=1e-10, abs_tol=1e-10, rel_tol=1e-8)


@pytest.fixture(scope="module")
def samples():
    problem = random_problem(m=900, seed=5)
    # Parquet stores float32: compare against the problem built from the same float32 values
    features = problem.samples.features.to(torch.float32)
    targets = problem.samples.targets.to(torch.float32)
    return features, targets, problem


def reference_for(features, targets, problem):
    single = SIMProblem.from_samples(
        features.double(),
        targets.double(),
        n_constrained=problem.n_constrained,
        lam=problem.lam,
        kappa=problem.kappa,
    )
    return single, ADMMSolver(device="cpu", **TOL).solve(single)


def test_split_rows_covers_everything():
    assert [(s.start, s.stop) for s in split_rows(7, 3)] == [(0, 3), (3, 5), (5, 7)]
    assert [s.stop - s.start for s in split_rows(2, 3)] == [1, 1, 0]


def test_parquet_round_trip_in_process(samples, tmp_path):
    features, targets, _ = samples
    paths = write_parquet_shards(features, targets, tmp_path, num_files=3)
    assert len(paths) == 3 and all(pq.ParquetFile(p).metadata.num_rows > 0 for p in paths)
    stats, load_s, gram_s = load_sources([ParquetShard(tuple(paths), batch_size=128)])
    assert stats.num_samples == features.shape[0] and load_s >= 0 and gram_s > 0
    F, T = features.double(), targets.double()
    assert torch.allclose(stats.G, F.T @ F, rtol=1e-10, atol=1e-8)
    # every statistic, in the stored column order (a swap of feature or target columns shows here)
    assert torch.allclose(stats.Rt, T.T @ F, rtol=1e-10, atol=1e-8)
    assert torch.allclose(stats.target_sq, (T * T).sum(dim=0), rtol=1e-10, atol=1e-8)


@pytest.mark.parametrize("strategy", ["gram", "consensus"])
def test_parquet_shards_solve_like_single_process(strategy, samples, tmp_path, worker_pools):
    features, targets, problem = samples
    write_parquet_shards(features, targets, tmp_path, num_files=4)
    sharded = ShardedProblem.from_parquet(
        tmp_path, num_shards=2, n_constrained=problem.n_constrained, lam=problem.lam, kappa=problem.kappa
    )
    assert len(sharded.sources) == 2 and all(len(s.paths) == 2 for s in sharded.sources)
    single, reference = reference_for(features, targets, problem)
    result = RayADMMSolver(strategy=strategy, workers=worker_pools(2), timeout_s=TIMEOUT_S, **TOL).solve(
        sharded
    )
    assert relative_gap(result.stats.objective, reference.stats.objective) < 1e-5
    assert relative_gap(single.objective(result.weights), reference.stats.objective) < 1e-5
    assert result.stats.constraint_violation == 0.0
    # the weights themselves (unique optimum): a column-order mix-up within X or U leaves the
    # objective unchanged but permutes them
    assert torch.allclose(result.weights, reference.weights, atol=1e-5, rtol=0)
    assert result.stats.extra["timings"]["load"] > 0


def test_parquet_with_scalar_and_list_columns(samples, tmp_path, worker_pools):
    """States written as separate columns (X and U as lists, a scalar bias column) are concatenated in order."""
    features, targets, problem = samples
    n = problem.n_constrained
    X, U, bias = features[:, :n].numpy(), features[:, n:-1].numpy(), features[:, -1].numpy()
    Z = targets.numpy()
    for k, rows in enumerate(split_rows(features.shape[0], 2)):
        table = pa.table(
            {
                "X": pa.FixedSizeListArray.from_arrays(pa.array(X[rows].reshape(-1)), X.shape[1]),
                "U": pa.array([list(u) for u in U[rows]], type=pa.list_(pa.float32())),
                "bias": pa.array(bias[rows]),
                "Z": pa.FixedSizeListArray.from_arrays(pa.array(Z[rows].reshape(-1)), Z.shape[1]),
            }
        )
        pq.write_table(table, tmp_path / f"states-{k}.parquet")
    sharded = ShardedProblem.from_parquet(
        sorted(str(p) for p in tmp_path.glob("*.parquet")),
        feature_columns=("X", "U", "bias"),
        target_columns=("Z",),
        n_constrained=n,
        lam=problem.lam,
        kappa=problem.kappa,
    )
    _, reference = reference_for(features, targets, problem)
    result = RayADMMSolver(workers=worker_pools(2), timeout_s=TIMEOUT_S, **TOL).solve(sharded)
    assert relative_gap(result.stats.objective, reference.stats.objective) < 1e-5
    # the weights themselves (unique optimum): a column-order mix-up within X or U leaves the
    # objective unchanged but permutes them
    assert torch.allclose(result.weights, reference.weights, atol=1e-5, rtol=0)


def test_missing_column_is_named(samples, tmp_path, worker_pools):
    features, targets, problem = samples
    write_parquet_shards(features, targets, tmp_path, num_files=2)
    sharded = ShardedProblem.from_parquet(
        tmp_path, feature_columns=("phi",), n_constrained=problem.n_constrained
    )
    with pytest.raises(DistributedError, match=r"no column\(s\) \['phi'\]"):
        RayADMMSolver(workers=worker_pools(2), timeout_s=TIMEOUT_S).solve(sharded)
    with pytest.raises(ConfigError, match="No Parquet files"):
        ShardedProblem.from_parquet(tmp_path / "nothing-here")


def test_ray_dataset_shards(samples, worker_pools):
    import ray.data

    features, targets, problem = samples
    dataset = ray.data.from_numpy(np.concatenate([features.numpy(), targets.numpy()], axis=1)).map_batches(
        lambda batch: {
            "features": batch["data"][:, : features.shape[1]],
            "targets": batch["data"][:, features.shape[1] :],
        },
        batch_format="numpy",
    )
    sharded = ShardedProblem.from_dataset(
        dataset, num_shards=2, n_constrained=problem.n_constrained, lam=problem.lam, kappa=problem.kappa
    )
    _, reference = reference_for(features, targets, problem)
    result = RayADMMSolver(workers=worker_pools(2), timeout_s=TIMEOUT_S, **TOL).solve(sharded)
    assert relative_gap(result.stats.objective, reference.stats.objective) < 1e-5
    # the weights themselves (unique optimum): a column-order mix-up within X or U leaves the
    # objective unchanged but permutes them
    assert torch.allclose(result.weights, reference.weights, atol=1e-5, rtol=0)
