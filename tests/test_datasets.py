"""Offline data sets and the teacher trainer used by jobs and examples."""

from __future__ import annotations

import pytest
import torch

from idl_ray.datasets import batches, load_dataset
from idl_ray.errors import ConfigError
from idl_ray.teachers import accuracy, mlp_teacher, train_classifier


@pytest.mark.parametrize(
    ("name", "features", "classes"), [("digits", 64, 10), ("digits28", 784, 10), ("synthetic", 32, 5)]
)
def test_datasets_shapes_and_standardisation(name: str, features: int, classes: int) -> None:
    split = load_dataset(name)
    assert split.num_features == features
    assert split.num_classes == classes
    assert len(split.x_train) > 3 * len(split.x_test) * 0.9
    # standardised with train statistics: train columns have mean ~0
    assert split.x_train.mean(dim=0).abs().max() < 1e-4
    assert torch.isfinite(split.x_train).all() and torch.isfinite(split.x_test).all()


def test_unknown_dataset_lists_choices() -> None:
    with pytest.raises(ConfigError, match="digits"):
        load_dataset("mnist-online")


def test_batches_cover_every_sample_once() -> None:
    x = torch.arange(10.0)[:, None]
    y = torch.arange(10)
    seen = torch.cat([yb for _, yb in batches(x, y, 3, shuffle=True, seed=1)])
    assert sorted(seen.tolist()) == list(range(10))
    assert len(list(batches(x, y, 3, shuffle=False))) == 4


def test_teacher_learns_digits() -> None:
    split = load_dataset("digits")
    teacher = mlp_teacher(64, [32], 10)
    chance = accuracy(teacher, split.x_test, split.y_test)
    acc = train_classifier(teacher, split, epochs=8)
    assert acc > 0.9 > chance + 0.3
