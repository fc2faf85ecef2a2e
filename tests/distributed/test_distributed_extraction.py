"""Streaming state extraction on Ray Data and the Parquet state sink, against the in-process recorder."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import torch
from torch import nn

from idl_ray.distributed import ShardedProblem, StreamConfig, iter_states, read_manifest, write_states
from idl_ray.distributed.extraction import prepare, reduce_dataset, stream_states
from idl_ray.distributed.shards import load_sources
from idl_ray.errors import ConfigError, ShapeError, UnsupportedLayerError
from idl_ray.sim.estimator import SIM
from idl_ray.sim.extraction import extract_states
from idl_ray.sim.problem import GramStats
from idl_ray.sim.rescale import layer_scales
from idl_ray.sim.solvers.admm import ADMMSolver
from idl_ray.sim.stages import stage_batch

# small, shared actors: two per pool, a quarter of a CPU each, never the (fake) GPU
STREAM = StreamConfig(num_actors=2, batch_size=64, cpus_per_actor=0.25, use_gpu=False)
ADMM_TOL = dict(abs_tol=1e-10, rel_tol=1e-9, max_iter=20_000)


def _mlp_bias() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 7), nn.ReLU(), nn.Linear(7, 3))


def _mlp_inplace() -> nn.Module:
    return nn.Sequential(
        nn.Linear(6, 9, bias=False),
        nn.ReLU(inplace=True),
        nn.Linear(9, 5, bias=False),
        nn.ReLU(inplace=True),
        nn.Linear(5, 2, bias=False),
    )


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(2 * 3 * 3, 4),
    )


TEACHERS = {"mlp_bias": (_mlp_bias, (6,)), "mlp_inplace": (_mlp_inplace, (6,)), "cnn": (_cnn, (1, 6, 6))}


def _dataset(x: torch.Tensor, blocks: int = 3):
    """A Ray Dataset of ``x`` in several blocks (so both actors get work), column ``data``."""
    parts = np.array_split(x.numpy(), blocks)
    return ray.data.from_numpy(parts)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


@pytest.mark.parametrize("name", sorted(TEACHERS))
def test_streamed_states_and_stats_equal_in_process(name, ray_cluster):
    build, shape = TEACHERS[name]
    torch.manual_seed(1)
    teacher = build().double()
    x = torch.randn(230, *shape, dtype=torch.float64)
    ds = _dataset(x)
    reference = extract_states(teacher, x, batch_size=64, dtype=torch.float64, progress=False)

    batches, structure, column = stream_states(teacher, ds, dtype=torch.float64, stream=STREAM, rows=100)
    assert column == "data"
    parts = list(batches)
    got = {k: np.concatenate([b[k] for b in parts]) for k in ("U", "Z", "X", "Y")}
    for key in ("U", "Z", "X", "Y"):
        ref = getattr(reference, key).T.numpy()
        assert got[key].shape == ref.shape, key
        np.testing.assert_allclose(got[key], ref, rtol=1e-13, atol=1e-13, err_msg=key)
    if name == "mlp_inplace":  # the recorded pre-activation survives the in-place ReLU: Z has negatives
        assert (got["Z"] < 0).any() and (got["X"] >= 0).all()

    # the reduced statistics, with a real per-layer rescaling, against GramStats of the in-process states
    scales = layer_scales(structure, 0.3)
    column, analysed = prepare(teacher, ds, input_column=None, dtype=torch.float64, owner="test")
    stats, info = reduce_dataset(ds, teacher, analysed, column, STREAM, dtype=torch.float64, scales=scales)
    features, targets = stage_batch(reference.U.T, reference.Z.T, reference.X.T, reference.Y.T, scales)
    expected = GramStats.from_batch(features, targets)
    assert stats.num_samples == expected.num_samples == 230
    assert _rel(stats.G, expected.G) < 1e-10
    assert _rel(stats.Rt, expected.Rt) < 1e-10
    assert _rel(stats.target_sq, expected.target_sq) < 1e-10
    assert info.num_batches >= 4 and info.num_samples == 230


@pytest.fixture(scope="module")
def digits_like():
    """A small trained-looking teacher (random weights) on 300 inputs."""
    torch.manual_seed(3)
    teacher = nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 6), nn.ReLU(), nn.Linear(6, 3))
    x = torch.randn(300, 8)
    return teacher, x


@pytest.mark.parametrize(("regenerate", "compute"), [(False, "auto"), (True, "auto"), (True, "actors")])
def test_sim_fit_from_ray_dataset_equals_dataloader(regenerate, compute, digits_like, ray_cluster):
    teacher, x = digits_like
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=64)
    settings = dict(kappa=0.5, lam=1e-4, regenerate_states=regenerate)
    reference = SIM(**settings).fit(teacher, loader, solver=ADMMSolver(device="cpu", **ADMM_TOL))
    # one block: Ray Data's batches of 64 are the DataLoader's, so the stage-2 fixed points match too
    ds = ray.data.from_numpy(x.numpy())
    stream = STREAM.replace(compute=compute)
    sim = SIM(**settings, stream=stream).fit(teacher, ds, solver=ADMMSolver(device="cpu", **ADMM_TOL))
    assert sim.scales_ is not None  # the teacher is rescaled to the kappa bound, on both paths
    for key in ("A_", "B_", "C_", "D_"):
        assert _rel(getattr(sim, key), getattr(reference, key)) < 1e-6, key
    assert set(sim.stream_info_) == ({"extraction", "regeneration"} if regenerate else {"extraction"})
    assert sim.n_samples_ == 300


def test_sim_fit_stream_with_ray_admm(digits_like, ray_cluster, worker_pools):
    from idl_ray.distributed import RayADMMSolver

    teacher, x = digits_like
    reference = SIM(kappa=0.5, lam=1e-4).fit(teacher, x, solver=ADMMSolver(device="cpu", **ADMM_TOL))
    solver = RayADMMSolver(workers=worker_pools(2), timeout_s=120.0, **ADMM_TOL)
    sim = SIM(kappa=0.5, lam=1e-4, stream=STREAM).fit(teacher, _dataset(x), solver=solver)
    for stage in ("stage1", "stage2"):
        ours, ref = sim.stats_[stage].objective, reference.stats_[stage].objective
        assert abs(ours - ref) <= 1e-6 * abs(ref), stage
    assert float(sim.A_.abs().sum(dim=1).max()) <= 0.5 + 1e-12


@pytest.mark.parametrize("regenerate", [False, True])
def test_ray_solver_actors_are_held_across_stages_unless_ray_data_runs_between(regenerate, digits_like):
    """Without keep_workers, SIM.fit on a Ray Dataset keeps the solver's actors from stage 1 to stage 2,
    except around the regeneration pass (Ray Data workers need the CPUs: held actors could starve it)."""
    from idl_ray.distributed import RayADMMSolver

    teacher, x = digits_like
    solver = RayADMMSolver(num_workers=1, use_gpu=False, cpus_per_worker=0.2, timeout_s=120.0)
    sim = SIM(kappa=0.5, lam=1e-4, stream=STREAM, regenerate_states=regenerate).fit(
        teacher, _dataset(x), solver=solver
    )
    pids = [set(sim.stats_[stage].extra["pids"]) for stage in ("stage1", "stage2")]
    assert (pids[0] == pids[1]) is not regenerate
    assert sim.stats_["stage1"].converged and sim.stats_["stage2"].converged


def test_parquet_round_trip_resume_and_fit_states(digits_like, ray_cluster, tmp_path):
    teacher, x = digits_like
    path = tmp_path / "states"
    result = write_states(teacher, _dataset(x), path, rows_per_shard=70, stream=STREAM)
    assert result["written"] == [0, 1, 2, 3, 4] and result["num_rows"] == 300
    reference = extract_states(teacher, x, progress=False)
    manifest = read_manifest(path)
    assert [s["num_rows"] for s in manifest["shards"]] == [70, 70, 70, 70, 20]
    assert manifest["input_column"] == "data" and manifest["widths"] == {"U": 9, "Z": 18, "X": 18, "Y": 3}
    schema = pq.read_schema(path / "part-00000.parquet")
    assert schema.field("U").type == pa.list_(pa.float32(), 9)  # 8 inputs + the bias feature
    assert schema.field("Z").type == pa.list_(pa.float32(), 18)
    rows = np.concatenate([b["row"][:, 0] for b in iter_states(path, columns=("row",))])
    assert np.array_equal(rows, np.arange(300))  # dataset order
    stored = {k: np.concatenate([b[k] for b in iter_states(path, batch_size=50)]) for k in "UZXY"}
    for key in "UZXY":
        ref = getattr(reference, key).T.numpy()
        assert stored[key].dtype == np.float32 and stored[key].shape == ref.shape
        np.testing.assert_allclose(stored[key], ref, rtol=1e-6, atol=1e-6, err_msg=key)

    # ShardedProblem.from_parquet reads the directory (checked against the manifest)
    problem = ShardedProblem.from_parquet(path, feature_columns=("X", "U"), target_columns=("Z",))
    assert len(problem.sources) == 5
    stats, _, _ = load_sources(problem.sources)
    features = torch.cat([reference.X.T, reference.U.T], dim=1)
    expected = GramStats.from_batch(features, reference.Z.T)
    assert _rel(stats.G, expected.G) < 1e-6 and _rel(stats.Rt, expected.Rt) < 1e-6

    # SIM.fit_states == SIM.fit on the same inputs (float32 states both ways)
    settings = dict(kappa=0.5, lam=1e-4)
    fitted = SIM(**settings).fit(teacher, x, solver=ADMMSolver(device="cpu", **ADMM_TOL))
    from_parquet = SIM(**settings).fit_states(path, solver=ADMMSolver(device="cpu", **ADMM_TOL))
    for key in ("A_", "B_", "C_", "D_"):
        assert _rel(getattr(from_parquet, key), getattr(fitted, key)) < 1e-6, key

    # an interruption: shards 1 and 3 lost, no manifest, a half-written temporary file left behind
    mtimes = {k: (path / f"part-{k:05d}.parquet").stat().st_mtime_ns for k in (0, 2, 4)}
    for k in (1, 3):
        (path / f"part-{k:05d}.parquet").unlink()
    (path / "_manifest.json").unlink()
    (path / ".part-00001.parquet.tmp").write_bytes(b"PAR1 truncated")
    with pytest.raises(ConfigError, match="incomplete state write"):
        SIM(**settings).fit_states(path)
    resumed = write_states(teacher, _dataset(x), path, rows_per_shard=70, stream=STREAM)
    assert resumed["written"] == [1, 3] and resumed["kept"] == [0, 2, 4]
    for k, mtime in mtimes.items():
        assert (path / f"part-{k:05d}.parquet").stat().st_mtime_ns == mtime
    again = {k: np.concatenate([b[k] for b in iter_states(path)]) for k in "UZXY"}
    for key in "UZXY":
        assert np.array_equal(again[key], stored[key])
    # a complete directory is left alone
    assert write_states(teacher, _dataset(x), path, rows_per_shard=70, stream=STREAM)["written"] == []
    # resuming with other settings is refused
    (path / "_manifest.json").unlink()
    with pytest.raises(ConfigError, match="other settings"):
        write_states(teacher, _dataset(x), path, rows_per_shard=50, stream=STREAM)


def test_corrupted_or_foreign_parquet_directory(digits_like, ray_cluster, tmp_path):
    teacher, x = digits_like
    path = tmp_path / "states"
    write_states(teacher, _dataset(x[:100], blocks=1), path, rows_per_shard=40, stream=STREAM)
    shard = path / "part-00001.parquet"
    shard.write_bytes(shard.read_bytes()[:100])  # truncated
    with pytest.raises(ConfigError, match=r"corrupted: shard part-00001\.parquet cannot be read"):
        read_manifest(path)
    with pytest.raises(ConfigError, match="corrupted"):
        ShardedProblem.from_parquet(path, feature_columns=("X", "U"), target_columns=("Z",))
    shard.unlink()
    with pytest.raises(ConfigError, match=r"part-00001\.parquet is missing"):
        SIM().fit_states(path)
    with pytest.raises(ConfigError, match="not a states directory"):
        SIM().fit_states(tmp_path)


@ray.remote(num_cpus=0)
class _Counter:
    def __init__(self) -> None:
        self.loads: list[str] = []

    def add(self, who: str) -> None:
        self.loads.append(who)

    def get(self) -> list[str]:
        return self.loads


@pytest.mark.parametrize("compute", ["tasks", "actors"])
def test_teacher_loaded_once_per_worker(compute, ray_cluster):
    counter = _Counter.options(name="idl_ray_test_teacher_loads").remote()
    driver = os.getpid()
    try:

        def factory() -> nn.Module:  # defined here so that cloudpickle ships it by value to the workers
            who = (
                "driver"
                if os.getpid() == driver
                else f"{os.getpid()}:{ray.get_runtime_context().get_actor_id()}"
            )
            ray.get(ray.get_actor("idl_ray_test_teacher_loads").add.remote(who), timeout=60)
            torch.manual_seed(5)
            return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))

        x = torch.randn(400, 4)
        config = STREAM.replace(batch_size=20, compute=compute)
        sim = SIM(kappa=0.5, stream=config).fit(
            factory, _dataset(x, blocks=8), solver=ADMMSolver(device="cpu")
        )
        info = sim.stream_info_["extraction"]
        loads = ray.get(counter.get.remote(), timeout=60)
        in_actors = [who for who in loads if who != "driver"]
        assert info.num_batches >= 20 and info.num_samples == 400  # batches do not span blocks
        assert len(in_actors) == len(set(in_actors))  # once per worker, however many batches
        assert 1 <= info.actors <= config.num_actors < info.num_batches
        if compute == "actors":
            # info.actors counts the actors that produced batches; an actor of the pool that Ray Data started
            # but gave no batch (seen once in CI, on a busy machine) has loaded the teacher too
            assert info.actors <= len(in_actors) <= config.num_actors
        else:  # a task loads it in the worker process that runs it
            assert len(in_actors) == info.actors
        assert loads.count("driver") == 1  # the driver builds it once, to check and analyse it
    finally:
        ray.kill(counter)


def test_workers_are_capped_by_the_batches_of_a_materialised_dataset(ray_cluster):
    """A dataset with one batch's worth of rows gets one worker (no idle actor, no Ray Data warning about
    unused concurrency); a lazy dataset, whose row count is unknown, keeps num_actors."""
    import warnings

    from idl_ray.distributed.extraction import useful_workers

    config = STREAM.replace(num_actors=3, batch_size=100)
    assert useful_workers(_dataset(torch.randn(100, 4)), config) == 1
    assert useful_workers(_dataset(torch.randn(150, 4)), config) == 2
    assert useful_workers(_dataset(torch.randn(1000, 4)), config) == 3
    assert useful_workers(_dataset(torch.randn(1000, 4), blocks=2), config) == 2  # a block is not split
    lazy = _dataset(torch.randn(100, 4)).map_batches(lambda batch: batch)
    assert useful_workers(lazy, config) == 3
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sim = SIM(kappa=0.5, stream=config.replace(compute="actors")).fit(
            teacher, _dataset(torch.randn(100, 4)), solver=ADMMSolver(device="cpu")
        )
    assert sim.stream_info_["extraction"].actors == 1
    assert not [w for w in caught if "concurren" in str(w.message)]


# ---------------------------------------------------------------------------------------- bad inputs
def _explode(batch):
    raise RuntimeError("the pipeline ran")


def test_unsupported_teacher_fails_before_any_ray_work(ray_cluster):
    teacher = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.ReLU(), nn.Linear(4, 2))
    ds = ray.data.range(10).map_batches(_explode)  # would raise if anything ran
    with pytest.raises(UnsupportedLayerError, match="LayerNorm"):
        SIM(stream=STREAM).fit(teacher, ds)
    with pytest.raises(UnsupportedLayerError, match="LayerNorm"):
        write_states(teacher, ds, "/nonexistent/never-created", stream=STREAM)


def test_dataset_input_errors(digits_like, ray_cluster):
    teacher, x = digits_like
    sim = SIM(stream=STREAM)
    two = ray.data.from_items([{"a": np.ones(8), "b": np.zeros(8)} for _ in range(4)])
    with pytest.raises(ConfigError, match="cannot tell which column"):
        sim.fit(teacher, two)
    with pytest.raises(ConfigError, match=r"input_column 'c' .* not in the dataset"):
        SIM(stream=STREAM, input_column="c").fit(teacher, two)
    with pytest.raises(
        ShapeError, match=r"cannot take the SIM inputs: a batch of shape \(batch, 5\).*first layer is Linear"
    ):
        sim.fit(teacher, ray.data.from_numpy(np.ones((10, 5), np.float32)))
    empty = ray.data.from_numpy(x.numpy()).filter(lambda row: False)
    with pytest.raises(ConfigError, match="empty dataset"):
        sim.fit(teacher, empty)
    with pytest.raises(ConfigError, match="StreamConfig"):
        SIM(stream={"num_actor": 2}).fit(teacher, ray.data.from_numpy(x.numpy()))
    # a labelled dataset: the one tensor column is the inputs, the labels are ignored
    labelled = ray.data.from_items([{"x": x[i].numpy(), "y": i % 3} for i in range(40)])
    fitted = SIM(kappa=0.5, stream=STREAM).fit(teacher, labelled, solver=ADMMSolver(device="cpu"))
    assert fitted.n_samples_ == 40


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_inputs_name_the_batch(bad, digits_like, ray_cluster, tmp_path):
    teacher, x = digits_like
    x = x.clone()
    x[150, 2] = bad
    if bad == float("inf"):  # the Parquet sink's pass (states, not statistics) names the rows as well
        with pytest.raises(ConfigError, match=r"rows 128\.\.191 of the dataset .*non-finite"):
            write_states(teacher, ray.data.from_numpy(x.numpy()), tmp_path / "s", stream=STREAM)
        assert not (tmp_path / "s" / "_manifest.json").exists()
    with pytest.raises(
        ConfigError, match=r"rows 128\.\.191 of the dataset .*non-finite .* row 22 of the batch"
    ):
        SIM(stream=STREAM).fit(teacher, ray.data.from_numpy(x.numpy()))


def test_sample_solvers_are_refused_before_streaming(digits_like, ray_cluster):
    teacher, x = digits_like
    from idl_ray.sim.solvers import CVXSolver

    with pytest.raises(ConfigError, match="keeps no samples"):  # CVX solves 'exact' from the samples
        SIM(variant="exact", stream=STREAM).fit(teacher, ray.data.from_numpy(x.numpy()), solver=CVXSolver())


def test_stream_config_rejects_bad_values():
    with pytest.raises(ConfigError, match="num_actors"):
        StreamConfig(num_actors=0)
    with pytest.raises(ConfigError, match="use_gpu"):
        StreamConfig(use_gpu="yes")
    with pytest.raises(ConfigError, match="compute"):
        StreamConfig(compute="threads")
    # tasks on CPU (no pool to start per pass), actors where each holds a GPU and the teacher on it
    assert not StreamConfig().uses_actors(use_gpu=False) and StreamConfig().uses_actors(use_gpu=True)
    assert StreamConfig(compute="actors").uses_actors(use_gpu=False)
    assert not StreamConfig(compute="tasks").uses_actors(use_gpu=True)
    assert StreamConfig.from_dict({"batch_size": 8}).batch_size == 8


def test_sim_job_streams_with_a_ray_solver(ray_cluster, worker_pools):
    from idl_ray.jobs.sim_job import SimJobConfig, run_sim_job

    worker_pools(2)  # other work holds 0.2 CPU: the job sizes its actors from the free CPUs (sized from the
    # total, its solver actor took 1 of the 1.8 free, Ray Data's read task never got a whole CPU: it waited forever)

    config = SimJobConfig(
        hidden=(16,), teacher_epochs=3, solver="ray-admm", workers=1, use_gpu=False, kappa=0.9
    )
    report = run_sim_job(config, log=lambda _: None)
    from idl_ray.datasets import load_dataset

    extraction = report["streaming"]["extraction"]  # the states streamed through one Ray Data worker
    assert extraction["actors"] == 1
    assert extraction["num_samples"] == len(load_dataset("digits", seed=0).x_train)
    assert report["sim_accuracy"] >= report["teacher_accuracy"] - 0.05


@ray.remote
class _CPUHolder:
    def ready(self) -> bool:
        return True


def test_sim_job_without_a_free_cpu_for_ray_data_fails_fast(ray_cluster, monkeypatch):
    from idl_ray.errors import ClusterConfigError
    from idl_ray.jobs import sim_job
    from idl_ray.jobs.sim_job import SimJobConfig, run_sim_job

    monkeypatch.setattr(sim_job, "_FREE_CPU_WAIT_S", 1.0)  # the job waits this long for a CPU to free up

    free = float(ray.available_resources().get("CPU", 0.0))
    holder = _CPUHolder.options(num_cpus=free - 0.5).remote()  # leaves half a CPU: Ray Data's read needs one
    try:
        ray.get(holder.ready.remote(), timeout=60)
        config = SimJobConfig(hidden=(16,), teacher_epochs=1, solver="ray-admm", workers=1, use_gpu=False)
        with pytest.raises(ClusterConfigError, match=r"free CPU.*after waiting 1 s"):
            run_sim_job(config, log=lambda _: None)
    finally:
        ray.kill(holder)
