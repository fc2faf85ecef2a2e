"""Picard without compaction (``compaction="never"``, the CUDA default): same fixed point as the
compacting path, truthful telemetry, warnings, buffers that never touch the inputs."""

from __future__ import annotations

import types

import pytest
import torch

from idl_ray.errors import ConfigError, ConvergenceWarning
from idl_ray.implicit.fixed_point import FixedPointOptions, _compacts, solve_adjoint, solve_fixed_point
from idl_ray.implicit.functional import implicit_fixed_point
from idl_ray.implicit.projection import project_onto_kappa_ball


def problem(n=30, batch=40, kappa=0.95, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = project_onto_kappa_ball(torch.randn(n, n, generator=g, dtype=dtype), kappa)
    BU = torch.randn(batch, n, generator=g, dtype=dtype)
    return A, BU


def true_residuals(X, A, BU, fn):
    return (fn(X @ A.T + BU) - X).norm(dim=1)


@pytest.mark.parametrize("activation", ["relu", "tanh", "sigmoid", "leaky_relu", "softplus"])
@pytest.mark.parametrize("crit", [{"tol": 1e-12}, {"tol": 0.0, "atol": 1e-12, "norm": "inf"}])
def test_dense_path_matches_the_compacting_path(activation, crit):
    A, BU = problem()
    BU[:10] = 0.0  # some samples converge at once: the compacting path shrinks, the dense one does not
    opts = crit | {"max_iter": 2000}
    Xc, sc = solve_fixed_point(A, BU, activation, opts | {"compaction": "always"})
    Xd, sd = solve_fixed_point(A, BU, activation, opts | {"compaction": "never"})
    assert sc.all_converged and sd.all_converged
    assert float((Xc - Xd).abs().max()) < 1e-10
    # telemetry of the dense path: every sample ran every iteration
    assert sd.iterations >= sc.iterations - 1
    assert torch.all(sd.sample_iterations == sd.iterations)
    assert sd.work == sd.iterations * sd.num_samples == int(sd.sample_iterations.sum())
    assert bool(sd.converged.all()) and sd.num_converged == sd.num_samples
    if "atol" in crit:
        assert sd.max_abs_residual <= 1e-12
    else:
        assert sd.max_residual <= 1e-12


def test_dense_residuals_are_the_last_step_residuals():
    A, BU = problem(batch=9)
    X, stats = solve_fixed_point(A, BU, "tanh", {"tol": 1e-9, "compaction": "never"})
    assert stats.all_converged
    # the recorded residual is ||f(x_prev) - x_prev||; X = f(x_prev) is closer by the contraction factor
    assert torch.all(true_residuals(X, A, BU, torch.tanh) <= stats.abs_residuals * 0.95 + 1e-15)
    assert stats.max_residual <= 1e-9


def test_dense_path_warns_on_non_convergence_with_exact_counts():
    A, BU = problem(kappa=0.99)
    BU[:5] = 0.0  # these converge at the first iteration
    with pytest.warns(ConvergenceWarning, match=r"max_iter=3 .*did not|did not converge.*max_iter=3"):
        _, stats = solve_fixed_point(A, BU, "relu", {"tol": 1e-10, "max_iter": 3, "compaction": "never"})
    assert stats.iterations == 3 and torch.all(stats.sample_iterations == 3)
    assert 5 <= stats.num_converged < stats.num_samples
    assert stats.num_converged == int(stats.converged.sum())
    thr = 1e-10 * stats.state.norm(dim=1)
    assert torch.equal(stats.converged, stats.abs_residuals <= thr)
    assert bool(stats.converged[:5].all())


def test_dense_path_warns_with_the_absolute_max_norm_test():
    A, BU = problem(kappa=0.99)
    opts = {"tol": 0.0, "atol": 1e-12, "norm": "inf", "max_iter": 4, "compaction": "never"}
    with pytest.warns(ConvergenceWarning, match="did not converge"):
        _, stats = solve_fixed_point(A, BU, "relu", opts)
    assert stats.iterations == 4 and stats.num_converged == int(stats.converged.sum()) < stats.num_samples
    assert torch.equal(stats.converged, stats.abs_residuals <= 1e-12)


@pytest.mark.parametrize("compaction", ["never", "always"])
def test_inputs_are_never_written(compaction):
    A, BU = problem(batch=6)
    x0 = torch.rand_like(BU)
    copies = A.clone(), BU.clone(), x0.clone()
    X, s = solve_fixed_point(A, BU, "relu", {"tol": 1e-10, "compaction": compaction}, x0=x0)
    assert s.all_converged
    for t, c in zip((A, BU, x0), copies):
        assert torch.equal(t, c)
    assert X.data_ptr() not in (A.data_ptr(), BU.data_ptr(), x0.data_ptr())


def test_dense_warm_start_from_the_solution_takes_one_iteration():
    A, BU = problem()
    X, _ = solve_fixed_point(A, BU, "relu", {"tol": 1e-12, "compaction": "never"})
    X2, s2 = solve_fixed_point(A, BU, "relu", {"tol": 1e-10, "compaction": "never"}, x0=X)
    assert s2.iterations == 1 and torch.allclose(X, X2, atol=1e-11)


@pytest.mark.parametrize("compaction", ["never", "always"])
def test_dense_adjoint_matches(compaction):
    A, BU = problem(n=12, batch=5)
    X, _ = solve_fixed_point(A, BU, "tanh", {"tol": 1e-13})
    J = 1 - torch.tanh(X @ A.T + BU) ** 2
    G = torch.randn_like(X)
    G0, J0 = G.clone(), J.clone()
    V, stats = solve_adjoint(A, J, G, {"tol": 1e-13, "compaction": compaction})
    assert stats.all_converged and torch.allclose(V, J * (V @ A + G), atol=1e-12)
    assert torch.equal(G, G0) and torch.equal(J, J0)


def test_gradients_through_the_dense_path():
    g = torch.Generator().manual_seed(1)
    A = (0.1 * torch.randn(6, 6, generator=g, dtype=torch.float64)).requires_grad_()
    BU = torch.randn(4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    opts = {"tol": 1e-13, "compaction": "never"}
    assert torch.autograd.gradcheck(
        lambda a, b: implicit_fixed_point(a, b, "tanh", forward_options=opts, backward_options=opts), (A, BU)
    )


def test_compaction_option():
    assert FixedPointOptions().compaction == "auto"
    with pytest.raises(ConfigError, match="'compaction'"):
        FixedPointOptions(compaction="sometimes")
    cuda, cpu = types.SimpleNamespace(is_cuda=True), types.SimpleNamespace(is_cuda=False)
    assert not _compacts(FixedPointOptions(), cuda) and _compacts(FixedPointOptions(), cpu)
    assert _compacts(FixedPointOptions(compaction="always"), cuda)
    assert not _compacts(FixedPointOptions(compaction="never"), cpu)


def test_known_activations_run_in_place():
    from idl_ray.implicit.activations import resolve_activation
    from idl_ray.implicit.fixed_point import _inplace_of

    z = torch.linspace(-3, 3, 13, dtype=torch.float64)
    for name in ("relu", "tanh", "sigmoid", "leaky_relu"):
        act = resolve_activation(name)
        f = _inplace_of(act.fn)
        assert f is not None, name
        y = z.clone()
        f(y)
        assert torch.equal(y, act.fn(z)), name
    assert _inplace_of(resolve_activation("softplus").fn) is None and _inplace_of(None) is None


class _UnhashableTanh:
    def __eq__(self, other):  # defining __eq__ without __hash__ makes instances unhashable
        return isinstance(other, _UnhashableTanh)

    def __call__(self, z):
        return torch.tanh(z)


@pytest.mark.parametrize("compaction", ["never", "always"])
def test_user_activation_out_of_place(compaction):
    A, BU = problem(batch=8)
    dphi = lambda z: 1 - torch.tanh(z) ** 2  # noqa: E731
    opts = {"tol": 1e-12, "compaction": compaction}
    Xu, su = solve_fixed_point(A, BU, (_UnhashableTanh(), dphi), opts)
    Xt, _ = solve_fixed_point(A, BU, "tanh", opts)
    assert su.all_converged and torch.allclose(Xu, Xt, atol=1e-11)


def test_check_spacing():
    from idl_ray.implicit.fixed_point import _checks_to_skip, _remaining_iterations, _worth_compacting

    def skip(previous, k, worst, cap, eager=False):
        return _checks_to_skip(_remaining_iterations(previous, k, worst), cap, eager)

    assert skip(None, 1, 100.0, 16) == 0
    # rate 1/2 per iteration: 2^10 needs 10 more iterations; three quarters of them are skipped
    assert _remaining_iterations((1, 2.0**11), 2, 2.0**10) == pytest.approx(10.0)
    assert skip((1, 2.0**11), 2, 2.0**10, 16) == 7
    assert skip((1, 2.0**11), 2, 2.0**10, 16, eager=True) == 7
    assert skip((1, 2.0**11), 2, 2.0**10, 4) == 4
    # near the end the dense path checks where the tolerance should be met: 2^3 -> 3 more iterations
    assert skip((1, 16.0), 2, 8.0, 16) == 2
    assert skip((1, 16.0), 2, 8.0, 16, eager=True) == 2
    assert skip((1, 2.0**7), 2, 2.0**6, 16) == 4
    assert skip((1, 2.0**7), 2, 2.0**6, 16, eager=True) == 5
    assert skip((1, 2.0), 2, 1.1, 16, eager=True) == 0
    # no progress or no rate: check at the next iteration
    assert skip((1, 2.0), 2, 3.0, 16, eager=True) == 0
    assert skip((1, 2.0), 2, float("nan"), 16, eager=True) == 0
    # compaction (about one iteration of work) is only tried while 3 or more iterations remain
    assert _worth_compacting(None, 1, 100.0)
    assert _worth_compacting((1, 16.0), 2, 8.0)
    assert not _worth_compacting((1, 8.0), 2, 4.0)


@pytest.mark.parametrize("crit", [{"tol": 1e-10}, {"tol": 0.0, "atol": 1e-10, "norm": "inf"}])
def test_dense_path_with_a_nan_sample(crit):
    A, BU = problem(batch=6)
    BU[2, 0] = float("nan")
    with pytest.warns(ConvergenceWarning, match="1 of 6"):
        X, stats = solve_fixed_point(A, BU, "tanh", crit | {"max_iter": 50, "compaction": "never"})
    assert stats.iterations == 50 and stats.num_converged == 5
    assert stats.converged.tolist() == [True, True, False, True, True, True]
    assert bool(torch.isfinite(X[[0, 1, 3, 4, 5]]).all())
