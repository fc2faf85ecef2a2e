"""The duality-gap certificate and support polishing for drivers that never hold H (sample shards).

The workers hold their shards' statistics (G_k, Rt_k); the driver holds the iterate W, R = Rt/m and
c = ||t||^2/m per row (rows x d and rows values, obtained once). One gradient round trip gives
``grad(W) = sum_k (W G_k - Rt_k)/m + l2 W = W H - R``, hence ``W H`` and the exact duality gap of every row
(:func:`~idl_ray.sim.solvers.certificate.duality_gap_from_product`). Polishing needs H restricted to the union
S of the rows' supports: ``H_SS = sum_k G_k[S, S]/m + l2 I``, one more round trip
(:meth:`~idl_ray.distributed.actors.SolverWorker.gram_restricted`), taken only when some row is close
enough to be worth polishing. Used by the consensus strategy and the Ray projected-gradient solver.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from idl_ray.sim.solvers.certificate import DualityGap, duality_gap_from_product
from idl_ray.sim.solvers.polish import POLISH_BELOW, Polished, polish_if_better

__all__ = ["ShardCertificate"]


class ShardCertificate:
    """Certificate and polishing of a stage from a distributed gradient.

    Parameters
    ----------
    grad : callable ``W -> W H - R`` (rows x d), summed over the workers
    R : Tensor (rows, d), Rt/m; target_sq : Tensor (rows,), ||t||^2/m
    lam, kappa, n_constrained : the stage's settings (lam: a float or per-entry thresholds (rows, d) from
        l1 weights)
    restricted_hessian : callable ``index -> H[index][:, index]`` or None (no polishing)
    """

    def __init__(
        self,
        grad: Callable[[torch.Tensor], torch.Tensor],
        R: torch.Tensor,
        target_sq: torch.Tensor,
        *,
        lam: float | torch.Tensor,
        kappa: float | None,
        n_constrained: int,
        restricted_hessian: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        self.grad, self.R, self.target_sq = grad, R, target_sq
        self.lam = lam.to(R) if isinstance(lam, torch.Tensor) else float(lam)
        self.kappa = kappa
        self.n_constrained = n_constrained if kappa is not None else 0
        self.restricted_hessian = restricted_hessian

    def __call__(self, W: torch.Tensor) -> DualityGap:
        """The per-row duality gaps of W (one gradient round trip)."""
        return duality_gap_from_product(
            W,
            self.grad(W) + self.R,
            self.R,
            self.target_sq,
            lam=self.lam,
            kappa=self.kappa,
            n_constrained=self.n_constrained,
        )

    def polish(self, W: torch.Tensor, gaps: DualityGap, eligible: torch.Tensor) -> Polished | None:
        """Polished rows of W that improve on ``gaps`` (see :func:`polish_if_better`), or None; the
        polished rows are returned with all d columns."""
        if self.restricted_hessian is None:
            return None
        relative = gaps.gaps / gaps.primal.abs().clamp_min(torch.finfo(torch.float64).tiny)
        if not bool((eligible & (relative < POLISH_BELOW)).any()):
            return None  # nothing close enough: spare the round trip for H_SS
        index = torch.nonzero(W.abs().sum(dim=0)).flatten()
        if index.numel() == 0:
            return None
        H_SS = self.restricted_hessian(index)
        nc_S = int((index < self.n_constrained).sum())  # the constrained columns lead, as in W

        def certificate(Wc: torch.Tensor, rows: torch.Tensor) -> DualityGap:
            full = W.clone()  # zero outside ``index`` (the union of the supports)
            full[rows[:, None], index[None, :]] = Wc
            everything = self(full)
            return everything.take(rows)

        polished = polish_if_better(
            H_SS,
            self.R[:, index],
            W[:, index],
            gaps,
            rows=torch.arange(W.shape[0]),
            certificate=certificate,
            eligible=eligible,
            lam=self.lam[:, index] if isinstance(self.lam, torch.Tensor) else self.lam,
            kappa=self.kappa,
            n_constrained=nc_S,
        )
        if polished is None:
            return None
        full = torch.zeros(polished.weights.shape[0], W.shape[1], dtype=W.dtype)
        full[:, index] = polished.weights  # back to all d columns (zero off the supports)
        return Polished(positions=polished.positions, weights=full, gaps=polished.gaps)
