"""Job: train an :class:`~idl_ray.ImplicitModel` by gradient descent on an offline data set.

``workers=0`` (the default) trains in this process, without Ray. ``workers=N >= 1`` trains on ``N`` Ray
Train workers through :func:`idl_ray.distributed.train_implicit` (DDP, a checkpoint every epoch under
``storage_path/name``, resumed when started again with the same name, ``max_failures`` worker failures
survived); ``batch_size`` is then per worker, and ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S`` defaults to 0.1 s
(set by ``train_implicit``; Ray's 2 s would make every short epoch last 2 s).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from collections.abc import Callable
from typing import Any, ClassVar

import torch

from idl_ray._validation import (
    Options,
    bad_parameter,
    check_choice,
    check_device,
    check_kappa,
    check_positive_float,
    check_positive_int,
)
from idl_ray.datasets import DATASETS, Split, batches, load_dataset
from idl_ray.errors import ConfigError
from idl_ray.implicit.activations import ACTIVATIONS
from idl_ray.implicit.fixed_point import FIXED_POINT_METHODS
from idl_ray.implicit.model import CONSTRAINTS
from idl_ray.jobs.common import write_report


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainJobConfig(Options):
    """Settings of the ``idl-ray train`` job.

    ``workers``: 0 trains in this process (no Ray; ``device`` picks the device); ``N >= 1`` trains on
    ``N`` Ray Train workers (``use_gpu``, ``cpus_per_worker``, ``storage_path``, ``name``,
    ``max_failures``, ``address`` apply; ``batch_size`` is per worker).
    """

    dataset: str = "digits"
    hidden_dim: int = 100
    kappa: float = 0.95
    activation: str = "relu"
    fixed_point: str = "picard"
    constraint: str = "shrink"
    epochs: int = 10
    batch_size: int = 64
    lr: float = 3e-3
    seed: int = 0
    device: str | None = None
    output_dir: str | None = None
    workers: int = 0
    use_gpu: bool = False
    cpus_per_worker: float | None = None
    storage_path: str | None = None
    name: str | None = None
    max_failures: int = 0
    address: str | None = None

    #: the allowed values of the choice options (listed by ``--help``)
    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {
        "dataset": DATASETS,
        "activation": tuple(ACTIVATIONS),
        "fixed_point": tuple(FIXED_POINT_METHODS),
        "constraint": CONSTRAINTS,
    }

    #: what an option means where its default alone does not say (shown by ``--help``)
    NOTES: ClassVar[dict[str, str]] = {
        "device": "torch device, e.g. cpu or cuda:0 (None: CUDA when available)",
        "output_dir": "folder for train_report.json and implicit_model.pt (created; checked before any work)",
    }

    def _validate(self) -> None:
        owner = "TrainJobConfig"
        for name, choices in self.CHOICES.items():
            check_choice(getattr(self, name), name, owner, choices)
        check_positive_int(self.hidden_dim, "hidden_dim", owner)
        check_kappa(self.kappa, owner)
        check_positive_int(self.epochs, "epochs", owner)
        check_positive_int(self.batch_size, "batch_size", owner)
        check_positive_float(self.lr, "lr", owner)
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 0:
            raise bad_parameter(
                "workers",
                owner,
                "an integer >= 0",
                self.workers,
                "0 trains in this process, N >= 1 on Ray Train.",
            )
        if (
            isinstance(self.max_failures, bool)
            or not isinstance(self.max_failures, int)
            or self.max_failures < -1
        ):
            raise bad_parameter("max_failures", owner, "an integer >= -1 (-1: no limit)", self.max_failures)
        if self.cpus_per_worker is not None:
            check_positive_float(self.cpus_per_worker, "cpus_per_worker", owner)
        if self.workers == 0:
            ray_only = {
                "use_gpu": self.use_gpu,
                "cpus_per_worker": self.cpus_per_worker,
                "storage_path": self.storage_path,
                "name": self.name,
                "max_failures": self.max_failures or None,
                "address": self.address,
            }
            given = sorted(key for key, value in ray_only.items() if value)
            if given:
                raise ConfigError(
                    f"{owner}: {given} apply to training on Ray Train workers only. Pass workers >= 1 "
                    "(--workers 2), or drop them (workers=0 trains in this process; --device picks its device)."
                )
        elif self.device is not None:
            raise ConfigError(
                f"{owner}: 'device' applies to workers=0 only. With workers={self.workers} every worker "
                "uses the device Ray Train assigns it: pass use_gpu=True (--use-gpu) for GPUs."
            )
        if self.device is not None:
            check_device(self.device, "device", owner)  # a missing GPU fails before the data is loaded


def _model_fn(config: TrainJobConfig, split: Split) -> Callable[[], torch.nn.Module]:
    from idl_ray.implicit.model import ImplicitModel

    return functools.partial(
        ImplicitModel,
        split.num_features,
        split.num_classes,
        config.hidden_dim,
        activation=config.activation,
        kappa=config.kappa,
        fixed_point=config.fixed_point,
        constraint=config.constraint,
        bias=True,
    )


def run_train_job(config: TrainJobConfig, *, log=print) -> dict[str, Any]:
    """Train on ``config.dataset`` and return a report with the test accuracy and solver telemetry."""
    from idl_ray.jobs.common import prepare_output_dir

    folder = prepare_output_dir(config.output_dir, "TrainJobConfig")  # before any work
    split = load_dataset(config.dataset, seed=config.seed)
    if config.workers == 0:
        model, extra = _train_here(config, split, log)
    else:
        model, extra = _train_on_ray(config, split, log)
    device = next(model.parameters()).device
    model.eval()
    with torch.no_grad():
        predictions = model(split.x_test.to(device)).argmax(dim=1).cpu()
    accuracy = float((predictions == split.y_test).float().mean())
    A = model.A.detach()
    report = {
        "job": "train",
        "config": config.to_dict(),
        "test_accuracy": accuracy,
        "A_inf_norm": float(A.abs().sum(dim=1).max()),
        **extra,
    }
    log(f"test accuracy {accuracy:.4f}  (||A||_inf = {report['A_inf_norm']:.4f} <= kappa = {config.kappa})")
    if folder is not None:
        torch.save(model.state_dict(), folder / "implicit_model.pt")
        path = write_report(report, config.output_dir, "train_report")
        log(f"model and report written to {path.parent}")
    return report


def _train_here(config: TrainJobConfig, split: Split, log) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The single-process loop (``workers=0``): no Ray."""
    torch.manual_seed(config.seed)
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = _model_fn(config, split)().to(device)
    optimiser = torch.optim.Adam(model.parameters(), lr=config.lr)
    loss_fn = torch.nn.CrossEntropyLoss()
    start = time.perf_counter()
    for epoch in range(config.epochs):
        total = 0.0
        for x, y in batches(split.x_train, split.y_train, config.batch_size, shuffle=True, seed=epoch):
            optimiser.zero_grad()
            loss = loss_fn(model(x.to(device)), y.to(device))
            loss.backward()
            optimiser.step()
            total += loss.item() * len(x)
        log(f"epoch {epoch + 1}/{config.epochs}  loss {total / len(split.x_train):.4f}")
    return model, {"device": str(device), "workers": 0, "train_time_s": time.perf_counter() - start}


