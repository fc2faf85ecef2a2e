"""The batched interior point (``idl_ray.sim.solvers.interior_point``) and ADMM's hand-over to it.

References are independent: Clarabel on the sample form written here with cvxpy, and the closed form of the
lasso on an orthogonal design (a soft-threshold per entry).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from sim_helpers import clarabel_row_optima, gram_form

import idl_ray.sim.solvers.interior_point as interior_point
from idl_ray.errors import ConfigError, ConvergenceWarning
from idl_ray.sim.problem import SIMProblem
from idl_ray.sim.solvers import ADMMSolver
from idl_ray.sim.solvers.admm_kernels import ADMMOptions, GramFactor
from idl_ray.sim.solvers.certificate import duality_gap
from idl_ray.sim.solvers.interior_point import interior_point_rows

N, P, M = 5, 16, 60


def samples(*, rank_deficient: bool, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Features [hidden, pixels] (M x (N + P)) and targets (M x N); rank-deficient pixels span 4 directions,
    as upsampled images do (rank(G) = 9 of 21)."""
    gen = torch.Generator().manual_seed(seed)
    if rank_deficient:
        pixels = torch.rand(M, 4, generator=gen, dtype=torch.float64) @ torch.rand(
            4, P, generator=gen, dtype=torch.float64
        )
    else:
        pixels = torch.rand(M, P, generator=gen, dtype=torch.float64)
    hidden = (pixels @ torch.randn(P, N, generator=gen, dtype=torch.float64) * 0.3).relu()
    features = torch.cat([hidden, pixels], dim=1)
    W_true = torch.randn(N, N + P, generator=gen, dtype=torch.float64) * 0.5
    targets = features @ W_true.T + 0.05 * torch.randn(M, N, generator=gen, dtype=torch.float64)
    return features, targets


def clarabel(features, targets, thresholds: np.ndarray, kappa: float | None) -> np.ndarray:
    """Per-row optimum of 1/(2M) ||t - F w||^2 + sum_j t_j |w_j| (+ ||w_A||_1 <= kappa), by Clarabel."""
    return clarabel_row_optima(features, targets, thresholds, kappa, N)


def solve(H, R, c, lam, kappa, *, tol=1e-9):
    def certify(W, rows):
        gaps = duality_gap(W, H, R[rows], c[rows], lam=lam if not torch.is_tensor(lam) else lam[rows],
                           kappa=kappa, n_constrained=N)  # fmt: skip
        return gaps, gaps.certified(tol)

    return interior_point_rows(GramFactor(H), R, lam=lam, kappa=kappa, n_constrained=N, certify=certify)


@pytest.mark.parametrize("rank_deficient", [True, False])
@pytest.mark.parametrize("kappa", [0.5, None])
@pytest.mark.parametrize("lam", [1e-4, 1e-2])
def test_matches_clarabel(rank_deficient: bool, kappa: float | None, lam: float) -> None:
    features, targets = samples(rank_deficient=rank_deficient)
    H, R, c = gram_form(features, targets)
    result = solve(H, R, c, lam, kappa)
    assert bool(result.certified.all())
    if kappa is not None:
        assert float(result.weights[:, :N].abs().sum(1).max()) <= kappa * (1 + 1e-15)
    ours = duality_gap(result.weights, H, R, c, lam=lam, kappa=kappa, n_constrained=N)
    reference = clarabel(features, targets, np.full((N, N + P), lam), kappa)
    np.testing.assert_allclose(ours.primal.numpy(), reference, rtol=1e-6, atol=1e-10)
    # the certificate bounds the true suboptimality (up to Clarabel's own accuracy)
    assert bool(((ours.primal.numpy() - reference) <= ours.gaps.numpy() + 1e-9).all())


def test_per_entry_thresholds_and_held_entries() -> None:
    features, targets = samples(rank_deficient=True, seed=3)
    H, R, c = gram_form(features, targets)
    gen = torch.Generator().manual_seed(1)
    thresholds = 1e-3 * (0.2 + 2.8 * torch.rand(N, N + P, generator=gen, dtype=torch.float64))
    thresholds[torch.rand(N, N + P, generator=gen) < 0.2] = torch.inf
    thresholds[2, :N] = torch.inf  # a row whose A-part is held at 0
    result = solve(H, R, c, thresholds, 0.6)
    assert bool(result.certified.all())
    assert bool((result.weights[torch.isinf(thresholds)] == 0).all())
    ours = duality_gap(result.weights, H, R, c, lam=thresholds, kappa=0.6, n_constrained=N).primal
    np.testing.assert_allclose(ours.numpy(), clarabel(features, targets, thresholds.numpy(), 0.6), rtol=1e-6)


