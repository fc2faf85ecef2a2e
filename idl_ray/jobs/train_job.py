"""Job: train an :class:`~idl_ray.ImplicitModel` by gradient descent on an offline data set."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import torch

from idl_ray._validation import Options, check_choice, check_kappa, check_positive_float, check_positive_int
from idl_ray.datasets import DATASETS, batches, load_dataset
from idl_ray.implicit.model import CONSTRAINTS


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainJobConfig(Options):
    """Settings of the ``idl-ray train`` job."""

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

    def _validate(self) -> None:
        owner = "TrainJobConfig"
        check_choice(self.dataset, "dataset", owner, DATASETS)
        check_positive_int(self.hidden_dim, "hidden_dim", owner)
        check_kappa(self.kappa, owner)
        check_choice(self.constraint, "constraint", owner, CONSTRAINTS)
        check_positive_int(self.epochs, "epochs", owner)
        check_positive_int(self.batch_size, "batch_size", owner)
        check_positive_float(self.lr, "lr", owner)


def run_train_job(config: TrainJobConfig, *, log=print) -> dict[str, Any]:
    """Train on ``config.dataset`` and return a report with the test accuracy and solver telemetry."""
    from idl_ray.implicit.model import ImplicitModel

    torch.manual_seed(config.seed)
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    split = load_dataset(config.dataset, seed=config.seed)
    model = ImplicitModel(
        split.num_features,
        split.num_classes,
        config.hidden_dim,
        activation=config.activation,
        kappa=config.kappa,
        fixed_point=config.fixed_point,
        constraint=config.constraint,
        bias=True,
    ).to(device)
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
    train_time = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        predictions = model(split.x_test.to(device)).argmax(dim=1).cpu()
    accuracy = float((predictions == split.y_test).float().mean())
    A = model.A.detach()
    report = {
        "job": "train",
        "config": config.to_dict(),
        "device": str(device),
        "test_accuracy": accuracy,
        "train_time_s": train_time,
        "A_inf_norm": float(A.abs().sum(dim=1).max()),
    }
    log(f"test accuracy {accuracy:.4f}  (||A||_inf = {report['A_inf_norm']:.4f} <= kappa = {config.kappa})")
    return report
