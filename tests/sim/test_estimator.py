"""The SIM estimator end to end on digits teachers: accuracy, exact matching, persistence, compatibility."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from sim_helpers import train_classifier
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from idl_ray.errors import ConfigError, ConvergenceWarning, NotFittedError, UnsupportedLayerError
from idl_ray.implicit.projection import inf_norm
from idl_ray.sim import SIM
from idl_ray.sim.rescale import layer_scales, scale_teacher_weights
from idl_ray.sim.solvers import ADMMSolver, CVXSolver


def FAST_ADMM() -> ADMMSolver:
    """Looser tolerances for tests that check accuracy, not the optimum (a 2-core CPU shared by others)."""
    return ADMMSolver(gap_tol=1e-6, max_iter=3000)


@pytest.fixture(scope="module")
def fitted(mlp_teacher, digits) -> dict[str, SIM]:
    return {
        "admm": SIM(kappa=0.95, lam=1e-4).fit(mlp_teacher, digits.X_train),
        "cvx": SIM(kappa=0.95, lam=1e-4).fit(mlp_teacher, digits.X_train, solver=CVXSolver(n_jobs=2)),
    }


@pytest.mark.parametrize("name", ["admm", "cvx"])
def test_sim_matches_teacher_accuracy_on_digits(acc, fitted, mlp_teacher, digits, name: str) -> None:
    sim = fitted[name]
    teacher_acc = acc(mlp_teacher, digits.X_test, digits.y_test)
    sim_acc = sim.score(digits.X_test, digits.y_test)
    assert teacher_acc > 0.9
    assert abs(sim_acc - teacher_acc) <= 0.02, (sim_acc, teacher_acc)
    assert inf_norm(sim.A_) <= 0.95
    assert sim.bias_ and sim.B_.shape == (72, 65) and sim.D_.shape == (10, 65)
    assert sim.stats_["stage1"].constraint_violation == 0.0
    assert set(sim.weights) == {"A", "B", "C", "D"}


def test_admm_and_cvx_reach_the_same_objective(fitted) -> None:
    for stage in ("stage1", "stage2"):
        a, c = fitted["admm"].stats_[stage].objective, fitted["cvx"].stats_[stage].objective
        assert abs(a - c) / abs(c) < 1e-4, (stage, a, c)


@pytest.fixture(scope="module")
def small_teacher(digits) -> nn.Module:
    """A 64-32-16-10 ReLU MLP with biases, float64 (the exact-matching teacher)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 10))
    return train_classifier(model, digits.X_train, digits.y_train, epochs=20).double()


def test_relu_teacher_is_matched_exactly_with_rescaling(small_teacher, digits) -> None:
    kappa = 0.5
    sim = SIM(
        kappa=kappa, lam=0.0, rescale="auto", dtype=torch.float64, fixed_point={"tol": 1e-13, "max_iter": 500}
    )
    solver = ADMMSolver(gap_tol=1e-12, max_iter=20_000)
    sim.fit(small_teacher, digits.X_train.double(), solver=solver)
    s = sim.structure_
    assert inf_norm(s.A) > kappa  # without rescaling the teacher itself is infeasible
    A_scaled = scale_teacher_weights(s, sim.scales_)[0]
    assert inf_norm(A_scaled) <= kappa
    assert sim.stats_["stage1"].converged and sim.stats_["stage1"].objective < 1e-10
    # on the training inputs the fit is exact; on unseen inputs, directions the training states never
    # excite (units dead on every training sample) are not identified, so allow a little more there
    for X, tol in ((digits.X_train.double(), 1e-7), (digits.X_test.double(), 1e-4)):
        with torch.no_grad():
            expected = small_teacher(X)
        torch.testing.assert_close(sim.predict(X), expected, atol=tol, rtol=tol)


def test_without_rescaling_a_tight_kappa_costs_exactness(mlp_teacher, digits) -> None:
    X = digits.X_train[:600]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        sim = SIM(kappa=0.5, lam=0.0, rescale="none").fit(mlp_teacher, X, solver=ADMMSolver(max_iter=2000))
    assert sim.scales_ is None
    with torch.no_grad():
        err = float((sim.predict(digits.X_test) - mlp_teacher(digits.X_test)).abs().max())
    assert err > 1e-2