def test_orthogonal_design_is_a_soft_threshold() -> None:
    """H = diag(h), no bound: w_j = soft(r_j, t) / h_j exactly."""
    gen = torch.Generator().manual_seed(0)
    h = 0.5 + torch.rand(N + P, generator=gen, dtype=torch.float64)
    H = torch.diag(h)
    R = torch.randn(3, N + P, generator=gen, dtype=torch.float64) * 0.1
    c = (R * R / h).sum(1) + 1.0
    result = solve(H, R, c, 0.05, None, tol=1e-11)
    expected = torch.sign(R) * (R.abs() - 0.05).clamp_min(0) / h
    torch.testing.assert_close(result.weights, expected, atol=1e-8, rtol=0)


def test_zero_kappa_holds_the_bounded_block_at_zero() -> None:
    features, targets = samples(rank_deficient=False, seed=5)
    H, R, c = gram_form(features, targets)
    result = solve(H, R, c, 1e-3, 0.0)
    assert bool(result.certified.all())
    assert bool((result.weights[:, :N] == 0).all())


def test_normal_matrix_routes_give_the_same_answer(monkeypatch) -> None:
    """The Newton matrices from the products f_k f_l formed once (many rows), from batched products (a few
    rows) and in chunks of one row (a small memory budget): the same iterates."""
    features, targets = samples(rank_deficient=True, seed=7)
    H, R, c = gram_form(features, targets)
    monkeypatch.setattr(interior_point, "_PRODUCTS_FROM_ROWS", 0)  # N = 5 rows: the products route
    products = solve(H, R, c, 1e-3, 0.5)
    monkeypatch.setattr(interior_point, "_PRODUCTS_FROM_ROWS", 16)
    batched = solve(H, R, c, 1e-3, 0.5)
    monkeypatch.setattr(interior_point, "MEMORY_BUDGET_BYTES", 1)  # one row per chunk
    chunked = solve(H, R, c, 1e-3, 0.5)
    assert bool(products.certified.all())
    torch.testing.assert_close(batched.weights, products.weights, atol=1e-10, rtol=0)
    torch.testing.assert_close(chunked.weights, batched.weights, atol=1e-12, rtol=0)


def test_admm_hands_uncertified_rows_over() -> None:
    """On a rank-deficient Gram, ADMM with an immediate hand-over certifies through the interior point and
    reaches Clarabel's optimum; without it, the same optimum (the hand-over changes the route, not the answer)."""
    features, targets = samples(rank_deficient=True, seed=11)
    problem = SIMProblem.from_samples(features, targets, lam=1e-4, kappa=0.5, n_constrained=N)
    # (the active-set method, which would solve these rows first, switched off)
    handed = ADMMSolver(device="cpu", interior_point_after=0, active_set=False).solve(problem)
    assert handed.stats.converged
    assert handed.stats.extra["interior_point_rows"] > 0
    assert handed.stats.extra["interior_point_iterations"] > 0
    plain = ADMMSolver(device="cpu", interior_point=False, max_iter=50_000, stall_checks=0).solve(problem)
    assert plain.stats.extra["interior_point_rows"] == 0
    reference = clarabel(features, targets, np.full((N, N + P), 1e-4), 0.5).sum()
    assert abs(handed.stats.objective - reference) <= 1e-6 * reference
    assert handed.stats.objective <= plain.stats.objective * (1 + 2e-7)  # both within gap_tol = 1e-7
    assert float(handed.weights[:, :N].abs().sum(1).max()) <= 0.5