def _train_on_ray(config: TrainJobConfig, split: Split, log) -> tuple[torch.nn.Module, dict[str, Any]]:
    """``workers >= 1``: :func:`~idl_ray.distributed.train_implicit` on Ray Train workers."""
    import ray
    import ray.train

    from idl_ray.distributed.train import train_implicit
    from idl_ray.jobs.common import ensure_ray

    started = ensure_ray(config.address)
    try:
        resources = None if config.cpus_per_worker is None else {"CPU": config.cpus_per_worker}
        if resources is not None and config.use_gpu:
            resources["GPU"] = 1
        storage = (
            None if config.storage_path is None else os.path.abspath(os.path.expanduser(config.storage_path))
        )
        start = time.perf_counter()
        result = train_implicit(
            _model_fn(config, split),
            (split.x_train, split.y_train),
            eval_data=(split.x_test, split.y_test),
            epochs=config.epochs,
            batch_size=config.batch_size,
            lr=config.lr,
            seed=config.seed,
            scaling_config=ray.train.ScalingConfig(
                num_workers=config.workers, use_gpu=config.use_gpu, resources_per_worker=resources
            ),
            run_config=ray.train.RunConfig(
                name=config.name,
                storage_path=storage,
                failure_config=ray.train.FailureConfig(max_failures=config.max_failures),
            ),
        )
        wall = time.perf_counter() - start
    finally:
        if started:
            ray.shutdown()
    for m in result.metrics:
        log(
            f"epoch {m['epoch']}/{config.epochs}  loss {m['train_loss']:.4f}  eval accuracy "
            f"{m['eval_accuracy']:.4f}  fixed-point iterations {m['fp_iterations']:.1f}"
        )
    extra = {
        "device": "ray-train " + ("gpu" if config.use_gpu else "cpu"),
        "workers": config.workers,
        "train_time_s": wall,
        "metrics": result.metrics,
        "run_path": result.path,
        "checkpoint_path": result.checkpoint.path,
    }
    log(f"run folder {result.path}  (start again with --name {os.path.basename(result.path)} to resume)")
    return result.model, extra