def test_rescaling_factors_are_per_layer_and_positive(mlp_teacher, digits) -> None:
    from idl_ray.sim.extraction import teacher_weights

    s = teacher_weights(mlp_teacher, digits.X_test[:1])
    scales = layer_scales(s, 0.3)
    assert torch.all(scales[:48] == 1) and torch.all(scales > 0)
    assert torch.unique(scales[48:]).numel() == 1 and float(scales[48]) < 1
    A, B, C, D = scale_teacher_weights(s, scales)
    assert inf_norm(A) <= 0.3
    # the scaled teacher computes the same outputs
    U = torch.cat([digits.X_test.double(), torch.ones(len(digits.X_test), 1, dtype=torch.float64)], 1)
    Z1 = U @ B[:48].T
    X1 = Z1.relu()
    X2 = (X1 @ A[48:, :48].T + U @ B[48:].T).relu()
    Y = torch.cat([X1, X2], 1) @ C.T + U @ D.T
    with torch.no_grad():
        torch.testing.assert_close(Y.float(), mlp_teacher(digits.X_test), atol=1e-4, rtol=1e-4)


def test_save_load_round_trip(fitted, digits, tmp_path) -> None:
    sim = fitted["admm"]
    path = sim.save(tmp_path / "sim")
    assert (path / "weights.safetensors").exists() and (path / "sim.json").exists()
    loaded = SIM.load(path)
    torch.testing.assert_close(loaded.predict(digits.X_test), sim.predict(digits.X_test))
    assert loaded.get_params() == sim.get_params()
    assert loaded.summary().a_inf_norm == pytest.approx(sim.summary().a_inf_norm)
    with pytest.raises(ConfigError, match="does not hold"):
        SIM.load(tmp_path / "missing")


def test_to_module_and_summary(fitted, digits) -> None:
    # both solve the same fixed point; at the default tol (1e-6 relative, 2-norm) each may be off by
    # up to tol * sqrt(72) / (1 - kappa) ~ 2e-4 of the state in the max norm, so compare at a tight tol
    tight = {"tol": 1e-10, "max_iter": 5000}
    sim = copy.deepcopy(fitted["admm"]).set_params(fixed_point=tight)
    module = sim.to_module()
    assert module.forward_options.tol == 1e-10
    with torch.no_grad():
        torch.testing.assert_close(module(digits.X_test), sim.predict(digits.X_test), atol=1e-4, rtol=1e-4)
    sim = fitted["admm"]
    sim.predict(digits.X_test)  # the summary reports the last prediction's fixed-point iterations
    summary = sim.summary()
    assert summary.hidden == 72 and summary.kappa == 0.95 and summary.a_inf_norm <= 0.95
    assert 0 < summary.sparsity["A"] < 1 and summary.inference_iterations["max"] >= 1
    assert "||A||_inf" in str(summary) and summary.solve_time_s["stage1"] > 0


def test_cnn_teacher_fits_and_predicts(acc, cnn_teacher, digits) -> None:
    images = digits.images(digits.X_train)
    sim = SIM(kappa=0.95, lam=1e-4).fit(cnn_teacher, images, solver=FAST_ADMM())
    test_images = digits.images(digits.X_test)
    teacher_acc = acc(cnn_teacher, test_images, digits.y_test)
    assert sim.A_.shape == (32 + 16, 32 + 16)
    assert sim.predict(test_images).shape == (len(test_images), 10)
    assert sim.predict(digits.X_test).shape == (len(test_images), 10)  # flat inputs work too
    assert sim.score(test_images, digits.y_test) >= teacher_acc - 0.03


def test_torchidl_style_train_and_evaluate(acc, mlp_teacher, digits) -> None:
    train = DataLoader(TensorDataset(digits.X_train, digits.y_train), batch_size=200)
    test = DataLoader(TensorDataset(digits.X_test, digits.y_test), batch_size=200)
    sim = SIM(kappa=0.95, lam=1e-4).train(solver=FAST_ADMM(), model=mlp_teacher, dataloader=train)
    sim_acc = sim.evaluate(test)
    assert sim_acc == pytest.approx(sim.score(digits.X_test, digits.y_test))
    assert sim_acc >= acc(mlp_teacher, digits.X_test, digits.y_test) - 0.02
    with pytest.raises(ConfigError, match="states_data_path"):
        SIM().train(solver=ADMMSolver(), model=mlp_teacher, dataloader=train, states_data_path="x.npy")


