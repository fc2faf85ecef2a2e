"""train_implicit on real Ray Train (local Ray, 2 CPU workers): accuracy, the bound on every replica,
equal replicas, resume without redone epochs, a worker failure survived, ImplicitRNN on a Ray Dataset,
bad input rejected before any worker starts, and ``idl-ray train --workers 2``.

Ray Train start-up dominates (about 10-40 s a run on this shared machine), so the digits runs are made
once per module and shared: run "digits" trains 2 epochs through the ``idl-ray train`` job and is then
started again with ``train_implicit`` and the same name for 4 epochs (it resumes); run
"digits-failure" trains the same model 4 epochs with a loss that kills rank 1 once in epoch 2.
"""

from __future__ import annotations

import math
import pathlib
import sys

import pytest
import ray
import ray.cloudpickle
import ray.data
import ray.train
import torch

from idl_ray import ImplicitModel, ImplicitRNN
from idl_ray.cli import build_parser, options_from_args
from idl_ray.datasets import load_dataset
from idl_ray.distributed import TrainResult, train_implicit
from idl_ray.distributed.train import _load_state
from idl_ray.errors import ConfigError, ConfigTypeError, DistributedError, ShapeError
from idl_ray.implicit.projection import inf_norm
from idl_ray.jobs.train_job import TrainJobConfig, run_train_job

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import train_helpers

ray.cloudpickle.register_pickle_by_value(train_helpers)

BATCH = 32
WORKERS = 2


def scaling() -> ray.train.ScalingConfig:
    return ray.train.ScalingConfig(num_workers=WORKERS, resources_per_worker={"CPU": 0.4})


def steps_per_epoch(samples: int) -> int:
    return math.ceil(math.ceil(samples / WORKERS) / BATCH)


def adam_steps(checkpoint: ray.train.Checkpoint) -> int:
    """The step count Adam itself stored in a checkpoint (independent of our counters)."""
    state = _load_state(checkpoint)["optimizer"]["state"]
    counts = {int(s["step"]) for s in state.values()}
    assert len(counts) == 1
    return counts.pop()


def checkpoints_in(result: TrainResult) -> list[pathlib.Path]:
    return sorted(p for p in pathlib.Path(result.path).glob("checkpoint_*") if p.is_dir())


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return int((model(x).argmax(dim=1) == y).sum()) / len(y)


