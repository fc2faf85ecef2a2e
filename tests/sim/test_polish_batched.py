"""The batched active-set polish gives the per-row polish's answer, row for row."""

from __future__ import annotations

import pytest
import torch

from idl_ray.sim.problem import SIMProblem
from idl_ray.sim.solvers import ADMMSolver
from idl_ray.sim.solvers.polish import _polish_row
from idl_ray.sim.solvers.polish_batched import polish_rows_batched


def per_row(H, R, W, **settings):
    """The reference: the per-row active-set polish, one row at a time."""
    out, ok = W.clone(), torch.zeros(W.shape[0], dtype=torch.bool)
    for i in range(W.shape[0]):
        row = _polish_row(H, R[i], W[i], **settings)
        if row is not None:
            out[i], ok[i] = row, True
    return out, ok


def problem(seed: int, kappa, *, m=400, n=8, p=10, singular=False, lam=1e-2):
    g = torch.Generator().manual_seed(seed)
    F = torch.randn(m, n + p, generator=g, dtype=torch.float64)
    if singular:
        F[:, -1] = F[:, 0] + F[:, 1]
    T = F @ (0.5 * torch.randn(n + p, n, generator=g, dtype=torch.float64))
    T = T + 0.1 * torch.randn(m, n, generator=g, dtype=torch.float64)
    return SIMProblem.from_samples(F, T, n_constrained=n if kappa is not None else 0, lam=lam, kappa=kappa)


@pytest.mark.parametrize("kappa", [0.3, 0.8, None])
@pytest.mark.parametrize("start", ["admm", "short", "random"])
@pytest.mark.parametrize("singular", [False, True])
def test_batched_polish_equals_per_row(kappa, start, singular):
    prob = problem(3, kappa, singular=singular)
    H, R = prob.scaled()
    if start == "random":
        g = torch.Generator().manual_seed(5)
        W = torch.randn(prob.rows, prob.dim, generator=g, dtype=torch.float64)
        W = W * (torch.rand(prob.rows, prob.dim, generator=g) < 0.4)
    else:
        steps = 30 if start == "admm" else 2
        solver = ADMMSolver(device="cpu", max_iter=steps, warn=False, polish=False, warm_start=False)
        W = solver.solve(prob).weights
    settings = dict(lam=prob.lam, kappa=kappa, n_constrained=prob.n_constrained)
    reference, ok_ref = per_row(H, R, W, **settings)
    ours, ok = polish_rows_batched(H, R, W, **settings)
    assert torch.equal(ok, ok_ref)
    assert ok.any()
    assert torch.allclose(ours, reference, atol=1e-10, rtol=1e-8)
    if kappa is not None:  # the bound the polish must keep
        assert float(ours[ok][:, : prob.n_constrained].abs().sum(dim=1).max()) <= kappa * (1 + 1e-12)


def test_rows_that_do_not_converge_keep_their_start():
    # more features than samples and a tiny lam: the active set runs out of passes on every row
    prob = problem(0, 0.3, m=50, n=20, p=60, lam=1e-4)
    H, R = prob.scaled()
    g = torch.Generator().manual_seed(1)
    W = torch.randn(prob.rows, prob.dim, generator=g, dtype=torch.float64)
    W = W * (torch.rand(prob.rows, prob.dim, generator=g) < 0.3)
    settings = dict(lam=prob.lam, kappa=0.3, n_constrained=prob.n_constrained)
    _, ok_ref = per_row(H, R, W, **settings)
    ours, ok = polish_rows_batched(H, R, W, **settings)
    assert torch.equal(ok, ok_ref)
    assert torch.equal(ours[~ok], W[~ok])
