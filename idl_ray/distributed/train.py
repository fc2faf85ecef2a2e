r"""Gradient training of implicit models on Ray Train: many workers, checkpoints, resume, failures survived.

:func:`train_implicit` runs the usual mini-batch loop of an :class:`~idl_ray.ImplicitModel` or
:class:`~idl_ray.ImplicitRNN` on ``k`` Ray Train workers (``ray.train.torch.TorchTrainer``, Train V2)
with data parallelism (DDP): every worker holds a replica, computes the gradient of its own
``batch_size`` samples, the gradients are averaged by an all-reduce, and every replica takes the same
optimiser step. The effective batch per step is ``k * batch_size``.

Well-posedness on every replica. After every optimiser step each replica enforces
``||A||_inf <= kappa`` in place (:meth:`ImplicitModel.project_`: the scaling of ``constraint="shrink"``,
the Euclidean projection of ``"project"``). The replicas hold equal parameters and receive the same
averaged gradient, and the enforcement is a deterministic function of the parameters, so they stay
equal: nothing is broadcast after the start. Each epoch reports the smallest margin
``kappa - ||A||_inf`` seen after any step on any replica (``kappa_margin``, never negative) and the
largest difference between the replicas' parameters (``replica_max_diff``, 0 on CPU).

Checkpoints. At the end of every epoch the workers report their metrics with a checkpoint holding the
model's ``state_dict``, the optimiser state, the epoch, the metrics of every epoch so far, and every
worker's RNG state (``state.pt`` from rank 0, ``rng_rank{r}.pt`` from rank ``r``). A worker group that
starts with a checkpoint (``ray.train.get_checkpoint()``: after a failure under
``FailureConfig(max_failures=...)``, or a run started again with the same ``RunConfig(name=...,
storage_path=...)``) loads it and continues with the next epoch: finished epochs are never redone.

Data. ``train_data`` is a Ray Dataset with columns ``"x"`` and ``"y"`` (split across workers by Ray
Train with equal row counts; shuffle it beforehand if order matters), or a pair ``(inputs, targets)``
of tensors or arrays. A pair travels with the training function through Ray's object store (fine up to
hundreds of MB; use a Ray Dataset beyond that). Each epoch it is permuted with a generator seeded by
``(seed, epoch)``, padded to a multiple of the number of workers, and dealt round-robin, as
``torch.utils.data.DistributedSampler`` does, so every worker runs the same number of steps.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from idl_ray._validation import Options, bad_parameter, check_choice, check_positive_float, check_positive_int
from idl_ray.errors import ConfigError, ConfigTypeError, DistributedError, IDLError, ShapeError
from idl_ray.implicit.model import ImplicitModel
from idl_ray.implicit.rnn import ImplicitRNN

#: the controller's poll (``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``) set when the user has not set one
POLL_INTERVAL_S = "0.1"

__all__ = ["OPTIMIZERS", "TrainResult", "TrainSettings", "train_implicit"]

_OWNER = "train_implicit"

#: optimiser names accepted by :func:`train_implicit` (``"sgd"`` is plain SGD, no momentum)
OPTIMIZERS = ("adam", "adamw", "sgd")

_STATE_FILE = "state.pt"
_RNG_FILE = "rng_rank{}.pt"
_DATA_COLUMNS = ("x", "y")
_EVAL_CHUNK = 1024  # samples per evaluation forward


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainSettings(Options):
    """The algorithm settings of :func:`train_implicit` (how to run lives in Ray's own configs).

    Attributes
    ----------
    epochs : int >= 1, the total number of epochs of the run (a resumed run counts the finished ones).
    batch_size : int >= 1, samples per step **per worker**.
    lr : float > 0, learning rate.
    optimizer : one of :data:`OPTIMIZERS`.
    seed : int, seeds the initial weights (identical on every worker) and the epoch permutations.
    """

    epochs: int = 10
    batch_size: int = 64
    lr: float = 3e-3
    optimizer: str = "adam"
    seed: int = 0

    def _validate(self) -> None:
        check_positive_int(self.epochs, "epochs", _OWNER)
        check_positive_int(self.batch_size, "batch_size", _OWNER)
        check_positive_float(self.lr, "lr", _OWNER)
        check_choice(self.optimizer, "optimizer", _OWNER, OPTIMIZERS)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise bad_parameter("seed", _OWNER, "a non-negative integer", self.seed)


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """What :func:`train_implicit` returns.

    Attributes
    ----------
    model : the ``ImplicitModel`` / ``ImplicitRNN`` built by ``model_fn`` on the driver, on the CPU, in
        eval mode, holding the weights of the last epoch.
    metrics : one dict per epoch of the run (all of them, also those of an earlier, resumed session):
        ``epoch`` (1-based), ``train_loss``, ``eval_loss`` and, for class labels, ``eval_accuracy`` (with
        ``eval_data``), ``fp_iterations`` / ``bp_iterations`` (mean forward / backward fixed-point
        iterations per solve over the epoch's training steps, all workers), ``nonconverged`` (samples
        of those solves that stopped at their cap, forward + backward, all workers), ``kappa_margin``
        (smallest ``kappa - ||A||_inf`` after any step on any worker), ``replica_max_diff``,
        ``optimizer_steps`` (cumulative), ``num_workers``, ``epoch_time_s`` (rank 0, training and
        evaluation), ``started_at`` (rank 0's ``time.time()`` at the epoch's start: the differences
        include reporting and checkpointing).
    checkpoint : the ``ray.train.Checkpoint`` of the last epoch.
    path : the run's folder (``storage_path/name``).
    ray_result : the ``ray.train.Result`` of ``TorchTrainer.fit()``.
    """

    model: nn.Module
    metrics: list[dict[str, Any]]
    checkpoint: ray.train.Checkpoint
    path: str
    ray_result: Any = dataclasses.field(repr=False, default=None)


def train_implicit(
    model_fn: Callable[[], nn.Module],
    train_data: Any,
    *,
    eval_data: Any = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    epochs: int = 10,
    batch_size: int = 64,
    lr: float = 3e-3,
    optimizer: str = "adam",
    seed: int = 0,
    scaling_config: ray.train.ScalingConfig | None = None,
    run_config: ray.train.RunConfig | None = None,
) -> TrainResult:
    r"""Train an implicit model by mini-batch gradient descent on Ray Train workers (DDP).

    Every step, on each of the ``k`` workers: ``loss = loss_fn(model(x), y)`` on the worker's
    ``batch_size`` samples, backward (implicit differentiation), gradients averaged across workers,
    optimiser step, then ``||A||_inf <= kappa`` enforced in place on every replica. So one step
    consumes ``k * batch_size`` samples and an epoch about ``ceil(N / (k * batch_size))`` steps.

    Parameters
    ----------
    model_fn : callable () -> ImplicitModel or ImplicitRNN
        Builds the model; called once on the driver (to check it, and to hold the result) and once
        on every worker, under ``torch.manual_seed(seed)`` so that all replicas start equal. Must be
        picklable (a function, a ``functools.partial``, a lambda).
    train_data : ray.data.Dataset or (inputs, targets)
        A Dataset with columns ``"x"`` (inputs, one row per sample) and ``"y"`` (targets), or a pair
        of tensors / arrays with the same first dimension. Inputs take the model's dtype.
    eval_data : same forms, optional
        Evaluated after every epoch with the un-wrapped model in eval mode: a pair is sharded across
        the workers and the sums all-reduced; a Dataset is read whole by rank 0.
    loss_fn : callable (outputs, targets) -> scalar tensor, optional
        The mean loss of a batch (as torch's losses by default). Default: cross-entropy (``targets``
        are class indices). Also used for ``eval_loss``.
    epochs, batch_size, lr, optimizer, seed
        See :class:`TrainSettings`. ``batch_size`` is **per worker**.
    scaling_config : ray.train.ScalingConfig, optional
        Workers and resources, taken as it is. Default ``ScalingConfig(num_workers=2, use_gpu=False)``.
        With ``use_gpu=True`` each worker trains on the GPU Ray assigned to it.
    run_config : ray.train.RunConfig, optional
        ``name``, ``storage_path`` (absolute, or a URI), ``failure_config``
        (``FailureConfig(max_failures=...)``: restarts from the last checkpoint) and
        ``checkpoint_config`` (``CheckpointConfig(num_to_keep=...)``), taken as it is. Starting again
        with the same ``name`` and ``storage_path`` and a larger ``epochs`` resumes the run from its
        latest checkpoint; a run whose checkpoint already holds ``epochs`` epochs (or more) trains
        nothing and returns that checkpoint.

    Returns
    -------
    TrainResult
        ``model`` (CPU), ``metrics`` (one dict per epoch), ``checkpoint``, ``path``, ``ray_result``.

    Raises
    ------
    ConfigError, ConfigTypeError, ShapeError
        Bad settings, a ``model_fn`` that does not return an ImplicitModel / ImplicitRNN, data without
        the columns ``"x"`` and ``"y"`` or inputs that do not fit the model: raised on the driver,
        before any worker starts.
    DistributedError
        The run failed on the workers more often than ``FailureConfig(max_failures=...)`` allows (the
        Ray error is the ``__cause__``).

    Notes
    -----
    Ray Train's controller takes one report per worker each ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``
    seconds (Ray's default 2 s), so an epoch shorter than that would last that long. Unless the variable
    is already set, this call sets it to 0.1 in the driver's environment (Ray passes it on to the
    controller), so short epochs are not padded. See ``docs/train.md``.

    Examples
    --------
    >>> import functools, ray.train
    >>> from idl_ray import ImplicitModel
    >>> from idl_ray.datasets import load_dataset
    >>> split = load_dataset("digits")
    >>> result = train_implicit(  # doctest: +SKIP
    ...     functools.partial(ImplicitModel, 64, 10, 100, kappa=0.95, bias=True),
    ...     (split.x_train, split.y_train),
    ...     eval_data=(split.x_test, split.y_test),
    ...     epochs=5,
    ...     scaling_config=ray.train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
    ...     run_config=ray.train.RunConfig(name="digits", storage_path="/tmp/idl_runs"),
    ... )
    >>> result.metrics[-1]["eval_accuracy"], result.model.A.abs().sum(1).max()  # doctest: +SKIP
    """
    settings = TrainSettings(epochs=epochs, batch_size=batch_size, lr=lr, optimizer=optimizer, seed=seed)
    model = _checked_model(model_fn, seed)
    if loss_fn is not None and not callable(loss_fn):
        raise ConfigTypeError(
            f"The 'loss_fn' argument of {_OWNER} must be a callable (outputs, targets) -> scalar loss, or "
            f"None for cross-entropy. Got {type(loss_fn).__name__}."
        )
    dtype = _model_dtype(model)
    train = _checked_data(train_data, "train_data", model, dtype)
    evaluation = None if eval_data is None else _checked_data(eval_data, "eval_data", model, dtype)
    scaling_config, run_config = _checked_configs(scaling_config, run_config)

    datasets = {}
    config: dict[str, Any] = {
        "model_fn": model_fn,
        "loss_fn": loss_fn,
        "settings": settings.to_dict(),
        "dtype": dtype,
    }
    for key, data in (("train", train), ("eval", evaluation)):
        if isinstance(data, ray.data.Dataset):
            datasets[key] = data
            config[key] = "dataset"
        else:
            config[key] = data  # a (inputs, targets) pair of CPU tensors, or None

    # Ray's 2 s poll would pad every short epoch to 2 s (see Notes); a value the user set wins
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", POLL_INTERVAL_S)
    trainer = ray.train.torch.TorchTrainer(
        _train_loop_per_worker,
        train_loop_config=config,
        scaling_config=scaling_config,
        run_config=run_config,
        datasets=datasets or None,
        # the training set is split across workers (equal row counts); an evaluation set is read by rank 0
        dataset_config=ray.train.DataConfig(datasets_to_split=[k for k in datasets if k == "train"]),
    )
    try:
        ray_result = trainer.fit()
    except ray.train.TrainingFailedError as error:
        raise DistributedError(
            f"{_OWNER}: the Ray Train run {run_config.name!r} failed (FailureConfig(max_failures="
            f"{run_config.failure_config.max_failures}) exhausted or a controller error): {error}. Raise "
            "max_failures to survive more worker failures; the run resumes from its last checkpoint when "
            "started again with the same RunConfig(name=..., storage_path=...)."
        ) from error
    checkpoint = ray_result.checkpoint
    if checkpoint is None:
        raise DistributedError(f"{_OWNER}: the Ray Train run {run_config.name!r} produced no checkpoint.")
    state = _load_state(checkpoint)
    model.load_state_dict(state["model"])
    model.cpu().eval()
    for module in _implicit_modules(model):
        module.reset_telemetry()
    return TrainResult(
        model=model,
        metrics=list(state["metrics"]),
        checkpoint=checkpoint,
        path=str(ray_result.path),
        ray_result=ray_result,
    )


# ---------------------------------------------------------------------------------------------- driver checks
def _checked_model(model_fn: Any, seed: int) -> nn.Module:
    if not callable(model_fn):
        raise ConfigTypeError(
            f"The 'model_fn' argument of {_OWNER} must be a callable () -> ImplicitModel or ImplicitRNN. "
            f"Got {type(model_fn).__name__}; pass e.g. functools.partial(ImplicitModel, 64, 10, 100)."
        )
    torch.manual_seed(seed)
    model = model_fn()
    if not isinstance(model, (ImplicitModel, ImplicitRNN)):
        raise ConfigTypeError(
            f"The 'model_fn' argument of {_OWNER} must return an ImplicitModel or an ImplicitRNN. It returned "
            f"{type(model).__name__}. Wrap other modules around the implicit one inside an ImplicitModel "
            "subclass, or train them with a plain Ray Train loop."
        )
    return model


def _model_dtype(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def _checked_data(data: Any, name: str, model: nn.Module, dtype: torch.dtype) -> Any:
    """A Ray Dataset with the columns "x" and "y", or the pair as CPU tensors (inputs in ``dtype``)."""
    if isinstance(data, ray.data.Dataset):
        schema = data.schema()
        columns = list(schema.names) if schema is not None else []
        missing = [c for c in _DATA_COLUMNS if c not in columns]
        if missing:
            raise ConfigError(
                f"The '{name}' argument of {_OWNER} must have the columns 'x' (inputs) and 'y' (targets). "
                f"Got columns {columns}: {missing} missing. Rename them, e.g. "
                f"ds.rename_columns({{'image': 'x', 'label': 'y'}})."
            )
        return data
    if not isinstance(data, Sequence) or isinstance(data, str) or len(data) != 2:
        raise ConfigTypeError(
            f"The '{name}' argument of {_OWNER} must be a ray.data.Dataset with columns 'x' and 'y' or a pair "
            f"(inputs, targets) of tensors or arrays. Got {type(data).__name__}."
        )
    tensors = []
    for part, value in zip(("inputs", "targets"), data):
        if isinstance(value, np.ndarray):
            value = torch.from_numpy(np.ascontiguousarray(value))
        if not torch.is_tensor(value):
            raise ConfigTypeError(
                f"The {part} of '{name}' ({_OWNER}) must be a tensor or a numpy array. Got "
                f"{type(value).__name__}."
            )
        tensors.append(value.detach().cpu())
    x, y = tensors
    if x.dim() == 0 or y.dim() == 0 or len(x) != len(y) or len(x) == 0:
        raise ShapeError(
            f"The inputs and targets of '{name}' ({_OWNER}) must hold the same number (>= 1) of samples "
            f"along dim 0. Got inputs {tuple(x.shape)} and targets {tuple(y.shape)}."
        )
    if not x.is_floating_point():
        raise ConfigTypeError(
            f"The inputs of '{name}' ({_OWNER}) must be floating point. Got {x.dtype}; use x.float()."
        )
    x = x.to(dtype)
    try:
        with torch.no_grad():
            model(x[:2])
    except IDLError as error:
        raise ShapeError(
            f"The inputs of '{name}' ({_OWNER}), shape {tuple(x.shape)}, do not fit the model from "
            f"model_fn: {error}"
        ) from error
    for module in _implicit_modules(model):
        module.reset_telemetry()
    return x, y


def _checked_configs(scaling_config: Any, run_config: Any) -> tuple[Any, Any]:
    if scaling_config is None:
        scaling_config = ray.train.ScalingConfig(num_workers=2, use_gpu=False)
    if not isinstance(scaling_config, ray.train.ScalingConfig):
        raise ConfigTypeError(
            f"The 'scaling_config' argument of {_OWNER} must be a ray.train.ScalingConfig. Got "
            f"{type(scaling_config).__name__}."
        )
    if scaling_config.elasticity_enabled:
        raise ConfigError(
            f"The 'scaling_config' argument of {_OWNER} must have a fixed num_workers (an int). Got "
            f"{scaling_config.num_workers!r}: elastic training is not supported."
        )
    if run_config is None:
        run_config = ray.train.RunConfig()
    if not isinstance(run_config, ray.train.RunConfig):
        raise ConfigTypeError(
            f"The 'run_config' argument of {_OWNER} must be a ray.train.RunConfig. Got "
            f"{type(run_config).__name__}."
        )
    path = run_config.storage_path
    if run_config.storage_filesystem is None and "://" not in path and not os.path.isabs(path):
        raise ConfigError(
            f"The storage_path of the 'run_config' argument of {_OWNER} must be an absolute path or a URI. "
            f"Got {path!r}; use os.path.abspath({path!r})."
        )
    return scaling_config, run_config


# ---------------------------------------------------------------------------------------------- workers
def _implicit_modules(model: nn.Module) -> list[ImplicitModel]:
    return [m for m in model.modules() if isinstance(m, ImplicitModel)]


def _telemetry(modules: list[ImplicitModel]) -> dict[str, int]:
    """The cumulative solver counters of ``modules``, summed (``ImplicitTelemetry`` fields)."""
    totals: dict[str, int] = {}
    for module in modules:
        for name, value in dataclasses.asdict(module.telemetry).items():
            totals[name] = totals.get(name, 0) + value
    return totals


def _build_optimizer(name: str, parameters: Iterator[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(parameters, lr=lr)
    if name == "adamw":
        return torch.optim.AdamW(parameters, lr=lr)
    return torch.optim.SGD(parameters, lr=lr)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce(values: list[float], op: Any, device: torch.device) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if _distributed():
        dist.all_reduce(tensor, op=op)
    return tensor.tolist()


def _replica_max_diff(model: nn.Module) -> float:
    """max |p_i - p_j| over parameters and pairs of workers (two all-reduces of the parameters)."""
    if not _distributed():
        return 0.0
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    high, low = flat.clone(), flat.clone()
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    return float((high - low).max())


def _tensor_batches(
    x: torch.Tensor, y: torch.Tensor, batch_size: int, *, rank: int, world: int, generator: torch.Generator
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This worker's batches of one epoch: a seeded permutation padded to a multiple of ``world`` and dealt
    round-robin (``DistributedSampler``), so every worker yields the same number of batches."""
    count = len(x)
    order = torch.randperm(count, generator=generator)
    total = math.ceil(count / world) * world
    if total > count:
        order = order.repeat(math.ceil(total / count))[:total]
    mine = order[rank:total:world]
    for start in range(0, len(mine), batch_size):
        index = mine[start : start + batch_size]
        yield x[index], y[index]


def _dataset_batches(name: str, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    shard = ray.train.get_dataset_shard(name)
    for batch in shard.iter_torch_batches(batch_size=batch_size, device="cpu"):
        yield batch["x"], batch["y"]


def _rng_state() -> dict[str, Any]:
    numpy_state = np.random.get_state()  # noqa: NPY002 - the global state user code may draw from
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (numpy_state[0], torch.from_numpy(numpy_state[1].copy()), *numpy_state[2:]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy(), *rest))  # noqa: NPY002
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _load_state(checkpoint: ray.train.Checkpoint) -> dict[str, Any]:
    with checkpoint.as_directory() as folder:
        return torch.load(os.path.join(folder, _STATE_FILE), map_location="cpu", weights_only=True)


def _evaluate(
    model: nn.Module, loss_fn: Callable, batches: Iterator, device: torch.device, dtype: torch.dtype
) -> list[float]:
    """[sum of loss * samples, correct predictions, samples, samples with class labels] of this worker."""
    loss_sum = correct = count = labelled = 0.0
    model.eval()
    with torch.no_grad():
        for x, y in batches:
            x, y = x.to(device, dtype), y.to(device)
            outputs = model(x)
            loss_sum += float(loss_fn(outputs, y)) * len(x)
            count += len(x)
            if not y.is_floating_point() and outputs.dim() == 2 and outputs.shape[1] > 1 and y.dim() == 1:
                correct += float((outputs.argmax(dim=1) == y).sum())
                labelled += len(x)
    model.train()
    return [loss_sum, correct, count, labelled]


def _train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train's per-worker function: restore, train the remaining epochs, report with checkpoints."""
    settings = TrainSettings.from_dict(config["settings"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    dtype = config["dtype"]
    loss_fn = config["loss_fn"] or F.cross_entropy

    torch.manual_seed(settings.seed)  # identical initial replicas (DDP broadcasts rank 0's anyway)
    model = config["model_fn"]()
    history: list[dict[str, Any]] = []
    start_epoch = steps_done = 0
    optimizer_state = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = torch.load(os.path.join(folder, _STATE_FILE), map_location="cpu", weights_only=True)
            rng_path = os.path.join(folder, _RNG_FILE.format(rank))
            if os.path.exists(rng_path) and state["num_workers"] == world:
                _set_rng_state(torch.load(rng_path, weights_only=True))
        model.load_state_dict(state["model"])
        optimizer_state = state["optimizer"]
        history = list(state["metrics"])
        start_epoch, steps_done = state["epoch"], state["optimizer_steps"]

    module = model
    model = ray.train.torch.prepare_model(model)  # to the worker's device; DDP when world > 1
    implicit = _implicit_modules(module)
    optimiser = _build_optimizer(settings.optimizer, module.parameters(), settings.lr)
    if optimizer_state is not None:
        optimiser.load_state_dict(optimizer_state)

    train, evaluation = config["train"], config["eval"]
    for epoch in range(start_epoch, settings.epochs):
        started_at, started = time.time(), time.perf_counter()
        before = _telemetry(implicit)
        if train == "dataset":
            batches = _dataset_batches("train", settings.batch_size)
        else:
            generator = torch.Generator().manual_seed(settings.seed * 1_000_003 + epoch)
            batches = _tensor_batches(
                *train, settings.batch_size, rank=rank, world=world, generator=generator
            )
        model.train()
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        count = steps = 0
        margin = math.inf
        for x, y in batches:
            x, y = x.to(device, dtype), y.to(device)
            optimiser.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            loss.backward()
            optimiser.step()
            for m in implicit:  # the same deterministic step on every replica: they stay equal
                m.project_()
                margin = min(margin, m.well_posedness_margin())
            loss_sum += loss.detach().double() * len(x)
            count += len(x)
            steps += 1
        solves = {name: value - before[name] for name, value in _telemetry(implicit).items()}
        sums = _all_reduce(
            [
                float(loss_sum),
                count,
                solves["forward_iterations"],
                solves["forward_calls"],
                solves["backward_iterations"],
                solves["backward_calls"],
                solves["forward_unconverged"] + solves["backward_unconverged"],
            ],
            dist.ReduceOp.SUM,
            device,
        )
        (margin,) = _all_reduce([margin], dist.ReduceOp.MIN, device)
        steps_done += steps
        metrics: dict[str, Any] = {
            "epoch": epoch + 1,
            "train_loss": sums[0] / max(sums[1], 1.0),
            "fp_iterations": sums[2] / max(sums[3], 1.0),
            "bp_iterations": sums[4] / max(sums[5], 1.0),
            "nonconverged": int(sums[6]),
            "kappa_margin": margin,
            "replica_max_diff": _replica_max_diff(module),
            "optimizer_steps": steps_done,
            "num_workers": world,
        }
        if evaluation is not None:
            if evaluation == "dataset":
                eval_batches = _dataset_batches("eval", settings.batch_size) if rank == 0 else iter(())
            else:
                x_eval, y_eval = (t[rank::world] for t in evaluation)  # disjoint shards, no padding
                eval_batches = (
                    (x_eval[i : i + _EVAL_CHUNK], y_eval[i : i + _EVAL_CHUNK])
                    for i in range(0, len(x_eval), _EVAL_CHUNK)
                )
            totals = _evaluate(module, loss_fn, eval_batches, device, dtype)
            loss_total, correct, seen, labelled = _all_reduce(totals, dist.ReduceOp.SUM, device)
            metrics["eval_loss"] = loss_total / max(seen, 1.0)
            if labelled and labelled == seen:
                metrics["eval_accuracy"] = correct / labelled
        metrics["epoch_time_s"] = time.perf_counter() - started
        metrics["started_at"] = started_at
        history.append(metrics)
        with tempfile.TemporaryDirectory() as folder:
            torch.save(_rng_state(), os.path.join(folder, _RNG_FILE.format(rank)))
            if rank == 0:
                state = {
                    "model": module.state_dict(),
                    "optimizer": optimiser.state_dict(),
                    "epoch": epoch + 1,
                    "optimizer_steps": steps_done,
                    "metrics": history,
                    "num_workers": world,
                    "settings": settings.to_dict(),
                }
                torch.save(state, os.path.join(folder, _STATE_FILE))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))
