"""SIM stage-1 problems under the mu_inf row constraint: ADMM against Clarabel, the certificate, gating."""

from __future__ import annotations

import cvxpy as cp
import numpy as np
import pytest
import torch

from idl_ray.errors import ConfigError
from idl_ray.implicit.mu_projection import mu_inf, mu_inf_rows
from idl_ray.sim.problem import SIMProblem
from idl_ray.sim.solvers import ADMMSolver, CVXSolver
from idl_ray.sim.solvers.certificate import duality_gap

CLARABEL = {"solver_options": {"tol_gap_abs": 1e-11, "tol_gap_rel": 1e-11, "tol_feas": 1e-11}}


def stage1(n=6, p=5, m=400, lam=1e-3, kappa=0.5, seed=0, **kwargs) -> SIMProblem:
    """Targets from a teacher whose A has a large negative diagonal (so the mu bound binds differently)."""
    g = torch.Generator().manual_seed(seed)
    A = 0.4 * torch.randn(n, n, generator=g, dtype=torch.float64)
    A.diagonal().copy_(-1.5 - torch.rand(n, generator=g, dtype=torch.float64))
    B = torch.randn(n, p, generator=g, dtype=torch.float64)
    X = torch.rand(m, n, generator=g, dtype=torch.float64)
    U = torch.randn(m, p, generator=g, dtype=torch.float64)
    Z = X @ A.T + U @ B.T + 0.05 * torch.randn(m, n, generator=g, dtype=torch.float64)
    Phi = torch.cat([X, U], dim=1)
    return SIMProblem.from_samples(
        Phi, Z, n_constrained=n, lam=lam, kappa=kappa, constraint="mu_inf", **kwargs
    )


def sample_objective(problem: SIMProblem, W: np.ndarray, Phi: np.ndarray, T: np.ndarray) -> float:
    m = Phi.shape[0]
    return float(0.5 * ((T - Phi @ W.T) ** 2).sum() / m + problem.lam * np.abs(W).sum())


@pytest.mark.parametrize(("lam", "kappa"), [(1e-3, 0.5), (1e-2, 0.0), (0.0, 0.9)])
def test_admm_matches_clarabel_and_keeps_the_bound(lam, kappa):
    problem = stage1(lam=lam, kappa=kappa)
    ref = CVXSolver(**CLARABEL).solve(problem)
    ours = ADMMSolver(device="cpu", gap_tol=1e-9, max_iter=50_000).solve(problem)
    n = problem.n_constrained
    A = ours.weights[:, :n]
    assert mu_inf(A) <= kappa
    assert ours.stats.constraint_violation == 0.0
    assert ours.stats.constraint_norm == pytest.approx(mu_inf(A))
    assert float(A.abs().sum(1).max()) > 1.0  # ||A||_inf > 1: the inf-norm bound could not hold
    f_ref, f = ref.stats.objective, ours.stats.objective
    assert abs(f - f_ref) <= 1e-5 * abs(f_ref)
    # the certificate bounds the true suboptimality (against Clarabel's optimum, less its own tolerance)
    assert ours.stats.gap >= f - f_ref - 1e-9 * abs(f_ref)
    assert ours.stats.converged


def test_clarabel_reference_is_the_mu_constrained_optimum():
    """The CVX solver's program is the stated one: an independent cvxpy model on the samples agrees."""
    problem = stage1(n=4, p=3, m=150, lam=2e-3, kappa=0.3, keep_samples=True)
    W = CVXSolver(**CLARABEL).solve(problem).weights.numpy()
    Phi, T = problem.samples.features.numpy(), problem.samples.targets.numpy()
    n, d = 4, 7
    V = cp.Variable((n, d))
    cons = [V[i, i] + cp.sum(cp.abs(V[i, [j for j in range(n) if j != i]])) <= 0.3 for i in range(n)]
    obj = 0.5 * cp.sum_squares(T - Phi @ V.T) / Phi.shape[0] + problem.lam * cp.sum(cp.abs(V))
    cp.Problem(cp.Minimize(obj), cons).solve(solver=cp.CLARABEL)
    assert sample_objective(problem, W, Phi, T) == pytest.approx(
        sample_objective(problem, V.value, Phi, T), rel=1e-6
    )


