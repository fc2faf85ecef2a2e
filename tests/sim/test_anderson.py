"""The safeguarded type-II Anderson acceleration of the ADMM map (idl_ray.sim.solvers.anderson).

Checked against a closed form (the fixed point of an affine contraction, x* = (I - M)^{-1} c per row) and
against plain fixed-point iteration on the same map; the safeguard is exercised by corrupting one row's
extrapolation (an injected fault in the input to the safeguard, not a stand-in for it).
"""

from __future__ import annotations

import torch

from idl_ray.sim.solvers.anderson import AndersonAccelerator


def _affine_contraction(rows: int = 6, n: int = 20, seed: int = 0):
    """T(x) = x M + c row-wise, M symmetric with eigenvalues in [0, 0.995] (slow for plain iteration)."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    eigenvalues = torch.linspace(0.0, 0.995, n, dtype=torch.float64)
    M = (Q * eigenvalues) @ Q.T
    c = torch.randn(rows, n, generator=g, dtype=torch.float64)
    fixed = torch.linalg.solve(torch.eye(n, dtype=torch.float64) - M, c.T).T  # x = x M + c
    calls = []

    def step(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        calls.append(idx.numel())
        return x @ M + c[idx]

    return step, fixed, calls


def test_anderson_reaches_the_closed_form_fixed_point_with_one_map_call_per_step() -> None:
    step, fixed, calls = _affine_contraction()
    rows = torch.arange(fixed.shape[0])
    accelerator = AndersonAccelerator(step, memory=5)
    x = torch.zeros_like(fixed)
    gx = step(x, rows)
    tolerance = 1e-10 * float(fixed.abs().max())
    accelerated = 0
    while accelerated < 500 and float((x - fixed).abs().max()) >= tolerance:
        before = accelerator.evaluations
        x, gx = accelerator.iterate(x, gx, rows)
        assert accelerator.evaluations - before == 1  # one batched call per step, rejections included
        accelerated += 1
    assert float((x - fixed).abs().max()) < tolerance
    assert torch.allclose(gx, step(x, rows), atol=0, rtol=0)  # the pair returned is (x, T(x))
    assert all(count == fixed.shape[0] for count in calls)  # every call on all rows
    # plain iteration on the same map needs far more steps (the slowest mode contracts by 0.995 per step)
    x = torch.zeros_like(fixed)
    plain = 0
    while plain < 20_000 and float((x - fixed).abs().max()) >= tolerance:
        x = step(x, rows)
        plain += 1
    assert accelerated * 10 < plain


def test_a_rejected_row_stays_put_and_takes_the_plain_step_next() -> None:
    step, fixed, _ = _affine_contraction(rows=3)
    rows = torch.arange(3)
    accelerator = AndersonAccelerator(step, memory=5)
    x = torch.zeros_like(fixed)
    gx = step(x, rows)
    for _ in range(3):  # build a history
        x, gx = accelerator.iterate(x, gx, rows)
    honest = accelerator._extrapolate

    def corrupted(f: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        out = honest(f, g)
        out[1] += 1e3  # row 1's extrapolation is far off: its residual grows, the safeguard must reject it
        return out

    accelerator._extrapolate = corrupted
    x_before, gx_before = x.clone(), gx.clone()
    rejected = accelerator.rejected
    x, gx = accelerator.iterate(x, gx, rows)
    assert accelerator.rejected == rejected + 1
    assert torch.equal(x[1], x_before[1]) and torch.equal(gx[1], gx_before[1])  # row 1 stayed at (x, T(x))
    assert not torch.equal(x[0], x_before[0])  # the other rows moved
    assert float(accelerator._history_norms()[1]) == 0.0  # row 1 forgot its history
    accelerator._extrapolate = honest
    x2, gx2 = accelerator.iterate(x, gx, rows)
    assert torch.equal(x2[1], gx[1])  # no history: its next point is the plain step T(x)
    assert torch.allclose(gx2[1], step(x2[1:2], rows[1:2])[0], atol=0, rtol=0)
    # and it is never rejected for taking it, whatever its residual
    assert float(accelerator._history_norms()[1]) > 0.0
    for _ in range(500):
        x2, gx2 = accelerator.iterate(x2, gx2, rows)
    assert float((x2 - fixed).abs().max()) < 1e-9 * float(fixed.abs().max())  # and it still converges
