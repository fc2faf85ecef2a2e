"""GramFactor's sketched range (a randomized range finder) against the full eigendecomposition."""

from __future__ import annotations

import pytest
import torch

from idl_ray.sim.solvers.admm_kernels import GramFactor


def low_rank_gram(d: int, rank: int, *, seed: int = 0, extra: float | None = None) -> torch.Tensor:
    """Phi^T Phi / m for m = 2 d samples of ``rank`` latent factors (a PSD d x d Gram of that rank), plus
    ``extra`` * max eigenvalue along one more direction when given."""
    generator = torch.Generator().manual_seed(seed)
    latent = torch.randn(2 * d, rank, generator=generator, dtype=torch.float64)
    mixing = torch.randn(rank, d, generator=generator, dtype=torch.float64)
    Phi = latent @ mixing
    G = Phi.T @ Phi / Phi.shape[0]
    if extra is not None:
        direction = torch.randn(d, generator=generator, dtype=torch.float64)
        direction /= direction.norm()
        G = G + extra * float(torch.linalg.eigvalsh(G).max()) * torch.outer(direction, direction)
    return G


def full_eigendecomposition_rank(G: torch.Tensor) -> int:
    values = torch.linalg.eigvalsh(0.5 * (G + G.T))
    return int((values > GramFactor.RANK_CUT * values.max()).sum())


def test_a_low_rank_gram_is_sketched_and_serves_the_same_solves() -> None:
    """rank 30 of d = 300 (<= d / 6): the factor holds the range only (300 x 30), with the full
    eigendecomposition's eigenvalues and range, and its solves and inverse equal (G + rho I)^{-1} formed
    directly."""
    G = low_rank_gram(300, 30)
    factor = GramFactor(G)
    assert factor.rank == full_eigendecomposition_rank(G) == 30 and factor.low_rank
    assert tuple(factor.Q.shape) == (300, 30)  # sketched: no d x d eigenvector matrix
    Q, s = factor.range_basis()
    values, vectors = torch.linalg.eigh(G)
    torch.testing.assert_close(torch.sort(s).values, values[-30:], rtol=1e-10, atol=0.0)
    torch.testing.assert_close(Q @ Q.T, vectors[:, -30:] @ vectors[:, -30:].T, rtol=0.0, atol=1e-10)
    R = torch.randn(5, 300, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for rho in (1e-3, 0.1, 10.0):
        dense = torch.linalg.inv(G + rho * torch.eye(300, dtype=G.dtype))
        scale = float(dense.abs().max())
        torch.testing.assert_close(factor.solve(R, rho), R @ dense, rtol=1e-8, atol=1e-11 * scale * 300)
        torch.testing.assert_close(factor.inverse(rho), dense, rtol=1e-8, atol=1e-11 * scale)


@pytest.mark.parametrize(
    ("rank", "dtype", "why"),
    [(80, torch.float64, "rank above d / 6"), (30, torch.float32, "float32"), (0, torch.float64, "G = 0")],
)
def test_the_full_eigendecomposition_serves_where_the_sketch_does_not_apply(rank, dtype, why) -> None:
    G = low_rank_gram(300, max(rank, 1)).to(dtype) * (rank > 0)
    factor = GramFactor(G)
    assert tuple(factor.Q.shape) == (300, 300), why
    if dtype == torch.float64:  # (float32's noise eigenvalues sit above the 1e-12 cut: no rank to compare)
        assert factor.rank == (full_eigendecomposition_rank(G) if rank else 0)


def test_an_eigenvalue_just_above_the_rank_cut_is_not_lost() -> None:
    """One more direction with 1e-10 of the largest eigenvalue (above the 1e-12 cut): whichever way the factor
    is formed, it keeps that direction, as the full eigendecomposition does."""
    G = low_rank_gram(300, 30, extra=1e-10)
    factor = GramFactor(G)
    assert factor.rank == full_eigendecomposition_rank(G) == 31
    Q, s = factor.range_basis()
    residual = G - (Q * s) @ Q.T
    assert float(torch.linalg.matrix_norm(residual, ord=2)) <= 1e-12 * float(s.max())


def test_the_sketch_is_deterministic() -> None:
    G = low_rank_gram(300, 30)
    first, second = GramFactor(G), GramFactor(G)
    assert torch.equal(first.Q, second.Q) and torch.equal(first.eigenvalues, second.eigenvalues)


def test_an_admm_solve_on_the_sketched_factor_equals_one_on_the_eigendecomposition(monkeypatch) -> None:
    """A bounded lasso stage on a rank-30 Gram of d = 300 (the dual active set runs on the factor's range):
    the same certified objective, within the certificate's tolerance, whichever way G was factored."""
    from idl_ray.sim.problem import SIMProblem
    from idl_ray.sim.solvers import ADMMSolver

    generator = torch.Generator().manual_seed(5)
    # 6 bounded columns of their own, 294 of rank 24: rank 30; the first three targets need the bounded
    # columns beyond kappa (the bound is active there), the others do not
    features = torch.cat(
        [
            torch.randn(600, 6, generator=generator, dtype=torch.float64),
            torch.randn(600, 24, generator=generator, dtype=torch.float64)
            @ torch.randn(24, 294, generator=generator, dtype=torch.float64),
        ],
        dim=1,
    )
    targets = features @ torch.randn(300, 6, generator=generator, dtype=torch.float64) * 0.05
    targets[:, :3] += 2 * features[:, :3]
    problem = SIMProblem.from_samples(features, targets, n_constrained=6, lam=1e-3, kappa=0.5)
    assert tuple(GramFactor(problem.scaled()[0]).Q.shape) == (300, 30)  # the sketch serves this G
    sketched = ADMMSolver(device="cpu").solve(problem)
    assert sketched.stats.extra["rank"] == 30 and sketched.stats.extra["active_set_rows"] > 0
    monkeypatch.setattr(GramFactor, "_sketched_range", classmethod(lambda cls, G: None))
    full = ADMMSolver(device="cpu").solve(problem)
    assert sketched.stats.converged and full.stats.converged
    for result in (sketched, full):
        bounded = result.weights[:, :6].abs().sum(dim=1)
        assert float(bounded.max()) <= 0.5 + 1e-12 and bool((bounded[:3] > 0.5 - 1e-9).all())
    objective = full.stats.objective
    assert abs(sketched.stats.objective - objective) <= 2e-7 * abs(objective)
