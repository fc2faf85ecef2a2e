"""Offline data sets for the default jobs, examples and tests (nothing is downloaded).

Each loader returns a :class:`Split` of float32 tensors, features flattened to (samples, features),
standardised with statistics of the training part only.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from idl_ray._validation import check_choice, check_positive_int

DATASETS = ("digits", "digits28", "synthetic")


@dataclasses.dataclass(frozen=True)
class Split:
    """A train/test split. x_*: (samples, features) float32; y_*: (samples,) int64 class labels."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    @property
    def num_features(self) -> int:
        return self.x_train.shape[1]

    @property
    def num_classes(self) -> int:
        return int(torch.cat([self.y_train, self.y_test]).max()) + 1


def load_dataset(name: str = "digits", *, test_fraction: float = 0.25, seed: int = 0) -> Split:
    """Load an offline data set by name.

    - ``digits``: scikit-learn's 8x8 handwritten digits (1,797 samples, 64 features, 10 classes).
    - ``digits28``: the same digits upsampled bilinearly to 28x28 (784 features), an MNIST-shaped stand-in.
    - ``synthetic``: 4,000 samples of a 5-class Gaussian mixture in 32 dimensions.
    """
    check_choice(name, "name", "load_dataset", DATASETS)
    if name == "synthetic":
        x, y = _gaussian_mixture(4000, 32, 5, seed)
    else:
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = digits.images.astype(np.float32)
        y = digits.target.astype(np.int64)
        if name == "digits28":
            images = torch.from_numpy(x)[:, None]
            x = torch.nn.functional.interpolate(images, size=(28, 28), mode="bilinear", align_corners=False)
            x = x[:, 0].numpy()
        x = x.reshape(len(x), -1)
    return _split(x, y, test_fraction, seed)


def _gaussian_mixture(samples: int, dim: int, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=2.0, size=(classes, dim))
    y = rng.integers(0, classes, size=samples)
    x = centres[y] + rng.normal(size=(samples, dim))
    return x.astype(np.float32), y.astype(np.int64)


def _split(x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int) -> Split:
    order = np.random.default_rng(seed).permutation(len(x))
    n_test = max(1, round(test_fraction * len(x)))
    test, train = order[:n_test], order[n_test:]
    mean = x[train].mean(axis=0)
    std = x[train].std(axis=0) + 1e-6
    x = (x - mean) / std
    return Split(
        x_train=torch.from_numpy(x[train]).float(),
        y_train=torch.from_numpy(y[train]),
        x_test=torch.from_numpy(x[test]).float(),
        y_test=torch.from_numpy(y[test]),
    )


def batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, *, shuffle: bool, seed: int = 0):
    """Yield (x, y) mini-batches; a seeded permutation when ``shuffle``."""
    check_positive_int(batch_size, "batch_size", "batches")
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed)) if shuffle else None
    for start in range(0, len(x), batch_size):
        index = slice(start, start + batch_size) if order is None else order[start : start + batch_size]
        yield x[index], y[index]
