"""Per-entry l1 weights (``SIMProblem.l1_weights``) in every solver, against Clarabel at tight tolerances.

The reference is an independent cvxpy program written here from the samples (not CVXSolver's Gram form):
``1/(2m) ||T - W Phi||^2 + lam sum_ij w_ij |W_ij|`` with ``W_ij = 0`` where ``w_ij = inf`` and the kappa
bound on the first n columns.
"""

from __future__ import annotations

import cvxpy as cp
import numpy as np
import pytest
import torch

from idl_ray.errors import ConfigError, ShapeError
from idl_ray.sim.problem import SIMProblem
from idl_ray.sim.solvers import ADMMSolver, CVXSolver, LeastSquareSolver, ProjectedGDLowRankSolver

N, P, M = 6, 14, 150
TIGHT = {"tol_gap_abs": 1e-12, "tol_gap_rel": 1e-12, "tol_feas": 1e-12, "max_iter": 500}


def weighted_problem(
    *,
    lam: float,
    kappa: float | None,
    rank_deficient: bool,
    seed: int = 0,
    with_inf: bool = True,
    l2: float = 0.0,
) -> tuple[SIMProblem, torch.Tensor, torch.Tensor]:
    """A stage-1-like problem with random weights in [0.2, 3], a zero weight and some infinite ones."""
    gen = torch.Generator().manual_seed(seed)
    if rank_deficient:
        base = torch.rand(M, 5, generator=gen, dtype=torch.float64)
        pixels = base @ torch.rand(5, P, generator=gen, dtype=torch.float64)
        pixels[:, :2] = 0.0
    else:
        pixels = torch.rand(M, P, generator=gen, dtype=torch.float64)
    hidden = (pixels @ torch.randn(P, N, generator=gen, dtype=torch.float64) * 0.3).relu()
    features = torch.cat([hidden, pixels], dim=1)
    W_true = torch.randn(N, N + P, generator=gen, dtype=torch.float64) * 0.4
    targets = features @ W_true.T + 0.05 * torch.randn(M, N, generator=gen, dtype=torch.float64)
    weights = 0.2 + 2.8 * torch.rand(N, N + P, generator=gen, dtype=torch.float64)
    weights[0, 3] = 0.0
    if with_inf:
        weights[torch.rand(N, N + P, generator=gen) < 0.15] = torch.inf
        weights[1, :N] = torch.inf  # a row whose A-part is held at 0 entirely
    variant = "elastic_net" if l2 else "lasso"
    problem = SIMProblem.from_samples(
        features, targets, lam=lam, kappa=kappa, n_constrained=N, l1_weights=weights, l2=l2, variant=variant
    )
    return problem, features, targets


def reference(problem: SIMProblem, features: torch.Tensor, targets: torch.Tensor) -> np.ndarray:
    """Clarabel on the sample form, one program per row."""
    F, T = features.numpy(), targets.numpy()
    w_all = problem.l1_weights.numpy()
    out = np.zeros((problem.rows, problem.dim))
    for i in range(problem.rows):
        w = cp.Variable(problem.dim)
        held = np.isinf(w_all[i])
        finite = np.where(held, 0.0, w_all[i])
        objective = (
            0.5 / M * cp.sum_squares(T[:, i] - F @ w)
            + problem.lam * cp.norm1(cp.multiply(finite, w))
            + 0.5 * problem.l2 * cp.sum_squares(w)
        )
        constraints = [w[held] == 0] if held.any() else []
        if problem.kappa is not None:
            constraints.append(cp.norm1(w[:N]) <= problem.kappa)
        cp.Problem(cp.Minimize(objective), constraints).solve(solver="CLARABEL", **TIGHT)
        out[i] = w.value
    out[np.isinf(w_all)] = 0.0
    return out


#: (lam, kappa, rank-deficient features, l2)
CASES = [
    (1e-2, 0.5, False, 0.0),
    (1e-3, None, False, 0.0),
    (1e-2, 0.8, True, 0.0),
    (1e-3, None, True, 0.0),
    (0.0, 0.5, False, 0.0),
    (1e-2, 0.5, True, 1e-3),
]


