"""The dual active-set method (Goldfarb-Idnani) for many lasso rows on one low-rank Gram.

For one row with thresholds t > 0 (lam, or per-entry l1 weights times lam; ``t_j = inf`` holds ``w_j`` at 0)
and ``H = F^T F`` (F: r x d, the range factor of :class:`~idl_ray.sim.solvers.admm_kernels.GramFactor`),
``r = F^T b``, the stage objective without the kappa bound is, up to a constant,

    P(w) = 1/2 ||F w - b||^2 + sum_j t_j |w_j|,

and its dual is the projection of b onto a polytope of R^r::

    min_u 1/2 ||u - b||^2   subject to   |f_j^T u| <= t_j  for every column f_j of F,

with ``u* = b - F w*`` and w* the signed multipliers of the active constraints. The dual has an identity
Hessian whatever the conditioning of H, and only r dimensions (r = 123 for d = 881 on the 28x28 digits
teacher). Goldfarb and Idnani's dual method (Math. Programming 27, 1983) solves it exactly: start at the
unconstrained minimum u = b, add the violated constraint farthest from its hyperplane, and move u along
the direction that keeps the active constraints tight, dropping an active constraint when its multiplier
reaches 0 (a partial step), until none is violated. The active normals stay linearly independent, so the
answer has at most r nonzeros: it is a vertex of the optimal face (the sparse optimum that
:mod:`~idl_ray.sim.solvers.vertex` otherwise recovers from an interior point's dense answer).

Every row runs in lockstep (one batched step: a few (rows x r x r) products), so the cost is the largest
number of steps any row needs times one step: 147-382 steps for the 96 rows of the 28x28 digits teacher's
stage 1 over lam in [1e-6, 1e-2]. The active normals N (k x r) and N^+ are kept per row, N^+ by Greville's
rank-one updates (adding column n with z = (I - N N^+) n: rows of N^+ lose ``(N^+ n) z^T / z^T n``, the new
row is ``z^T / z^T n``; dropping row g of N^+: the others lose ``(N^+ g) g^T / g^T g``). These accumulate
rounding, so the result is the active set, its signs and approximate weights: callers polish it on its
support (:mod:`~idl_ray.sim.solvers.polish`, an exact solve) and certify it before taking it.

The kappa bound is not part of this dual: a row whose answer satisfies the bound is optimal with it too;
the others are left to the caller's other methods. Zero thresholds (lam = 0) make constraints equalities,
which this iteration does not handle (:func:`dual_active_set_applies`).
"""

from __future__ import annotations

import dataclasses
import math

import torch

from idl_ray.sim.solvers.admm_kernels import GramFactor
from idl_ray.sim.solvers.weights import Threshold

__all__ = ["ActiveSetResult", "dual_active_set", "dual_active_set_applies"]

#: a constraint counts as violated when |f_j^T u| exceeds t_j by more than this fraction of t_j
_VIOLATION_TOL = 1e-10
#: a new normal whose part orthogonal to the active ones has a squared norm below this fraction of its own
#: is dependent on them (a partial step then drops an active constraint)
_DEPENDENT_TOL = 1e-12
#: rows x r x r x (N and N^+) float64 bytes per batch of rows at most (larger blocks run in batches)
_BATCH_BYTES = 256 * 2**20


@dataclasses.dataclass(frozen=True)
class ActiveSetResult:
    """``weights`` (rows x d, the signed multipliers: approximate values, exact support and signs),
    ``finished`` (rows whose iteration ended with no violated constraint) and ``steps`` (the most any
    batch took)."""

    weights: torch.Tensor
    finished: torch.Tensor
    steps: int


def dual_active_set_applies(lam: Threshold) -> bool:
    """Every threshold > 0 (infinite ones allowed): the dual constraints are then inequalities."""
    if isinstance(lam, torch.Tensor):
        return bool((lam > 0).all())
    return float(lam) > 0


def max_steps_for(rank: int) -> int:
    """A guard on the steps: each row needs about (adds + drops) ~ 1-4 r steps on the digits teachers."""
    return 10 * rank + 100


