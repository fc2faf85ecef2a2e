"""The mu_inf condition and its exact row prox against cvxpy (Clarabel)."""

from __future__ import annotations

import cvxpy as cp
import numpy as np
import pytest
import torch

from idl_ray.errors import ConfigError
from idl_ray.implicit.mu_projection import mu_inf, mu_inf_rows, project_onto_mu_ball, prox_mu_rows


def cvxpy_prox(V: np.ndarray, kappa: float, n: int, T: np.ndarray, row_offset: int) -> np.ndarray:
    """argmin 1/2||Z - V||^2 + sum T|Z| s.t. z_d + sum_{j<n, j!=d}|z_j| <= kappa per row, by Clarabel."""
    rows, width = V.shape
    Z = cp.Variable((rows, width))
    constraints = []
    for r in range(rows):
        d = row_offset + r
        off = [j for j in range(n) if j != d]
        constraints.append(Z[r, d] + cp.sum(cp.abs(Z[r, off])) <= kappa)
    objective = 0.5 * cp.sum_squares(Z - V) + cp.sum(cp.multiply(T, cp.abs(Z)))
    cp.Problem(cp.Minimize(objective), constraints).solve(
        solver=cp.CLARABEL, tol_gap_abs=1e-12, tol_gap_rel=1e-12, tol_feas=1e-12
    )
    return Z.value


def test_mu_inf_closed_form():
    A = torch.tensor([[-5.0, 3.0, -1.0], [0.5, 0.2, 0.1], [1.0, -1.0, -3.0]])
    assert mu_inf(A) == pytest.approx(max(-5 + 4, 0.2 + 0.6, -3 + 2))
    assert mu_inf(A) <= float(A.abs().sum(1).max())
    rows = mu_inf_rows(A[1:], 3, row_offset=1)
    assert torch.allclose(rows, torch.tensor([0.8, -1.0]))


@pytest.mark.parametrize(("n", "scale", "kappa"), [(6, 1.0, 0.9), (10, 0.3, 0.5), (8, 3.0, 0.0)])
def test_projection_matches_cvxpy(n, scale, kappa):
    rng = np.random.default_rng(n)
    V = scale * rng.standard_normal((n, n))
    V[0] *= 1e-3  # a row already feasible (also for kappa = 0)
    V[0, 0] = -0.5
    V[1, 1] = -4.0 * scale * n  # a large negative diagonal: feasible although its l1 norm is large
    P = project_onto_mu_ball(torch.tensor(V), kappa)
    ref = cvxpy_prox(V, kappa, n, np.zeros_like(V), 0)
    assert np.abs(P.numpy() - ref).max() < 1e-6
    np.testing.assert_array_equal(P[0].numpy(), V[0])
    np.testing.assert_array_equal(P[1].numpy(), V[1])
    assert mu_inf(P) <= kappa + 1e-12


@pytest.mark.parametrize("row_offset", [0, 3])
@pytest.mark.parametrize("threshold_kind", ["float", "tensor"])
def test_prox_with_thresholds_and_offset_matches_cvxpy(row_offset, threshold_kind):
    rng = np.random.default_rng(7 + row_offset)
    rows, n, width, kappa = 5, 9, 14, 0.7
    V = 1.5 * rng.standard_normal((rows, width))
    V[2] *= 1e-2  # feasible and below the thresholds
    V[3, row_offset + 3] = -6.0  # deep negative diagonal
    if threshold_kind == "float":
        T = np.full_like(V, 0.2)
        threshold = 0.2
    else:
        T = rng.uniform(0.0, 0.6, size=V.shape)
        threshold = torch.tensor(T)
    Z = prox_mu_rows(torch.tensor(V), kappa, n, threshold=threshold, row_offset=row_offset)
    ref = cvxpy_prox(V, kappa, n, T, row_offset)
    assert np.abs(Z.numpy() - ref).max() < 1e-6
    assert float(mu_inf_rows(Z, n, row_offset).max()) <= kappa + 1e-12


def test_random_rows_all_regimes_against_cvxpy():
    """Many random rows of varied scale, diagonals of both signs: the root falls in varied intervals."""
    rng = np.random.default_rng(0)
    n = 6
    for block in range(5):
        V = rng.standard_normal((n, n)) * rng.uniform(0.1, 5.0, size=(n, 1))
        V[np.arange(n), np.arange(n)] = rng.uniform(-6.0, 6.0, size=n)
        T = rng.uniform(0.0, 0.5, size=V.shape)
        Z = prox_mu_rows(torch.tensor(V), 0.3, n, threshold=torch.tensor(T))
        ref = cvxpy_prox(V, 0.3, n, T, 0)
        assert np.abs(Z.numpy() - ref).max() < 1e-6, block


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bound_holds_in_floating_point(dtype):
    g = torch.Generator().manual_seed(3)
    for kappa in (0.0, 0.5, 0.99):
        A = torch.randn(50, 50, generator=g, dtype=dtype) * 10
        P = project_onto_mu_ball(A, kappa)
        assert P.dtype == dtype
        assert mu_inf(P) <= kappa  # exactly, in this dtype
        rows = P.double().abs().sum(1) - P.double().diagonal().abs() + P.double().diagonal()
        assert float(rows.max()) <= kappa  # and recomputed in float64


def test_projection_is_idempotent_and_no_larger_than_inf_norm_projection():
    g = torch.Generator().manual_seed(4)
    A = torch.randn(20, 20, generator=g, dtype=torch.float64)
    P = project_onto_mu_ball(A, 0.8)
    assert torch.allclose(project_onto_mu_ball(P, 0.8), P, atol=1e-12)
    # the mu set contains the inf-norm ball, so the distance to it is no larger
    from idl_ray.implicit.projection import project_onto_kappa_ball

    assert float((P - A).norm()) <= float((project_onto_kappa_ball(A, 0.8) - A).norm()) + 1e-12


def test_bad_arguments():
    with pytest.raises(ConfigError, match="'A'"):
        project_onto_mu_ball(torch.zeros(2, 3), 0.5)
    with pytest.raises(ConfigError, match="kappa"):
        project_onto_mu_ball(torch.zeros(2, 2), 1.5)
    with pytest.raises(ConfigError, match="row_offset"):
        prox_mu_rows(torch.zeros(3, 5), 0.5, 3, row_offset=1)
