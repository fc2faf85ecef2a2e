"""Helpers shared by the SIM tests (imported as a plain module next to them; a test importing from
``conftest`` would get whichever folder's conftest Python imported first)."""

from __future__ import annotations

import cvxpy as cp
import numpy as np
import torch
from torch import nn


def train_classifier(
    model: nn.Module, X: torch.Tensor, y: torch.Tensor, epochs: int, seed: int = 0
) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(epochs):
        perm = torch.randperm(X.shape[0], generator=gen)
        for i in range(0, X.shape[0], 128):
            idx = perm[i : i + 128]
            opt.zero_grad()
            nn.functional.cross_entropy(model(X[idx]), y[idx]).backward()
            opt.step()
    return model.eval().requires_grad_(False)


def accuracy(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(X).argmax(dim=1) == y).double().mean())


#: Clarabel at tight tolerances (the reference optimum of the small SIM tests)
TIGHT_CLARABEL = {"tol_gap_abs": 1e-12, "tol_gap_rel": 1e-12, "tol_feas": 1e-12, "max_iter": 500}


def clarabel_row_optima(
    features: torch.Tensor,
    targets: torch.Tensor,
    thresholds: np.ndarray,
    kappa: float | None,
    n_constrained: int,
) -> np.ndarray:
    """Per-row optimum of 1/(2m) ||t - F w||^2 + sum_j t_j |w_j| (+ ||w[:n_constrained]||_1 <= kappa), written
    independently with cvxpy on the samples (features m x d, targets m x rows, thresholds rows x d; inf holds
    an entry at 0)."""
    F, T = features.numpy(), targets.numpy()
    m = F.shape[0]
    values = []
    for i in range(T.shape[1]):
        w = cp.Variable(F.shape[1])
        held = np.isinf(thresholds[i])
        finite = np.where(held, 0.0, thresholds[i])
        objective = 0.5 / m * cp.sum_squares(T[:, i] - F @ w) + cp.sum(cp.multiply(finite, cp.abs(w)))
        constraints = [w[held] == 0] if held.any() else []
        if kappa is not None:
            constraints.append(cp.norm1(w[:n_constrained]) <= kappa)
        program = cp.Problem(cp.Minimize(objective), constraints)
        program.solve(solver="CLARABEL", **TIGHT_CLARABEL)
        values.append(program.value)
    return np.array(values)


def gram_form(
    features: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(H, R, c) = (F^T F / m, T^T F / m, ||t_i||^2 / m) of samples F (m x d), T (m x rows)."""
    m = features.shape[0]
    return features.T @ features / m, targets.T @ features / m, (targets * targets).sum(0) / m
