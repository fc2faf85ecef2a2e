"""Session-wide teachers and data for the SIM tests: digits (8x8), small MLP and CNN teachers."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from sim_helpers import accuracy, train_classifier
from torch import nn


@pytest.fixture(autouse=True, scope="package")
def _one_thread():
    """One intra-op thread for the SIM tests (restored afterwards, so other folders keep their setting).

    These problems are small, and on a shared 2-core machine OpenMP threads spinning at barriers made small
    matmuls up to 10x slower than a single thread.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@dataclasses.dataclass
class Digits:
    X_train: torch.Tensor  # (m, 64) float32 in [0, 1]
    y_train: torch.Tensor
    X_test: torch.Tensor
    y_test: torch.Tensor

    def images(self, X: torch.Tensor) -> torch.Tensor:
        return X.reshape(-1, 1, 8, 8)


@pytest.fixture(scope="session")
def digits() -> Digits:
    from sklearn.datasets import load_digits

    data = load_digits()
    X = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(X.shape[0], generator=torch.Generator().manual_seed(0))
    train, test = perm[:1300], perm[1300:]
    return Digits(X[train], y[train], X[test], y[test])


@pytest.fixture(scope="session")
def mlp_teacher(digits: Digits) -> nn.Module:
    """A 64-48-24-10 ReLU MLP with biases, trained on digits."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 24), nn.ReLU(), nn.Linear(24, 10))
    return train_classifier(model, digits.X_train, digits.y_train, epochs=25)


class SmallCNN(nn.Module):
    """Conv2d(1->2, 3x3, stride 2) + ReLU, flatten, Linear + ReLU, Linear: a tiny CNN for 8x8 digits."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, kernel_size=3, stride=2, padding=1)
        self.fc1 = nn.Linear(2 * 4 * 4, 16)
        self.fc2 = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv(x))
        x = x.flatten(1)
        x = nn.functional.relu(self.fc1(x), inplace=True)
        return self.fc2(x)


@pytest.fixture(scope="session")
def cnn_teacher(digits: Digits) -> nn.Module:
    torch.manual_seed(2)
    model = SmallCNN()
    return train_classifier(model, digits.images(digits.X_train), digits.y_train, epochs=15)


@pytest.fixture(scope="session")
def acc():
    """The accuracy helper, as a fixture (test folders are not packages)."""
    return accuracy
