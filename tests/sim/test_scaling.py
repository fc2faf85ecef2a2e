"""Block equilibration: the scaled stage is the same problem (same optimum, same duality gap)."""

from __future__ import annotations

import torch

from idl_ray.sim.problem import SIMProblem
from idl_ray.sim.solvers import ADMMSolver, CVXSolver
from idl_ray.sim.solvers.certificate import duality_gap
from idl_ray.sim.solvers.scaling import BlockScaling


def _badly_scaled_problem(seed: int = 0, lam: float = 1e-3) -> SIMProblem:
    """States 30x larger than the inputs (as rescaled hidden states vs pixels), rank-deficient inputs."""
    g = torch.Generator().manual_seed(seed)
    m, n, p, rows = 300, 6, 10, 6
    X = 30.0 * torch.rand(m, n, generator=g, dtype=torch.float64)
    base = torch.rand(m, 4, generator=g, dtype=torch.float64)
    U = base @ torch.rand(4, p, generator=g, dtype=torch.float64)  # rank 4 of 10
    T = X @ torch.randn(n, rows, generator=g, dtype=torch.float64) * 0.05 + U @ torch.randn(
        p, rows, generator=g, dtype=torch.float64
    )
    return SIMProblem.from_samples(torch.cat([X, U], 1), T, n_constrained=n, lam=lam, kappa=0.6)


def test_the_scaled_problem_has_the_same_duality_gap_at_mapped_points() -> None:
    problem = _badly_scaled_problem()
    H, R = problem.scaled()
    c = problem.target_sq / problem.num_samples
    scaling = BlockScaling.for_stage(H, problem.n_constrained)
    assert scaling is not None and scaling.bounded_scale > 10 * float(scaling.scales[-1])
    g = torch.Generator().manual_seed(1)
    W = 0.05 * torch.randn(problem.rows, problem.dim, generator=g, dtype=torch.float64)
    W[:, : problem.n_constrained] *= 0.6 / W[:, : problem.n_constrained].abs().sum(
        1, keepdim=True
    )  # on the bound
    settings = {"kappa": problem.kappa, "n_constrained": problem.n_constrained}
    original = duality_gap(W, H, R, c, lam=problem.lam, **settings)
    scaled = duality_gap(
        scaling.to_scaled(W),
        scaling.gram(H),
        scaling.targets(R),
        c,
        lam=scaling.thresholds(problem.lam, problem.rows),
        **{**settings, "kappa": scaling.radius(problem.kappa)},
    )
    torch.testing.assert_close(scaled.primal, original.primal, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(scaled.dual, original.dual, rtol=1e-10, atol=1e-12)
    assert float(original.gaps.min()) > 0  # a non-optimal point: the test compares non-trivial bounds


def test_equilibrated_admm_reaches_the_clarabel_optimum_with_an_exact_bound() -> None:
    for lam in (1e-4, 1e-3, 1e-2):
        problem = _badly_scaled_problem(seed=2, lam=lam)
        tight = {"tol_gap_abs": 1e-11, "tol_gap_rel": 1e-11, "tol_feas": 1e-11, "max_iter": 500}
        reference = CVXSolver(solver_options=tight).solve(problem).stats.objective
        result = ADMMSolver(device="cpu").solve(problem)
        assert result.stats.extra["equilibrated"] and result.stats.converged
        assert result.stats.objective <= reference + 1e-7 * abs(reference)
        assert float(result.weights[:, : problem.n_constrained].abs().sum(1).max()) <= problem.kappa
        # the certificate, computed on the original problem, bounds the true suboptimality
        assert result.stats.gap >= result.stats.objective - reference - 1e-12


def test_no_scaling_without_a_bound() -> None:
    problem = _badly_scaled_problem()
    H, _ = problem.scaled()
    assert BlockScaling.for_stage(H, 0) is None
    result = ADMMSolver(device="cpu").solve(problem.replace(n_constrained=0, kappa=None))
    assert not result.stats.extra["equilibrated"]
