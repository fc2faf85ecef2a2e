"""Every solver against CVXSolver (Clarabel) on small random problems; the kappa bound is exact."""

from __future__ import annotations

import warnings

import pytest
import torch

from idl_ray.errors import ConfigError, ConvergenceWarning, SolverError, WellPosednessWarning
from idl_ray.sim.problem import SIMProblem
from idl_ray.sim.solvers import (
    ADMMSolver,
    BaseSolver,
    CVXSolver,
    LeastSquareSolver,
    ProjectedGDLowRankSolver,
    SolveResult,
    available_solvers,
    get_solver,
    register_solver,
)

N, P, Q, M = 10, 6, 4, 300


def _problem(stage: int, variant: str = "lasso", seed: int = 0, keep_samples: bool = False) -> SIMProblem:
    gen = torch.Generator().manual_seed(seed)
    d = N + P
    Phi = torch.randn(M, d, generator=gen, dtype=torch.float64)
    Phi[:, :N] = Phi[:, :N].relu()  # states are post-activations
    rows = N if stage == 1 else Q
    W_true = torch.randn(rows, d, generator=gen, dtype=torch.float64)
    T = Phi @ W_true.T + 0.1 * torch.randn(M, rows, generator=gen, dtype=torch.float64)
    settings = {"lam": 0.02, "variant": variant, "l2": 0.05 if variant == "elastic_net" else 0.0}
    if stage == 1:
        settings |= {"n_constrained": N, "kappa": 0.6}
    return SIMProblem.from_samples(Phi, T, keep_samples=keep_samples, **settings)


@pytest.fixture(scope="module")
def references() -> dict[tuple[int, str], SolveResult]:
    return {
        (stage, variant): CVXSolver().solve(_problem(stage, variant))
        for stage in (1, 2)
        for variant in ("lasso", "elastic_net")
    }


SOLVERS = {
    "admm": lambda: ADMMSolver(device="cpu"),
    "admm_float32": lambda: ADMMSolver(device="cpu", dtype=torch.float32, gap_tol=1e-5),
    "fista": lambda: ProjectedGDLowRankSolver(device="cpu"),
}


@pytest.mark.parametrize("name", sorted(SOLVERS))
@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.parametrize("variant", ["lasso", "elastic_net"])
def test_solver_matches_cvx(references, name: str, stage: int, variant: str) -> None:
    problem = _problem(stage, variant)
    ref = references[(stage, variant)]
    result = SOLVERS[name]().solve(problem)
    assert result.stats.converged
    rel = abs(result.stats.objective - ref.stats.objective) / abs(ref.stats.objective)
    assert rel < 1e-4, (name, result.stats.objective, ref.stats.objective)
    assert result.stats.constraint_violation == 0.0
    # G is positive definite (300 samples, 16 features), so the optimum is unique: the weights
    # themselves must agree, not only the objective (a 0.4% weight error moves it by ~1e-5)
    W, W_ref = result.weights.to(torch.float64), ref.weights
    tol = 2e-3 if name == "admm_float32" else 2e-4
    assert float((W - W_ref).norm() / W_ref.norm()) < tol, (name, float((W - W_ref).norm() / W_ref.norm()))
    # and the zero pattern of the lasso (entries clearly nonzero in one are nonzero in the other)
    assert bool(((W_ref.abs() > 1e-2) <= (W.abs() > 0)).all())
    if stage == 1:
        # the bound is active at this kappa (the unconstrained fit violates it) and holds exactly
        assert ref.stats.constraint_norm == pytest.approx(0.6, abs=1e-6)
        assert float(result.weights[:, :N].abs().sum(1).max()) <= 0.6


def test_cvx_bound_is_exact_and_parallel_rows_agree(references) -> None:
    problem = _problem(1)
    ref = references[(1, "lasso")]
    assert float(ref.weights[:, :N].abs().sum(1).max()) <= 0.6
    threaded = CVXSolver(n_jobs=2, executor="thread").solve(problem)
    torch.testing.assert_close(threaded.weights, ref.weights, atol=1e-6, rtol=1e-5)
    assert threaded.stats.extra["workers"] == 2


def test_low_rank_solver_keeps_rank_and_bound() -> None:
    problem = _problem(1, keep_samples=True)
    with pytest.warns(ConvergenceWarning, match="low-rank Adam"):  # 400 Adam steps: its test is not met
        result = ProjectedGDLowRankSolver(rank=3, max_iter=400, lr=0.02, device="cpu").solve(problem)
    A, B = result.weights[:, :N], result.weights[:, N:]
    assert float(A.abs().sum(1).max()) <= 0.6
    assert int(torch.linalg.matrix_rank(A)) <= 3
    full = ADMMSolver(device="cpu").solve(problem)
    # a rank-3 fit cannot beat the full optimum, and it must be far better than W = 0
    assert result.stats.objective >= full.stats.objective * (1 - 1e-9)
    assert result.stats.objective < problem.objective(torch.zeros_like(result.weights))
    Phi, T = problem.samples.features, problem.samples.targets

    def best_B(A_fixed: torch.Tensor) -> torch.Tensor:
        """The lasso in B with A fixed, solved independently by Clarabel on the samples."""
        rest = SIMProblem.from_samples(Phi[:, N:], T - Phi[:, :N] @ A_fixed.T, lam=problem.lam)
        return CVXSolver().solve(rest).weights

    # B is refitted exactly for the A found
    B_ref = best_B(A)
    assert float((B - B_ref).norm() / B_ref.norm()) < 1e-5
    # and A is a real rank-3 fit: better than the rank-3 truncation of the full optimum (scaled into
    # the bound, with its own best B)
    U, S, Vh = torch.linalg.svd(full.weights[:, :N])
    A3 = (U[:, :3] * S[:3]) @ Vh[:3]
    A3 = A3 * torch.clamp(0.6 / A3.abs().sum(1), max=1.0)[:, None]
    truncated = problem.objective(torch.cat([A3, best_B(A3)], dim=1))
    assert result.stats.objective < truncated


