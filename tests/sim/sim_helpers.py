"""Helpers shared by the SIM tests (imported as a plain module next to them; a test importing from
``conftest`` would get whichever folder's conftest Python imported first)."""

from __future__ import annotations

import torch
from torch import nn


def train_classifier(
    model: nn.Module, X: torch.Tensor, y: torch.Tensor, epochs: int, seed: int = 0
) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(epochs):
        perm = torch.randperm(X.shape[0], generator=gen)
        for i in range(0, X.shape[0], 128):
            idx = perm[i : i + 128]
            opt.zero_grad()
            nn.functional.cross_entropy(model(X[idx]), y[idx]).backward()
            opt.step()
    return model.eval().requires_grad_(False)


def accuracy(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(X).argmax(dim=1) == y).double().mean())
