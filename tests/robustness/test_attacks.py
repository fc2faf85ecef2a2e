"""FGSM / PGD through implicit models: equal to attacks through an unrolled loop, PGD vs FGSM, accuracy curves."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from idl_ray.errors import ConfigError, ConfigTypeError, NotFittedError, ShapeError
from idl_ray.implicit.model import ImplicitModel
from idl_ray.implicit.projection import project_onto_kappa_ball
from idl_ray.robustness import attack_accuracy, fgsm, lipschitz_bound, pgd
from idl_ray.sim import SIM

TIGHT = {"tol": 1e-13, "max_iter": 3000, "backward_tol": 1e-13}


class Unrolled(nn.Module):
    """The same model as an ImplicitModel, by K Picard iterations under autograd (no implicit backward)."""

    def __init__(self, model: ImplicitModel, iterations: int) -> None:
        super().__init__()
        self.model, self.iterations = model, iterations

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        m = self.model
        U = torch.cat([u, u.new_ones(u.shape[0], 1)], dim=1) if m.bias else u
        X = U.new_zeros(U.shape[0], m.hidden_dim)
        for _ in range(self.iterations):
            X = m.activation(X @ m.A.t() + U @ m.B.t())
        return X @ m.C.t() + U @ m.D.t()


def random_model(activation: str, *, n=10, p=6, q=4, seed=0) -> ImplicitModel:
    g = torch.Generator().manual_seed(seed)
    A = project_onto_kappa_ball(torch.randn(n, n, generator=g, dtype=torch.float64), 0.9)
    B = torch.randn(n, p + 1, generator=g, dtype=torch.float64)
    C = torch.randn(q, n, generator=g, dtype=torch.float64)
    D = torch.randn(q, p + 1, generator=g, dtype=torch.float64)
    return ImplicitModel.from_weights(A, B, C, D, activation=activation, kappa=0.95, bias=True, **TIGHT)


def input_grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    x = x.clone().requires_grad_()
    nn.functional.cross_entropy(model(x), y, reduction="sum").backward()
    return x.grad


@pytest.mark.parametrize("activation", ["relu", "tanh", "sigmoid"])
def test_fgsm_through_the_implicit_backward_equals_fgsm_through_an_unrolled_loop(activation: str) -> None:
    model = random_model(activation)
    unrolled = Unrolled(model, iterations=500)  # 0.9^500 ~ 1e-23: converged in float64
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (64,), generator=g)
    grad_implicit, grad_unrolled = input_grad(model, x, y), input_grad(unrolled, x, y)
    torch.testing.assert_close(grad_implicit, grad_unrolled, rtol=1e-9, atol=1e-11)
    sure = grad_unrolled.abs() > 1e-9  # where the sign is unambiguous at this accuracy
    assert float(sure.double().mean()) > 0.95
    for eps in (0.01, 0.3):
        adv = fgsm(model, x, y, eps)
        torch.testing.assert_close(adv[sure], fgsm(unrolled, x, y, eps)[sure], rtol=0, atol=0)
        torch.testing.assert_close(adv[sure], (x + eps * grad_unrolled.sign())[sure], rtol=0, atol=1e-15)


def test_fgsm_on_a_fitted_sim_attacks_its_module() -> None:
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3)).double().requires_grad_(False)
    x = torch.randn(200, 5, dtype=torch.float64)
    sim = SIM(kappa=0.95, lam=1e-4, dtype="float64").fit(teacher, x)
    y = teacher(x).argmax(dim=1)
    module = sim.to_module()
    torch.testing.assert_close(fgsm(sim, x, y, 0.05), fgsm(module, x, y, 0.05))
    grad = input_grad(Unrolled(module, 600), x, y)
    sure = grad.abs() > 1e-9
    assert float(sure.double().mean()) > 0.9
    expected = x + 0.05 * grad.sign()
    torch.testing.assert_close(fgsm(module, x, y, 0.05)[sure], expected[sure], rtol=0, atol=1e-15)
    assert lipschitz_bound(sim) > 0
    # float32 inputs are cast to the module's dtype
    assert fgsm(sim, x.float(), y, 0.05).dtype == torch.float64


def test_pgd_with_one_full_step_and_no_random_start_is_fgsm() -> None:
    model = random_model("relu", seed=2)
    x = torch.rand(50, 6, dtype=torch.float64)
    y = torch.randint(0, 4, (50,), generator=torch.Generator().manual_seed(2))
    for clip in (None, (0.0, 1.0)):
        one = pgd(model, x, y, 0.1, steps=1, step_size=0.1, random_start=False, clip=clip)
        torch.testing.assert_close(one, fgsm(model, x, y, 0.1, clip=clip), rtol=0, atol=0)


def test_pgd_stays_in_the_ball_and_the_box_and_beats_fgsm() -> None:
    model = random_model("tanh", seed=3)
    g = torch.Generator().manual_seed(3)
    x = torch.rand(100, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (100,), generator=g)
    adv = pgd(model, x, y, 0.2, steps=20, clip=(0.0, 1.0), generator=torch.Generator().manual_seed(0))
    assert float((adv - x).abs().max()) <= 0.2 + 1e-15
    assert float(adv.min()) >= 0.0 and float(adv.max()) <= 1.0

    def loss(z: torch.Tensor) -> float:
        with torch.no_grad():
            return float(nn.functional.cross_entropy(model(z), y, reduction="sum"))

    assert loss(x) < loss(fgsm(model, x, y, 0.2, clip=(0.0, 1.0))) <= loss(adv)
    assert all(p.grad is None for p in model.parameters())  # only the input is differentiated
    # the same generator seed gives the same attack
    again = pgd(model, x, y, 0.2, steps=20, clip=(0.0, 1.0), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(adv, again, rtol=0, atol=0)


@pytest.fixture(scope="module")
def trained() -> tuple[ImplicitModel, torch.Tensor, torch.Tensor]:
    """An ImplicitModel trained on sklearn's 8x8 digits (inputs in [0, 1])."""
    from sklearn.datasets import load_digits

    data = load_digits()
    X = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    torch.manual_seed(0)
    model = ImplicitModel(64, 10, 40, kappa=0.9, bias=True)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(8):
        for i in range(0, 1400, 100):
            opt.zero_grad()
            nn.functional.cross_entropy(model(X[i : i + 100]), y[i : i + 100]).backward()
            opt.step()
    return model.eval(), X[1400:], y[1400:]


