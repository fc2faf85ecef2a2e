"""Proximal / projected gradient on the Gram form, with an optional low-rank A = L R^T.

Full rank (``rank=None``, and always for unconstrained stages): FISTA with step 1/L (L = largest
eigenvalue of H) and the exact prox of ``lam ||.||_1 + indicator(||a_i||_1 <= kappa)`` (soft-threshold then
l1-ball projection), with adaptive restart; it converges to the same optimum as ADMM and CVX.

Low rank (``rank=r < n``): A = L R^T with L, R of shape (n, r), B free; Adam on the objective plus a
quadratic penalty on row sums above kappa. At the end the rows of L are scaled so that
``||L R^T||_inf <= kappa`` holds exactly (row scaling keeps the rank), and B is refitted by FISTA with A fixed.
Everything stays on the device; the host reads a scalar only every ``check_every`` steps.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from idl_ray._validation import check_choice, check_positive_float, check_positive_int
from idl_ray.implicit.projection import project_rows_onto_l1_ball
from idl_ray.sim.problem import SIMProblem
from idl_ray.sim.solvers.admm_kernels import prox
from idl_ray.sim.solvers.base import BaseSolver, check_dtype, register_solver, resolve_device

__all__ = ["ProjectedGDLowRankSolver", "fista"]


def _quad_grad(W: torch.Tensor, H: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    return W @ H - R


def fista(
    H: torch.Tensor,
    R: torch.Tensor,
    *,
    lam: float,
    kappa: float | None,
    n_constrained: int,
    W0: torch.Tensor | None = None,
    max_iter: int = 20_000,
    tol: float = 1e-9,
    check_every: int = 25,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """FISTA with gradient restart on ``1/2 tr(W H W^T) - tr(W R^T) + lam ||W||_1`` s.t. the row bound.

    The step is 1/L with L the largest eigenvalue of H; see :func:`fista_loop` for the iteration.
    """
    L = float(torch.linalg.eigvalsh(0.5 * (H + H.T)).max().clamp_min(1e-300))
    return fista_loop(
        lambda W: _quad_grad(W, H, R),
        torch.zeros_like(R) if W0 is None else W0,
        step=1.0 / L,
        lam=lam,
        kappa=kappa,
        n_constrained=n_constrained,
        max_iter=max_iter,
        tol=tol,
        check_every=check_every,
    )


def fista_loop(
    grad: Callable[[torch.Tensor], torch.Tensor],
    W0: torch.Tensor,
    *,
    step: float,
    lam: float,
    kappa: float | None,
    n_constrained: int,
    max_iter: int,
    tol: float,
    check_every: int,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Proximal gradient with Nesterov momentum and gradient restart, for any smooth part's gradient.

    ``W <- prox(Y - step grad(Y))`` with ``prox`` the l1 soft-threshold plus the row-wise kappa
    projection; momentum is dropped when it points uphill (O'Donoghue & Candes 2015). Stops when the
    relative change ``||W_k - W_{k-1}|| / max(||W_k||, 1e-12)`` falls below ``tol``, checked every
    ``check_every`` iterations (one host sync each time). ``grad`` may be local (a Gram product) or a
    sum over Ray actors: both solvers share this loop.
    """
    W = W0.clone()
    Y = W.clone()
    t = torch.ones((), dtype=W.dtype, device=W.device)  # momentum state stays on the device: no sync
    one = torch.ones((), dtype=W.dtype, device=W.device)
    zero = torch.zeros((), dtype=W.dtype, device=W.device)
    history: list[dict[str, float]] = []
    converged, k = False, 0
    for k in range(1, max_iter + 1):
        W_prev = W
        W = prox(Y - step * grad(Y), step * lam, kappa, n_constrained)
        restart = torch.sum((Y - W) * (W - W_prev)) > 0
        t_next = 0.5 * (1.0 + torch.sqrt(1.0 + 4.0 * t * t))
        momentum = torch.where(restart, zero, (t - 1.0) / t_next)
        Y = W + momentum * (W - W_prev)
        t = torch.where(restart, one, t_next)
        if k % check_every == 0:
            change = float(torch.linalg.norm(W - W_prev) / torch.linalg.norm(W).clamp_min(1e-12))
            history.append({"iteration": k, "relative_change": change})
            if change <= tol:
                converged = True
                break
    return W, {"iterations": k, "converged": converged, "history": history, "step": step}


def set_gradient_settings(
    solver: Any,
    owner: str,
    *,
    rank: int | None,
    max_iter: int,
    tol: float,
    lr: float,
    penalty: float,
    check_every: int,
    method: str,
) -> dict[str, Any]:
    """Validate the projected-gradient settings and store them on ``solver`` (local and Ray solvers);
    return them as given, for the solver's ``get_params``."""
    solver.rank = check_positive_int(rank, "rank", owner, allow_none=True)
    solver.max_iter = check_positive_int(max_iter, "max_iter", owner)
    solver.tol = check_positive_float(tol, "tol", owner)
    solver.lr = check_positive_float(lr, "lr", owner)
    solver.penalty = check_positive_float(penalty, "penalty", owner, allow_zero=True)
    solver.check_every = check_positive_int(check_every, "check_every", owner)
    solver.method = check_choice(method, "method", owner, ("fista", "adam"))
    return {
        "rank": rank,
        "max_iter": max_iter,
        "tol": tol,
        "lr": lr,
        "penalty": penalty,
        "check_every": check_every,
        "method": method,
    }


