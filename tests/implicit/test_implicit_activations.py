"""Activations: names, user pairs (checked), torch modules, never in place."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from idl_ray.errors import ConfigError, ConfigTypeError, UnsupportedLayerError
from idl_ray.implicit.activations import ACTIVATIONS, Activation, activation_from_module, resolve_activation


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_named_activation_derivative_matches_autograd(name):
    act = resolve_activation(name)
    z = torch.linspace(-4, 4, 101, dtype=torch.float64).add(1e-3).requires_grad_()  # avoid the ReLU kink
    (grad,) = torch.autograd.grad(act.fn(z).sum(), z)
    assert torch.allclose(act.derivative(z.detach()), grad, atol=1e-12)
    assert float(act.derivative(z.detach()).min()) >= 0 and float(act.derivative(z.detach()).max()) <= 1


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_activations_do_not_modify_their_input(name):
    z = torch.randn(50)
    before = z.clone()
    act = resolve_activation(name)
    act.fn(z)
    act.derivative(z)
    assert torch.equal(z, before)


def test_leaky_relu_slope_and_bad_slope():
    act = resolve_activation("leaky_relu", negative_slope=0.2)
    assert act.negative_slope == 0.2
    assert torch.allclose(act.fn(torch.tensor([-1.0, 2.0])), torch.tensor([-0.2, 2.0]))
    with pytest.raises(ConfigError, match="negative_slope"):
        resolve_activation("leaky_relu", negative_slope=1.5)
    with pytest.raises(ConfigError, match="Unknown option"):
        resolve_activation("relu", negative_slope=0.1)


def test_unknown_name_lists_known_ones():
    with pytest.raises(ConfigError, match="relu") as info:
        resolve_activation("swish")
    assert "'swish'" in str(info.value) and "tanh" in str(info.value)


def test_user_pair_accepted_and_checked():
    act = resolve_activation((lambda z: 0.5 * torch.tanh(z), lambda z: 0.5 * (1 - torch.tanh(z) ** 2)))
    assert act.name == "custom"
    with pytest.raises(ConfigError, match="monotone"):
        resolve_activation((lambda z: -torch.tanh(z), lambda z: torch.zeros_like(z)))
    with pytest.raises(ConfigError, match="1-Lipschitz"):
        resolve_activation((lambda z: 2 * z, lambda z: torch.full_like(z, 2.0)))
    with pytest.raises(ConfigError, match="dphi <= 1"):
        resolve_activation((torch.tanh, lambda z: torch.full_like(z, 3.0)))
    with pytest.raises(ConfigError, match="failed"):
        resolve_activation((lambda z: z.not_a_method(), torch.ones_like))
    with pytest.raises(ConfigTypeError):
        resolve_activation(3.0)


@pytest.mark.parametrize(
    ("module", "name"),
    [
        (nn.ReLU(), "relu"),
        (nn.Tanh(), "tanh"),
        (nn.Sigmoid(), "sigmoid"),
        (nn.Softplus(), "softplus"),
        (nn.Identity(), "identity"),
        (F.relu, "relu"),
        (torch.relu, "relu"),
        (torch.tanh, "tanh"),
        (torch.sigmoid, "sigmoid"),
        (F.softplus, "softplus"),
    ],
)
def test_activation_from_module(module, name):
    act = activation_from_module(module)
    assert isinstance(act, Activation) and act.name == name
    z = torch.randn(20)
    assert torch.allclose(act.fn(z), module(z))


def test_activation_from_leaky_relu_module_keeps_slope():
    act = activation_from_module(nn.LeakyReLU(0.3))
    assert act.name == "leaky_relu" and act.negative_slope == pytest.approx(0.3)
    assert resolve_activation(nn.LeakyReLU(0.3)).negative_slope == pytest.approx(0.3)


@pytest.mark.parametrize("module", [nn.GELU(), nn.ELU(), nn.Softplus(beta=2.0), nn.Linear(2, 2), torch.exp])
def test_activation_from_module_rejects_unsupported(module):
    with pytest.raises(UnsupportedLayerError):
        activation_from_module(module)