def test_regenerated_states_and_elastic_net(acc, mlp_teacher, digits) -> None:
    sim = SIM(kappa=0.95, lam=1e-4, l2=1e-4, variant="elastic_net", regenerate_states=True)
    sim.fit(mlp_teacher, digits.X_train, solver="admm")
    stage2 = sim.problems_["stage2"]
    original = SIM(kappa=0.95, lam=1e-4, l2=1e-4, variant="elastic_net").fit(mlp_teacher, digits.X_train)
    assert not torch.allclose(stage2.G, original.problems_["stage2"].G)  # fitted on other states
    assert sim.score(digits.X_test, digits.y_test) >= acc(mlp_teacher, digits.X_test, digits.y_test) - 0.03


def test_regression_score_and_least_squares(digits) -> None:
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 2)).eval()
    with torch.no_grad():
        targets = teacher(digits.X_test)
    sim = SIM(activation="tanh", variant="least_squares").fit(teacher, digits.X_train, solver="least_squares")
    assert sim.score(digits.X_test, targets) > 0.99
    assert sim.score(digits.X_test, targets, metric="mse") < 1e-3


def test_errors_are_clear(mlp_teacher, digits) -> None:
    with pytest.raises(NotFittedError, match="fit"):
        SIM().predict(digits.X_test)
    with pytest.raises(ConfigError, match="kappa"):
        SIM(kappa=1.2).fit(mlp_teacher, digits.X_train)
    with pytest.raises(ConfigError, match="variant"):
        SIM(variant="ridge").fit(mlp_teacher, digits.X_train)
    with pytest.raises(ConfigError, match="elastic_net"):
        SIM(l2=0.1).fit(mlp_teacher, digits.X_train)
    with pytest.raises(ConfigError, match="tanh"):
        SIM(activation="tanh").fit(mlp_teacher, digits.X_train)
    with pytest.raises(ConfigError, match="empty"):
        SIM().fit(mlp_teacher, torch.zeros(0, 64))
    bad = digits.X_train[:100].clone()
    bad[5, 3] = float("nan")
    with pytest.raises(ConfigError, match="NaN"):
        SIM().fit(mlp_teacher, bad)
    with pytest.raises(UnsupportedLayerError, match="MaxPool"):
        SIM().fit(nn.Sequential(nn.Linear(64, 8), nn.ReLU(), nn.MaxPool1d(2)), digits.X_train)
    with pytest.raises(ConfigError, match="solver"):
        SIM().fit(mlp_teacher, digits.X_train, solver="mosek")
    with pytest.raises(ConfigError, match="Unknown parameter"):
        SIM().set_params(rho=1.0)
    sim = SIM(kappa=0.95).fit(mlp_teacher, digits.X_train[:300])
    with pytest.raises(ConfigError, match=r"expects 64 input features"):
        sim.predict(torch.zeros(3, 10))


def test_summary_says_when_a_gap_is_rounding_of_an_exact_fit() -> None:
    """A converged stage with a relative gap far above any gap tolerance is a fit exact to rounding (lam = 0
    on a teacher the model represents: 4.2e-11 on the 28x28 digits teacher, relative gap 0.89): the summary
    gives the absolute numbers; an ordinary certificate and an unconverged stage read as before."""
    from idl_ray.sim.summary import SIMSummary

    summary = SIMSummary(
        hidden=4, inputs=3, outputs=2, bias=False, activation="relu", kappa=0.9, a_inf_norm=0.5,
        sparsity={"A": 0.5}, nonzeros={"A": 8}, solver="admm", solve_time_s={"stage1": 0.1, "stage2": 0.1},
        iterations={"stage1": 0, "stage2": 3}, objective={"stage1": 4.2e-11, "stage2": 0.25},
        extraction_time_s=0.01, scales=None, inference_iterations=None,
        relative_gap={"stage1": 0.89, "stage2": 2e-9}, converged={"stage1": True, "stage2": True},
    )  # fmt: skip
    line = next(x for x in str(summary).splitlines() if "certified relative gap" in x)
    assert "stage 1 0.89 (absolute 3.7e-11 on an objective of 4.2e-11: exact to rounding)" in line
    assert "stage 2 2e-09" in line and line.count("exact to rounding") == 1
    summary.converged["stage1"] = False
    line = next(x for x in str(summary).splitlines() if "certified relative gap" in x)
    assert "stage 1 0.89 (NOT converged)" in line and "exact to rounding" not in line
