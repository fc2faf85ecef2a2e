"""Per-entry l1 thresholds: the weighted penalty ``sum_ij t_ij |W_ij|`` shared by every Gram-form solver.

A SIM stage with l1 weights w (rows x d, entries in [0, inf]) penalises ``lam sum_ij w_ij |W_ij|``. The
solvers see the effective thresholds ``t_ij = lam w_ij`` (with ``t_ij = inf`` wherever ``w_ij = inf``,
whatever lam, never ``lam * inf = nan`` at lam = 0): an infinite threshold holds ``W_ij = 0`` exactly
(the soft-threshold of any value by inf is 0, and the certificate puts no constraint on the dual there).

A threshold is either a float (one lam for every entry: the unweighted problem, unchanged) or a float64
tensor of shape (rows, d) aligned with the rows of the block it belongs to. These helpers keep both forms
working with one code path.
"""

from __future__ import annotations

import torch

__all__ = ["Threshold", "effective_thresholds", "l1_term", "take_rows"]

#: one lam for all entries, or per-entry thresholds (rows x d, inf = entry held at 0)
Threshold = float | torch.Tensor


def effective_thresholds(lam: float, weights: torch.Tensor) -> torch.Tensor:
    """t = lam * w, with inf where w is inf (also at lam = 0)."""
    return torch.where(torch.isinf(weights), weights, lam * weights)


def take_rows(lam: Threshold, index: torch.Tensor | slice) -> Threshold:
    """The thresholds of a subset of rows (a float is shared by every row)."""
    return lam[index] if isinstance(lam, torch.Tensor) else lam


def l1_term(W: torch.Tensor, lam: Threshold) -> torch.Tensor:
    """Per-row penalty ``sum_j t_j |W_j|`` (shape (rows,)); 0 where W is 0 even when t is inf (an
    infinite-weight entry that is nonzero gives inf: the point is infeasible)."""
    if not isinstance(lam, torch.Tensor):
        return lam * W.abs().sum(dim=1)
    t = lam.to(device=W.device, dtype=W.dtype)
    return torch.where(W == 0, torch.zeros_like(W), t * W.abs()).sum(dim=1)
