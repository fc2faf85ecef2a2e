"""ImplicitModel: well-posedness invariant, options per instance, module behaviour, bad input, digits."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
import torch.nn.functional as F

from idl_ray import ImplicitModel
from idl_ray.errors import ConfigError, ConfigTypeError, ConvergenceWarning, ShapeError, WellPosednessError
from idl_ray.implicit.projection import inf_norm


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"rank": 5},
        {"bias": True, "activation": "tanh"},
        {"constraint": "rescale"},
        {"constraint": "project"},
        {"constraint": "project", "rank": 5},
        {"constraint": "project", "bias": True, "activation": "tanh"},
    ],
)
def test_bound_holds_after_many_large_adam_steps(kwargs):
    kappa = 0.9
    model = ImplicitModel(8, 3, 20, kappa=kappa, tol=1e-4, **kwargs)
    opt = torch.optim.Adam(model.parameters(), lr=0.5)
    U, target = torch.randn(32, 8), torch.randn(32, 3)
    projected_before_forward = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for _ in range(60):
            opt.zero_grad()
            loss = ((model(U) - target) ** 2).mean()
            # the A used by this forward is model.A, inside the bound, exactly
            assert float(model.A.detach().abs().sum(1).max()) <= kappa
            loss.backward()
            opt.step()
            projected_before_forward += int(inf_norm(model.A.detach()) > kappa)
    if model.constraint == "rescale":  # bound by construction: the trained W itself left the ball
        assert inf_norm(model.W.detach()) > kappa and model.telemetry.projections == 0
        return
    assert projected_before_forward > 10  # the large steps did leave the ball: the projection was needed
    assert model.telemetry.projections >= projected_before_forward - 1
    model.project_()
    assert inf_norm(model.A.detach()) <= kappa and model.well_posedness_margin() >= 0


def test_dense_a_is_the_parameter_and_gets_the_exact_gradient():
    model = ImplicitModel(4, 2, 6, dtype=torch.float64)
    assert isinstance(model.A, torch.nn.Parameter)
    assert [n for n, _ in model.named_parameters()] == ["A", "B", "C", "D"]
    model(torch.randn(3, 4, dtype=torch.float64)).sum().backward()
    assert model.A.grad is not None and model.A.grad.abs().sum() > 0


def test_options_are_per_instance():
    a = ImplicitModel(4, 2, 6, tol=1e-3, max_iter=7, kappa=0.5, activation="tanh", fixed_point="anderson")
    b = ImplicitModel(4, 2, 6)
    assert (a.forward_options.tol, a.forward_options.max_iter, a.forward_options.method) == (
        1e-3,
        7,
        "anderson",
    )
    assert (b.forward_options.tol, b.forward_options.max_iter, b.forward_options.method) == (
        1e-5,
        300,
        "picard",
    )
    assert a.kappa == 0.5 and b.kappa == 0.99 and a.activation.name == "tanh" and b.activation.name == "relu"
    U = torch.randn(5, 4)
    a(U)
    b(U)
    assert a.last_forward_stats.method == "anderson" and b.last_forward_stats.method == "picard"
    assert a.telemetry is not b.telemetry and a.telemetry.forward_calls == b.telemetry.forward_calls == 1
    b(U)
    assert a.telemetry.forward_calls == 1 and b.telemetry.forward_calls == 2


def test_rescale_constraint_exposes_the_used_a():
    model = ImplicitModel(4, 2, 6, constraint="rescale", kappa=0.5, dtype=torch.float64)
    assert [n for n, _ in model.named_parameters()] == ["W", "B", "C", "D"]
    with torch.no_grad():
        model.W.mul_(50.0)
    A = model.A
    assert A.requires_grad and float(A.detach().abs().sum(1).max()) <= 0.5
    assert torch.allclose(A.detach(), model.W.detach() * 0.5 / inf_norm(model.W.detach()), rtol=1e-12)
    model(torch.randn(3, 4, dtype=torch.float64)).sum().backward()
    assert model.W.grad is not None and model.W.grad.abs().sum() > 0
    assert "constraint='rescale'" in repr(model)


@pytest.mark.parametrize("rank", [None, 3])
def test_shrink_constraint_scales_the_stored_a_uniformly(rank):
    model = ImplicitModel(4, 2, 6, constraint="shrink", rank=rank, kappa=0.5, dtype=torch.float64)
    names = ["A", "B", "C", "D"] if rank is None else ["L", "R", "B", "C", "D"]
    assert [n for n, _ in model.named_parameters()] == names
    with torch.no_grad():
        factor = model.A if rank is None else model.L
        factor.mul_(10.0)
        factor[0].mul_(5.0)  # row 0 of A is the largest
    before = model.A.detach().clone()
    assert inf_norm(before) > 0.5
    U = torch.randn(3, 4, dtype=torch.float64)
    model(U).sum().backward()
    used = model.A.detach()
    # one factor for the whole matrix, the largest row at the bound (less a few ulps), nothing else
    assert torch.allclose(used, before * (0.5 / inf_norm(before)), rtol=1e-12, atol=0)
    assert 0.5 * (1 - 1e-12) <= inf_norm(used) <= 0.5
    rows = used.abs().sum(1)
    assert rows[0] > 0.5 * (1 - 1e-12) and float(rows[1:].max()) < 0.5 * 0.9
    assert model.telemetry.projections == 1 and not model.project_()  # already inside: no-op
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    # the state_dict holds the A that the forward used
    sd = model.state_dict()
    if rank is None:
        assert torch.equal(sd["A"], used)
    else:
        assert torch.allclose(sd["L"] @ sd["R"].t(), used, rtol=0, atol=0)
    assert "constraint='shrink'" in repr(model)


def test_shrink_margin_is_a_few_ulps_in_float32():
    model = ImplicitModel(8, 2, 100, constraint="shrink", kappa=0.99)
    with torch.no_grad():
        model.A.mul_(10.0)
    model(torch.randn(4, 8))
    norm = inf_norm(model.A.detach())
    assert 0.99 * (1 - 3e-5) < norm <= 0.99  # (n + 2) eps = 1.2e-5 relative below kappa, not 1e-4


def test_state_dict_round_trip_and_dtype_conversion():
    model = ImplicitModel(6, 3, 10, bias=True, rank=4, no_D=True, activation="leaky_relu", negative_slope=0.1)
    U = torch.randn(7, 6)
    y = model(U)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    clone = ImplicitModel(6, 3, 10, bias=True, rank=4, no_D=True, activation="leaky_relu", negative_slope=0.1)
    clone.load_state_dict(torch.load(buffer))
    assert set(clone.state_dict()) == {"L", "R", "B", "C", "D"}
    assert torch.equal(clone(U), y)

    dense = ImplicitModel(6, 3, 10, no_D=True)
    assert set(dense.state_dict()) == {"A", "B", "C", "D"}
    assert [n for n, _ in dense.named_parameters()] == ["A", "B", "C"]  # no_D: D is a buffer, not trained
    assert [n for n, _ in dense.named_buffers()] == ["D"] and dense.D.shape == (3, 6)
    assert not dense.D.any()
    d64 = copy.deepcopy(dense).to(torch.float64)
    assert all(p.dtype == torch.float64 for p in d64.parameters()) and d64.D.dtype == torch.float64
    y64 = d64(U.double())
    assert y64.dtype == torch.float64
    assert torch.allclose(y64.float(), dense(U), atol=1e-4)


def test_telemetry_counts_forward_and_backward():
    model = ImplicitModel(4, 2, 6)
    model(torch.randn(5, 4)).sum().backward()
    model(torch.randn(5, 4))
    t = model.telemetry
    assert t.forward_calls == 2 and t.backward_calls == 1
    assert t.forward_iterations >= 2 and t.forward_work >= t.forward_iterations
    assert model.last_backward_stats.num_samples == 5
    model.reset_telemetry()
    assert model.telemetry.forward_calls == 0 and model.last_forward_stats is None


def test_inputs_are_flattened_from_dim_one_and_warm_start_works():
    model = ImplicitModel(12, 2, 8, dtype=torch.float64, tol=1e-12)
    U = torch.randn(5, 3, 4, dtype=torch.float64)
    y, X = model(U, return_state=True)
    assert y.shape == (5, 2) and X.shape == (5, 8)
    assert torch.allclose(model(U.reshape(5, 12)), y)
    y2 = model(U, x0=X)
    assert model.last_forward_stats.iterations == 1 and torch.allclose(y2, y, atol=1e-10)


def test_bias_is_a_constant_last_input_column():
    model = ImplicitModel(3, 2, 5, bias=True, dtype=torch.float64)
    assert model.B.shape == (5, 4) and model.D.shape == (2, 4)
    U = torch.randn(4, 3, dtype=torch.float64)
    assert torch.equal(model.prepare_input(U)[:, -1], torch.ones(4, dtype=torch.float64))
    ref = ImplicitModel.from_weights(model.A.detach(), model.B.detach(), model.C.detach(), model.D.detach(),
                                     bias=True, tol=1e-12)  # fmt: skip
    nobias = ImplicitModel.from_weights(model.A.detach(), model.B.detach(), model.C.detach(), model.D.detach(),
                                        bias=False, tol=1e-12)  # fmt: skip
    ones = torch.ones(4, 1, dtype=torch.float64)
    assert torch.allclose(ref(U), nobias(torch.cat([U, ones], 1)), atol=1e-9)


def test_from_weights_predicts_with_given_weights():
    g = torch.Generator().manual_seed(0)
    A = 0.05 * torch.randn(6, 6, generator=g, dtype=torch.float64)
    B, C = (
        torch.randn(6, 3, generator=g, dtype=torch.float64),
        torch.randn(2, 6, generator=g, dtype=torch.float64),
    )
    model = ImplicitModel.from_weights(A, B, C, None, activation="tanh", kappa=0.9, tol=1e-13)
    assert model.no_D and not model.D.any() and model.A.dtype == torch.float64 and torch.equal(model.A, A)
    U = torch.randn(4, 3, dtype=torch.float64)
    X = torch.zeros(4, 6, dtype=torch.float64)
    for _ in range(200):
        X = torch.tanh(X @ A.T + U @ B.T)
    assert torch.allclose(model(U), X @ C.T, atol=1e-10)
    with pytest.raises(WellPosednessError, match=r"\|\|A\|\|_inf = .* exceeds kappa = 0.5"):
        ImplicitModel.from_weights(A * 100, B, C, kappa=0.5)
    with pytest.raises(ShapeError, match="'D'"):
        ImplicitModel.from_weights(A, B, C, torch.zeros(2, 5, dtype=torch.float64))
    with pytest.raises(ShapeError):
        ImplicitModel.from_weights(A, B[:4], C)
    with pytest.raises(ConfigError, match="Unknown keyword"):
        ImplicitModel.from_weights(A, B, C, tolerance=1e-3)
    with pytest.raises(ConfigError, match="'constraint'"):
        ImplicitModel.from_weights(A, B, C, constraint="rescale")


def test_repr_shows_settings():
    text = repr(ImplicitModel(4, 2, 6, rank=2, bias=True, kappa=0.5, fixed_point="anderson"))
    for part in ("input_dim=4", "hidden_dim=6", "rank=2", "bias=True", "kappa=0.5", "anderson"):
        assert part in text
    assert "constraint='shrink'" in text  # the default


def test_default_constraint_is_shrink():
    model = ImplicitModel(4, 2, 6, kappa=0.5, dtype=torch.float64)
    assert model.constraint == "shrink"
    with torch.no_grad():
        model.A.mul_(10.0)
    before = model.A.detach().clone()
    model.project_()
    # one factor for the whole matrix (a scaling, not the row-wise projection)
    assert torch.allclose(model.A.detach(), before * (0.5 / inf_norm(before)), rtol=1e-12, atol=0)


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        ({"kappa": 1.0}, ConfigError, r"'kappa' parameter of ImplicitModel must be a float in \[0, 1\)"),
        ({"kappa": -0.5}, ConfigError, "'kappa'"),
        ({"input_dim": 0}, ConfigError, "'input_dim'.*positive integer.*Got 0"),
        ({"hidden_dim": -3}, ConfigError, "'hidden_dim'"),
        ({"output_dim": 2.5}, ConfigError, "'output_dim'"),
        ({"rank": 9}, ConfigError, r"'rank'.*\[1, hidden_dim=6\].*Got 9"),
        ({"rank": 0}, ConfigError, "'rank'"),
        ({"activation": "swish"}, ConfigError, "'activation'.*relu.*Got 'swish'"),
        ({"fixed_point": "newton"}, ConfigError, "'fixed_point'.*anderson.*picard"),
        ({"tol": 0.0}, ConfigError, "'tol'"),
        ({"max_iter": 0}, ConfigError, "'max_iter'"),
        ({"bias": "yes"}, ConfigTypeError, "'bias'"),
        ({"constraint": "clip"}, ConfigError, r"'constraint'.*\['project', 'rescale', 'shrink'\]"),
        ({"tolerance": 1e-3}, ConfigError, r"Unknown keyword argument\(s\) \['tolerance'\].*Valid ones"),
        ({"mitr": 10}, ConfigError, "Unknown keyword"),
    ],
)
def test_bad_constructor_arguments(kwargs, error, pattern):
    args = {"input_dim": 4, "output_dim": 2, "hidden_dim": 6} | kwargs
    with pytest.raises(error, match=pattern):
        ImplicitModel(**args)


def test_bad_inputs_at_forward():
    model = ImplicitModel(4, 2, 6)
    with pytest.raises(ShapeError, match=r"must have 4 features.*Got shape \(3, 5\)"):
        model(torch.randn(3, 5))
    with pytest.raises(ShapeError, match="batch first"):
        model(torch.randn(4))
    bad = torch.randn(3, 4)
    bad[1, 2] = float("nan")
    with pytest.raises(ConfigError, match="1 NaN or Inf"):
        model(bad)
    bad[1, 2] = float("inf")
    with pytest.raises(ConfigError, match="NaN or Inf"):
        model(bad)
    with pytest.raises(ShapeError, match="'x0'"):
        model(torch.randn(3, 4), x0=torch.zeros(2, 6))
    with pytest.raises(ConfigTypeError):
        model([[1.0, 2.0, 3.0, 4.0]])


def test_non_convergence_warning_from_the_model():
    model = ImplicitModel(4, 2, 30, kappa=0.99, max_iter=1, tol=1e-12)
    with torch.no_grad():
        model.A.copy_(torch.full((30, 30), 0.99 / 30))
    with pytest.warns(ConvergenceWarning, match="max_iter=1"):
        model(torch.rand(8, 4))
    assert model.telemetry.forward_unconverged > 0


def _digits():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    Xtr, Xte, ytr, yte = train_test_split(X / 16.0, y, test_size=0.25, random_state=0, stratify=y)
    t = torch.tensor
    return t(Xtr, dtype=torch.float32), t(ytr), t(Xte, dtype=torch.float32), t(yte)


@pytest.mark.parametrize("fixed_point", ["picard", "anderson"])
def test_digits_accuracy(fixed_point):
    torch.manual_seed(0)
    Xtr, ytr, Xte, yte = _digits()
    model = ImplicitModel(64, 10, 64, tol=1e-4, fixed_point=fixed_point)
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    epochs = 10
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    g = torch.Generator().manual_seed(0)
    for _epoch in range(epochs):
        perm = torch.randperm(len(Xtr), generator=g)
        for s in range(0, len(Xtr), 64):
            idx = perm[s : s + 64]
            opt.zero_grad()
            F.cross_entropy(model(Xtr[idx]), ytr[idx]).backward()
            opt.step()
        schedule.step()
    with torch.no_grad():
        acc = float((model(Xte).argmax(1) == yte).float().mean())
    print(f"digits test accuracy ({fixed_point}): {acc:.4f}")
    assert acc >= 0.93, acc
    assert inf_norm(model.A.detach()) <= model.kappa  # the evaluation forward projected after the last step
