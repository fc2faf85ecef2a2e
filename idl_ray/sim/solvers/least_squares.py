"""Unconstrained least squares on the Gram form: W = Rt H^+ (minimum-norm when G is singular)."""

from __future__ import annotations

import warnings
from typing import Any

import torch

from idl_ray._validation import check_positive_float
from idl_ray.errors import WellPosednessWarning
from idl_ray.sim.problem import SIMProblem
from idl_ray.sim.solvers.base import BaseSolver, check_dtype, register_solver, resolve_device

__all__ = ["LeastSquareSolver"]


@register_solver("least_squares")
class LeastSquareSolver(BaseSolver):
    """The unconstrained fit ``min_W 1/(2m) ||T - W Phi||^2 + (l2 + ridge)/2 ||W||^2``.

    It ignores ``lam`` and ``kappa`` (it is the closed-form baseline), so it does **not** guarantee
    well-posedness: when the problem has a kappa bound and the fit violates it, a
    :class:`~idl_ray.errors.WellPosednessWarning` says by how much. Solved through the eigendecomposition
    of H = G/m + (l2 + ridge) I; eigenvalues below ``rcond * max`` are treated as zero (minimum-norm
    solution), so a rank-deficient Gram (dead units, constant pixels) is fine.

    Parameters
    ----------
    ridge : float >= 0, extra Tikhonov term (default 0)
    rcond : float > 0, relative eigenvalue cut-off (default 1e-10)
    device : None/"auto" (CUDA when available), or a device
    dtype : torch.float64 (default) or torch.float32
    """

    def __init__(
        self,
        *,
        ridge: float = 0.0,
        rcond: float = 1e-10,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float64,
    ) -> None:
        owner = "LeastSquareSolver"
        self.ridge = check_positive_float(ridge, "ridge", owner, allow_zero=True)
        self.rcond = check_positive_float(rcond, "rcond", owner)
        self.device = resolve_device(device)
        self.dtype = check_dtype(dtype, owner)
        self._params = {"ridge": ridge, "rcond": rcond, "device": str(self.device), "dtype": str(dtype)}

    def _solve(self, problem: SIMProblem) -> tuple[torch.Tensor, dict[str, Any]]:
        H, R = problem.scaled(device=self.device, dtype=self.dtype)
        if self.ridge:
            H = H + self.ridge * torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
        s, Q = torch.linalg.eigh(0.5 * (H + H.T))
        cut = self.rcond * float(s.abs().max().clamp_min(torch.finfo(s.dtype).tiny))
        inv = torch.where(s > cut, 1.0 / s.clamp_min(cut), torch.zeros_like(s))
        W = ((R @ Q) * inv) @ Q.T
        if problem.constrained:
            norm = float(W[:, : problem.n_constrained].abs().sum(dim=1).max())
            if norm > float(problem.kappa):
                warnings.warn(
                    f"LeastSquareSolver: the unconstrained fit has ||A||_inf = {norm:.4g} > kappa = "
                    f"{problem.kappa:g}, so the implicit model may not be well-posed. Use ADMMSolver or "
                    "CVXSolver to enforce the bound.",
                    WellPosednessWarning,
                    stacklevel=3,
                )
        rank = int((s > cut).sum())
        return W, {"iterations": 1, "converged": True, "extra": {"rank": rank}}
