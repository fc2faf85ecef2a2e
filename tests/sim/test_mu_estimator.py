"""SIM(well_posedness="mu_inf") end to end on a small digits teacher."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from idl_ray.errors import ConfigError
from idl_ray.implicit.mu_fixed_point import jacobi_rate
from idl_ray.implicit.mu_projection import mu_inf
from idl_ray.sim import SIM
from idl_ray.sim.rescale import layer_scales
from idl_ray.sim.solvers import ADMMSolver


@pytest.fixture(scope="module")
def teacher(mlp_teacher) -> nn.Module:
    """The 64-48-24-10 ReLU MLP of conftest (two hidden layers: A is not zero)."""
    return mlp_teacher


@pytest.fixture(scope="module")
def fits(teacher, digits) -> dict[str, SIM]:
    out = {}
    for condition in ("inf_norm", "mu_inf"):
        sim = SIM(kappa=0.9, lam=1e-4, well_posedness=condition, device="cpu")
        out[condition] = sim.fit(teacher, digits.X_train, solver=ADMMSolver(gap_tol=1e-6, max_iter=5000))
    return out


def test_mu_fit_predicts_as_well_as_the_inf_norm_fit(fits, acc, teacher, digits):
    teacher_acc = acc(teacher, digits.X_test, digits.y_test)
    scores = {k: sim.score(digits.X_test, digits.y_test) for k, sim in fits.items()}
    print(
        "teacher", teacher_acc, "scores", scores, {k: s.stats_["stage1"].objective for k, s in fits.items()}
    )
    assert scores["mu_inf"] >= scores["inf_norm"] - 0.01, scores
    assert abs(scores["mu_inf"] - teacher_acc) <= 0.02, (scores, teacher_acc)
    sim = fits["mu_inf"]
    assert mu_inf(sim.A_) <= 0.9
    assert sim.stats_["stage1"].constraint_violation == 0.0
    assert jacobi_rate(sim.A_) < 1
    assert sim.well_posedness == "mu_inf"
    summary = sim.summary()
    assert summary.mu_inf == pytest.approx(mu_inf(sim.A_)) and "mu_inf(A) =" in str(summary)
    assert fits["inf_norm"].summary().mu_inf is None
    # its objective is no worse than the inf-norm fit's: the mu set contains the inf-norm ball
    objective = {k: s.stats_["stage1"].objective for k, s in fits.items()}
    assert objective["mu_inf"] <= objective["inf_norm"] * (1 + 1e-5)


def test_predict_and_to_module_use_the_mu_fixed_point(fits, digits):
    sim = fits["mu_inf"]
    # an A with ||A||_inf > 1 but mu_inf <= kappa: the state must still solve its own equation
    A = sim.A_.clone()
    A.diagonal().sub_(3.0)  # more negative diagonal: mu_inf only drops
    sim_wide = SIM(kappa=0.9, well_posedness="mu_inf", dtype=torch.float64, fixed_point={"tol": 1e-12})
    for name in ("B_", "C_", "D_", "bias_", "structure_", "activation_", "kappa_"):
        setattr(sim_wide, name, getattr(sim, name))
    sim_wide.A_ = A
    assert float(A.abs().sum(1).max()) > 1.0 and mu_inf(A) <= 0.9
    X = digits.X_test[:50].double()
    Y, states = sim_wide.predict(X, return_states=True)
    U = torch.cat([X, torch.ones(50, 1, dtype=torch.float64)], dim=1)
    assert (states - torch.relu(states @ A.T + U @ sim.B_.T)).abs().max() < 1e-9
    module = sim_wide.to_module()
    assert module.well_posedness == "mu_inf"
    with torch.no_grad():
        assert torch.allclose(module(X), Y, atol=1e-8)


def test_rescaling_targets_the_chosen_condition(teacher, digits):
    structure = SIM(kappa=0.5, well_posedness="mu_inf").fit(teacher, digits.X_train[:200]).structure_
    scales_mu = layer_scales(structure, 0.5, condition="mu_inf")
    scales_inf = layer_scales(structure, 0.5)
    # the teacher's A has a zero diagonal: both conditions agree on it
    assert torch.allclose(scales_mu, scales_inf)
    # a negative diagonal gives room under mu_inf only
    assert float(scales_inf.min()) < 1  # the teacher needs rescaling at kappa = 0.5
    structure.A = structure.A.clone()
    structure.A.diagonal().fill_(-0.3)
    assert float(layer_scales(structure, 0.5, condition="mu_inf").min()) > float(scales_inf.min())


def test_unsupported_solver_is_named(teacher, digits):
    with pytest.raises(ConfigError, match=r"ProjectedGD.*mu_inf"):
        SIM(kappa=0.9, well_posedness="mu_inf").fit(teacher, digits.X_train[:200], solver="projected_gd")
    with pytest.raises(ConfigError, match="well_posedness"):
        SIM(well_posedness="spectral").fit(teacher, digits.X_train[:200])


def test_streaming_refuses_mu_with_regenerated_states():
    from idl_ray.distributed.extraction import fit_dataset

    sim = SIM(well_posedness="mu_inf", regenerate_states=True)
    with pytest.raises(ConfigError, match="regenerate_states"):
        fit_dataset(sim, None, None, None, sim._validated())
