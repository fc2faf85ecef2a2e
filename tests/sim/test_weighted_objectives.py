"""Reweighted l1, exact sparsity targets and the robustness-weighted objective.

References: cold Clarabel solves written here from the samples (each reweighting round's weighted lasso, the
refit on a fixed support), the plain l1 path (for the reweighting comparison) and the certified Lipschitz
bound of :func:`idl_ray.robustness.lipschitz.lipschitz_bound`.
"""

from __future__ import annotations

import cvxpy as cp
import numpy as np
import pytest
import torch
from torch import nn

from idl_ray.errors import ConfigError
from idl_ray.robustness.lipschitz import lipschitz_bound
from idl_ray.sim.estimator import SIM
from idl_ray.sim.problem import SIMProblem
from idl_ray.sim.reweighting import reweighted_solve, reweighting_weights
from idl_ray.sim.solvers import ADMMSolver
from idl_ray.sim.targets import SparsityTarget, solve_to_target
from idl_ray.sim.weighting import StageWeighting, robust_l1_weights

TIGHT = {"tol_gap_abs": 1e-12, "tol_gap_rel": 1e-12, "tol_feas": 1e-12, "max_iter": 500}
N, P, M = 6, 20, 300


def sparse_problem(*, lam: float, kappa: float | None, bias: bool = False, seed: int = 0):
    """A stage-like problem whose targets come from a sparse W (a quarter of the entries)."""
    gen = torch.Generator().manual_seed(seed)
    F = torch.randn(M, N + P, generator=gen, dtype=torch.float64)
    if bias:
        F[:, -1] = 1.0
    mask = torch.rand(N, N + P, generator=gen) < 0.25
    W_true = torch.randn(N, N + P, generator=gen, dtype=torch.float64) * mask
    T = F @ W_true.T + 0.1 * torch.randn(M, N, generator=gen, dtype=torch.float64)
    problem = SIMProblem.from_samples(F, T, lam=lam, kappa=kappa, n_constrained=N if kappa else 0)
    return problem, F, T


def clarabel(F: torch.Tensor, T: torch.Tensor, problem: SIMProblem) -> np.ndarray:
    """Cold Clarabel solve of the weighted problem, row by row (inf weight: the entry is fixed at 0)."""
    Fn, Tn = F.numpy(), T.numpy()
    weights = (
        np.ones((problem.rows, problem.dim)) if problem.l1_weights is None else problem.l1_weights.numpy()
    )
    out = np.zeros((problem.rows, problem.dim))
    for i in range(problem.rows):
        w = cp.Variable(problem.dim)
        held = np.isinf(weights[i])
        t = problem.lam * np.where(held, 0.0, weights[i])
        objective = 0.5 / M * cp.sum_squares(Tn[:, i] - Fn @ w) + cp.norm1(cp.multiply(t, w))
        constraints = [w[held] == 0] if held.any() else []
        if problem.kappa is not None and problem.n_constrained:
            constraints.append(cp.norm1(w[: problem.n_constrained]) <= problem.kappa)
        cp.Problem(cp.Minimize(objective), constraints).solve(solver="CLARABEL", **TIGHT)
        out[i] = np.where(held, 0.0, w.value)
    return out