@pytest.fixture(scope="module", autouse=True)
def _quick_controller_polls():
    """Ray Train's controller takes one report per poll; its interval is read from the driver's
    environment at each fit. 0.1 s keeps these short epochs from waiting for it."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
        yield


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def storage(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("train_runs").resolve())


@pytest.fixture(scope="module")
def digits_runs(digits, storage) -> tuple[dict, TrainResult]:
    """The same run started twice: 2 epochs by ``idl-ray train --workers 2``, then again with
    ``train_implicit(epochs=4)`` (it resumes)."""
    flags = ["train", "--workers", str(WORKERS), "--cpus-per-worker", "0.4", "--hidden-dim", "32"]
    flags += ["--kappa", str(train_helpers.KAPPA), "--epochs", "2", "--batch-size", str(BATCH)]
    flags += ["--lr", "0.003", "--storage-path", storage, "--name", "digits"]
    config = options_from_args(TrainJobConfig, build_parser().parse_args(flags))
    report = run_train_job(config, log=lambda _: None)
    resumed = train_implicit(
        train_helpers.digits_model,
        (digits.x_train, digits.y_train),
        eval_data=(digits.x_test, digits.y_test),
        epochs=4,
        batch_size=BATCH,
        lr=3e-3,
        seed=0,
        scaling_config=scaling(),
        run_config=ray.train.RunConfig(name="digits", storage_path=storage),
    )
    return report, resumed


@pytest.fixture(scope="module")
def failure_run(digits, storage) -> tuple[TrainResult, pathlib.Path]:
    marker = pathlib.Path(storage) / "failure-marker.txt"
    spe = steps_per_epoch(len(digits.x_train))
    loss_fn = train_helpers.FailOnceOnRank(str(marker), rank=1, at_call=spe + 3)  # mid epoch 2
    result = train_implicit(
        train_helpers.digits_model,
        (digits.x_train, digits.y_train),
        eval_data=(digits.x_test, digits.y_test),
        loss_fn=loss_fn,
        epochs=4,
        batch_size=BATCH,
        lr=3e-3,
        seed=0,
        scaling_config=scaling(),
        run_config=ray.train.RunConfig(
            name="digits-failure",
            storage_path=storage,
            failure_config=ray.train.FailureConfig(max_failures=1),
        ),
    )
    return result, marker


def test_two_workers_train_digits_within_the_bound(digits, digits_runs):
    _, result = digits_runs
    model = result.model
    assert type(model) is ImplicitModel and not model.training
    assert all(p.device.type == "cpu" for p in model.parameters())
    test_accuracy = accuracy(model, digits.x_test, digits.y_test)
    assert test_accuracy >= 0.93
    # the workers' sharded, all-reduced evaluation agrees with the driver's on the returned weights
    assert result.metrics[-1]["eval_accuracy"] == pytest.approx(test_accuracy, abs=1e-12)
    assert inf_norm(model.A.detach()) <= train_helpers.KAPPA
    # smallest kappa - ||A||_inf after any optimiser step on any replica, per epoch
    assert all(0.0 <= m["kappa_margin"] < 1e-3 for m in result.metrics)  # the bound was active
    assert result.metrics[-1]["train_loss"] < result.metrics[0]["train_loss"]
    assert all(m["fp_iterations"] > 1 and m["nonconverged"] == 0 for m in result.metrics)


def test_replicas_hold_equal_parameters(digits_runs, failure_run):
    report, resumed = digits_runs
    for metrics in (report["metrics"], resumed.metrics, failure_run[0].metrics):
        assert [m["num_workers"] for m in metrics] == [WORKERS] * len(metrics)
        # max |p_rank0 - p_rank1| over every parameter, all-reduced at the end of every epoch
        assert [m["replica_max_diff"] for m in metrics] == [0.0] * len(metrics)


def test_resume_continues_the_epoch_count_without_redoing_epochs(digits, digits_runs):
    report, resumed = digits_runs
    spe = steps_per_epoch(len(digits.x_train))
    assert [m["epoch"] for m in report["metrics"]] == [1, 2]
    assert [m["epoch"] for m in resumed.metrics] == [1, 2, 3, 4]
    assert resumed.metrics[:2] == report["metrics"]  # the finished epochs are carried over, not rerun
    assert adam_steps(ray.train.Checkpoint.from_directory(report["checkpoint_path"])) == 2 * spe
    assert adam_steps(resumed.checkpoint) == 4 * spe  # 6 * spe if epochs 1-2 had been redone
    assert [m["optimizer_steps"] for m in resumed.metrics] == [spe, 2 * spe, 3 * spe, 4 * spe]
    assert len(checkpoints_in(resumed)) == 4  # one per epoch, in the run's folder
    assert resumed.path == report["run_path"]


def test_train_command_runs_on_ray_train_workers(digits_runs):
    report, _ = digits_runs
    assert report["workers"] == WORKERS and report["device"] == "ray-train cpu"
    assert report["A_inf_norm"] <= train_helpers.KAPPA
    # the job's own accuracy (driver, returned model) is the workers' last evaluation
    assert report["test_accuracy"] == pytest.approx(report["metrics"][-1]["eval_accuracy"], abs=1e-6)
    assert report["test_accuracy"] > 0.85


def test_a_worker_failure_is_survived_from_the_last_checkpoint(digits, digits_runs, failure_run):
    result, marker = failure_run
    spe = steps_per_epoch(len(digits.x_train))
    assert marker.exists()  # rank 1 did raise, in epoch 2
    assert [m["epoch"] for m in result.metrics] == [1, 2, 3, 4]
    assert adam_steps(result.checkpoint) == 4 * spe
    assert len(checkpoints_in(result)) == 4
    # restarted from epoch 1's checkpoint (weights, Adam state, RNG) it retraced the uninterrupted
    # trajectory: the same weights as the run that was stopped after epoch 2 and resumed
    _, resumed = digits_runs
    ours, reference = result.model.state_dict(), resumed.model.state_dict()
    assert ours.keys() == reference.keys()
    for name in ours:
        assert torch.equal(ours[name], reference[name]), name
    assert inf_norm(result.model.A.detach()) <= train_helpers.KAPPA


def test_implicit_rnn_trains_on_a_ray_dataset(storage):
    x, y = train_helpers.sign_of_sum(768)
    rows = [{"x": x[i].numpy(), "y": int(y[i])} for i in range(len(x))]
    train = ray.data.from_items(rows[:512])
    evaluation = ray.data.from_items(rows[512:])
    result = train_implicit(
        train_helpers.sequence_model,
        train,
        eval_data=evaluation,
        epochs=3,
        batch_size=BATCH,
        lr=1e-2,
        scaling_config=scaling(),
        run_config=ray.train.RunConfig(name="rnn", storage_path=storage),
    )
    model = result.model
    assert type(model) is ImplicitRNN
    test_accuracy = accuracy(model, x[512:], y[512:])
    assert test_accuracy >= 0.85
    assert result.metrics[-1]["eval_accuracy"] == pytest.approx(test_accuracy, abs=1e-12)
    # Ray Data splits 512 rows equally: 256 per worker, 8 steps of 32 per epoch
    assert [m["optimizer_steps"] for m in result.metrics] == [8, 16, 24]
    assert all(m["kappa_margin"] >= 0.0 and m["replica_max_diff"] == 0.0 for m in result.metrics)
    assert inf_norm(model.cell.implicit.A.detach()) <= 0.9


def test_failures_beyond_max_failures_raise_a_distributed_error(digits, storage):
    with pytest.raises(DistributedError, match=r"'fails'.*max_failures=0") as caught:
        train_implicit(
            train_helpers.digits_model,
            (digits.x_train[:64], digits.y_train[:64]),
            loss_fn=train_helpers.always_fails,
            epochs=1,
            scaling_config=scaling(),
            run_config=ray.train.RunConfig(name="fails", storage_path=storage),
        )
    assert isinstance(caught.value.__cause__, ray.train.TrainingFailedError)
    assert "always raises" in str(caught.value)


@pytest.mark.parametrize(
    ("change", "error", "pattern"),
    [
        ({"train_data": "wrong_columns"}, ConfigError, r"'train_data'.*columns 'x'.*\['features', 'y'\]"),
        ({"model_fn": train_helpers.not_implicit_model}, ConfigTypeError, "'model_fn'.*returned Linear"),
        ({"model_fn": "ImplicitModel"}, ConfigTypeError, "'model_fn'.*callable"),
        ({"batch_size": 0}, ConfigError, "'batch_size' parameter of train_implicit.*Got 0"),
        ({"epochs": 0}, ConfigError, "'epochs' parameter of train_implicit.*Got 0"),
        ({"optimizer": "lbfgs"}, ConfigError, "'optimizer'.*adam"),
        ({"train_data": "narrow"}, ShapeError, "'train_data'.*do not fit the model"),
        ({"train_data": "unequal"}, ShapeError, "same number"),
        ({"loss_fn": "mse"}, ConfigTypeError, "'loss_fn'"),
        ({"storage_path": "relative/runs"}, ConfigError, "absolute path"),
    ],
)
def test_bad_input_is_rejected_before_any_worker_starts(digits, storage, change, error, pattern):
    change = dict(change)
    data = {
        "wrong_columns": lambda: ray.data.from_items([{"features": [0.0] * 64, "y": 0}] * 4),
        "narrow": lambda: (digits.x_train[:, :63], digits.y_train),
        "unequal": lambda: (digits.x_train, digits.y_train[:-1]),
    }
    arguments = {
        "model_fn": train_helpers.digits_model,
        "train_data": (digits.x_train, digits.y_train),
        "epochs": 1,
        "scaling_config": scaling(),
        "run_config": ray.train.RunConfig(name="bad", storage_path=change.pop("storage_path", storage)),
    }
    for key, value in change.items():
        arguments[key] = data[value]() if key == "train_data" else value
    with pytest.raises(error, match=pattern):
        train_implicit(**arguments)
    assert not (pathlib.Path(storage) / "bad").exists()  # no run was started
