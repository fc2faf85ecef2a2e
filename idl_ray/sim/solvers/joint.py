"""The dual active-set method for the rows of several stages on one Gram, in one lockstep batch.

A SIM fit solves stage 1 (the rows of [A B], under the kappa bound, on block-equilibrated columns) and stage 2
(the rows of [C D], no bound, unscaled) on the same G. On a low-rank G both go to the dual active-set method
(:mod:`~idl_ray.sim.solvers.active_set`), whose rows run in lockstep: its cost is the steps of its slowest row
times the cost of one step, ~0.5 ms plus ~21 us per row on one CPU thread at the 28x28 digits teacher's sizes.
Stage 2's 10 rows alone take 87-355 steps there (0.09-0.39 s), fewer than stage 1's 96 rows need; in stage 1's
batch they add ~10% to its steps' cost instead.

The method's answer does not depend on the columns' scale: with stage i in variables ``v_i = w s_i`` and the
reference stage (the first) in ``v = w s``, stage i is posed in the reference's variables by
``r -> r / c``, ``t -> t / c`` (c = s / s_i) and its answer maps back by ``v_i = v / c``. Only the reference
stage may carry the kappa bound (the other stages' rows are plain lasso rows:
``dual_active_set(bounded=...)``). The answers are what the method gives each stage on its own (supports and
signs; approximate values): each stage's solve polishes and certifies its rows as usual.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from idl_ray.sim.solvers.active_set import ActiveSetResult, dual_active_set, dual_active_set_applies
from idl_ray.sim.solvers.admm_kernels import GramFactor
from idl_ray.sim.solvers.scaling import ScaledStage

__all__ = ["joint_active_set", "joint_applies"]


def _scales(stage: ScaledStage) -> torch.Tensor:
    d = stage.H.shape[0]
    if stage.scaling is None:
        return torch.ones(d, dtype=torch.float64, device=stage.H.device)
    return stage.scaling.scales.to(device=stage.H.device, dtype=torch.float64)


def joint_applies(factor: GramFactor, stages: Sequence[ScaledStage], n_constrained: Sequence[int]) -> bool:
    """Whether :func:`joint_active_set` applies: two stages or more, the reference's factor low-rank (where
    the method runs), every threshold > 0, and a bound on the reference stage only."""
    return (
        len(stages) >= 2
        and factor.low_rank
        and factor.rank > 0
        and all(dual_active_set_applies(stage.lam) for stage in stages)
        and all(count == 0 or stage.kappa is None for stage, count in zip(stages[1:], n_constrained[1:]))
    )


def joint_active_set(
    factor: GramFactor,
    stages: Sequence[ScaledStage],
    n_constrained: int,
    rows: Sequence[torch.Tensor | None] | None = None,
) -> list[ActiveSetResult]:
    """One :func:`~idl_ray.sim.solvers.active_set.dual_active_set` run for the rows of every stage.

    Parameters
    ----------
    factor : GramFactor of the reference stage's H (``stages[0].H``)
    stages : the stages in their solvers' variables (:class:`~idl_ray.sim.solvers.scaling.ScaledStage`, all on
        one G); the first is the reference, the only one whose bound (``kappa``, ``n_constrained``) applies
    n_constrained : the reference stage's bounded columns
    rows : per stage, the rows to solve (1-D index tensors; None: all); default all rows of every stage

    Returns
    -------
    One ActiveSetResult per stage over all its rows, in that stage's variables: rows not solved have zero
    weights and are not ``finished``; ``steps`` is the joint batch's
    """
    reference = _scales(stages[0])
    device = reference.device
    chosen = list(rows) if rows is not None else [None] * len(stages)
    R_parts, t_parts, bounded, ratios, picked = [], [], [], [], []
    for index, (stage, wanted) in enumerate(zip(stages, chosen)):
        count, d = stage.R.shape
        take = torch.arange(count, device=device) if wanted is None else wanted.to(device)
        ratio = reference / _scales(stage)  # c = s / s_i
        lam = stage.lam
        thresholds = (
            lam.to(torch.float64)[take]
            if isinstance(lam, torch.Tensor)
            else torch.full((take.numel(), d), float(lam))
        ).to(device)
        R_parts.append(stage.R.to(torch.float64)[take] / ratio)
        t_parts.append(thresholds / ratio)
        bounded.append(torch.full((take.numel(),), index == 0, dtype=torch.bool, device=device))
        ratios.append(ratio)
        picked.append(take)
    result = dual_active_set(
        factor,
        torch.cat(R_parts),
        lam=torch.cat(t_parts),
        kappa=stages[0].kappa,
        n_constrained=n_constrained if stages[0].kappa is not None else 0,
        bounded=torch.cat(bounded),
    )
    answers, first = [], 0
    for stage, ratio, take in zip(stages, ratios, picked):
        part = slice(first, first + take.numel())
        first = part.stop
        weights = torch.zeros(stage.R.shape, dtype=stage.R.dtype, device=stage.R.device)
        finished = torch.zeros(stage.R.shape[0], dtype=torch.bool, device=stage.R.device)
        weights[take] = (result.weights[part] / ratio).to(stage.R.dtype)
        finished[take] = result.finished[part]
        answers.append(ActiveSetResult(weights=weights, finished=finished, steps=result.steps))
    return answers