# ----------------------------------------------------------------------------- reweighting
def test_reweighting_weights_formula() -> None:
    W = torch.tensor([[2.0, -1.0, 0.0, 0.5], [0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    base = torch.tensor([[1.0, 2.0, torch.inf, 1.0], [1.0, 3.0, 1.0, 1.0]], dtype=torch.float64)
    w = reweighting_weights(W, 0.1, base)
    eps = 0.2
    a = torch.tensor([2.0, 1.0, 0.0, 0.5], dtype=torch.float64)
    b = torch.tensor([1.0, 2.0, 0.0, 1.0], dtype=torch.float64)  # the base, inf entry (W = 0) left out
    c = (b * a).sum() / (b * a / (a + eps)).sum()
    expected = b * c / (a + eps)
    assert torch.allclose(w[0, [0, 1, 3]], expected[[0, 1, 3]], rtol=1e-14)
    assert torch.isinf(w[0, 2])
    assert torch.equal(w[1], base[1])  # an all-zero row keeps its base weights
    # the new weighted penalty of W equals its round-0 (base-weighted) penalty
    assert float((w[0, [0, 1, 3]] * a[[0, 1, 3]]).sum()) == pytest.approx(float((b * a).sum()), rel=1e-14)


def test_reweighting_is_sparser_than_l1_at_equal_fit() -> None:
    problem, _, _ = sparse_problem(lam=0.02, kappa=None)
    solver = ADMMSolver(device="cpu", gap_tol=1e-10)
    fit = reweighted_solve(problem, solver, rounds=3)
    W = fit.result.weights
    nnz, residual = int((W != 0).sum()), problem.residual(W)
    assert fit.rounds[-1]["nonzeros"] < fit.rounds[0]["nonzeros"]
    # every plain-l1 fit at least as good as the reweighted one keeps more nonzeros
    as_good = []
    for lam in np.geomspace(1e-3, 0.3, 25):
        W_l1 = solver.solve(problem.replace(lam=float(lam))).weights
        if problem.residual(W_l1) <= residual:
            as_good.append(int((W_l1 != 0).sum()))
    assert as_good, "the grid must contain plain-l1 fits as good as the reweighted one"
    assert min(as_good) > nnz


def test_each_reweighting_round_equals_a_cold_clarabel_solve() -> None:
    problem, F, T = sparse_problem(lam=0.02, kappa=0.8)
    fit = reweighted_solve(problem, ADMMSolver(device="cpu", gap_tol=1e-10), rounds=2)
    assert len(fit.weights) == 3 and fit.weights[0] is None
    # replay: each round's weights come from the previous round's answer; check the last two rounds
    previous = ADMMSolver(device="cpu", gap_tol=1e-10).solve(problem).weights
    for r in (1, 2):
        assert torch.allclose(fit.weights[r], reweighting_weights(previous, 0.1), rtol=1e-6, atol=0)
        weighted = problem.replace(l1_weights=fit.weights[r])
        W_ref = clarabel(F, T, weighted)
        W_ours = ADMMSolver(device="cpu", gap_tol=1e-10).solve(weighted).weights
        f_ref, f_ours = weighted.objective(W_ref), weighted.objective(W_ours)
        assert abs(f_ours - f_ref) <= 1e-6 * f_ref
        assert fit.rounds[r]["objective"] == pytest.approx(f_ours, rel=1e-8)
        previous = W_ours


# ----------------------------------------------------------------------------- targets
@pytest.mark.parametrize("k", [0, 3, 5])
def test_nonzeros_per_row_is_met_and_the_refit_equals_clarabel(k: int) -> None:
    problem, F, T = sparse_problem(lam=0.02, kappa=0.8, bias=True)
    fit = solve_to_target(
        problem, ADMMSolver(device="cpu", gap_tol=1e-10), SparsityTarget(nonzeros_per_row=k), bias_column=True
    )
    W = fit.result.weights
    counted = fit.counted
    assert not bool(counted[:, -1].any())  # the bias column is not counted
    assert bool(((fit.support & counted).sum(dim=1) == k).all())  # the support meets the count exactly
    assert bool(((W != 0) & counted).sum(dim=1).le(k).all())  # and the weights never exceed it
    assert bool((W[~fit.support] == 0).all())
    assert problem.constraint_violation(W) == 0.0
    assert problem.constraint_norm(W) <= 0.8
    # the refit is the best fit on the support under the kappa bound: cvxpy on the fixed support
    W_ref = clarabel(F, T, fit.problem)
    f_ref = fit.problem.objective(W_ref)
    assert fit.problem.objective(W) == pytest.approx(f_ref, rel=1e-6, abs=1e-12)


@pytest.mark.parametrize("fraction", [0.0, 0.5, 0.83, 1.0])
def test_fraction_removed_is_met_exactly(fraction: float) -> None:
    problem, F, T = sparse_problem(lam=0.02, kappa=None, bias=True, seed=3)
    fit = solve_to_target(
        problem,
        ADMMSolver(device="cpu", gap_tol=1e-10),
        SparsityTarget(fraction_removed=fraction),
        bias_column=True,
    )
    total = N * (N + P - 1)
    keep = total - round(fraction * total)
    W = fit.result.weights
    assert int((fit.support & fit.counted).sum()) == keep
    # without the kappa bound the refit (least squares on the support) keeps every support entry
    assert int(((W != 0) & fit.counted).sum()) == keep
    W_ref = clarabel(F, T, fit.problem)
    assert fit.problem.objective(W) == pytest.approx(fit.problem.objective(W_ref), rel=1e-6, abs=1e-12)


def test_target_validation() -> None:
    with pytest.raises(ConfigError, match="exactly one"):
        SparsityTarget()
    with pytest.raises(ConfigError, match="exactly one"):
        SparsityTarget(nonzeros_per_row=2, fraction_removed=0.5)
    with pytest.raises(ConfigError, match="fraction_removed"):
        SparsityTarget(fraction_removed=1.5)
    with pytest.raises(ConfigError, match="nonzeros_per_row"):
        SparsityTarget(nonzeros_per_row=-1)
    assert SparsityTarget.coerce({"nonzeros_per_row": 3}) == SparsityTarget(nonzeros_per_row=3)
    with pytest.raises(ConfigError, match="target"):
        SparsityTarget.coerce({"k": 3})
    with pytest.raises(ConfigError, match="reweight_rounds"):
        StageWeighting(reweight_rounds=2, target=SparsityTarget(nonzeros_per_row=3))


# ----------------------------------------------------------------------------- SIM
@pytest.fixture(scope="module")
def small_teacher():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 3))
    return teacher.requires_grad_(False), torch.randn(600, 8)


def test_sim_target_meets_the_count_in_both_stages(small_teacher) -> None:
    teacher, X = small_teacher
    sim = SIM(kappa=0.9, target=SparsityTarget(nonzeros_per_row=4)).fit(teacher, X)
    W1 = torch.cat([sim.A_, sim.B_[:, :-1]], dim=1)  # bias column (last) not counted
    W2 = torch.cat([sim.C_, sim.D_[:, :-1]], dim=1)
    assert int((W1 != 0).sum(dim=1).max()) <= 4 and int((W2 != 0).sum(dim=1).max()) <= 4
    assert float(sim.A_.abs().sum(dim=1).max()) <= 0.9
    record = sim.stats_["stage1"].extra["weighting"]["target"]
    assert record["max_nonzeros_per_row"] <= 4 and record["nonzeros_per_row"] == 4


def test_sim_reweighting_is_recorded_and_sparser(small_teacher) -> None:
    teacher, X = small_teacher
    plain = SIM(kappa=0.9, lam=1e-3).fit(teacher, X)
    sim = SIM(kappa=0.9, lam=1e-3, reweight_rounds=2).fit(teacher, X)
    record = sim.stats_["stage1"].extra["weighting"]["reweighting"]
    assert record["rounds"] == 2 and len(record["per_round"]) == 3
    nnz = sum(int((w != 0).sum()) for w in (sim.A_, sim.B_))
    assert nnz == record["per_round"][-1]["nonzeros"]
    assert nnz < sum(int((w != 0).sum()) for w in (plain.A_, plain.B_))


def test_robust_weight_lowers_the_lipschitz_bound(small_teacher) -> None:
    teacher, X = small_teacher
    bounds = [
        lipschitz_bound(SIM(kappa=0.9, lam=1e-3, robust_weight=rw).fit(teacher, X)) for rw in (0.0, 1.0, 10.0)
    ]
    assert bounds[2] < bounds[1] < bounds[0]
    assert bounds[2] < 0.25 * bounds[0]


def test_robust_weights_leave_the_bias_column_alone() -> None:
    w1 = robust_l1_weights(1, 3, 7, 3, 2.0, bias=True)
    assert torch.equal(w1[:, :-1], torch.full((3, 6), 3.0, dtype=torch.float64))
    assert torch.equal(w1[:, -1], torch.ones(3, dtype=torch.float64))
    assert robust_l1_weights(2, 3, 7, 3, 0.0, bias=True) is None


def test_weighting_options_are_validated(small_teacher) -> None:
    teacher, X = small_teacher
    with pytest.raises(ConfigError, match="robust_weight"):
        SIM(robust_weight=-1.0).fit(teacher, X)
    with pytest.raises(ConfigError, match="robust_weight"):
        SIM(lam=0.0, robust_weight=1.0).fit(teacher, X)
    with pytest.raises(ConfigError, match="reweight_rounds"):
        SIM(reweight_rounds=-2).fit(teacher, X)
    with pytest.raises(ConfigError, match="reweight_eps"):
        SIM(reweight_rounds=1, reweight_eps=0.0).fit(teacher, X)
    with pytest.raises(ConfigError, match="variant"):
        SIM(variant="least_squares", reweight_rounds=1).fit(teacher, X, solver="least_squares")
    with pytest.raises(ConfigError, match="target"):
        SIM(target=3).fit(teacher, X)


def test_sim_with_target_saves_and_loads(small_teacher, tmp_path) -> None:
    teacher, X = small_teacher
    sim = SIM(kappa=0.9, target=SparsityTarget(fraction_removed=0.5)).fit(teacher, X)
    loaded = SIM.load(sim.save(tmp_path / "sim"))
    assert SparsityTarget.coerce(loaded.target) == SparsityTarget(fraction_removed=0.5)
    assert torch.allclose(loaded.predict(X), sim.predict(X))
