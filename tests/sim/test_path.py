"""The lambda path: warm starts, lam_max, monotone sparsity, agreement with cold solves, best() and plots."""

from __future__ import annotations

import csv
import itertools
import json

import pytest
import torch
from torch import nn

from idl_ray.errors import ConfigError
from idl_ray.sim import SIM, SIMProblem
from idl_ray.sim.path import lam_max
from idl_ray.sim.solvers import ADMMSolver, LeastSquareSolver

TIGHT = dict(gap_tol=1e-12, max_iter=50_000)


@pytest.fixture(scope="module")
def tanh_teacher():
    """A random 5-6-3 tanh MLP with biases: its states have a well-conditioned Gram (unique lasso optima)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def inputs():
    return torch.randn(1500, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


def tanh_sim() -> SIM:
    return SIM(activation="tanh", kappa=0.8, dtype=torch.float64, device="cpu")


@pytest.fixture(scope="module")
def tanh_path(tanh_teacher, inputs):
    return tanh_sim().fit_path(
        tanh_teacher, inputs, n_lams=8, lam_ratio=1e-3, solver=ADMMSolver(device="cpu", warn=False, **TIGHT)
    )


def flat(model: SIM) -> torch.Tensor:
    return torch.cat([model.A_.flatten(), model.B_.flatten(), model.C_.flatten(), model.D_.flatten()])


def test_each_point_equals_a_cold_solve(tanh_path, tanh_teacher, inputs):
    for lam, model in zip(tanh_path.lams, tanh_path.models):
        cold = (
            tanh_sim()
            .set_params(lam=lam)
            .fit(tanh_teacher, inputs, solver=ADMMSolver(device="cpu", warn=False, warm_start=False, **TIGHT))
        )
        assert model.stats_["stage1"].converged and model.stats_["stage2"].converged
        reference = flat(cold)
        scale = max(float(reference.norm()), 1e-12)
        assert float((flat(model) - reference).norm()) <= 1e-5 * scale + 1e-9, lam


def test_points_match_cvxpy_objectives(tanh_path):
    pytest.importorskip("cvxpy")
    from idl_ray.sim.solvers import CVXSolver

    for k in (2, 6):
        model = tanh_path.models[k]
        for stage in ("stage1", "stage2"):
            problem = model.problems_[stage]
            reference = CVXSolver().solve(problem)
            ours = model.stats_[stage].objective
            assert ours <= reference.stats.objective * (1 + 1e-6) + 1e-9


def test_sparsity_is_monotone_and_lam_max_zeroes_everything(tanh_path):
    counts = [row["nnz"] for row in tanh_path.rows]
    assert counts[0] == 0
    assert all(a <= b for a, b in itertools.pairwise(counts)), counts
    assert counts[-1] > 0
    assert tanh_path.lams == sorted(tanh_path.lams, reverse=True)
    assert tanh_path.lams[0] == pytest.approx(tanh_path.lam_max)
    assert tanh_path.lams[-1] == pytest.approx(1e-3 * tanh_path.lam_max)


def test_lam_max_is_the_smallest_lam_that_zeroes_both_stages(tanh_path, tanh_teacher, inputs):
    top = tanh_path.lam_max
    path = tanh_sim().fit_path(
        tanh_teacher, inputs, lams=[top, 0.999 * top], solver=ADMMSolver(device="cpu", warn=False, **TIGHT)
    )
    assert path.rows[0]["nnz"] == 0
    assert path.rows[1]["nnz"] > 0
    # independently: the gradient of the smooth part at W = 0 is -Rt/m; its largest entry is lam_max
    problems = tanh_path.models[0].problems_
    expected = max(float((p.Rt / p.num_samples).abs().max()) for p in problems.values())
    assert top == pytest.approx(expected, rel=1e-12)


def test_lam_max_with_robust_weights_zeroes_both_stages(tanh_teacher, inputs):
    """robust_weight = 1 doubles every weight but the bias column's: lam_max is then set by the entries
    |Rt/m| / w, and lam_max itself zeroes everything while a slightly smaller lam does not."""
    sim = tanh_sim().set_params(robust_weight=1.0)
    path = sim.fit_path(
        tanh_teacher, inputs, lams=None, n_lams=2, solver=ADMMSolver(device="cpu", warn=False, **TIGHT)
    )
    top = path.lam_max
    assert path.rows[0]["lam"] == pytest.approx(top) and path.rows[0]["nnz"] == 0
    problems = path.models[0].problems_
    expected = max(float(((p.Rt / p.num_samples).abs() / p.l1_weights).max()) for p in problems.values())
    assert top == pytest.approx(expected, rel=1e-12)
    below = sim.fit_path(
        tanh_teacher, inputs, lams=[0.999 * top], solver=ADMMSolver(device="cpu", warn=False, **TIGHT)
    )
    assert below.rows[0]["nnz"] > 0


def test_lam_max_leaves_out_columns_fixed_by_kappa_zero():
    Phi = torch.randn(200, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    T = Phi @ torch.tensor([[5.0, 0.0, 0.0, 0.5], [0.0, 0.0, 0.0, -0.25]], dtype=torch.float64).T
    free = SIMProblem.from_samples(Phi, T, n_constrained=2, lam=0.0, kappa=0.5)
    fixed = SIMProblem.from_samples(Phi, T, n_constrained=2, lam=0.0, kappa=0.0)
    assert lam_max(free) == pytest.approx(float((T.T @ Phi / 200).abs().max()))
    assert lam_max(fixed) == pytest.approx(float((T.T @ Phi / 200)[:, 2:].abs().max()))
    assert lam_max(fixed) < lam_max(free)


def test_warm_start_from_the_optimum_takes_no_more_steps_and_keeps_the_answer():
    gen = torch.Generator().manual_seed(3)
    Phi = torch.randn(400, 8, dtype=torch.float64, generator=gen)
    T = torch.randn(400, 4, dtype=torch.float64, generator=gen)
    problem = SIMProblem.from_samples(Phi, T, n_constrained=4, lam=1e-2, kappa=0.5)
    cold = ADMMSolver(device="cpu", warm_start=False, **TIGHT).solve(problem)
    warm = ADMMSolver(device="cpu", warm_start=False, **TIGHT).solve(problem, initial=cold.weights)
    assert warm.stats.extra["initial"]
    assert cold.stats.iterations > 0
    assert warm.stats.iterations == 0  # the first-check polish on the optimum's support certifies it
    assert torch.allclose(warm.weights, cold.weights, atol=1e-6)
    # a start outside the kappa ball is projected: the answer is still feasible and optimal
    far = ADMMSolver(device="cpu", **TIGHT).solve(problem, initial=10 * torch.ones(4, 8, dtype=torch.float64))
    assert far.stats.constraint_violation == 0.0
    assert torch.allclose(far.weights, cold.weights, atol=1e-6)


def test_initial_is_checked_and_ignored_by_solvers_that_cannot_use_it():
    Phi = torch.randn(100, 5, dtype=torch.float64)
    T = torch.randn(100, 2, dtype=torch.float64)
    problem = SIMProblem.from_samples(Phi, T, variant="least_squares")
    plain = LeastSquareSolver().solve(problem)
    given = LeastSquareSolver().solve(problem, initial=torch.ones(2, 5))
    assert torch.equal(plain.weights, given.weights)
    with pytest.raises(ConfigError, match="'initial'"):
        ADMMSolver(device="cpu").solve(problem, initial=torch.ones(3, 5))
    with pytest.raises(ConfigError, match="'initial'"):
        ADMMSolver(device="cpu").solve(problem, initial=torch.full((2, 5), float("nan")))


@pytest.fixture(scope="module")
def digits_path(digits, mlp_teacher):
    return SIM(kappa=0.9, device="cpu").fit_path(
        mlp_teacher,
        digits.X_train,
        n_lams=10,
        lam_ratio=1e-5,
        test_data=(digits.X_test, digits.y_test),
    )


def test_digits_path_table(digits_path, digits, mlp_teacher, acc):
    rows = digits_path.rows
    assert len(rows) == 10 == len(digits_path.models)
    assert digits_path.teacher["accuracy"] == pytest.approx(acc(mlp_teacher, digits.X_test, digits.y_test))
    for row, model in zip(rows, digits_path.models):
        assert row["accuracy"] == pytest.approx(model.score(digits.X_test, digits.y_test, metric="accuracy"))
        assert row["nnz_A"] == int((model.A_ != 0).sum())
        assert row["A_inf"] <= 0.9 + 1e-12
        assert row["relative_gap_1"] <= 1e-6 and row["relative_gap_2"] <= 1e-6
        assert 0.0 <= row["frac_nonzero"] <= 1.0
        assert row["time_s"] > 0
    # the sparsest point is at chance level, the densest close to the teacher
    assert rows[0]["accuracy"] < 0.3
    assert rows[-1]["accuracy"] >= digits_path.teacher["accuracy"] - 0.03
    # the bound follows the fitted weights: a fully zero model is constant (bound 0)
    assert rows[0]["lipschitz"] == 0.0
    assert all(row["lipschitz"] is not None for row in rows)


def test_best_is_the_sparsest_point_within_the_drop(digits_path):
    for drop in (0.01, 0.05, 0.2):
        floor = digits_path.teacher["accuracy"] - drop
        ok = [k for k, row in enumerate(digits_path.rows) if row["accuracy"] >= floor]
        if not ok:
            with pytest.raises(ConfigError, match="max_accuracy_drop"):
                digits_path.best(drop)
            continue
        fewest = min(digits_path.rows[k]["nnz"] for k in ok)
        chosen = digits_path.best(max_accuracy_drop=drop)
        k = digits_path.best_index(drop)
        assert digits_path.models[k] is chosen
        assert digits_path.rows[k]["nnz"] == fewest
        assert digits_path.rows[k]["accuracy"] >= floor


def test_best_errors(tanh_path, digits, mlp_teacher):
    with pytest.raises(ConfigError, match="test_data"):
        tanh_path.best()
    one = SIM(kappa=0.9, device="cpu").fit_path(
        mlp_teacher, digits.X_train, n_lams=1, test_data=(digits.X_test, digits.y_test)
    )
    with pytest.raises(ConfigError, match="no point is within"):
        one.best(max_accuracy_drop=0.0)


def test_tables_and_plot_are_written(digits_path, tmp_path):
    csv_path = digits_path.to_csv(tmp_path / "path.csv")
    with csv_path.open() as handle:
        read = list(csv.DictReader(handle))
    assert [float(r["lam"]) for r in read] == pytest.approx(digits_path.lams)
    assert [int(r["nnz"]) for r in read] == [row["nnz"] for row in digits_path.rows]
    payload = json.loads(digits_path.to_json(tmp_path / "path.json").read_text())
    assert payload["teacher"]["accuracy"] == digits_path.teacher["accuracy"]
    assert len(payload["rows"]) == len(digits_path)
    pytest.importorskip("matplotlib")
    png = digits_path.plot(tmp_path / "path.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_arguments(tanh_teacher, inputs):
    with pytest.raises(ConfigError, match="'lams'"):
        tanh_sim().fit_path(tanh_teacher, inputs, lams=[0.1, -1.0])
    with pytest.raises(ConfigError, match="'n_lams'"):
        tanh_sim().fit_path(tanh_teacher, inputs, n_lams=0)
    with pytest.raises(ConfigError, match="'lam_ratio'"):
        tanh_sim().fit_path(tanh_teacher, inputs, lam_ratio=2.0)
    with pytest.raises(ConfigError, match="'variant'"):
        tanh_sim().set_params(variant="least_squares").fit_path(tanh_teacher, inputs)
    with pytest.raises(ConfigError, match="'test_data'"):
        tanh_sim().fit_path(tanh_teacher, inputs, test_data=inputs)
    with pytest.raises(ConfigError, match="regenerate_states"):
        tanh_sim().set_params(regenerate_states=True).fit_path(tanh_teacher, inputs)
    with pytest.raises(ConfigError, match="target"):
        tanh_sim().set_params(target={"fraction_removed": 0.5}).fit_path(tanh_teacher, inputs)
