"""Safeguarded type-II Anderson acceleration of a row-wise fixed-point map, batched over rows.

For a map T whose fixed point is wanted (here one ADMM step on a block of rows), with residual
f(x) = T(x) - x and the last ``memory`` differences dX_k = x_{k+1} - x_k, dF_k = f_{k+1} - f_k stacked as
columns, type-II Anderson acceleration (Walker & Ni 2011; Zhang, O'Donoghue & Boyd 2020, as in SCS 3)
extrapolates::

    gamma = argmin ||f_k - dF gamma||^2  (+ a relative Tikhonov term for conditioning)
    x_{k+1} = T(x_k) - (dX + dF) gamma

Rows are independent problems, so every row has its own gamma (a batched memory x memory solve) and its
own safeguard: a row whose accelerated residual is larger than its previous residual takes the plain
step T(x_k) instead and forgets its history. The map is called on the accelerated rows and, for the
rows that fall back, once more on those rows only.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["AndersonAccelerator"]

#: relative Tikhonov regularisation of the memory x memory least-squares system
_REGULARISATION = 1e-10


class AndersonAccelerator:
    """Accelerated fixed-point iteration for ``x = T(x)`` on a (rows, n) tensor, row by row.

    Parameters
    ----------
    step : callable ``(x, rows) -> T(x)`` applying the map to the rows ``rows`` (a 1-D index tensor) of
        a (len(rows), n) tensor
    memory : int >= 1, the number of differences kept per row
    """

    def __init__(self, step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], memory: int) -> None:
        self.step = step
        self.memory = int(memory)
        self.dX: list[torch.Tensor] = []
        self.dF: list[torch.Tensor] = []
        self.evaluations = 0
        self.rejected = 0

    def reset(self) -> None:
        """Forget the history (after the map changed, e.g. a new rho)."""
        self.dX.clear()
        self.dF.clear()

    def _apply(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        self.evaluations += 1
        return self.step(x, rows)

    def iterate(
        self, x: torch.Tensor, gx: torch.Tensor, rows: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One accelerated step from x (with gx = T(x) known) on ``rows``; returns (x_next, T(x_next))."""
        f = gx - x
        if not self.dX:
            x_next = gx
            g_next = self._apply(x_next, rows)
        else:
            DX = torch.stack(self.dX, dim=2)  # (rows, n, k)
            DF = torch.stack(self.dF, dim=2)
            gram = DF.transpose(1, 2) @ DF
            trace = gram.diagonal(dim1=1, dim2=2).sum(-1).clamp_min(torch.finfo(x.dtype).tiny)
            eye = torch.eye(gram.shape[-1], dtype=x.dtype, device=x.device)
            # a row with no history left (all differences zeroed) solves 0 gamma = 0: the floor keeps it regular
            floor = torch.finfo(x.dtype).tiny ** 0.5
            gram = gram + (_REGULARISATION * trace + floor)[:, None, None] * eye
            # solve_ex: no per-call error check (torch.linalg.solve costs ms on tiny batches); a row whose
            # system failed gets gamma = 0, the plain step
            gamma = torch.linalg.solve_ex(gram, DF.transpose(1, 2) @ f[:, :, None])[0]
            gamma = torch.nan_to_num(gamma, nan=0.0, posinf=0.0, neginf=0.0)
            x_next = gx - ((DX + DF) @ gamma)[:, :, 0]
            g_next = self._apply(x_next, rows)
            bad = (g_next - x_next).norm(dim=1) > f.norm(dim=1)
            if bool(bad.any()):
                self.rejected += int(bad.sum())
                x_next = torch.where(bad[:, None], gx, x_next)
                bad_rows = torch.nonzero(bad).flatten()
                g_next = g_next.clone()
                g_next[bad_rows] = self._apply(gx[bad_rows], rows[bad_rows])
                # a rejected row restarts its history: zero its differences
                keep = (~bad).to(x.dtype)[:, None]
                self.dX = [d * keep for d in self.dX]
                self.dF = [d * keep for d in self.dF]
        self.dX.append(x_next - x)
        self.dF.append((g_next - x_next) - f)
        if len(self.dX) > self.memory:
            self.dX.pop(0)
            self.dF.pop(0)
        return x_next, g_next

    def select(self, keep: torch.Tensor) -> None:
        """Keep the history of the rows ``keep`` (a bool mask) only, when the active rows shrink."""
        self.dX = [d[keep] for d in self.dX]
        self.dF = [d[keep] for d in self.dF]
