"""The diagonal-implicit fixed point under mu_inf(A) <= kappa < 1 where ||A||_inf > 1."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy.optimize import fsolve

from idl_ray.errors import WellPosednessError
from idl_ray.implicit.fixed_point import solve_fixed_point
from idl_ray.implicit.functional import implicit_fixed_point
from idl_ray.implicit.mu_fixed_point import jacobi_rate, solve_adjoint_mu, solve_fixed_point_mu
from idl_ray.implicit.mu_projection import mu_inf, project_onto_mu_ball

TIGHT = {"tol": 1e-13, "max_iter": 5000}


def wide_matrix(n: int, seed: int, kappa: float = 0.9) -> torch.Tensor:
    """A with a large negative diagonal: ||A||_inf > 1 but mu_inf(A) <= kappa."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, n, generator=g, dtype=torch.float64)
    A.diagonal().copy_(-3.0 - 2.0 * torch.rand(n, generator=g, dtype=torch.float64))
    A = project_onto_mu_ball(A, kappa)
    assert mu_inf(A) <= kappa + 1e-12
    assert float(A.abs().sum(1).max()) > 2.0
    return A


def relu_lcp_reference(A: np.ndarray, b: np.ndarray) -> np.ndarray:
    """x = relu(A x + b) by enumerating active sets (an LCP with the P-matrix I - A: one solution)."""
    n = len(b)
    for active in itertools.product([False, True], repeat=n):
        S = np.array(active)
        x = np.zeros(n)
        if S.any():
            M = np.eye(S.sum()) - A[np.ix_(S, S)]
            x[S] = np.linalg.solve(M, b[S])
        z = A @ x + b
        if (x[S] >= -1e-12).all() and (z[~S] <= 1e-12).all():
            return x
    raise AssertionError("no solution found")


def test_plain_picard_diverges_where_the_split_converges():
    A = wide_matrix(6, 0)
    BU = torch.randn(4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert jacobi_rate(A) < 1
    with pytest.warns(Warning):
        _, stats = solve_fixed_point(A, BU, "identity", {"tol": 1e-10, "max_iter": 50})
    assert not stats.all_converged
    X, stats = solve_fixed_point_mu(A, BU, "identity", TIGHT)
    assert stats.all_converged
    ref = torch.linalg.solve(torch.eye(6, dtype=A.dtype) - A, BU.T).T  # identity phi: (I - A) x = b
    assert torch.allclose(X, ref, atol=1e-10)


@pytest.mark.parametrize("method", ["picard", "anderson"])
def test_relu_forward_matches_lcp_enumeration(method):
    A = wide_matrix(6, 2)
    BU = torch.randn(5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    X, stats = solve_fixed_point_mu(A, BU, "relu", {**TIGHT, "method": method})
    assert stats.all_converged
    assert (X - torch.relu(X @ A.T + BU)).abs().max() < 1e-10
    for i in range(BU.shape[0]):
        ref = relu_lcp_reference(A.numpy(), BU[i].numpy())
        np.testing.assert_allclose(X[i].numpy(), ref, atol=1e-10)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # fsolve notes it cannot improve on 1e-14
@pytest.mark.parametrize("name", ["tanh", "leaky_relu", "softplus"])
def test_other_activations_match_fsolve(name):
    A = wide_matrix(5, 4)
    BU = torch.randn(3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    X, stats = solve_fixed_point_mu(A, BU, name, TIGHT)
    assert stats.all_converged
    f = {
        "tanh": np.tanh,
        "leaky_relu": lambda z: np.where(z > 0, z, 0.01 * z),
        "softplus": lambda z: np.logaddexp(0, z),
    }[name]
    An = A.numpy()
    for i in range(3):
        b = BU[i].numpy()
        ref = fsolve(lambda x, b=b: x - f(An @ x + b), np.zeros(5), xtol=1e-14)
        np.testing.assert_allclose(X[i].numpy(), ref, atol=1e-9)
        assert np.abs(X[i].numpy() - f(An @ X[i].numpy() + b)).max() < 1e-10


def unrolled_relu(A: torch.Tensor, BU: torch.Tensor, steps: int = 400) -> torch.Tensor:
    """The same split iteration, unrolled under autograd (converges geometrically, rate jacobi_rate)."""
    diag = torch.diagonal(A)
    off = A - torch.diag_embed(diag)
    X = torch.zeros_like(BU)
    for _ in range(steps):
        X = torch.relu(X @ off.T + BU) / (1 - diag)
    return X


def test_gradients_match_autograd_through_unrolled_iteration():
    A0 = wide_matrix(6, 6, kappa=0.3)
    assert jacobi_rate(A0) < 0.95
    BU0 = torch.randn(4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    W = torch.randn(4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    A1, BU1 = A0.clone().requires_grad_(), BU0.clone().requires_grad_()
    X = implicit_fixed_point(
        A1, BU1, "relu", forward_options=TIGHT, backward_options=TIGHT, well_posedness="mu_inf"
    )
    (X * W).sum().backward()
    A2, BU2 = A0.clone().requires_grad_(), BU0.clone().requires_grad_()
    (unrolled_relu(A2, BU2, 800) * W).sum().backward()
    assert torch.allclose(X, unrolled_relu(A0, BU0, 800), atol=1e-10)
    assert torch.allclose(A1.grad, A2.grad, atol=1e-8)
    assert torch.allclose(BU1.grad, BU2.grad, atol=1e-8)


def test_gradcheck_tanh_under_mu_inf():
    A = wide_matrix(4, 9).requires_grad_()
    BU = torch.randn(
        2, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(10), requires_grad=True
    )

    def fn(a, b):
        return implicit_fixed_point(
            a, b, "tanh", forward_options=TIGHT, backward_options=TIGHT, well_posedness="mu_inf"
        )

    assert torch.autograd.gradcheck(fn, (A, BU))


def test_adjoint_matches_dense_solve():
    A = wide_matrix(6, 11)
    g = torch.Generator().manual_seed(12)
    J = torch.rand(3, 6, dtype=torch.float64, generator=g)
    G = torch.randn(3, 6, dtype=torch.float64, generator=g)
    V, stats = solve_adjoint_mu(A, J, G, TIGHT)
    assert stats.all_converged
    for i in range(3):  # v = J (A^T v + g)  <=>  (I - diag(J) A^T) v = J g
        M = torch.eye(6, dtype=A.dtype) - torch.diag(J[i]) @ A.T
        ref = torch.linalg.solve(M, J[i] * G[i])
        assert torch.allclose(V[i], ref, atol=1e-10)


def test_diagonal_at_or_above_one_is_refused():
    A = torch.eye(3, dtype=torch.float64)
    with pytest.raises(WellPosednessError, match="diagonal"):
        solve_fixed_point_mu(A, torch.zeros(1, 3, dtype=torch.float64))
    assert jacobi_rate(A) == float("inf")