def test_least_squares_is_exact_unconstrained_and_warns_on_kappa() -> None:
    problem = _problem(1)
    with pytest.warns(WellPosednessWarning, match="kappa"):
        result = LeastSquareSolver(device="cpu").solve(problem)
    F, T = problem.samples, None  # samples were not kept
    assert F is T is None
    # normal equations: W G = Rt
    torch.testing.assert_close(result.weights @ problem.G, problem.Rt, atol=1e-8, rtol=1e-8)
    assert result.stats.constraint_violation > 0
    unconstrained = _problem(2).replace(variant="least_squares", lam=0.0)
    ls = LeastSquareSolver(device="cpu").solve(unconstrained)
    admm = ADMMSolver(device="cpu").solve(unconstrained)
    assert admm.stats.objective == pytest.approx(ls.stats.objective, rel=1e-6)


def test_exact_variant_with_cvx() -> None:
    gen = torch.Generator().manual_seed(3)
    Phi = torch.randn(80, 8, generator=gen, dtype=torch.float64)
    W = torch.randn(3, 8, generator=gen, dtype=torch.float64)
    W[:, :5] *= 0.1 / W[:, :5].abs().sum(1, keepdim=True)  # feasible under kappa = 0.5
    problem = SIMProblem.from_samples(
        Phi, Phi @ W.T, keep_samples=True, n_constrained=5, kappa=0.5, variant="exact"
    )
    result = CVXSolver(exact_tol=1e-7).solve(problem)
    assert problem.residual(result.weights) < 1e-10
    assert result.stats.constraint_violation == 0.0
    with pytest.raises(ConfigError, match="exact"):
        ADMMSolver(device="cpu").solve(problem)
    infeasible = problem.replace(kappa=0.01)
    with pytest.raises(SolverError, match="rescale"):
        CVXSolver().solve(infeasible)


def test_admm_reports_non_convergence_and_still_satisfies_the_bound() -> None:
    problem = _problem(1)
    plain = {"anderson": 0, "polish": False, "warm_start": False}
    with pytest.warns(ConvergenceWarning, match=r"max_iter=6 with a relative duality gap of"):
        result = ADMMSolver(device="cpu", max_iter=6, check_every=2, **plain).solve(problem)
    assert not result.stats.converged and result.stats.status == "max_iter"
    assert result.stats.constraint_violation == 0.0
    assert result.stats.iterations == 6
    # a check before the first step, then after each round (its first step plus check_every more)
    assert [h["iteration"] for h in result.stats.history] == [0, 3, 6]
    assert result.stats.relative_gap > 1e-7 and result.stats.history[-1]["relative_gap"] > 1e-7


def _factors_held(solver: ADMMSolver) -> list:
    return [factor for known in solver._factors.values() for _, factor in known]


def test_admm_reuses_its_factor_across_stages() -> None:
    problem = _problem(1)
    stage2 = problem.replace(n_constrained=0, kappa=None)
    shared = ADMMSolver(device="cpu", equilibrate=False)
    shared.solve(problem)
    shared.solve(stage2)
    assert len(_factors_held(shared)) == 1  # without equilibration both stages use G itself
    solver = ADMMSolver(device="cpu")
    solver.solve(problem)
    solver.solve(stage2)
    assert len(_factors_held(solver)) == 2  # stage 1 equilibrated, stage 2 not: one factor each
    factors = _factors_held(solver)
    solver.solve(problem)
    solver.solve(stage2)
    assert all(a is b for a, b in zip(_factors_held(solver), factors, strict=True))  # a refit reuses both


def test_registry_and_custom_solver() -> None:
    assert {"admm", "cvx", "least_squares", "projected_gd"} <= set(available_solvers())
    assert isinstance(get_solver("cvx"), CVXSolver)
    with pytest.raises(ConfigError, match="admm"):
        get_solver("mosek")

    @register_solver("zero_test", overwrite=True)
    class ZeroSolver(BaseSolver):
        def _solve(self, problem):
            return torch.zeros(problem.rows, problem.dim, dtype=torch.float64), {"iterations": 0}

    problem = _problem(2)
    W, stats = get_solver("zero_test").solve(problem)
    assert stats.solver == "zero_test" and stats.objective == pytest.approx(problem.objective(W))
    with pytest.raises(ConfigError, match="samples"):
        type("NeedsSamples", (ZeroSolver,), {"needs_samples": True})().solve(problem)


def test_solver_settings_are_validated() -> None:
    with pytest.raises(ConfigError, match="max_iter"):
        ADMMSolver(max_iter=0)
    with pytest.raises(ConfigError, match="Unknown option"):
        ADMMSolver(step=3)
    with pytest.raises(ConfigError, match="rank"):
        ProjectedGDLowRankSolver(rank=0)
    with pytest.raises(ConfigError, match="executor"):
        CVXSolver(executor="gpu")
    with pytest.raises(SolverError, match="not installed"):
        CVXSolver(solver="NOT_A_SOLVER").solve(_problem(2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ADMMSolver(options={"max_iter": 50}, warn=False).solve(_problem(2))
