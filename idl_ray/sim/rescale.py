"""Positive per-layer rescaling of hidden states, so the teacher itself satisfies the kappa bound.

For a positively homogeneous activation (ReLU, leaky ReLU), phi(s z) = s phi(z) for s > 0. Scaling the
hidden units of layer k by s_k (Z' = S Z, X' = S X with S = diag(s)) turns the teacher's implicit weights into

    A' = S A* S^{-1},   B' = S B*,   C' = C* S^{-1},   D' = D*,

the same function. Row i of layer k has l1 norm ``s_k * sum_j |A*_ij| / s_j`` (j in earlier layers), so,
going through the layers in order (A* is strictly block lower-triangular),

    s_1 = 1,    s_k = min(1, target / max_{i in layer k} sum_j |A*_ij| / s_j),    target = margin * kappa,

makes ``||A'||_inf <= target``: the teacher's own (A', B') is feasible for the SIM problem, so a solve
with a small lam can reproduce it. Layers that already satisfy the bound keep s_k = 1.

The teacher's A* has a zero diagonal, and scaling keeps it zero (``s_i a_ii / s_i``), so its
``mu_inf(A') = max_i (a'_ii + sum_{j != i} |a'_ij|)`` equals ``||A'||_inf``: the same scales make the
teacher feasible for the wider ``mu_inf`` bound (``condition="mu_inf"``). For a general diagonal the
rule reads ``s_k = min(1, min_i (target - a_ii) / sum_{j != i} |A*_ij| / s_j)``, which is what is computed.
"""

from __future__ import annotations

import torch

from idl_ray.sim.extraction import TeacherStructure

__all__ = ["HOMOGENEOUS_ACTIVATIONS", "layer_scales", "scale_teacher_weights"]

#: activations with phi(s z) = s phi(z) for every s > 0
HOMOGENEOUS_ACTIVATIONS = frozenset({"relu", "leaky_relu"})


def layer_scales(
    structure: TeacherStructure, kappa: float, *, margin: float = 0.999, condition: str = "inf_norm"
) -> torch.Tensor:
    """Per-unit positive scales s (shape (n,), float64; constant within each layer) as described above;
    ``condition="mu_inf"`` makes the rescaled teacher satisfy ``mu_inf(A') <= margin * kappa`` instead."""
    A = structure.A.abs().to(torch.float64)
    n = A.shape[0]
    diag = torch.zeros(n, dtype=torch.float64)
    if condition == "mu_inf":  # the diagonal is not scaled and counts with its sign
        diag = torch.diagonal(structure.A).to(torch.float64).clone()
        A = A - torch.diag_embed(A.diagonal())
    scales = torch.ones(n, dtype=torch.float64)
    target = margin * kappa
    for block in structure.layer_slices:
        rows = (A[block] / scales).sum(dim=1)  # divides column j by s_j (later layers' columns are zero)
        if rows.numel() == 0:
            continue
        room = target - diag[block]
        over = diag[block] + rows > target
        if bool(over.any()):
            ratio = room[over] / rows[over]
            scales[block] = float(ratio.clamp_min(0).min())
    return scales


def scale_teacher_weights(
    structure: TeacherStructure, scales: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A', B', C', D') of the rescaled teacher (float64)."""
    s = scales.to(torch.float64)
    A = s[:, None] * structure.A / s[None, :]
    return A, s[:, None] * structure.B, structure.C / s[None, :], structure.D.clone()
