"""The exact projection onto {A : ||A||_inf <= kappa} against cvxpy, and its invariants."""

from __future__ import annotations

import cvxpy as cp
import numpy as np
import pytest
import torch

from idl_ray.errors import ConfigError
from idl_ray.implicit.projection import (
    inf_norm,
    l1_ball_thresholds,
    project_onto_kappa_ball,
    project_rows_onto_l1_ball,
)


def cvxpy_projection(V: np.ndarray, kappa: float) -> np.ndarray:
    W = cp.Variable(V.shape)
    constraints = [cp.sum(cp.abs(W), axis=1) <= kappa]
    cp.Problem(cp.Minimize(cp.sum_squares(W - V)), constraints).solve(
        solver=cp.CLARABEL, tol_gap_abs=1e-12, tol_gap_rel=1e-12, tol_feas=1e-12
    )
    return W.value


@pytest.mark.parametrize(
    ("rows", "cols", "scale", "kappa"), [(6, 6, 1.0, 0.9), (12, 7, 0.3, 0.5), (5, 30, 3.0, 0.99)]
)
def test_projection_matches_cvxpy(rows, cols, scale, kappa):
    rng = np.random.default_rng(rows * cols)
    V = scale * rng.standard_normal((rows, cols))
    V[0] *= 1e-3  # one row already inside the ball
    ours = project_onto_kappa_ball(torch.tensor(V), kappa).numpy()
    ref = cvxpy_projection(V, kappa)
    assert np.abs(ours - ref).max() < 1e-6
    np.testing.assert_array_equal(ours[0], V[0])  # inside rows untouched


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bound_holds_exactly_in_floating_point(dtype):
    g = torch.Generator().manual_seed(1)
    for kappa in (0.0, 0.1, 0.5, 0.99, 0.999999):
        A = torch.randn(64, 64, generator=g, dtype=dtype) * 10
        P = project_onto_kappa_ball(A, kappa)
        assert P.dtype == dtype
        assert float(P.abs().sum(1).max()) <= kappa
        assert inf_norm(P) <= kappa


def test_projection_is_idempotent_and_thresholds_soft_threshold():
    V = torch.randn(9, 11, dtype=torch.float64) * 2
    W = project_rows_onto_l1_ball(V, 1.5)
    assert torch.allclose(project_rows_onto_l1_ball(W, 1.5), W, atol=1e-12)
    theta = l1_ball_thresholds(V, 1.5)
    soft = torch.sign(V) * (V.abs() - theta).clamp_min(0)
    assert torch.allclose(soft, W, atol=1e-12)
    # rows on the boundary after projection
    assert torch.allclose(W.abs().sum(1), torch.full((9,), 1.5, dtype=torch.float64), atol=1e-12)


def test_per_row_radii():
    V = torch.ones(3, 4, dtype=torch.float64)
    W = project_rows_onto_l1_ball(V, torch.tensor([1.0, 2.0, 8.0], dtype=torch.float64))
    assert torch.allclose(W.abs().sum(1), torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64))


@pytest.mark.parametrize("kappa", [1.0, -0.1, 1.5, float("nan"), "0.5"])
def test_projection_rejects_bad_kappa(kappa):
    with pytest.raises(ConfigError, match="kappa"):
        project_onto_kappa_ball(torch.randn(3, 3), kappa)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_numpy_sort_path_matches_torch_sort_path(dtype):
    """On the CPU outside autograd the rows are sorted by numpy; a tensor that requires grad is sorted by
    torch. Both give the same matrix (to rounding) and both meet the bound exactly."""
    g = torch.Generator().manual_seed(3)
    for shape, scale in (((100, 100), 0.02), ((7, 3), 1.0), ((40, 64), 10.0)):
        V = torch.randn(*shape, generator=g, dtype=dtype) * scale
        V[0] *= 1e-4  # a row inside the ball
        for kappa in (0.0, 0.5, 0.99):
            host = project_rows_onto_l1_ball(V, kappa)
            via_torch = project_rows_onto_l1_ball(V.clone().requires_grad_(), kappa).detach()
            assert not host.requires_grad
            assert torch.allclose(host, via_torch, rtol=0, atol=8 * torch.finfo(dtype).eps * scale)
            assert inf_norm(host) <= kappa and inf_norm(via_torch) <= kappa
            if kappa > 0:
                assert torch.equal(host[0], V[0])  # inside rows untouched
