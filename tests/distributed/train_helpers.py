"""Picklable pieces for the Ray Train tests: model factories, a loss that fails once, a sequence task.

The test module registers this module with ``ray.cloudpickle.register_pickle_by_value`` so that Ray
workers (which do not have ``tests/`` on their path) receive the functions by value.
"""

from __future__ import annotations

import os

import ray.train
import torch
import torch.nn.functional as F

from idl_ray import ImplicitModel, ImplicitRNN

KAPPA = 0.95


def digits_model() -> ImplicitModel:
    """The model ``idl-ray train --hidden-dim 32 --kappa 0.95`` builds for digits (so runs can mix)."""
    return ImplicitModel(
        64, 10, 32, activation="relu", kappa=KAPPA, fixed_point="picard", constraint="shrink", bias=True
    )


def sequence_model() -> ImplicitRNN:
    return ImplicitRNN(1, 2, implicit_hidden_dim=16, hidden_dim=8, kappa=0.9, tol=1e-4, constraint="project")


def not_implicit_model() -> torch.nn.Module:
    return torch.nn.Linear(64, 10)


def sign_of_sum(samples: int, steps: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences (samples, steps, 1) of standard normals, labelled 1 when their sum is positive."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, steps, 1, generator=generator)
    return x, (x.sum(dim=(1, 2)) > 0).long()


class FailOnceOnRank:
    """Cross-entropy that raises once, on one rank, at its ``at_call``-th training call (calls under
    ``no_grad``, i.e. evaluation, are not counted). ``marker`` (a file) records that it fired, so the
    restarted worker group does not fail again."""

    def __init__(self, marker: str, *, rank: int = 1, at_call: int = 1) -> None:
        self.marker, self.rank, self.at_call = marker, rank, at_call
        self.calls = 0

    def __call__(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and ray.train.get_context().get_world_rank() == self.rank:
            self.calls += 1
            if self.calls == self.at_call and not os.path.exists(self.marker):
                with open(self.marker, "w") as handle:
                    handle.write(f"failed at training call {self.calls} on rank {self.rank}\n")
                raise RuntimeError("injected failure (test): this worker dies once")
        return F.cross_entropy(outputs, targets)


def always_fails(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    raise RuntimeError("injected failure (test): this loss always raises")