@pytest.fixture(scope="module")
def references() -> dict:
    out = {}
    for case in CASES:
        lam, kappa, deficient, l2 = case
        problem, F, T = weighted_problem(lam=lam, kappa=kappa, rank_deficient=deficient, l2=l2)
        out[case] = (problem, reference(problem, F, T))
    return out


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize(
    "solver",
    [
        lambda: ADMMSolver(device="cpu", gap_tol=1e-9),
        lambda: CVXSolver(solver_options=TIGHT),
        lambda: ProjectedGDLowRankSolver(device="cpu", gap_tol=1e-9, max_iter=200_000),
    ],
    ids=["admm", "cvx", "fista"],
)
def test_weighted_solvers_match_clarabel(references: dict, case: tuple, solver) -> None:
    problem, W_ref = references[case]
    result = solver().solve(problem)
    W = result.weights.double()
    held = torch.isinf(problem.l1_weights)
    assert bool((W[held] == 0).all()), "an infinite-weight entry is not exactly 0"
    assert problem.constraint_violation(W) == 0.0
    f_ref = problem.objective(W_ref)
    f = problem.objective(W)
    assert abs(f - f_ref) <= 1e-5 * abs(f_ref) + 1e-12
    gap = problem.duality_gap(W)
    assert gap is not None
    # the certificate bounds the true suboptimality (the reference is optimal to ~1e-10)
    assert f - f_ref <= gap.gap + 1e-8 * abs(f_ref)
    # and its dual bound is a lower bound on the optimum
    assert float(gap.dual.sum()) <= f_ref + 1e-8 * abs(f_ref)


def test_weighted_certificate_is_tight_at_the_reference(references: dict) -> None:
    """At Clarabel's optimum the weighted certificate (infinite entries excluded) nearly closes."""
    for problem, W_ref in references.values():
        gap = problem.duality_gap(torch.as_tensor(W_ref))
        assert gap is not None and gap.relative_gap < 1e-6


def test_lam_zero_with_infinite_weights_holds_entries_at_zero() -> None:
    problem, F, T = weighted_problem(lam=0.0, kappa=None, rank_deficient=False)
    thresholds = problem.thresholds
    assert isinstance(thresholds, torch.Tensor)
    assert not bool(torch.isnan(thresholds).any())
    assert bool(torch.isinf(thresholds[torch.isinf(problem.l1_weights)]).all())
    W = ADMMSolver(device="cpu", gap_tol=1e-10).solve(problem).weights
    assert bool((W[torch.isinf(problem.l1_weights)] == 0).all())
    # lam = 0 with inf weights is least squares on the allowed entries of each row
    for i in range(problem.rows):
        keep = ~torch.isinf(problem.l1_weights[i])
        w_ls = torch.linalg.lstsq(F[:, keep], T[:, i : i + 1]).solution[:, 0]
        fit = ((T[:, i] - F[:, keep] @ w_ls) ** 2).sum() / (2 * M)
        ours = ((T[:, i] - F @ W[i]) ** 2).sum() / (2 * M)
        assert float(ours) <= float(fit) * (1 + 1e-6) + 1e-12


def test_unit_weights_equal_the_unweighted_problem() -> None:
    problem, _, _ = weighted_problem(lam=1e-2, kappa=0.5, rank_deficient=False, with_inf=False)
    plain = problem.replace(l1_weights=None)
    ones = problem.replace(l1_weights=torch.ones(()))
    W_plain = ADMMSolver(device="cpu", gap_tol=1e-10).solve(plain).weights
    W_ones = ADMMSolver(device="cpu", gap_tol=1e-10).solve(ones).weights
    assert plain.objective(W_plain) == pytest.approx(ones.objective(W_ones), rel=1e-8)
    assert ones.objective(W_plain) == pytest.approx(plain.objective(W_plain), rel=1e-14)


