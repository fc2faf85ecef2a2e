"""One batch of states turned into the two SIM stages' samples: the per-batch step every fitting path shares.

Whatever streams the batches (the in-process loop of :meth:`SIM.fit`, the Ray Data actors of
:mod:`idl_ray.distributed.extraction`, the Parquet reader of :mod:`idl_ray.distributed.state_store`), a
batch of recorded states becomes

* features ``Phi^T = [X S, U]`` (b, n + p) and targets ``T^T = [Z S, Y]`` (b, n + q), with S = diag(s) the
  positive per-unit state scales of :mod:`idl_ray.sim.rescale` (or none): stage 1 uses the first n target
  columns, stage 2 the last q; both share G = Phi Phi^T;
* for stage 2 with ``regenerate_states``: features ``[X_hat, U]`` with X_hat the fitted model's own fixed
  point ``X_hat = phi(X_hat A^T + U B^T)``, targets Y.

Keeping these in one place is what makes the streaming and in-process answers equal by construction.
"""

from __future__ import annotations

from typing import Any

import torch

from idl_ray.implicit.projection import project_rows_onto_l1_ball

__all__ = ["fixed_point_weights", "regenerated_features", "stage_batch"]


def stage_batch(
    U: torch.Tensor, Z: torch.Tensor, X: torch.Tensor, Y: torch.Tensor, scales: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features ``[X S, U]`` (b, n + p) and targets ``[Z S, Y]`` (b, n + q) of one batch (batch-first).

    Parameters
    ----------
    U : (b, p), Z : (b, n), X : (b, n), Y : (b, q)
        Recorded states, batch-first (``SIMStates`` fields transposed).
    scales : (n,) or None
        Positive per-unit state scales (cast to the states' device and dtype); None: no rescaling.
    """
    if scales is not None:
        s = scales.to(device=Z.device, dtype=Z.dtype)
        Z, X = Z * s, X * s
    return torch.cat([X, U], dim=1), torch.cat([Z, Y], dim=1)


def fixed_point_weights(
    A: torch.Tensor,
    B: torch.Tensor,
    kappa: float,
    dtype: torch.dtype,
    device: Any,
    well_posedness: str = "inf_norm",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) in the prediction dtype on ``device``; A's rows re-projected after rounding to float32 (onto
    the l1 ball, or onto the mu_inf set with ``well_posedness="mu_inf"``)."""
    Ad = A.to(device=device, dtype=dtype)
    if dtype != torch.float64:  # rounding to float32 must not break the bound
        if well_posedness == "mu_inf":
            from idl_ray.implicit.mu_projection import project_onto_mu_ball

            Ad = project_onto_mu_ball(Ad, kappa)
        else:
            Ad = project_rows_onto_l1_ball(Ad, kappa)
    return Ad, B.to(device=device, dtype=dtype)


def regenerated_features(
    Ad: torch.Tensor,
    Bd: torch.Tensor,
    U: torch.Tensor,
    activation: Any,
    fixed_point: Any,
    well_posedness: str = "inf_norm",
) -> torch.Tensor:
    """Stage-2 features ``[X_hat, U]`` (b, n + p) with X_hat the fitted model's equilibrium on ``U`` (b, p)
    (by the diagonal-implicit iteration with ``well_posedness="mu_inf"``)."""
    from idl_ray.implicit.fixed_point import solve_fixed_point
    from idl_ray.implicit.mu_fixed_point import solve_fixed_point_mu

    solve = solve_fixed_point_mu if well_posedness == "mu_inf" else solve_fixed_point
    Ud = U.to(device=Ad.device, dtype=Ad.dtype)
    X, _ = solve(Ad, Ud @ Bd.T, activation, fixed_point)
    return torch.cat([X, Ud], dim=1)
