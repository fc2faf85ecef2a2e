r"""``ImplicitRNN``: an implicit cell applied over time, warm-started from step to step."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from idl_ray._validation import check_finite, check_positive_int
from idl_ray.errors import ConfigTypeError, ShapeError
from idl_ray.implicit.model import ImplicitModel

__all__ = ["ImplicitRNN", "ImplicitRNNCell"]


class ImplicitRNNCell(nn.Module):
    r"""Recurrent cell whose update is an implicit model: ``h_t = ImplicitModel([x_t, h_{t-1}])``.

    The implicit model has input ``[x_t, h_{t-1}]`` (``input_dim + hidden_dim`` features), state size
    ``implicit_hidden_dim`` and output ``h_t`` (``hidden_dim``). Each step's fixed point is warm-started from
    the previous step's implicit state, which is usually close, so later steps need few iterations.

    Args:
        input_dim: features per time step ``p``.
        implicit_hidden_dim: state size ``n`` of the implicit model.
        hidden_dim: recurrent state size ``h``.
        **implicit_kwargs: keywords of :class:`ImplicitModel` (``activation``, ``kappa``, ``bias``,
            ``fixed_point``, ``tol``, ...); unknown names raise.

    Shape:
        - Input: ``(batch, time, p)``; optional ``h0``: ``(batch, h)``.
        - Output: ``(outputs, h_last)`` with ``outputs`` ``(batch, time, h)`` and ``h_last`` ``(batch, h)``.

    Attributes:
        implicit: the :class:`ImplicitModel` applied at every step.
    """

    def __init__(
        self, input_dim: int, implicit_hidden_dim: int, hidden_dim: int, **implicit_kwargs: Any
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        self.input_dim = check_positive_int(input_dim, "input_dim", owner)
        self.hidden_dim = check_positive_int(hidden_dim, "hidden_dim", owner)
        check_positive_int(implicit_hidden_dim, "implicit_hidden_dim", owner)
        self.implicit = ImplicitModel(
            self.input_dim + self.hidden_dim, self.hidden_dim, implicit_hidden_dim, **implicit_kwargs
        )

    def forward(
        self, input: torch.Tensor, h0: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        owner = type(self).__name__
        if not torch.is_tensor(input):
            raise ConfigTypeError(
                f"The 'input' argument of {owner} must be a tensor. Got {type(input).__name__}."
            )
        if input.dim() != 3 or input.shape[2] != self.input_dim:
            raise ShapeError(
                f"The 'input' argument of {owner} must have shape (batch, time, {self.input_dim}) "
                f"(batch first). Got {tuple(input.shape)}."
            )
        check_finite(input, "input", owner)
        batch, steps, _ = input.shape
        if h0 is None:
            h = input.new_zeros(batch, self.hidden_dim)
        else:
            if tuple(h0.shape) != (batch, self.hidden_dim):
                raise ShapeError(
                    f"The 'h0' argument of {owner} must have shape ({batch}, {self.hidden_dim}). Got {tuple(h0.shape)}."
                )
            h = h0
        state = None
        outputs = []
        for t in range(steps):
            h, state = self.implicit(torch.cat([input[:, t], h], dim=1), x0=state, return_state=True)
            state = state.detach()  # warm start only: the fixed point does not depend on it
            outputs.append(h)
        if not outputs:
            return input.new_zeros(batch, 0, self.hidden_dim), h
        return torch.stack(outputs, dim=1), h


class ImplicitRNN(nn.Module):
    r"""Implicit recurrent network: an :class:`ImplicitRNNCell` over time, then ``y = W h_T + b``.

    Args:
        input_dim: features per time step ``p``.
        output_dim: outputs ``q`` of the linear read-out.
        implicit_hidden_dim: state size ``n`` of the implicit model inside the cell.
        hidden_dim: recurrent state size ``h``.
        return_sequences: if True, :meth:`forward` reads out every step, ``(batch, time, q)``.
        **implicit_kwargs: keywords of :class:`ImplicitModel`; unknown names raise.

    Shape:
        - Input: ``(batch, time, p)``.
        - Output: ``(batch, q)`` (last step) or ``(batch, time, q)`` with ``return_sequences=True``.

    Attributes:
        cell: the :class:`ImplicitRNNCell`.
        linear: ``nn.Linear(hidden_dim, output_dim)`` read-out.

    Examples::

        >>> rnn = ImplicitRNN(1, 1, implicit_hidden_dim=20, hidden_dim=8)
        >>> rnn(torch.randn(4, 12, 1)).shape
        torch.Size([4, 1])
        >>> hidden, h_last = rnn.forward_sequence(torch.randn(4, 12, 1))
        >>> hidden.shape
        torch.Size([4, 12, 8])
    """

    def __init__(
        self,
        input_dim: int,
        output_dim: int,
        implicit_hidden_dim: int,
        hidden_dim: int,
        *,
        return_sequences: bool = False,
        **implicit_kwargs: Any,
    ) -> None:
        super().__init__()
        self.output_dim = check_positive_int(output_dim, "output_dim", type(self).__name__)
        if not isinstance(return_sequences, bool):
            raise ConfigTypeError(
                f"The 'return_sequences' parameter of ImplicitRNN must be a bool. Got {return_sequences!r}."
            )
        self.return_sequences = return_sequences
        self.cell = ImplicitRNNCell(input_dim, implicit_hidden_dim, hidden_dim, **implicit_kwargs)
        device = implicit_kwargs.get("device")
        dtype = implicit_kwargs.get("dtype")
        self.linear = nn.Linear(hidden_dim, output_dim, device=device, dtype=dtype)

    def forward_sequence(
        self, input: torch.Tensor, h0: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """All hidden states ``(batch, time, h)`` and the last one ``(batch, h)``."""
        return self.cell(input, h0)

    def forward(self, input: torch.Tensor, h0: torch.Tensor | None = None) -> torch.Tensor:
        hidden, h_last = self.cell(input, h0)
        return self.linear(hidden if self.return_sequences else h_last)

    def extra_repr(self) -> str:
        return f"return_sequences={self.return_sequences}"
