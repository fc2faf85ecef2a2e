"""ProjectedGDLowRankSolver stops on the duality gap, polishes, and warns at its cap (issue 9)."""

from __future__ import annotations

import pytest
import torch

from idl_ray.errors import ConvergenceWarning
from idl_ray.sim.problem import SIMProblem
from idl_ray.sim.solvers.cvx import CVXSolver
from idl_ray.sim.solvers.projected_gd import ProjectedGDLowRankSolver


@pytest.fixture(scope="module")
def problem() -> SIMProblem:
    """Nearly rank-deficient features (rank ~5 of 16 plus 1e-2 noise); the kappa bound is active."""
    g = torch.Generator().manual_seed(3)
    features = torch.randn(600, 5, generator=g, dtype=torch.float64) @ torch.randn(
        5, 16, generator=g, dtype=torch.float64
    )
    features = features + 1e-2 * torch.randn(600, 16, generator=g, dtype=torch.float64)
    targets = features @ (0.4 * torch.randn(16, 6, generator=g, dtype=torch.float64))
    targets = targets + 0.05 * torch.randn(600, 6, generator=g, dtype=torch.float64)
    return SIMProblem.from_samples(features, targets, n_constrained=6, lam=1e-4, kappa=0.5)


@pytest.fixture(scope="module")
def cvx(problem):
    options = {"tol_gap_abs": 1e-12, "tol_gap_rel": 1e-12, "tol_feas": 1e-12}
    return CVXSolver(solver_options=options).solve(problem)


@pytest.mark.parametrize("polish", [True, False])
def test_fista_reaches_the_certified_optimum(polish, problem, cvx) -> None:
    result = ProjectedGDLowRankSolver(device="cpu", polish=polish).solve(problem)
    stats = result.stats
    assert stats.converged and stats.status == "optimal"
    assert stats.constraint_violation == 0.0
    assert abs(stats.objective - cvx.stats.objective) / abs(cvx.stats.objective) < 1e-5
    # the certificate bounds the true suboptimality; FISTA's own certificate is the problem's
    assert stats.objective - cvx.stats.objective <= stats.gap + 1e-9 * abs(cvx.stats.objective)
    assert stats.relative_gap <= 1e-6
    # the same certificate up to rounding (1e-12 of the objective)
    assert stats.extra["relative_gap"] == pytest.approx(stats.relative_gap, rel=1e-6, abs=1e-12)
    assert stats.iterations > 25  # ill-conditioned: the loop ran past its first check


def test_polishing_finishes_fista_sooner(problem) -> None:
    polished = ProjectedGDLowRankSolver(device="cpu").solve(problem).stats
    plain = ProjectedGDLowRankSolver(device="cpu", polish=False).solve(problem).stats
    assert polished.iterations <= plain.iterations
    assert polished.objective <= plain.objective * (1 + 1e-9)


def test_fista_warns_at_its_cap_naming_the_gap(problem) -> None:
    with pytest.warns(ConvergenceWarning, match=r"max_iter=5 with a relative duality gap of"):
        result = ProjectedGDLowRankSolver(device="cpu", max_iter=5, polish=False).solve(problem)
    assert not result.stats.converged and result.stats.status == "max_iter"
    assert result.stats.constraint_violation == 0.0
    assert result.stats.extra["relative_gap"] > 1e-7


def test_low_rank_reports_the_refit_certificate_and_warns_at_the_cap(problem) -> None:
    with pytest.warns(ConvergenceWarning) as caught:
        # 50 steps: Adam and the refit stop at the cap (the refit's interior point comes at step 100)
        result = ProjectedGDLowRankSolver(rank=2, max_iter=50, lr=0.02, device="cpu").solve(problem)
    messages = " ".join(str(w.message) for w in caught)
    assert "low-rank Adam" in messages and "refit of B with A fixed" in messages
    extra = result.stats.extra
    assert extra["adam_converged"] is False and not result.stats.converged
    assert result.stats.status == "max_iter"
    assert float(result.weights[:, :6].abs().sum(1).max()) <= 0.5
    # the refit's certificate bounds how far B is from the best B for this A (CVX on the B-subproblem)
    A = result.weights[:, :6]
    best = problem.objective(torch.cat([A, _best_B(problem, A)], dim=1))
    suboptimality = problem.objective(result.weights) - best
    assert 0 < suboptimality <= extra["refit_gap"] + 1e-10
    # and the stage's own certificate (against the full-rank optimum) is larger still
    assert result.stats.gap >= extra["refit_gap"] * (1 - 1e-9)


