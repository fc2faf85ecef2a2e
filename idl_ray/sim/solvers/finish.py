"""Finish a set of rows exactly: the interior point, then the sparsest-optimum step, on one H.

For drivers that hold H but not a :class:`~idl_ray.sim.solvers.row_block.RowBlockADMM` (the consensus strategy
gathers H once for it; FISTA's hand-over in :mod:`~idl_ray.sim.solvers.projected_gd`). The single-process ADMM
runs the same two kernels inside its loop.
"""

from __future__ import annotations

import dataclasses

import torch

from idl_ray.sim.solvers.admm_kernels import GramFactor
from idl_ray.sim.solvers.certificate import DualityGap, duality_gap
from idl_ray.sim.solvers.interior_point import SPARSE_STEPS, interior_point_rows
from idl_ray.sim.solvers.vertex import move_to_vertices
from idl_ray.sim.solvers.weights import Threshold, take_rows

__all__ = ["Finished", "finish_rows"]


@dataclasses.dataclass(frozen=True)
class Finished:
    """``rows`` (indices into R), their ``weights`` (len(rows) x d), ``gaps`` and ``certified`` mask, the
    interior point's Newton ``iterations`` and the rows moved to vertices (``vertex_rows``)."""

    rows: torch.Tensor
    weights: torch.Tensor
    gaps: DualityGap
    certified: torch.Tensor
    iterations: int
    vertex_rows: int = 0


def finish_rows(
    H: torch.Tensor,
    R: torch.Tensor,
    target_sq: torch.Tensor,
    rows: torch.Tensor,
    *,
    lam: Threshold,
    kappa: float | None,
    n_constrained: int,
    gap_tol: float,
    current_primal: torch.Tensor,
    vertex: bool = True,
    factor: GramFactor | None = None,
    sparse_steps: int | None = None,
) -> Finished:
    """Solve the rows ``rows`` of (H, R) by the interior point and certify them (gap_tol against the stage's
    mean objective, from ``current_primal`` (n,) updated as these rows improve); certified rows with more
    nonzeros than rank(H) then move to a vertex of their optimal face where it still certifies.

    Parameters
    ----------
    H : Tensor (d, d), G/m + l2 I; R : Tensor (n, d), Rt/m; target_sq : Tensor (n,), ||t||^2/m
    rows : 1-D index tensor into R; lam : float or thresholds aligned with R; kappa, n_constrained : the bound
    factor : the GramFactor of H when the caller holds it (default: computed here)
    sparse_steps : the interior point's ``sparse_steps`` (default: 0 with the vertex step, which makes rows
        sparse where the optimum is not unique; :data:`~idl_ray.sim.solvers.interior_point.SPARSE_STEPS`
        without it)
    """
    factor = GramFactor(H) if factor is None else factor
    if sparse_steps is None:
        sparse_steps = 0 if vertex else SPARSE_STEPS
    lam_rows = take_rows(lam, rows)
    nc = n_constrained if kappa is not None else 0
    settings = {"kappa": kappa, "n_constrained": nc}
    primal = current_primal.to(torch.float64).clone()

    def certify(W: torch.Tensor, local: torch.Tensor) -> tuple[DualityGap, torch.Tensor]:
        index = rows[local]
        gaps = duality_gap(W, H, R[index], target_sq[index], lam=take_rows(lam_rows, local), **settings)
        primal[index] = torch.minimum(primal[index], gaps.primal)
        return gaps, gaps.certified(gap_tol, mean_primal=float(primal.abs().mean()))

    result = interior_point_rows(
        factor, R[rows], lam=lam_rows, certify=certify, sparse_steps=sparse_steps, **settings
    )
    weights, gaps, certified = result.weights, result.gaps, result.certified
    vertex_rows = 0
    if vertex:
        chosen = torch.nonzero(certified).flatten()
        weights, moved, new = move_to_vertices(
            factor, weights, chosen, lam=lam_rows, certify=certify, **settings
        )
        if new is not None:
            gaps.set_rows(moved, new)
            vertex_rows = int(moved.numel())
    return Finished(
        rows=rows,
        weights=weights,
        gaps=gaps,
        certified=certified,
        iterations=result.iterations,
        vertex_rows=vertex_rows,
    )
