"""Helpers shared by the distributed tests (imported as a plain module next to them)."""

from __future__ import annotations

import torch

from idl_ray.distributed import ShardedProblem
from idl_ray.sim.problem import SIMProblem

TIMEOUT_S = 120.0


def random_problem(
    m: int = 1200,
    n: int = 10,
    p: int = 14,
    *,
    lam: float = 2e-3,
    kappa: float | None = 0.5,
    l2: float = 0.0,
    seed: int = 0,
    keep_samples: bool = True,
) -> SIMProblem:
    """A random stage-1-like problem whose unconstrained fit violates kappa (so the bound is active)."""
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(m, n + p, generator=generator, dtype=torch.float64)
    weights = torch.randn(n + p, n, generator=generator, dtype=torch.float64) * 0.4
    targets = features @ weights + 0.1 * torch.randn(m, n, generator=generator, dtype=torch.float64)
    variant = "elastic_net" if l2 else "lasso"
    return SIMProblem.from_samples(
        features,
        targets,
        n_constrained=n,
        lam=lam,
        l2=l2,
        kappa=kappa,
        variant=variant,
        keep_samples=keep_samples,
    )


def relative_gap(value: float, reference: float) -> float:
    return abs(value - reference) / max(abs(reference), 1e-12)


def shard(problem: SIMProblem, num_shards: int) -> ShardedProblem:
    """``problem``'s samples split into ``num_shards`` object-store shards, with its penalties."""
    return ShardedProblem.from_tensors(
        problem.samples.features,
        problem.samples.targets,
        num_shards=num_shards,
        n_constrained=problem.n_constrained,
        lam=problem.lam,
        kappa=problem.kappa,
    )