def test_certificate_bounds_suboptimality_of_poor_points():
    problem = stage1(lam=5e-3, kappa=0.4)
    f_star = CVXSolver(**CLARABEL).solve(problem).stats.objective
    g = torch.Generator().manual_seed(3)
    n = problem.n_constrained
    for scale in (0.0, 0.1, 1.0):
        W = scale * torch.randn(problem.rows, problem.dim, generator=g, dtype=torch.float64)
        # make it feasible: push each diagonal down until the mu row value is <= kappa
        excess = (mu_inf_rows(W, n) - 0.4).clamp_min(0)
        W[torch.arange(n), torch.arange(n)] -= excess + 1e-9
        gap = problem.duality_gap(W)
        assert gap is not None
        assert gap.gap >= problem.objective(W) - f_star - 1e-10
        assert torch.isfinite(gap.dual).all()


def test_certificate_is_zero_at_the_optimum():
    problem = stage1(lam=1e-3, kappa=0.5)
    W = CVXSolver(**CLARABEL).solve(problem).weights
    gap = problem.duality_gap(W)
    assert gap.relative_gap < 1e-6
    H, R = problem.scaled()
    direct = duality_gap(
        W, H, R, problem.target_sq / problem.num_samples, lam=problem.lam, kappa=0.5, n_constrained=6,
        condition="mu_inf", diagonal=torch.arange(6),
    )  # fmt: skip
    assert torch.allclose(direct.dual, gap.dual)


def test_certificate_conjugate_domain_condition():
    """Row 0 with v_0 = 0 and |v_1| = 1: the conjugate is infinite (|v_1| - lam > v_0 + lam: the set is
    unbounded along e_1 - e_0), so the dual point must be rescaled. Without that, W = 0 would be
    certified optimal although w = (-a, a) fits better (w_0 + |w_1| = 0 <= kappa)."""
    n, m = 2, 64
    g = torch.Generator().manual_seed(0)
    Phi = torch.ones(m, n, dtype=torch.float64)
    Phi[:, 0] = 0.1 * torch.sign(torch.randn(m, generator=g, dtype=torch.float64))
    Phi[:, 0] -= Phi[:, 0].mean()  # exactly uncorrelated with the constant target: v_0 = 0 at W = 0
    T = torch.ones(m, n, dtype=torch.float64)
    problem = SIMProblem.from_samples(Phi, T, n_constrained=n, lam=1e-3, kappa=0.0, constraint="mu_inf")
    f_star = CVXSolver(**CLARABEL).solve(problem).stats.objective
    W = torch.zeros(n, n, dtype=torch.float64)
    assert problem.objective(W) - f_star > 1e-3  # W = 0 is far from optimal
    gap = problem.duality_gap(W)
    assert gap.gap >= problem.objective(W) - f_star - 1e-12


def test_row_blocks_carry_their_diagonal():
    problem = stage1(n=6, lam=1e-3, kappa=0.5)
    full = ADMMSolver(device="cpu", gap_tol=1e-10, max_iter=50_000).solve(problem).weights
    block = problem.row_block(slice(2, 5))
    assert block.row_offset == 2
    W = ADMMSolver(device="cpu", gap_tol=1e-10, max_iter=50_000).solve(block).weights
    assert float(mu_inf_rows(W, 6, row_offset=2).max()) <= 0.5 + 1e-12
    assert torch.allclose(W, full[2:5], atol=1e-4)


def test_other_solvers_and_bad_settings_are_refused():
    problem = stage1()
    from idl_ray.sim.solvers import SOLVERS

    for name in ("fista", "pgd"):
        if name in SOLVERS:
            with pytest.raises(ConfigError, match="mu_inf"):
                SOLVERS[name]().solve(problem)
    with pytest.raises(ConfigError, match="constraint"):
        problem.replace(constraint="spectral")
    with pytest.raises(ConfigError, match="diagonal"):
        problem.replace(row_offset=3)
