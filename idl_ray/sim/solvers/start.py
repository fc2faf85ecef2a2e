"""Where an ADMM solve of a SIM stage starts: zeros, given weights, or the least-squares fit.

Shared by :class:`~idl_ray.sim.solvers.ADMMSolver` and the Ray gram strategy (each worker applies it to its
block of rows with its own factored H): every choice here is per row, so a block's start is the same rows
of the whole problem's start.

A start is an :class:`~idl_ray.sim.solvers.admm_kernels.ADMMState` with ``W = Z = Z0`` (feasible: the
A-parts of Z0 are on the kappa ball) and ``U0 = (R - Z0 H) / rho``, the scaled dual that makes Z0 a fixed
point of ADMM's W-update.
"""

from __future__ import annotations

from typing import Any

import torch

from idl_ray.sim.solvers.admm_kernels import ADMMState, GramFactor, prox
from idl_ray.sim.solvers.certificate import duality_gap

__all__ = ["initial_state", "start_state"]


def _state_at(Z0: torch.Tensor, H: torch.Tensor, R: torch.Tensor, rho: float) -> ADMMState:
    return ADMMState(W=Z0, Z=Z0, U=(R - Z0 @ H) / rho, rho=rho)


def initial_state(
    initial: torch.Tensor,
    H: torch.Tensor,
    R: torch.Tensor,
    target_sq: torch.Tensor,
    rho: float,
    *,
    lam: float | torch.Tensor,
    kappa: float | None,
    n_constrained: int,
    **constraint: Any,
) -> ADMMState:
    """The ADMM state at given weights W0 (a warm start, e.g. the previous point of a lambda path).

    Z0 = W0 with its A-parts projected onto the kappa ball (feasible), kept per row only where its
    duality gap is at most that of a cold start (W = 0), else 0; U0 = (R - Z0 H) / rho.

    Parameters
    ----------
    initial : Tensor (rows, d); H : Tensor (d, d); R : Tensor (rows, d); target_sq : Tensor (rows,)
    rho : float > 0; lam, kappa, n_constrained : the stage's settings (``constraint``: the mu_inf
        ``condition`` and ``diagonal``, when that bound applies)
    """
    given = prox(initial.to(device=H.device, dtype=H.dtype), 0.0, kappa, n_constrained, **constraint)
    settings = {"lam": lam, "kappa": kappa, "n_constrained": n_constrained, **constraint}
    zero = torch.zeros_like(given)
    closer = (
        duality_gap(given, H, R, target_sq, **settings).gaps
        <= duality_gap(zero, H, R, target_sq, **settings).gaps
    )
    return _state_at(torch.where(closer[:, None], given, zero), H, R, rho)


def start_state(
    factor: GramFactor,
    H: torch.Tensor,
    R: torch.Tensor,
    target_sq: torch.Tensor,
    rho: float,
    *,
    warm_start: bool,
    gap_tol: float,
    lam: float | torch.Tensor,
    kappa: float | None,
    n_constrained: int,
    initial: torch.Tensor | None = None,
    **constraint: Any,
) -> ADMMState | None:
    """The state an ADMM solve starts from; None for a cold start (zeros).

    With ``warm_start``, per row: Z0 = prox(W_ls) (W_ls = R H^+, the minimum-norm least-squares fit,
    ``rows d^2`` flops from the factor) where that point is already certified optimal (duality gap at most
    ``gap_tol`` times the objective), or wherever lam = 0 (the least-squares fit is then the natural start:
    the l1 term that makes a cold start pay off is absent); elsewhere ``initial`` through
    :func:`initial_state` when given, else zeros. Without ``warm_start``: :func:`initial_state` of
    ``initial``, or None.

    Measured on the digits teachers, a warm row that is not already optimal saves nothing at lam > 0 and can
    cost steps (its dense support takes longer to settle than a cold one grows); at lam = 0 on the 784-input
    teacher with biases the least-squares start certifies every row at step 0, where a cold start takes 78
    steps and ~20 s (its dense supports make every polish a batch of ~900 x 900 systems).

    With ``initial`` (the previous point of a lambda path, whose support is close) the caller also polishes
    every row on that support at the first check (``polish_first``). Measured on the 64-input digits
    teacher with biases (20 lams from lam_max down six decades): 36 to 37 of the 40 stage solves take no
    ADMM step. A stage the polish does not certify runs ADMM, whose step count depends on the adapted rho's
    path and not only on how close the start is: in one run 3 of 40 stage-2 solves took 82 to 120 steps
    against 89 to 90 cold, and on the 784-input teacher one took 132 steps against 58 cold, so fewer steps
    than a cold start are typical, not guaranteed (``benchmarks/bench_sim_path.py`` prints the count).

    Parameters
    ----------
    factor : GramFactor of H (d x d); H : Tensor (d, d); R : Tensor (rows, d); target_sq : Tensor (rows,)
    rho : float > 0, the starting penalty; gap_tol : float, the solver's relative gap tolerance
    lam, kappa, n_constrained : the stage's settings (lam a float or per-entry thresholds (rows, d))
    initial : Tensor (rows, d) or None, weights to start from
    """
    if R.shape[0] == 0:  # an empty block (a Ray worker with no rows)
        return None
    settings = {"lam": lam, "kappa": kappa, "n_constrained": n_constrained, **constraint}
    given = None if initial is None else initial_state(initial, H, R, target_sq, rho, **settings)
    if not warm_start:
        return given
    s = factor.eigenvalues
    cut = 1e-10 * float(s.max().clamp_min(torch.finfo(s.dtype).tiny))
    inv = torch.where(s > cut, 1.0 / s.clamp_min(cut), torch.zeros_like(s))
    W_ls = ((R @ factor.Q) * inv) @ factor.Q.T
    Z_ls = prox(W_ls, lam / rho, kappa, n_constrained, **constraint)
    warm = duality_gap(Z_ls, H, R, target_sq, **settings)
    unpenalised = (lam == 0).all(dim=1) if isinstance(lam, torch.Tensor) else lam == 0
    use = warm.certified(gap_tol) | unpenalised
    if given is None and not bool(use.any()):
        return None
    other = torch.zeros_like(Z_ls) if given is None else given.Z
    return _state_at(torch.where(use[:, None], Z_ls, other), H, R, rho)