def test_attacked_accuracy_falls_with_eps_and_eps_zero_is_clean(trained) -> None:
    model, X, y = trained
    with torch.no_grad():
        clean = float((model(X).argmax(dim=1) == y).double().mean())
    assert clean > 0.85
    assert attack_accuracy(model, X, y, 0.0) == clean
    assert attack_accuracy(model, X, y, 0.0, method="pgd", steps=3) == clean
    radii = [0.0, 0.02, 0.05, 0.1, 0.2]
    opts = {"steps": 10, "clip": (0.0, 1.0), "random_start": False}
    single = [attack_accuracy(model, X, y, e, method="pgd", batch_size=150, **opts) for e in radii]
    assert all(b <= a for a, b in itertools.pairwise(single)), single
    assert single[-1] < clean - 0.2  # the attack does something
    together = attack_accuracy(model, X, y, radii[::-1], method="pgd", batch_size=150, **opts)
    assert together[::-1] == single  # same attacks; already monotone, so the running minimum changes nothing
    fg = attack_accuracy(model, X, y, radii, method="fgsm", clip=(0.0, 1.0))
    assert all(p <= f for p, f in zip(single[1:], fg[1:], strict=False)), (single, fg)


def test_attacks_reject_bad_input(trained) -> None:
    model, X, y = trained
    for eps in (-0.1, float("nan"), float("inf"), "0.1", True):
        with pytest.raises(ConfigError, match="'eps' parameter"):
            fgsm(model, X, y, eps)
    with pytest.raises(ConfigError, match="'eps' parameter of attack_accuracy"):
        attack_accuracy(model, X, y, [0.1, -0.1])
    with pytest.raises(ConfigError, match="empty sequence"):
        attack_accuracy(model, X, y, [])
    with pytest.raises(ShapeError, match="same number of samples"):
        pgd(model, X, y[:-1], 0.1)
    with pytest.raises(ShapeError, match="empty"):
        attack_accuracy(model, X[:0], y[:0], 0.1)
    with pytest.raises(ShapeError, match="features"):
        fgsm(model, X[:, :10], y, 0.1)  # the model names the width it expects
    with pytest.raises(ConfigError, match="'x' argument of fgsm contains 2 NaN"):
        fgsm(model, torch.where(torch.arange(64) == 3, float("nan"), X[0]).expand(2, 64), y[:2], 0.1)
    with pytest.raises(ConfigError, match="'clip' parameter"):
        fgsm(model, X, y, 0.1, clip=(1.0, 0.0))
    with pytest.raises(ConfigError, match="'method' parameter"):
        attack_accuracy(model, X, y, 0.1, method="cw")
    with pytest.raises(ConfigError, match=r"Unknown option\(s\) \['steps'\]"):
        attack_accuracy(model, X, y, 0.1, method="fgsm", steps=3)
    with pytest.raises(ConfigError, match="integer class labels"):
        attack_accuracy(model, X, y.double(), 0.1)
    with pytest.raises(ConfigError, match="'step_size' parameter"):
        pgd(model, X, y, 0.1, step_size=-1.0)
    with pytest.raises(ConfigTypeError, match=r"nn\.Module"):
        fgsm(lambda z: z, X, y, 0.1)
    with pytest.raises(NotFittedError, match="not fitted"):
        fgsm(SIM(), X, y, 0.1)
    with pytest.raises(ConfigTypeError, match="'x' argument"):
        fgsm(model, "x.npy", y, 0.1)