def _best_B(problem: SIMProblem, A: torch.Tensor) -> torch.Tensor:
    """argmin over B of the stage objective with A fixed, by cvxpy."""
    import cvxpy as cp

    H, R = problem.scaled()
    n = A.shape[1]
    Hbb = H[n:, n:].numpy()
    Rb = (R[:, n:] - A @ H[:n, n:]).numpy()
    L = torch.linalg.cholesky(H[n:, n:] + 1e-12 * torch.eye(Hbb.shape[0], dtype=H.dtype)).numpy()
    rows = []
    for i in range(A.shape[0]):
        b = cp.Variable(Hbb.shape[0])
        objective = 0.5 * cp.sum_squares(L.T @ b) - Rb[i] @ b + problem.lam * cp.norm1(b)
        cp.Problem(cp.Minimize(objective)).solve(solver="CLARABEL")
        rows.append(torch.as_tensor(b.value, dtype=torch.float64))
    return torch.stack(rows)


def test_rows_fista_has_not_certified_go_to_the_interior_point(cvx_rank_deficient) -> None:
    """On an exactly rank-deficient Gram (duplicated columns: the lasso optimum is not unique) FISTA and its
    polish have not certified every row by the hand-over's 100 steps; the interior point certifies the
    others there, at the CVX optimum, where FISTA alone needs 325 steps."""
    from idl_ray.sim.solvers.projected_gd import fista, hand_over_step

    problem, reference = cvx_rank_deficient
    H = problem.G / problem.num_samples
    R = problem.Rt / problem.num_samples
    c = problem.target_sq / problem.num_samples
    settings = dict(lam=problem.lam, kappa=problem.kappa, n_constrained=problem.n_constrained, target_sq=c)
    rank = int(torch.linalg.matrix_rank(H))
    assert rank < H.shape[0] and hand_over_step(H.shape[0], rank) == 100
    W, info = fista(H, R, **settings, max_iter=2_000)
    assert info["converged"] and info["iterations"] == 100
    assert info["interior_point_rows"] > 0  # the rows FISTA and the polish left
    objective = problem.objective(W)
    assert abs(objective - reference) <= 1e-6 * abs(reference)
    assert float(W[:, : problem.n_constrained].abs().sum(dim=1).max()) <= problem.kappa * (1 + 1e-12)
    _, alone = fista(H, R, **settings, max_iter=2_000, interior_point=False)
    assert alone["converged"] and alone["interior_point_rows"] == 0 and alone["iterations"] > 200


def test_rows_the_interior_point_improves_without_certifying_go_on_from_its_point(
    cvx_rank_deficient, monkeypatch
) -> None:
    """Cut to 8 Newton steps the interior point certifies no row, but its points beat FISTA's iterates at the
    hand-over: FISTA goes on from them and certifies at step 125, where it needs 325 from its own."""
    import idl_ray.sim.solvers.projected_gd as projected_gd

    problem, reference = cvx_rank_deficient
    H, R = problem.G / problem.num_samples, problem.Rt / problem.num_samples
    settings = dict(
        lam=problem.lam,
        kappa=problem.kappa,
        n_constrained=problem.n_constrained,
        target_sq=problem.target_sq / problem.num_samples,
    )
    _, alone = projected_gd.fista(H, R, **settings, max_iter=2_000, interior_point=False)
    import idl_ray.sim.solvers.finish as finish

    original = finish.interior_point_rows
    monkeypatch.setattr(
        finish, "interior_point_rows", lambda *args, **kw: original(*args, **{**kw, "max_iter": 8})
    )
    W, info = projected_gd.fista(H, R, **settings, max_iter=2_000)
    assert info["converged"] and info["interior_point_rows"] == 0
    assert info["iterations"] < alone["iterations"]
    assert abs(problem.objective(W) - reference) <= 1e-6 * abs(reference)


def test_the_solver_reports_the_interior_point_rows(cvx_rank_deficient) -> None:
    problem, reference = cvx_rank_deficient
    result = ProjectedGDLowRankSolver(device="cpu").solve(problem)
    assert result.stats.converged and result.stats.extra["interior_point_rows"] > 0
    assert abs(result.stats.objective - reference) <= 1e-6 * abs(reference)


@pytest.fixture(scope="module")
def cvx_rank_deficient() -> tuple[SIMProblem, float]:
    """Features with exactly duplicated columns (rank 8 of 14), a small lam and an active kappa bound."""
    g = torch.Generator().manual_seed(11)
    base = torch.randn(500, 8, generator=g, dtype=torch.float64)
    features = torch.cat([base, base[:, :6]], dim=1)
    targets = base @ (0.5 * torch.randn(8, 5, generator=g, dtype=torch.float64))
    targets = targets + 0.05 * torch.randn(500, 5, generator=g, dtype=torch.float64)
    problem = SIMProblem.from_samples(features, targets, n_constrained=5, lam=1e-6, kappa=0.4)
    options = {"tol_gap_abs": 1e-12, "tol_gap_rel": 1e-12, "tol_feas": 1e-12}
    return problem, CVXSolver(solver_options=options).solve(problem).stats.objective
