"""ImplicitModel(well_posedness="mu_inf"): the wider bound kept on the stored A, forward and backward."""

from __future__ import annotations

import pytest
import torch

from idl_ray.errors import ConfigError, WellPosednessError
from idl_ray.implicit.model import ImplicitModel
from idl_ray.implicit.mu_projection import mu_inf, project_onto_mu_ball
from idl_ray.implicit.projection import inf_norm

TIGHT = {"tol": 1e-13, "max_iter": 5000, "backward_tol": 1e-13}


def wide_A(n: int, kappa: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, n, generator=g, dtype=torch.float64)
    A.diagonal().copy_(-2.0 - torch.rand(n, generator=g, dtype=torch.float64))
    return project_onto_mu_ball(A, kappa)


def mu_model(n=6, p=4, q=3, kappa=0.5, **kwargs) -> ImplicitModel:
    model = ImplicitModel(
        p,
        q,
        n,
        kappa=kappa,
        dtype=torch.float64,
        well_posedness="mu_inf",
        constraint="project",
        **TIGHT,
        **kwargs,
    )
    with torch.no_grad():
        model.A.copy_(wide_A(n, kappa))
    return model


@pytest.mark.parametrize("method", ["picard", "anderson", "anderson_batch"])
def test_forward_solves_the_equation_where_inf_norm_exceeds_one(method):
    model = mu_model(fixed_point=method)
    assert model.well_posedness == "mu_inf"
    assert inf_norm(model.A.detach()) > 1.5 and mu_inf(model.A.detach()) <= 0.5
    U = torch.randn(7, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    Y, X = model(U, return_state=True)
    assert model.last_forward_stats.all_converged
    assert (X - torch.relu(X @ model.A.T + U @ model.B.T)).abs().max() < 1e-10
    assert torch.allclose(Y, X @ model.C.T + U @ model.D.T)
    # the forward left A alone: it is inside the bound
    assert model.telemetry.projections == 0


def test_gradients_match_unrolled_iteration():
    model = mu_model()
    U = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    model(U).square().sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}

    params = {name: p.detach().clone().requires_grad_() for name, p in model.named_parameters()}
    A, B, C, D = params["A"], params["B"], params["C"], params["D"]
    diag = torch.diagonal(A)
    off = A - torch.diag_embed(diag)
    BU = U @ B.T
    X = torch.zeros_like(BU)
    for _ in range(600):  # the diagonal-implicit iteration, unrolled (rate < 0.9 here)
        X = torch.relu(X @ off.T + BU) / (1 - diag)
    (X @ C.T + U @ D.T).square().sum().backward()
    for name, p in params.items():
        assert torch.allclose(grads[name], p.grad, atol=1e-8), name


@pytest.mark.parametrize("constraint", ["project", "shrink"])
def test_bound_is_restored_on_the_stored_parameter(constraint):
    model = ImplicitModel(
        4, 2, 8, kappa=0.6, dtype=torch.float64, well_posedness="mu_inf", constraint=constraint
    )
    bad = wide_A(8, 0.6) + 0.3  # pushes mu_inf above kappa
    assert mu_inf(bad) > 0.6
    with torch.no_grad():
        model.A.copy_(bad)
    assert model.project_()
    assert mu_inf(model.A) <= 0.6
    assert model.well_posedness_margin() >= 0
    if constraint == "project":
        assert torch.allclose(model.A, project_onto_mu_ball(bad, 0.6), atol=1e-12)
    else:  # a positive multiple of the old A with mu_inf at the bound
        ratio = model.A / bad
        assert torch.allclose(ratio, ratio[0, 0].expand_as(ratio), atol=1e-12)
        assert mu_inf(model.A) == pytest.approx(0.6, abs=1e-12)


def test_training_keeps_the_bound():
    torch.manual_seed(0)
    model = ImplicitModel(3, 2, 10, kappa=0.8, well_posedness="mu_inf")
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    U, T = torch.randn(32, 3), torch.randn(32, 2)
    for _ in range(5):
        opt.zero_grad()
        (model(U) - T).square().mean().backward()
        opt.step()
        model.project_()
        assert mu_inf(model.A) <= 0.8


def test_rejected_combinations_and_bad_values():
    with pytest.raises(ConfigError, match="well_posedness"):
        ImplicitModel(3, 2, 4, well_posedness="spectral")
    with pytest.raises(ConfigError, match="rank"):
        ImplicitModel(3, 2, 4, well_posedness="mu_inf", rank=2)
    with pytest.raises(ConfigError, match="rescale"):
        ImplicitModel(3, 2, 4, well_posedness="mu_inf", constraint="rescale")


def test_from_weights_checks_the_chosen_condition():
    A = wide_A(5, 0.7)
    B, C = torch.randn(5, 2, dtype=torch.float64), torch.randn(1, 5, dtype=torch.float64)
    with pytest.raises(WellPosednessError, match=r"\|\|A\|\|_inf"):
        ImplicitModel.from_weights(A, B, C, kappa=0.7)
    model = ImplicitModel.from_weights(A, B, C, kappa=0.7, well_posedness="mu_inf")
    assert torch.equal(model.A, A)
    with pytest.raises(WellPosednessError, match="mu_inf"):
        ImplicitModel.from_weights(A + 0.5, B, C, kappa=0.7, well_posedness="mu_inf")


def test_default_is_unchanged():
    model = ImplicitModel(3, 2, 4)
    assert model.well_posedness == "inf_norm"
    assert "well_posedness" not in repr(model)
