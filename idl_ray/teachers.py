"""Explicit teacher networks for SIM demos and tests, and a small trainer for them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from idl_ray.datasets import Split, batches


def mlp_teacher(
    input_dim: int,
    hidden_dims: Sequence[int],
    output_dim: int,
    *,
    bias: bool = True,
    activation: str = "relu",
) -> nn.Sequential:
    """A plain MLP: Linear -> activation -> ... -> Linear (the shape SIM represents exactly)."""
    layers: list[nn.Module] = []
    width = input_dim
    act = {"relu": nn.ReLU, "tanh": nn.Tanh, "leaky_relu": nn.LeakyReLU}[activation]
    for hidden in hidden_dims:
        layers += [nn.Linear(width, hidden, bias=bias), act()]
        width = hidden
    layers.append(nn.Linear(width, output_dim, bias=bias))
    return nn.Sequential(*layers)


def train_classifier(
    model: nn.Module,
    split: Split,
    *,
    epochs: int = 30,
    batch_size: int = 64,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    seed: int = 0,
    progress: bool = False,
) -> float:
    """Train ``model`` with Adam and cross-entropy on ``split``; returns its test accuracy.

    ``progress`` shows a tqdm bar over the epochs."""
    torch.manual_seed(seed)
    optimiser = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    epoch_range: Any = range(epochs)
    if progress:
        from tqdm.auto import tqdm

        epoch_range = tqdm(epoch_range, desc="teacher epochs", leave=False)
    for epoch in epoch_range:
        for x, y in batches(split.x_train, split.y_train, batch_size, shuffle=True, seed=seed + epoch):
            optimiser.zero_grad()
            loss_fn(model(x), y).backward()
            optimiser.step()
    return accuracy(model, split.x_test, split.y_test)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of samples whose arg-max output equals the label."""
    model.eval()
    return float((model(x).argmax(dim=1) == y).float().mean())