@register_solver("projected_gd")
class ProjectedGDLowRankSolver(BaseSolver):
    """Projected (proximal) gradient on the Gram form, optionally with a low-rank A = L R^T.

    Parameters
    ----------
    rank : int or None
        Rank of A in stage 1; None (default) fits a full A by FISTA (exact prox, same optimum as ADMM).
    max_iter : int, iteration cap (FISTA iterations, or Adam steps for the low-rank fit)
    tol : float, relative-change stopping tolerance of FISTA
    lr : float, Adam learning rate of the low-rank fit
    penalty : float, weight of the squared row-sum excess penalty during the low-rank fit
    check_every : int, host syncs (stopping tests) every this many steps
    method : "fista" (default) for full rank; "adam" forces Adam + final projection even at full rank
    device : None/"auto" (CUDA when available), or a device
    dtype : torch.float64 (default) or torch.float32
    seed : int, initialisation of L and R
    """

    def __init__(
        self,
        *,
        rank: int | None = None,
        max_iter: int = 20_000,
        tol: float = 1e-9,
        lr: float = 1e-2,
        penalty: float = 10.0,
        check_every: int = 25,
        method: str = "fista",
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float64,
        seed: int = 0,
    ) -> None:
        owner = "ProjectedGDLowRankSolver"
        settings = set_gradient_settings(
            self,
            owner,
            rank=rank,
            max_iter=max_iter,
            tol=tol,
            lr=lr,
            penalty=penalty,
            check_every=check_every,
            method=method,
        )
        self.device = resolve_device(device)
        self.dtype = check_dtype(dtype, owner)
        self.seed = int(seed)
        self._params = {
            **settings,
            "device": str(self.device),
            "dtype": str(dtype),
            "seed": seed,
        }

    def _solve(self, problem: SIMProblem) -> tuple[torch.Tensor, dict[str, Any]]:
        H, R = problem.scaled(device=self.device, dtype=self.dtype)
        lam = 0.0 if problem.variant == "least_squares" else problem.lam
        nc = problem.n_constrained if problem.kappa is not None else 0
        low_rank = nc > 0 and ((self.rank is not None and self.rank < nc) or self.method == "adam")
        if not low_rank:
            W, info = fista(
                H,
                R,
                lam=lam,
                kappa=problem.kappa,
                n_constrained=nc,
                max_iter=self.max_iter,
                tol=self.tol,
                check_every=self.check_every,
            )
            return W, {
                "iterations": info["iterations"],
                "converged": info["converged"],
                "status": "optimal" if info["converged"] else "max_iter",
                "history": info["history"],
                "extra": {"method": "fista", "step": info["step"]},
            }
        return self._low_rank(problem, H, R, lam, nc)

    def _low_rank(
        self, problem: SIMProblem, H: torch.Tensor, R: torch.Tensor, lam: float, nc: int
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        kappa = float(problem.kappa)
        rank = min(self.rank or nc, nc)
        gen = torch.Generator(device="cpu").manual_seed(self.seed)
        init = 0.1 / rank**0.5
        Lf = (init * torch.randn(nc, rank, generator=gen, dtype=self.dtype)).to(self.device).requires_grad_()
        Rf = (init * torch.randn(nc, rank, generator=gen, dtype=self.dtype)).to(self.device).requires_grad_()
        Bf = torch.zeros(
            R.shape[0], R.shape[1] - nc, dtype=self.dtype, device=self.device, requires_grad=True
        )
        optimiser = torch.optim.Adam([Lf, Rf, Bf], lr=self.lr)
        history: list[dict[str, float]] = []
        steps = max(1, self.max_iter)
        for k in range(1, steps + 1):
            optimiser.zero_grad(set_to_none=True)
            A = Lf @ Rf.T
            W = torch.cat([A, Bf], dim=1)
            loss = 0.5 * torch.sum((W @ H) * W) - torch.sum(W * R) + lam * W.abs().sum()
            excess = (A.abs().sum(dim=1) - kappa).clamp_min(0)
            loss = loss + self.penalty * torch.sum(excess * excess)
            loss.backward()
            optimiser.step()
            if k % (self.check_every * 20) == 0:
                history.append({"iteration": k, "loss": float(loss.detach())})
        with torch.no_grad():
            A = Lf @ Rf.T
            sums = A.abs().sum(dim=1, keepdim=True)
            # scaling rows keeps rank r; the margin covers rounding, so the projection below is a no-op guard
            margin = 1.0 - 4 * (nc + 1) * torch.finfo(A.dtype).eps
            scale = torch.where(sums > kappa, kappa * margin / sums.clamp_min(1e-300), torch.ones_like(sums))
            A = project_rows_onto_l1_ball(A * scale, kappa)
            # refit B (and the rest) with A fixed: FISTA on the B block
            Hbb, Hba = H[nc:, nc:], H[nc:, :nc]
            Rb = R[:, nc:] - A @ Hba.T
            B, info = fista(
                Hbb,
                Rb,
                lam=lam,
                kappa=None,
                n_constrained=0,
                W0=Bf.detach(),
                max_iter=self.max_iter,
                tol=self.tol,
                check_every=self.check_every,
            )
            W = torch.cat([A, B], dim=1)
        return W, {
            "iterations": steps + info["iterations"],
            "converged": info["converged"],
            "status": "optimal" if info["converged"] else "max_iter",
            "history": history + info["history"],
            "extra": {"method": "low_rank_adam", "rank": rank},
        }