def dual_active_set(
    factor: GramFactor, R: torch.Tensor, *, lam: Threshold, max_steps: int | None = None
) -> ActiveSetResult:
    """Solve the rows of R (n x d, r = Rt/m rows) without the kappa bound by the dual active-set method.

    Parameters
    ----------
    factor : GramFactor of H (rank r > 0)
    R : Tensor (n, d)
    lam : float > 0, or per-entry thresholds (n, d) in (0, inf]
    max_steps : guard on the steps of each batch (default :func:`max_steps_for` the rank); rows still
        iterating then are not ``finished``

    Returns
    -------
    ActiveSetResult (weights in R's dtype and device)
    """
    if not dual_active_set_applies(lam):
        raise ValueError("dual_active_set needs every threshold > 0 (lam > 0)")
    Q, s = factor.range_basis()
    Q = Q.to(torch.float64)
    root = s.to(torch.float64).sqrt()
    B = Q * root  # (d, r): row j is f_j
    n, r = R.shape[0], root.numel()
    steps_cap = max_steps if max_steps is not None else max_steps_for(r)
    b = (R.to(torch.float64) @ Q) / root  # F^T b = r on the range of H
    per_row = 2 * r * r * 8
    batch = max(1, _BATCH_BYTES // per_row)
    weights = torch.zeros(n, B.shape[0], dtype=torch.float64, device=R.device)
    finished = torch.zeros(n, dtype=torch.bool, device=R.device)
    steps = 0
    for start in range(0, n, batch):
        rows = slice(start, min(start + batch, n))
        T = lam[rows].to(torch.float64) if isinstance(lam, torch.Tensor) else None
        t = (
            T
            if T is not None
            else torch.full((1, B.shape[0]), float(lam), dtype=torch.float64, device=R.device)
        )
        w, ok, k = _iterate(B, b[rows], t.expand(b[rows].shape[0], -1), steps_cap)
        weights[rows], finished[rows], steps = w, ok, max(steps, k)
    return ActiveSetResult(weights=weights.to(R.dtype), finished=finished, steps=steps)


def _iterate(
    B: torch.Tensor, b: torch.Tensor, t: torch.Tensor, max_steps: int
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Goldfarb-Idnani on the rows of b (n x r) with thresholds t (n x d); see the module docstring."""
    n, r = b.shape
    d = B.shape[0]
    dt, dev = b.dtype, b.device
    norms = B.norm(dim=1).clamp_min(torch.finfo(dt).tiny)  # distance to a hyperplane = excess / ||f_j||

    # the state of the rows still iterating (compacted as rows finish)
    live = torch.arange(n, device=dev)
    u = b.clone()
    Bu = u @ B.T
    N = torch.zeros(n, r, r, dtype=dt, device=dev)  # active normals, one per slot (zero rows: free slots)
    Pinv = torch.zeros(n, r, r, dtype=dt, device=dev)  # N^+ transposed per slot: rows are slots
    y = torch.zeros(n, r, dtype=dt, device=dev)  # multipliers per slot
    member = torch.full((n, r), -1, dtype=torch.long, device=dev)  # constraint index per slot
    sign = torch.zeros(n, r, dtype=dt, device=dev)
    in_set = torch.zeros(n, d, dtype=torch.bool, device=dev)
    tt_ = t.clone()
    p = torch.full((n,), -1, dtype=torch.long, device=dev)  # the constraint being added (-1: pick one)
    s = torch.zeros(n, dtype=dt, device=dev)
    slack = torch.zeros(n, dtype=dt, device=dev)  # its slack t_p - s f_p^T u (< 0 while violated)
    y_new = torch.zeros(n, dtype=dt, device=dev)  # its multiplier so far
    weights = torch.zeros(n, d, dtype=dt, device=dev)
    finished = torch.zeros(n, dtype=torch.bool, device=dev)
    done = torch.zeros(n, dtype=torch.bool, device=dev)
    steps = 0

    def store(rows: torch.Tensor, ok: bool) -> None:
        occupied = member[rows] >= 0
        local = torch.arange(rows.numel(), device=dev)[:, None].expand(-1, r)[occupied]
        out = torch.zeros(rows.numel(), d, dtype=dt, device=dev)
        out[local, member[rows][occupied]] = (sign[rows] * y[rows])[occupied]
        weights[live[rows]] = out
        finished[live[rows]] = ok

    while True:
        pick = (p < 0) & ~done
        if bool(pick.any()):
            idx = torch.nonzero(pick).flatten()
            excess = Bu[idx].abs() - tt_[idx]
            violated = (excess > _VIOLATION_TOL * tt_[idx]) & ~in_set[idx]
            distance = torch.where(violated, excess / norms, torch.full_like(excess, -math.inf))
            best, j = distance.max(dim=1)
            clean = torch.isinf(best)
            if bool(clean.any()):
                store(idx[clean], True)
                done[idx[clean]] = True
            go, j = idx[~clean], j[~clean]
            p[go] = j
            s[go] = torch.sign(Bu[go, j])
            slack[go] = tt_[go, j] - s[go] * Bu[go, j]
            y_new[go] = 0.0
        if bool(done.all()):
            break
        if steps >= max_steps:
            store(torch.nonzero(~done).flatten(), False)
            break
        if int(done.sum()) * 4 >= live.numel():  # compact: drop the finished rows from the batch
            keep = torch.nonzero(~done).flatten()
            live, u, Bu, N, Pinv, y, member, sign, in_set, tt_, p, s, slack, y_new = (
                x[keep] for x in (live, u, Bu, N, Pinv, y, member, sign, in_set, tt_, p, s, slack, y_new)
            )
            done = torch.zeros(keep.numel(), dtype=torch.bool, device=dev)
        steps += 1
        normal = -s[:, None] * B[p.clamp_min(0)]  # GI's form: normal^T u >= -t_p
        normal[done] = 0.0
        rv = torch.bmm(Pinv, normal[:, :, None])[:, :, 0]  # N^+ n: how the active multipliers change
        z = normal - torch.bmm(N.transpose(1, 2), rv[:, :, None])[:, :, 0]  # (I - N N^+) n
        zn = (z * normal).sum(dim=1)
        dependent = zn <= _DEPENDENT_TOL * (normal * normal).sum(dim=1)
        full = torch.where(
            dependent, torch.full_like(zn, math.inf), -slack / zn.clamp_min(torch.finfo(dt).tiny)
        )
        positive = (member >= 0) & (rv > 0)
        ratios = torch.where(positive, y / torch.where(positive, rv, torch.ones_like(rv)), math.inf)
        partial, leaving = ratios.min(dim=1)
        step = torch.minimum(partial, full)
        stuck = torch.isinf(step) & ~done  # no step: rounding made the problem look infeasible
        if bool(stuck.any()):
            store(torch.nonzero(stuck).flatten(), False)
            done |= stuck
        step = torch.where(done, torch.zeros_like(step), step)
        y -= step[:, None] * rv
        y_new += step
        move = torch.where(dependent, torch.zeros_like(step), step)
        u += move[:, None] * z
        Bu += move[:, None] * (z @ B.T)
        slack += move * zn
        add = (full <= partial) & ~done
        drop = (full > partial) & ~done
        # one rank-one update of N^+ for both kinds of rows, in place: N^+ -= a c^T (a: slots, c: r)
        a = torch.where(add[:, None], rv / zn.clamp_min(torch.finfo(dt).tiny)[:, None], torch.zeros_like(rv))
        c = torch.where(add[:, None], z, torch.zeros_like(z))
        any_drop = bool(drop.any())
        if any_drop:
            rows, slot = torch.nonzero(drop).flatten(), leaving[drop]
            dropped = torch.zeros_like(z)
            dropped[rows] = Pinv[rows, slot]
            through = torch.bmm(Pinv, dropped[:, :, None])[:, :, 0]  # (N^+ g), zero on the adding rows
            a[rows] = through[rows] / (dropped[rows] ** 2).sum(dim=1).clamp_min(torch.finfo(dt).tiny)[:, None]
            c[rows] = dropped[rows]
        Pinv.baddbmm_(a[:, :, None], c[:, None, :], alpha=-1.0)
        if any_drop:
            Pinv[rows, slot] = 0.0
            N[rows, slot] = 0.0
            in_set[rows, member[rows, slot]] = False
            member[rows, slot], y[rows, slot], sign[rows, slot] = -1, 0.0, 0.0
        if bool(add.any()):
            rows = torch.nonzero(add).flatten()
            slot = (member[rows] < 0).to(torch.int8).argmax(dim=1)
            Pinv[rows, slot] = z[rows] / zn[rows, None]
            N[rows, slot] = normal[rows]
            member[rows, slot], sign[rows, slot], y[rows, slot] = p[rows], s[rows], y_new[rows]
            in_set[rows, p[rows]] = True
            p[rows] = -1
    return weights, finished, steps