@pytest.mark.parametrize("rank_deficient", [True, False])
@pytest.mark.parametrize("kappa", [0.3, 0.8])
def test_lam_zero_eliminates_the_free_weights(rank_deficient: bool, kappa: float) -> None:
    """lam = 0 with the bound: the unbounded weights are free (an equality in the dual), eliminated; the
    interior point solves the bounded block and least squares the rest, to Clarabel's optimum."""
    features, targets = samples(rank_deficient=rank_deficient, seed=2)
    H, R, c = gram_form(features, targets)
    result = solve(H, R, c, 0.0, kappa)
    assert bool(result.certified.all())
    assert float(result.weights[:, :N].abs().sum(1).max()) <= kappa * (1 + 1e-12)
    ours = duality_gap(result.weights, H, R, c, lam=0.0, kappa=kappa, n_constrained=N).primal.numpy()
    reference = clarabel(features, targets, np.zeros((N, N + P)), kappa)
    assert bool((ours <= reference + 1e-6 * np.abs(reference) + 1e-10).all())
    np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-9)


def test_free_columns_spanning_everything_give_least_squares() -> None:
    """lam = 0 where the free (pixel) columns span the whole range (hidden units linear in the pixels): the
    dual has no room left (theta = 0), the bounded block is 0 and the pixels carry the least-squares fit."""
    gen = torch.Generator().manual_seed(4)
    pixels = torch.rand(M, P, generator=gen, dtype=torch.float64)
    hidden = pixels @ torch.randn(P, N, generator=gen, dtype=torch.float64)
    features = torch.cat([hidden, pixels], dim=1)
    targets = features @ torch.randn(N + P, N, generator=gen, dtype=torch.float64) + 0.05 * torch.randn(
        M, N, generator=gen, dtype=torch.float64
    )
    H, R, c = gram_form(features, targets)
    result = solve(H, R, c, 0.0, 0.5)
    assert bool(result.certified.all())
    assert result.iterations == 0  # nothing left for Newton steps
    assert bool((result.weights[:, :N] == 0).all())
    ours = duality_gap(result.weights, H, R, c, lam=0.0, kappa=0.5, n_constrained=N).primal.numpy()
    least_squares = torch.linalg.lstsq(pixels, targets).solution
    residual = ((targets - pixels @ least_squares) ** 2).sum(0).numpy() / (2 * M)
    np.testing.assert_allclose(ours, residual, rtol=1e-8, atol=1e-12)


def test_admm_hands_over_at_lam_zero() -> None:
    """The ADMM's hand-over at lam = 0 (where it used to crawl for thousands of steps): the same optimum as
    Clarabel, certified, and the bound exact."""
    features, targets = samples(rank_deficient=True, seed=2)
    problem = SIMProblem.from_samples(features, targets, lam=0.0, kappa=0.3, n_constrained=N)
    result = ADMMSolver(device="cpu", interior_point_after=0).solve(problem)
    assert result.stats.converged
    reference = clarabel(features, targets, np.zeros((N, N + P)), 0.3).sum()
    assert abs(result.stats.objective - reference) <= 1e-6 * abs(reference) + 1e-10
    assert float(result.weights[:, :N].abs().sum(1).max()) <= 0.3 * (1 + 1e-12)


def test_where_the_interior_point_applies() -> None:
    applies = interior_point.interior_point_applies
    assert applies(1e-3) and applies(0.0, N, 0.5) and applies(0.0)
    assert not applies(-1.0)
    thresholds = torch.full((3, N + P), 1e-3, dtype=torch.float64)
    thresholds[:, N + 2] = 0.0  # a free column in every row
    thresholds[1, :N] = 0.0  # zeros on bounded columns
    thresholds[2, N + 4] = torch.inf
    assert applies(thresholds, N, 0.5)
    thresholds[0, N + 5] = 0.0  # a zero in one row only: an equality in that row's dual alone
    assert not applies(thresholds, N, 0.5)
    thresholds[0, N + 5] = 1e-3
    thresholds[1, :N] = 0.0
    assert not applies(thresholds, N, None)  # without the bound those zeros are one row's equalities


@pytest.mark.parametrize("name, value", [("interior_point_after", -1), ("interior_point", "yes")])
def test_bad_options(name: str, value) -> None:
    with pytest.raises(ConfigError, match=name):
        ADMMOptions(**{name: value})


