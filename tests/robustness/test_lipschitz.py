"""The certified l-infinity Lipschitz bound: never exceeded on random and FGSM pairs, closed forms, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from idl_ray.errors import ConfigError, ConfigTypeError, NotFittedError, ShapeError, WellPosednessError
from idl_ray.implicit.model import ImplicitModel
from idl_ray.implicit.projection import project_onto_kappa_ball
from idl_ray.robustness import lipschitz_bound, well_posedness_constant
from idl_ray.sim import SIM

ACTIVATIONS = ["relu", "leaky_relu", "tanh", "sigmoid", "softplus", "identity"]
TIGHT = {"tol": 1e-13, "max_iter": 2000, "backward_tol": 1e-13}


def random_model(activation: str, bias: bool, *, n=12, p=5, q=3, norm=0.9, seed=0) -> ImplicitModel:
    g = torch.Generator().manual_seed(seed)
    A = project_onto_kappa_ball(torch.randn(n, n, generator=g, dtype=torch.float64), norm)
    B = torch.randn(n, p + int(bias), generator=g, dtype=torch.float64)
    C = torch.randn(q, n, generator=g, dtype=torch.float64)
    D = torch.randn(q, p + int(bias), generator=g, dtype=torch.float64)
    return ImplicitModel.from_weights(A, B, C, D, activation=activation, kappa=0.95, bias=bias, **TIGHT)


def ratios(model: nn.Module, U: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return (model(U) - model(V)).abs().amax(dim=1) / (U - V).abs().amax(dim=1)


def fgsm_pairs(model: nn.Module, U: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """For every sample and output j, U + eps sign(d y_j / dU): the step that most increases y_j to first order."""
    starts, moved = [], []
    q = model(U[:1]).shape[1]
    for j in range(q):
        u = U.clone().requires_grad_()
        (grad,) = torch.autograd.grad(model(u)[:, j].sum(), u)
        starts.append(U)
        moved.append(U + eps * grad.sign())
    return torch.cat(starts), torch.cat(moved)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_bound_holds_on_random_and_fgsm_pairs(activation: str, bias: bool) -> None:
    model = random_model(activation, bias)
    L = lipschitz_bound(model)
    L_elem = lipschitz_bound(model, method="elementwise")
    assert 0 < L_elem <= L * (1 + 1e-12)
    g = torch.Generator().manual_seed(1)
    U = torch.randn(400, 5, generator=g, dtype=torch.float64)
    for scale in (1e-3, 0.1, 3.0):
        V = U + scale * (2 * torch.rand(U.shape, generator=g, dtype=torch.float64) - 1)
        assert float(ratios(model, U, V).max()) <= L_elem * (1 + 1e-9)
    for eps in (1e-4, 0.05, 0.5):
        S, T = fgsm_pairs(model, U[:100], eps)
        r = ratios(model, S, T)
        assert float(r.max()) <= L_elem * (1 + 1e-9)
        assert float(r.max()) > 0  # the pairs move the output


def test_bound_is_attained_by_a_monotone_linear_model() -> None:
    """Identity activation, nonnegative weights: Y = (C (I - A)^{-1} B + D) U, whose l-inf Lipschitz constant is
    the max row sum; the elementwise bound equals it and an FGSM step reaches it."""
    g = torch.Generator().manual_seed(3)
    A = project_onto_kappa_ball(torch.rand(6, 6, generator=g, dtype=torch.float64), 0.8)
    B, C, D = (torch.rand(*s, generator=g, dtype=torch.float64) for s in ((6, 4), (2, 6), (2, 4)))
    model = ImplicitModel.from_weights(A, B, C, D, activation="identity", kappa=0.9, **TIGHT)
    exact = float((C @ torch.linalg.solve(torch.eye(6, dtype=torch.float64) - A, B) + D).sum(dim=1).max())
    assert lipschitz_bound(model, method="elementwise") == pytest.approx(exact, rel=1e-12)
    assert lipschitz_bound(model) > exact  # the norm bound is looser here
    U = torch.randn(5, 4, generator=g, dtype=torch.float64)
    S, T = fgsm_pairs(model, U, 0.1)
    assert float(ratios(model, S, T).max()) == pytest.approx(exact, rel=1e-9)


def test_closed_form_on_a_tiny_model() -> None:
    A = torch.tensor([[0.2, -0.3], [0.1, 0.4]], dtype=torch.float64)  # ||A||_inf = 0.5, mu_inf = 0.5
    B = torch.tensor([[1.0, -2.0, 5.0], [0.5, 0.5, -7.0]], dtype=torch.float64)  # last column: bias
    C = torch.tensor([[1.0, -1.0]], dtype=torch.float64)
    D = torch.tensor([[0.25, 0.5, 9.0]], dtype=torch.float64)
    model = ImplicitModel.from_weights(A, B, C, D, kappa=0.9, bias=True)
    # without the bias column: ||B||_inf = 3, ||C||_inf = 2, ||D||_inf = 0.75, k = 0.5
    assert lipschitz_bound(model) == pytest.approx(0.75 + 2 * 3 / 0.5)
    assert lipschitz_bound(model, bias=False) == pytest.approx(9.75 + 2 * 8 / 0.5)
    assert lipschitz_bound({"A": A, "B": B, "C": C, "D": D}, bias=True) == pytest.approx(12.75)
    # elementwise: M = [[0.8, -0.3], [-0.1, 0.6]], |B| 1 = (3, 1), w = M^{-1} (3, 1)
    w1, w2 = (0.6 * 3 + 0.3 * 1) / 0.45, (0.1 * 3 + 0.8 * 1) / 0.45
    assert lipschitz_bound(model, method="elementwise") == pytest.approx(w1 + w2 + 0.75)
    # mu_inf differs from ||A||_inf with a negative diagonal: mu = max(-0.5 + 0.3, 0.1 + 0.4) = 0.5, here 0.3
    A2 = torch.tensor([[-0.9, 0.3], [0.1, 0.2]], dtype=torch.float64)
    assert well_posedness_constant(A2, "inf_norm") == pytest.approx(1.2)
    assert well_posedness_constant(A2, "mu_inf") == pytest.approx(0.3)
    assert well_posedness_constant(-0.5 * torch.eye(3), "mu_inf") == 0.0
    weights = {"A": A2, "B": B[:, :2], "C": C, "D": D[:, :2]}
    assert lipschitz_bound(weights, condition="mu_inf") == pytest.approx(0.75 + 2 * 3 / 0.7)
    with pytest.raises(WellPosednessError, match=r"inf_norm constant of A is 1\.2"):
        lipschitz_bound(weights)


def test_mu_inf_bound_holds_where_the_inf_norm_exceeds_one() -> None:
    """A with a large negative diagonal: ||A||_inf >= 1 but mu_inf(A) < 1; the mu_inf bound still holds."""
    g = torch.Generator().manual_seed(4)
    n, p = 8, 3
    off = project_onto_kappa_ball(torch.randn(n, n, generator=g, dtype=torch.float64), 0.6)
    off.fill_diagonal_(0.0)
    A = off - 0.8 * torch.eye(n, dtype=torch.float64)
    B, C, D = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((n, p), (2, n), (2, p)))
    assert well_posedness_constant(A) >= 1.0 > well_posedness_constant(A, "mu_inf")
    weights = {"A": A, "B": B, "C": C, "D": D}
    L = lipschitz_bound(weights, condition="mu_inf")
    L_elem = lipschitz_bound(weights, condition="mu_inf", method="elementwise")
    assert L_elem <= L

    def forward(U: torch.Tensor) -> torch.Tensor:
        # damped Picard, X <- (1 - t) X + t relu(A X + B U): its fixed points are the model's, and with
        # t = 1/2 the map is a contraction in l-inf for these weights
        X = torch.zeros(U.shape[0], n, dtype=torch.float64)
        for _ in range(3000):
            X = 0.5 * X + 0.5 * torch.relu(X @ A.t() + U @ B.t())
        assert float((X - torch.relu(X @ A.t() + U @ B.t())).abs().max()) < 1e-12
        return X @ C.t() + U @ D.t()

    U = torch.randn(300, p, generator=g, dtype=torch.float64)
    V = U + 0.3 * torch.randn(U.shape, generator=g, dtype=torch.float64)
    r = (forward(U) - forward(V)).abs().amax(dim=1) / (U - V).abs().amax(dim=1)
    assert float(r.max()) <= L_elem * (1 + 1e-9)


def test_elementwise_bound_is_invariant_under_state_rescaling() -> None:
    """ReLU: (S A S^-1, S B, C S^-1, D) is the same map; the norm bound moves, the elementwise one does not."""
    model = random_model("relu", True, norm=0.6, seed=5)
    s = torch.linspace(0.8, 1.2, 12, dtype=torch.float64)  # ||S A S^-1||_inf <= 1.5 * 0.6
    scaled = {
        "A": s[:, None] * model.A.detach() / s[None, :],
        "B": s[:, None] * model.B.detach(),
        "C": model.C.detach() / s[None, :],
        "D": model.D.detach(),
    }
    other = ImplicitModel.from_weights(**scaled, activation="relu", kappa=0.999, bias=True, **TIGHT)
    U = torch.randn(50, 5, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(other(U), model(U), rtol=1e-9, atol=1e-9)
    assert lipschitz_bound(other, method="elementwise") == pytest.approx(
        lipschitz_bound(model, method="elementwise"), rel=1e-10
    )
    assert abs(lipschitz_bound(other) - lipschitz_bound(model)) > 1e-3 * lipschitz_bound(model)


@pytest.fixture(scope="module")
def small_sim() -> tuple[nn.Module, SIM, torch.Tensor]:
    torch.manual_seed(0)
    teacher = nn.Sequential(
        nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 3)
    ).double()
    X = torch.randn(400, 6, dtype=torch.float64)
    sim = SIM(kappa=0.95, lam=1e-4, dtype="float64").fit(teacher.requires_grad_(False), X)
    return teacher, sim, X


def test_bound_holds_for_a_fitted_sim(small_sim) -> None:
    _, sim, X = small_sim
    module = sim.to_module(tol=1e-12, max_iter=3000, backward_tol=1e-12)
    L = lipschitz_bound(sim)
    assert L == pytest.approx(lipschitz_bound(module))
    assert L == pytest.approx(lipschitz_bound(sim.weights, bias=True))
    assert lipschitz_bound(sim, method="elementwise") <= L
    g = torch.Generator().manual_seed(7)
    V = X + 0.2 * torch.randn(X.shape, generator=g, dtype=torch.float64)
    assert float(ratios(module, X, V).max()) <= L * (1 + 1e-9)
    S, T = fgsm_pairs(module, X[:100], 0.05)
    assert float(ratios(module, S, T).max()) <= L * (1 + 1e-9)


def test_teacher_bound_is_the_product_of_absolute_weights(small_sim) -> None:
    """A feed-forward teacher as an implicit model (||A*||_inf may exceed 1): the elementwise bound is
    || |W3| |W2| |W1| ||_inf (bias columns left out) and holds on the teacher itself."""
    teacher, sim, X = small_sim
    W1, W2, W3 = (m.weight.detach() for m in teacher if isinstance(m, nn.Linear))
    expected = float((W3.abs() @ W2.abs() @ W1.abs()).sum(dim=1).max())
    L = lipschitz_bound(sim.structure_, method="elementwise")
    assert L == pytest.approx(expected, rel=1e-10)
    g = torch.Generator().manual_seed(8)
    V = X + 0.3 * torch.randn(X.shape, generator=g, dtype=torch.float64)
    assert float(ratios(teacher, X, V).max()) <= L * (1 + 1e-9)
    S, T = fgsm_pairs(teacher, X[:100], 0.05)
    assert float(ratios(teacher, S, T).max()) <= L * (1 + 1e-9)
    # the SIM reproduces the teacher closely: its bound is of the same order
    assert lipschitz_bound(sim, method="elementwise") < 10 * L


def test_bad_input_raises_clear_errors(small_sim) -> None:
    with pytest.raises(ConfigTypeError, match="fitted SIM, an ImplicitModel or a dict"):
        lipschitz_bound(nn.Linear(3, 2))
    with pytest.raises(ConfigTypeError, match="'model' argument"):
        lipschitz_bound("weights.pt")
    with pytest.raises(NotFittedError, match="not fitted"):
        lipschitz_bound(SIM())
    w = {"A": torch.zeros(2, 2), "B": torch.ones(2, 3), "C": torch.ones(1, 2), "D": torch.ones(1, 3)}
    with pytest.raises(ConfigError, match=r"missing \['D'\]"):
        lipschitz_bound({k: v for k, v in w.items() if k != "D"})
    with pytest.raises(ShapeError, match="inconsistent weight shapes"):
        lipschitz_bound(w | {"C": torch.ones(1, 3)})
    with pytest.raises(ConfigTypeError, match="'B' entry"):
        lipschitz_bound(w | {"B": torch.ones(2)})
    with pytest.raises(ConfigError, match="NaN or Inf"):
        lipschitz_bound(w | {"B": torch.full((2, 3), float("nan"))})
    with pytest.raises(ConfigError, match="'condition' parameter"):
        lipschitz_bound(w, condition="spectral")
    with pytest.raises(ConfigError, match="'method' parameter"):
        lipschitz_bound(w, method="exact")
    with pytest.raises(ConfigTypeError, match="'bias' parameter"):
        lipschitz_bound(w, bias=1)
    with pytest.raises(WellPosednessError, match=">= 1"):
        lipschitz_bound(w | {"A": torch.tensor([[0.6, 0.4], [0.0, 0.1]])})
    # triangular with a_ii < 1: well-posed, and the elementwise bound covers it
    assert lipschitz_bound(w | {"A": torch.tensor([[0.6, 0.4], [0.0, 0.1]])}, method="elementwise") > 0
    for A in (torch.tensor([[0.5, 0.8], [0.8, 0.5]]), torch.tensor([[1.0, 0.0], [0.0, 0.0]])):
        with pytest.raises(WellPosednessError, match="not a nonsingular M-matrix"):
            lipschitz_bound(w | {"A": A}, method="elementwise")
    # a stored A outside the bound (after an optimiser step, before the next forward) is refused too
    model = random_model("tanh", False)
    with torch.no_grad():
        model.A.mul_(2.0)
    with pytest.raises(WellPosednessError):
        lipschitz_bound(model)


def test_models_report_their_bound(small_sim, tmp_path) -> None:
    _, sim, _ = small_sim
    assert sim.lipschitz_bound() == lipschitz_bound(sim)
    assert sim.lipschitz_bound(method="elementwise") == lipschitz_bound(sim, method="elementwise")
    summary = sim.summary()
    assert summary.lipschitz_bound == lipschitz_bound(sim)
    assert summary.lipschitz_bound_elementwise == lipschitz_bound(sim, method="elementwise")
    assert f"l-inf Lipschitz bound: {summary.lipschitz_bound:.4g}" in str(summary)
    assert summary.to_dict()["lipschitz_bound"] == summary.lipschitz_bound
    sim.save(tmp_path / "model")
    assert SIM.load(tmp_path / "model").summary().lipschitz_bound == pytest.approx(summary.lipschitz_bound)
    with pytest.raises(NotFittedError):
        SIM().lipschitz_bound()
    # ImplicitModel: the method brings a stored A outside the bound back first, as a forward would
    model = random_model("tanh", False)
    before = model.lipschitz_bound()
    with torch.no_grad():
        model.A.mul_(2.0)
    after = model.lipschitz_bound()
    assert model.well_posedness_margin() >= 0
    assert after == lipschitz_bound(model) and after != before
    assert model.lipschitz_bound(method="elementwise") <= after


def test_the_models_own_condition_is_used() -> None:
    """A model with ``well_posedness = "mu_inf"`` gets k = max(0, mu_inf(A)); an explicit condition wins."""
    A = torch.tensor([[-0.5, 0.3], [0.2, -0.4]], dtype=torch.float64)  # ||A||_inf = 0.8, mu_inf = 0 (clamped)
    B, C, D = torch.eye(2, dtype=torch.float64), torch.eye(2, dtype=torch.float64), torch.zeros(2, 2)
    model = ImplicitModel.from_weights(A, B, C, D.double(), kappa=0.9)
    assert lipschitz_bound(model) == pytest.approx(1 / (1 - 0.8))
    model.well_posedness = "mu_inf"
    assert lipschitz_bound(model) == pytest.approx(1.0)
    assert lipschitz_bound(model, condition="inf_norm") == pytest.approx(1 / (1 - 0.8))