def test_row_block_slices_the_weights() -> None:
    problem, _, _ = weighted_problem(lam=1e-2, kappa=0.5, rank_deficient=False)
    block = problem.row_block(slice(2, 4))
    assert torch.equal(block.l1_weights, problem.l1_weights[2:4])
    W = torch.randn(problem.rows, problem.dim, dtype=torch.float64)
    W[torch.isinf(problem.l1_weights)] = 0
    assert float(block.row_objectives(W[2:4]).sum()) == pytest.approx(
        float(problem.row_objectives(W)[2:4].sum()), rel=1e-14
    )


def test_objective_uses_the_weights() -> None:
    problem, _, _ = weighted_problem(lam=0.1, kappa=None, rank_deficient=False, with_inf=False)
    W = torch.randn(problem.rows, problem.dim, dtype=torch.float64)
    plain = problem.replace(l1_weights=None)
    expected = (
        plain.objective(W) - 0.1 * float(W.abs().sum()) + 0.1 * float((problem.l1_weights * W.abs()).sum())
    )
    assert problem.objective(W) == pytest.approx(expected, rel=1e-12)
    W[1, 0] = 1.0
    assert problem.replace(l1_weights=problem.l1_weights.clone().fill_(torch.inf)).objective(W) == torch.inf


@pytest.mark.parametrize(
    "weights, error, match",
    [
        (torch.ones(3, 5), ShapeError, "broadcastable"),
        (torch.tensor([float("nan")]), ConfigError, "NaN"),
        (-torch.ones(()), ConfigError, ">= 0"),
        ("heavy", ConfigError, "l1_weights"),
    ],
)
def test_bad_weights_are_rejected(weights, error, match: str) -> None:
    features = torch.randn(20, 4, dtype=torch.float64)
    targets = torch.randn(20, 2, dtype=torch.float64)
    with pytest.raises(error, match=match):
        SIMProblem.from_samples(features, targets, lam=0.1, l1_weights=weights)


def test_least_squares_variant_rejects_weights() -> None:
    features = torch.randn(20, 4, dtype=torch.float64)
    with pytest.raises(ConfigError, match="l1_weights"):
        SIMProblem.from_samples(
            features, torch.randn(20, 2), variant="least_squares", l1_weights=torch.ones(2, 4)
        )


def test_solvers_that_cannot_honour_weights_say_so() -> None:
    problem, _, _ = weighted_problem(lam=1e-2, kappa=0.5, rank_deficient=False)
    with pytest.raises(ConfigError, match=r"LeastSquareSolver.*l1_weights"):
        LeastSquareSolver().solve(problem)
    with pytest.raises(ConfigError, match=r"low-rank.*l1_weights"):
        ProjectedGDLowRankSolver(rank=2, device="cpu").solve(problem)


def test_weighted_dual_bound_is_below_the_optimum_at_any_feasible_point(references: dict) -> None:
    """Weak duality of the weighted certificate, away from the optimum: random feasible points (zero where
    the weight is inf, inside the kappa ball) give dual bounds below Clarabel's optimum and gaps above
    their true suboptimality."""
    from idl_ray.implicit.projection import project_rows_onto_l1_ball

    gen = torch.Generator().manual_seed(5)
    for problem, W_ref in references.values():
        f_ref = problem.objective(W_ref)
        for scale in (0.01, 0.3, 2.0):
            W = torch.as_tensor(W_ref) + scale * torch.randn(
                problem.rows, problem.dim, generator=gen, dtype=torch.float64
            )
            W[torch.isinf(problem.l1_weights)] = 0.0
            if problem.kappa is not None:
                W[:, :N] = project_rows_onto_l1_ball(W[:, :N], problem.kappa)
            gap = problem.duality_gap(W)
            assert gap is not None
            assert float(gap.dual.sum()) <= f_ref * (1 + 1e-8) + 1e-12
            assert problem.objective(W) - f_ref <= gap.gap * (1 + 1e-8) + 1e-12