def test_float32_solver_hands_over_in_float64() -> None:
    """The interior point computes in float64 whatever the solver's dtype; the float32 answer is close to the
    float64 optimum (float32's certificate itself cannot resolve much below 1e-2 here)."""
    features, targets = samples(rank_deficient=True, seed=13)
    problem = SIMProblem.from_samples(features, targets, lam=1e-3, kappa=0.5, n_constrained=N)
    optimum = ADMMSolver(device="cpu").solve(problem).stats.objective
    # certified in float32, but not in float64 (rounding the rank-deficient Gram changed the problem): said so
    with pytest.warns(ConvergenceWarning, match="checked in float64"):
        result = ADMMSolver(device="cpu", dtype=torch.float32, interior_point_after=0).solve(problem)
    assert not result.stats.converged and result.stats.status == "inaccurate"
    assert result.stats.relative_gap > 1e-3
    assert result.weights.dtype == torch.float32
    assert result.stats.extra["interior_point_iterations"] > 0
    assert float(result.weights[:, :N].double().abs().sum(1).max()) <= 0.5 * (1 + 1e-6)
    # float32 weights on this rank-deficient problem land above the optimum by an amount that depends on the
    # CPU's rounding: below 1e-4 where this test was written, 1.12e-4 on an AMD EPYC host (the same with the
    # code of either); a wrong answer is off by far more
    assert (problem.objective(result.weights.double()) - optimum) <= 3e-4 * optimum


def test_hand_over_waits_where_the_interior_point_is_costly() -> None:
    """A full-rank Gram (d = 200, correlated columns): the interior point would cost as much as ~3,000 ADMM
    steps by flops, so even with interior_point_after=0 the hand-over waits (~90 steps), and ADMM certifies
    first (in ~70 steps; handing over at the first check would have run the interior point)."""
    gen = torch.Generator().manual_seed(5)
    base = torch.randn(3000, 200, generator=gen, dtype=torch.float64)
    features = 0.98 * base[:, :1] + 0.02 * base
    mixing = torch.randn(8, 8, generator=gen, dtype=torch.float64)
    targets = features[:, :8] @ mixing + 0.5 * torch.randn(3000, 8, generator=gen, dtype=torch.float64)
    problem = SIMProblem.from_samples(features, targets, lam=1e-5, kappa=0.2, n_constrained=8)
    result = ADMMSolver(device="cpu", interior_point_after=0).solve(problem)
    assert result.stats.converged
    assert result.stats.extra["interior_point_iterations"] == 0
    assert 25 < result.stats.iterations < 90  # past the first check, before the hand-over


def test_float32_at_lam_zero_does_not_crash_in_the_polish() -> None:
    """float32 at lam = 0 on a rank-deficient Gram: the polish's KKT systems can be exactly singular in float32
    (the ridge is below its rounding). That used to raise from torch.linalg.lu_factor; such rows now get no
    polish. The answer keeps the bound, is near the float64 optimum and the solver says how far it got."""
    features, targets = samples(rank_deficient=True, seed=2)
    problem = SIMProblem.from_samples(features, targets, lam=0.0, kappa=0.3, n_constrained=N)
    optimum = ADMMSolver(device="cpu").solve(problem).stats.objective
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = ADMMSolver(device="cpu", dtype=torch.float32).solve(problem)
    assert float(result.weights[:, :N].double().abs().sum(1).max()) <= 0.3 * (1 + 1e-6)
    assert float(problem.objective(result.weights.double())) <= optimum * 1.1
    assert result.stats.converged or any(issubclass(w.category, ConvergenceWarning) for w in caught)


def test_float32_at_lam_zero_keeps_rho_and_the_weights_bounded() -> None:
    """The same on another seed: the residual ratio drove rho to 1e-24 and (H + rho I)^{-1} blew W up to 6e18
    (objective 1e35). rho now stays within 1e6 of its start: W stays bounded, and the solver warns that it did
    not converge (float32 cannot resolve this problem; the warning says to use float64)."""
    features, targets = samples(rank_deficient=True, seed=13)
    problem = SIMProblem.from_samples(features, targets, lam=0.0, kappa=0.5, n_constrained=N)
    with pytest.warns(ConvergenceWarning):
        result = ADMMSolver(device="cpu", dtype=torch.float32).solve(problem)
    assert not result.stats.converged
    assert float(result.weights.abs().max()) < 1e8
