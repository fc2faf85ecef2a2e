r"""Block equilibration of a constrained SIM stage: one scale for the bounded block, one for the free block.

Stage 1 fits W = [A B] on features [X; U]: the states X and the inputs U often differ in scale by orders of
magnitude (on the 28x28 digits teacher, the mean diagonal of G/m is 20 on the state block and 0.15 on the
input block), and ADMM's single penalty rho cannot suit both. With column scales ``s`` (d,) and
``w = w_s / s`` the stage becomes::

    minimise 1/2 w_s^T H_s w_s - r_s^T w_s + sum_j (lam / s_j) |w_s,j|    s.t.  ||w_s,A||_1 <= kappa a
    H_s = S^{-1} H S^{-1},   r_s = S^{-1} r,   S = diag(s)

which has the same optimum (mapped by ``w = w_s / s``) and the same duality gap at every pair of mapped
points (the Fenchel dual is invariant under the change of variables). The bounded block shares one scale
``a`` so the bound stays an l1 ball (of radius kappa a); the free block shares another, ``b``. Each is the
square root of the block's mean diagonal entry of H, which makes both blocks' mean diagonal 1 (OSQP's
equilibration, Stellato et al. 2020, restricted to what keeps the ball a ball). The mu_inf bound
``w_d + sum_{j != d} |w_j| <= kappa`` is positively homogeneous on the bounded block too, so it becomes the
same bound of radius kappa a.

Measured on the digits teachers' stage 1 (plain over-relaxed ADMM, same rho rule, 2,000 steps): relative
duality gap 1.3e-4 against 7.5e-3 unscaled at p = 784, lam = 1e-4; 8e-4 against 1.2e-1 at p = 64,
lam = 1e-5. Stage 2 (no bound) gained nothing from it in the same test, so it applies only to bounded
stages.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from idl_ray.sim.problem import SIMProblem

__all__ = ["BlockScaling", "ScaledStage"]


@dataclasses.dataclass(frozen=True)
class BlockScaling:
    """Column scales ``s`` (d,): ``a`` on the first ``n_constrained`` columns, ``b`` on the others."""

    scales: torch.Tensor
    n_constrained: int

    @classmethod
    def for_stage(cls, H: torch.Tensor, n_constrained: int) -> BlockScaling | None:
        """The scaling of a stage with Gram H (d x d) and ``n_constrained`` bounded columns; None when
        there is no bound or nothing to scale (a block whose diagonal is all zero keeps scale 1)."""
        d = H.shape[0]
        if n_constrained <= 0 or n_constrained >= d:
            return None
        diagonal = torch.diagonal(H).clamp_min(0)

        def block_scale(values: torch.Tensor) -> torch.Tensor:
            mean = values.mean()
            return mean.sqrt() if float(mean) > 0 else torch.ones((), dtype=H.dtype, device=H.device)

        a, b = block_scale(diagonal[:n_constrained]), block_scale(diagonal[n_constrained:])
        scales = torch.cat([a.expand(n_constrained), b.expand(d - n_constrained)]).contiguous()
        return cls(scales=scales, n_constrained=n_constrained)

    @property
    def bounded_scale(self) -> float:
        return float(self.scales[0])

    def gram(self, H: torch.Tensor) -> torch.Tensor:
        """H_s = S^{-1} H S^{-1} (d x d)."""
        s = self.scales.to(H)
        return H / s[:, None] / s[None, :]

    def targets(self, R: torch.Tensor) -> torch.Tensor:
        """r_s = r S^{-1} for the rows of R (rows x d)."""
        return R / self.scales.to(R)

    def thresholds(self, lam: float | torch.Tensor, rows: int) -> torch.Tensor:
        """Per-entry l1 thresholds lam / s (rows x d) of the scaled problem, for a float lam or per-entry
        thresholds (rows x d, entries in [0, inf]: an infinite one stays infinite)."""
        lam_t = torch.as_tensor(lam, dtype=self.scales.dtype, device=self.scales.device)
        return (lam_t / self.scales).expand(rows, self.scales.numel()).contiguous()

    def radius(self, kappa: float) -> float:
        """kappa a: the bound on the scaled bounded block."""
        return float(kappa) * self.bounded_scale

    def to_scaled(self, W: torch.Tensor) -> torch.Tensor:
        """w_s = w S (rows x d)."""
        return W * self.scales.to(W)

    def from_scaled(self, W_s: torch.Tensor) -> torch.Tensor:
        """w = w_s S^{-1} (rows x d)."""
        return W_s / self.scales.to(W_s)


@dataclasses.dataclass(frozen=True)
class ScaledStage:
    """A stage in the variables a solver iterates on: equilibrated when ``scaling`` is set, else as given."""

    scaling: BlockScaling | None
    H: torch.Tensor
    R: torch.Tensor
    lam: float | torch.Tensor
    kappa: float | None
    initial: torch.Tensor | None

    @classmethod
    def of(
        cls,
        H: torch.Tensor,
        R: torch.Tensor,
        lam: float | torch.Tensor,
        kappa: float | None,
        n_constrained: int,
        *,
        equilibrate: bool,
        initial: torch.Tensor | None = None,
    ) -> ScaledStage:
        """H (d x d), R (rows x d), lam (float or rows x d), the bound and a start, equilibrated when
        ``equilibrate`` and the stage has a bound (:meth:`BlockScaling.for_stage`)."""
        scaling = BlockScaling.for_stage(H, n_constrained) if equilibrate else None
        if scaling is None:
            return cls(None, H, R, lam, kappa, initial)
        return cls(
            scaling,
            scaling.gram(H),
            scaling.targets(R),
            scaling.thresholds(lam, R.shape[0]),
            scaling.radius(kappa),
            None if initial is None else scaling.to_scaled(initial.to(R)),
        )

    def weights(self, W: torch.Tensor, problem: SIMProblem) -> torch.Tensor:
        """A solver's answer (rows x d) in the stage's own variables, the bound exact after the division."""
        if self.scaling is None:
            return W
        return problem.project_onto_bound(self.scaling.from_scaled(W))

    def dual_point(self, W: torch.Tensor | None) -> torch.Tensor | None:
        """A dual point (weights whose residual gives the certificate's dual) in the stage's own variables."""
        return W if W is None or self.scaling is None else self.scaling.from_scaled(W)
