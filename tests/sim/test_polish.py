"""The batched active-set polish gives a per-row reference's answer, row for row.

The reference below is the straightforward version of the same algorithm: one row at a time, one small LU per
pass, 2-D indexing of H; the library runs every pass for all rows at once on padded supports."""

from __future__ import annotations

import math

import pytest
import torch

from idl_ray.sim.problem import SIMProblem
from idl_ray.sim.solvers import ADMMSolver
from idl_ray.sim.solvers.polish import _MAX_ADDED as MAX_ADDED
from idl_ray.sim.solvers.polish import _MAX_PASSES as MAX_PASSES
from idl_ray.sim.solvers.polish import polish_rows
from idl_ray.sim.solvers.weights import Threshold


def threshold_scale(lam: Threshold) -> float:
    """The largest finite threshold (a scale for tolerances); 0 when there is none."""
    if not isinstance(lam, torch.Tensor):
        return float(lam)
    finite = lam[torch.isfinite(lam)]
    return float(finite.max()) if finite.numel() else 0.0


def solve_on_support(
    H: torch.Tensor,
    r: torch.Tensor,
    S: torch.Tensor,
    sigma: torch.Tensor,
    a: torch.Tensor | None,
    kappa: float | None,
    lam: Threshold,
) -> tuple[torch.Tensor, float]:
    """w_S (and nu, 0.0 without the bound) from the KKT system on support S (lam: a float or the row's
    per-entry thresholds, shape (d,), finite on S)."""
    k = S.numel()
    H_SS = H[S][:, S]
    c = r[S] - (lam[S] if isinstance(lam, torch.Tensor) else lam) * sigma
    if a is None:
        K, rhs = H_SS, c
    else:
        K = torch.zeros(k + 1, k + 1, dtype=H.dtype, device=H.device)
        K[:k, :k] = H_SS
        K[:k, k] = a
        K[k, :k] = a
        rhs = torch.cat([c, c.new_tensor([float(kappa)])])
    ridge = 1e-12 * float(H_SS.diagonal().abs().max().clamp_min(torch.finfo(H.dtype).tiny))
    K_reg = K + ridge * torch.eye(K.shape[0], dtype=K.dtype, device=K.device)
    if a is not None:
        K_reg[k, k] = -ridge
    # an exactly singular system (float32 rounding can swamp the ridge) is no error: NaN means "no answer"
    lu, pivots, info = torch.linalg.lu_factor_ex(K_reg)
    if int(info) > 0:
        return torch.full((k,), math.nan, dtype=H.dtype, device=H.device), math.nan
    x = torch.linalg.lu_solve(lu, pivots, rhs[:, None])[:, 0]
    for _ in range(2):
        x = x + torch.linalg.lu_solve(lu, pivots, (rhs - K @ x)[:, None])[:, 0]
    if a is None:
        return x, 0.0
    return x[:k], float(x[k])


def polish_row(
    H: torch.Tensor,
    r: torch.Tensor,
    w: torch.Tensor,
    *,
    lam: Threshold,
    kappa: float | None,
    n_constrained: int,
) -> torch.Tensor | None:
    """Active-set refinement from w's support: solve on S; drop entries whose sign flips; add the entries
    off S that violate their optimality condition (|v_j| <= lam, + nu on the constrained block, with
    v = r - H w); until neither happens (an optimum) or the passes run out (None)."""
    S = torch.nonzero(w if not isinstance(lam, torch.Tensor) else w * torch.isfinite(lam)).flatten()
    sigma = torch.sign(w[S])
    constrained = kappa is not None and n_constrained > 0
    active = constrained and float(w[:n_constrained].abs().sum()) >= float(kappa) * (1 - 1e-9)
    tolerance = 1e-9 * max(threshold_scale(lam), float(r.abs().max()), torch.finfo(r.dtype).tiny)
    for _ in range(MAX_PASSES):
        if S.numel() == 0:
            w_S, nu = S.new_zeros(0, dtype=w.dtype), 0.0
        else:
            a = torch.where(S < n_constrained, sigma, torch.zeros_like(sigma)) if active else None
            if a is not None and not bool((a != 0).any()):
                return None
            w_S, nu = solve_on_support(H, r, S, sigma, a, kappa, lam)
            if not bool(torch.isfinite(w_S).all()):
                return None
            keep = torch.sign(w_S) == sigma
            if not bool(keep.all()):
                S, sigma = S[keep], sigma[keep]
                continue
            if active and nu < 0:
                active, nu = False, 0.0
                continue
        candidate = torch.zeros_like(w)
        candidate[S] = w_S
        if constrained and not active and float(candidate[:n_constrained].abs().sum()) > float(kappa):
            active = True
            continue
        v = r - candidate @ H
        bound = lam.to(v).clone() if isinstance(lam, torch.Tensor) else torch.full_like(v, lam)
        if constrained:
            bound[:n_constrained] += max(nu, 0.0)
        violation = v.abs() - bound
        violation[S] = 0
        worst = torch.nonzero(violation > tolerance).flatten()
        if worst.numel() == 0:
            if constrained and float(candidate[:n_constrained].abs().sum()) > float(kappa) * (1 + 1e-12):
                return None
            return candidate
        order = torch.argsort(violation[worst], descending=True)[:MAX_ADDED]
        added = worst[order]
        S = torch.cat([S, added])
        sigma = torch.cat([sigma, torch.sign(v[added])])
    return None


def per_row(H, R, W, **settings):
    """The reference: the per-row active-set polish, one row at a time."""
    out, ok = W.clone(), torch.zeros(W.shape[0], dtype=torch.bool)
    for i in range(W.shape[0]):
        row = polish_row(H, R[i], W[i], **settings)
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
    ours, ok = polish_rows(H, R, W, **settings)
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
    ours, ok = polish_rows(H, R, W, **settings)
    assert torch.equal(ok, ok_ref)
    assert torch.equal(ours[~ok], W[~ok])
