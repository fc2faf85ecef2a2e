"""ImplicitRNN: learns a noisy sine, cell mode, warm starts, bad input."""

from __future__ import annotations

import math

import pytest
import torch

from idl_ray import ImplicitRNN
from idl_ray.errors import ConfigError, ShapeError
from idl_ray.implicit.rnn import ImplicitRNNCell


def noisy_sine(n, steps, generator):
    phase = torch.rand(n, 1, generator=generator) * 2 * math.pi
    freq = 0.5 + torch.rand(n, 1, generator=generator) * 0.5
    t = torch.arange(steps + 1, dtype=torch.float32)
    clean = torch.sin(freq * t * 0.5 + phase)
    noisy = clean + 0.05 * torch.randn(clean.shape, generator=generator)
    return noisy[:, :steps, None], clean[:, steps, None]  # predict the next clean value


def test_rnn_learns_noisy_sine_far_better_than_a_constant():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    Xtr, ytr = noisy_sine(256, 16, g)
    Xte, yte = noisy_sine(256, 16, g)
    model = ImplicitRNN(1, 1, implicit_hidden_dim=24, hidden_dim=12, tol=1e-4, activation="tanh")
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _step in range(120):
        idx = torch.randint(0, 256, (64,), generator=g)
        opt.zero_grad()
        loss = ((model(Xtr[idx]) - ytr[idx]) ** 2).mean()
        loss.backward()
        opt.step()
    with torch.no_grad():
        mse = float(((model(Xte) - yte) ** 2).mean())
    constant = float(((ytr.mean() - yte) ** 2).mean())
    print(f"noisy sine: test MSE {mse:.4f}, constant predictor {constant:.4f}")
    assert mse < 0.1 * constant, (mse, constant)


def test_cell_returns_all_hidden_states_and_sequence_mode():
    model = ImplicitRNN(2, 3, implicit_hidden_dim=10, hidden_dim=5)
    x = torch.randn(4, 7, 2)
    hidden, h_last = model.forward_sequence(x)
    assert hidden.shape == (4, 7, 5) and torch.equal(hidden[:, -1], h_last)
    assert torch.allclose(model(x), model.linear(h_last))
    seq = ImplicitRNN(2, 3, implicit_hidden_dim=10, hidden_dim=5, return_sequences=True)
    seq.load_state_dict(model.state_dict())
    assert torch.allclose(seq(x)[:, -1], model(x))
    assert seq(x).shape == (4, 7, 3)


def test_warm_start_reduces_iterations_on_a_slowly_varying_input():
    torch.manual_seed(0)
    cell = ImplicitRNNCell(1, 20, 4, tol=1e-8, kappa=0.95, dtype=torch.float64)
    x = torch.ones(3, 6, 1, dtype=torch.float64)  # constant input: the state barely moves after step 1
    cell(x)
    work_warm = cell.implicit.telemetry.forward_work
    cold = ImplicitRNNCell(1, 20, 4, tol=1e-8, kappa=0.95, dtype=torch.float64)
    cold.load_state_dict(cell.state_dict())
    h = torch.zeros(3, 4, dtype=torch.float64)
    for t in range(6):  # the same steps without warm start
        h = cold.implicit(torch.cat([x[:, t], h], 1))
    assert work_warm < cold.implicit.telemetry.forward_work


def test_rnn_options_reach_the_implicit_model_and_unknown_ones_raise():
    model = ImplicitRNN(2, 1, 8, 4, kappa=0.5, fixed_point="anderson", bias=True)
    assert model.cell.implicit.kappa == 0.5 and model.cell.implicit.forward_options.method == "anderson"
    assert model.cell.implicit.B.shape == (8, 2 + 4 + 1)
    with pytest.raises(ConfigError, match="Unknown keyword"):
        ImplicitRNN(2, 1, 8, 4, dropout=0.1)
    with pytest.raises(ConfigError, match="'hidden_dim'"):
        ImplicitRNN(2, 1, 8, 0)


def test_rnn_bad_inputs():
    model = ImplicitRNN(2, 1, 8, 4)
    with pytest.raises(ShapeError, match=r"\(batch, time, 2\)"):
        model(torch.randn(3, 5))
    with pytest.raises(ShapeError):
        model(torch.randn(3, 5, 3))
    bad = torch.randn(3, 5, 2)
    bad[0, 0, 0] = float("nan")
    with pytest.raises(ConfigError, match="NaN"):
        model(bad)


@pytest.mark.parametrize("bias", [False, True])
def test_rnn_matches_a_hand_written_recurrence_and_its_gradients(bias):
    """h_t = C X_t + D u_t with X_t = relu(A X_t + B u_t), u_t = [x_t, h_{t-1}] (+ 1), y = W h_T + b,
    written out with plain Picard loops (autograd through the unrolled iterations for the gradients)."""
    torch.manual_seed(3)
    rnn = ImplicitRNN(
        2, 3, implicit_hidden_dim=6, hidden_dim=4, kappa=0.7, bias=bias, tol=1e-12, dtype=torch.float64
    )
    x = torch.randn(5, 7, 2, dtype=torch.float64, requires_grad=True)
    y = rnn(x)
    (y**2).sum().backward()
    grad_x, grad_B = x.grad.clone(), rnn.cell.implicit.B.grad.clone()

    model = rnn.cell.implicit
    A, C, D = (t.detach().clone() for t in (model.A, model.C, model.D))
    B = model.B.detach().clone().requires_grad_(True)
    assert float(A.abs().sum(dim=1).max()) <= 0.7
    x_ref = x.detach().clone().requires_grad_(True)
    h = torch.zeros(5, 4, dtype=torch.float64)
    for t in range(7):
        u = torch.cat([x_ref[:, t], h], dim=1)
        if bias:
            u = torch.cat([u, torch.ones(5, 1, dtype=torch.float64)], dim=1)
        X = torch.zeros(5, 6, dtype=torch.float64)
        for _ in range(200):  # 0.7^200: converged far below float64 rounding
            X = torch.relu(X @ A.T + u @ B.T)
        h = X @ C.T + u @ D.T
    y_ref = h @ rnn.linear.weight.detach().T + rnn.linear.bias.detach()
    torch.testing.assert_close(y, y_ref, atol=1e-10, rtol=1e-10)
    (y_ref**2).sum().backward()
    torch.testing.assert_close(grad_x, x_ref.grad, atol=1e-8, rtol=1e-7)
    torch.testing.assert_close(grad_B, B.grad, atol=1e-8, rtol=1e-7)
