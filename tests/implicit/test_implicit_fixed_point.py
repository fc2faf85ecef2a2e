"""Fixed-point kernels: Picard and Anderson agree, per-sample stopping, warm start, warnings, options."""

from __future__ import annotations

import warnings

import pytest
import torch

from idl_ray.errors import ConfigError, ConvergenceWarning, ShapeError
from idl_ray.implicit.fixed_point import (
    FIXED_POINT_METHODS,
    FixedPointOptions,
    register_fixed_point_method,
    solve_adjoint,
    solve_fixed_point,
)
from idl_ray.implicit.projection import project_onto_kappa_ball


def problem(n=30, batch=40, kappa=0.95, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = project_onto_kappa_ball(torch.randn(n, n, generator=g, dtype=dtype), kappa)
    BU = torch.randn(batch, n, generator=g, dtype=dtype)
    return A, BU


@pytest.mark.parametrize("activation", ["relu", "tanh", "leaky_relu", "sigmoid", "softplus"])
def test_picard_and_anderson_reach_the_same_fixed_point(activation):
    A, BU = problem()
    opts = {"tol": 1e-12, "max_iter": 2000}
    Xp, sp = solve_fixed_point(A, BU, activation, opts | {"method": "picard"})
    assert sp.all_converged
    for method in ("anderson", "anderson_batch"):
        Xa, sa = solve_fixed_point(A, BU, activation, opts | {"method": method})
        assert sa.all_converged and sa.method == method
        assert float((Xp - Xa).abs().max()) < 1e-9
    phi = getattr(torch, activation) if activation in ("relu", "tanh", "sigmoid") else None
    if phi is not None:
        assert float((Xp - phi(Xp @ A.T + BU)).abs().max()) < 1e-10


def test_anderson_needs_fewer_iterations_near_kappa_one():
    A, BU = problem(kappa=0.99, seed=3)
    opts = {"tol": 1e-10, "max_iter": 5000}
    _, sp = solve_fixed_point(A, BU, "tanh", opts | {"method": "picard"})
    _, sa = solve_fixed_point(A, BU, "tanh", opts | {"method": "anderson"})
    _, sb = solve_fixed_point(A, BU, "tanh", opts | {"method": "anderson_batch"})
    assert sa.iterations < sp.iterations and sb.iterations < sp.iterations


@pytest.mark.parametrize("method", sorted(FIXED_POINT_METHODS))
def test_converged_samples_stop_costing_work(method):
    A, BU = problem(batch=50)
    BU[:25] = 0.0  # half the batch has the trivial fixed point 0: converged after one step
    X, stats = solve_fixed_point(A, BU, "relu", {"tol": 1e-10, "method": method})
    assert stats.all_converged
    assert torch.all(stats.sample_iterations[:25] == 1)
    assert int(stats.sample_iterations[25:].min()) > 1
    assert stats.work == int(stats.sample_iterations.sum()) < stats.iterations * 50
    assert torch.equal(X[:25], torch.zeros_like(X[:25]))


@pytest.mark.parametrize("memory", [1, 2, 5])
def test_batch_anderson_compacts_its_history_and_matches_picard(memory):
    # relu is positively homogeneous: inputs scaled by 1e-5 have solutions (and residuals) scaled by
    # 1e-5, so they meet the absolute tolerance well before the others and leave mid-solve
    A, BU = problem(batch=40, kappa=0.99, seed=5)
    BU[:20] *= 1e-5
    opts = {"tol": 0.0, "atol": 1e-11, "norm": "inf", "max_iter": 3000}
    Xp, sp = solve_fixed_point(A, BU, "relu", opts | {"method": "picard"})
    Xb, sb = solve_fixed_point(A, BU, "relu", opts | {"method": "anderson_batch", "anderson_memory": memory})
    assert sp.all_converged and sb.all_converged
    assert float((Xp - Xb).abs().max()) < 1e-9
    residual = (Xb - torch.relu(Xb @ A.T + BU)).abs().amax(dim=1)
    assert float(residual.max()) <= 1e-11
    its = sb.sample_iterations.double()
    assert float(its[:20].mean()) < float(its[20:].mean())
    assert 1 < int(its.min()) < sb.iterations  # samples left mid-solve, after the history had filled
    assert sb.work == int(its.sum()) < sb.iterations * 40


def test_batch_anderson_gram_bound_is_a_necessary_condition():
    from idl_ray.implicit.fixed_point import _gram_bound

    g = torch.Generator().manual_seed(0)
    for norm in ("l2", "inf"):
        for tol, atol in ((0.0, 1e-3), (1e-2, 0.0), (1e-2, 1e-3)):
            o = FixedPointOptions(tol=tol, atol=atol, norm=norm)
            f = torch.randn(8, 6, generator=g, dtype=torch.float64)
            # residuals that meet every per-sample test exactly (the extreme case)
            size = f.norm(dim=1) if norm == "l2" else f.abs().amax(dim=1)
            thr = atol + tol * size
            gdir = torch.ones(8, 6, dtype=torch.float64)  # for "inf": every entry at the threshold
            if norm == "l2":
                gdir = gdir / gdir.norm(dim=1, keepdim=True)
            g_res = gdir * thr[:, None]
            assert float(g_res.norm()) <= _gram_bound(o, 8, 6)(f) * (1 + 1e-12)


def test_warm_start_from_the_solution_takes_one_iteration():
    A, BU = problem()
    X, s1 = solve_fixed_point(A, BU, "relu", {"tol": 1e-12})
    X2, s2 = solve_fixed_point(A, BU, "relu", {"tol": 1e-10}, x0=X)
    assert s1.iterations > 5 and s2.iterations == 1
    assert torch.allclose(X, X2, atol=1e-11)


@pytest.mark.parametrize("method", sorted(FIXED_POINT_METHODS))
def test_default_start_is_the_first_iterate_from_zero(method):
    """Without x0 the solve starts from phi(BU) = f(0): the iterates of a start from zeros, one map
    evaluation (one product with A) earlier. With A = 0 that start is the fixed point itself."""
    A, BU = problem()
    opts = {"tol": 1e-11, "method": method, "max_check_skip": 0, "compaction": "never"}
    X, s_default = solve_fixed_point(A, BU, "tanh", opts)
    X0, s_zeros = solve_fixed_point(A, BU, "tanh", opts, x0=torch.zeros_like(BU))
    assert torch.allclose(X, X0, atol=1e-9) and s_default.all_converged
    if method == "picard":  # the same sequence, shifted by one
        assert s_default.iterations == s_zeros.iterations - 1
    _, s_exact = solve_fixed_point(torch.zeros_like(A), BU, "tanh", opts)
    assert s_exact.iterations == 1 and float(s_exact.abs_residuals.max()) == 0.0


def test_stats_are_consistent():
    A, BU = problem(batch=7)
    _, stats = solve_fixed_point(A, BU, "tanh", FixedPointOptions(tol=1e-8))
    assert stats.method == "picard" and stats.num_samples == 7 and stats.num_converged == 7
    assert stats.converged.dtype == torch.bool and bool(stats.converged.all())
    assert 0 <= stats.max_residual <= 1e-8 and stats.mean_residual <= stats.max_residual
    assert stats.time_s >= 0 and "7/7 converged" in stats.summary()


def test_absolute_tolerance():
    A, BU = problem()
    X, stats = solve_fixed_point(A, BU, "relu", {"tol": 0.0, "atol": 1e-9})
    assert stats.all_converged and stats.max_abs_residual <= 1e-9
    assert float((X - torch.relu(X @ A.T + BU)).norm(dim=1).max()) < 1e-8


def test_non_convergence_warns_with_numbers():
    A, BU = problem(kappa=0.99)
    with pytest.warns(ConvergenceWarning, match=r"max_iter=2 .*tol=1e-10.*Try a larger max_iter") as rec:
        _, stats = solve_fixed_point(A, BU, "relu", {"tol": 1e-10, "max_iter": 2})
    assert "did not converge" in str(rec[0].message)
    assert stats.num_converged < stats.num_samples and stats.iterations == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        solve_fixed_point(A, BU, "relu", {"tol": 1e-10, "max_iter": 2, "warn": False})


@pytest.mark.parametrize("method", sorted(FIXED_POINT_METHODS))
def test_adjoint_solves_its_linear_system(method):
    A, BU = problem(n=12, batch=5)
    X, _ = solve_fixed_point(A, BU, "tanh", {"tol": 1e-13})
    J = 1 - torch.tanh(X @ A.T + BU) ** 2
    G = torch.randn_like(X)
    V, stats = solve_adjoint(A, J, G, {"tol": 1e-13, "method": method})
    assert stats.all_converged
    assert torch.allclose(V, J * (V @ A + G), atol=1e-12)
    # row i solves (I - diag(J_i) A^T) v_i = J_i g_i
    i = 2
    M = torch.eye(12, dtype=A.dtype) - torch.diag(J[i]) @ A.T
    assert torch.allclose(torch.linalg.solve(M, J[i] * G[i]), V[i], atol=1e-10)


def test_empty_batch():
    A, _ = problem()
    X, stats = solve_fixed_point(A, torch.zeros(0, 30, dtype=A.dtype))
    assert X.shape == (0, 30) and stats.num_samples == 0 and stats.all_converged


def test_options_are_validated():
    with pytest.raises(ConfigError, match=r"Unknown option\(s\) \['tolerance'\].*Valid options"):
        FixedPointOptions.from_dict({"tolerance": 1e-3})
    with pytest.raises(ConfigError, match=r"'method'.*anderson.*picard"):
        FixedPointOptions(method="newton")
    with pytest.raises(ConfigError, match="'max_iter'"):
        FixedPointOptions(max_iter=0)
    with pytest.raises(ConfigError, match="'tol'"):
        FixedPointOptions(tol=-1.0)
    with pytest.raises(ConfigError, match="'tol'"):
        FixedPointOptions(tol=0.0, atol=0.0)
    with pytest.raises(ConfigError, match="'anderson_beta'"):
        FixedPointOptions(anderson_beta=0.0)
    with pytest.raises(TypeError):
        FixedPointOptions(1e-3)  # keyword-only


def test_shapes_are_checked():
    A, BU = problem()
    with pytest.raises(ShapeError, match="'BU'"):
        solve_fixed_point(A, BU[:, :5])
    with pytest.raises(ShapeError, match="'A'"):
        solve_fixed_point(A[:, :5], BU)
    with pytest.raises(ShapeError, match="'x0'"):
        solve_fixed_point(A, BU, x0=BU[:3])


def test_register_a_method():
    def damped(fmap, x0, options):
        return FIXED_POINT_METHODS["picard"](fmap, x0, options)

    register_fixed_point_method("test_damped", damped)
    try:
        A, BU = problem()
        X, _ = solve_fixed_point(A, BU, "relu", {"method": "test_damped", "tol": 1e-12})
        Xp, _ = solve_fixed_point(A, BU, "relu", {"tol": 1e-12})
        assert torch.allclose(X, Xp)
        with pytest.raises(ConfigError, match="exists already"):
            register_fixed_point_method("test_damped", damped)
    finally:
        FIXED_POINT_METHODS.pop("test_damped", None)


@pytest.mark.parametrize("method", sorted(FIXED_POINT_METHODS))
def test_every_method_runs_in_bfloat16(method):
    # numpy has no bfloat16 and LAPACK no bfloat16 LU: the small Anderson solves go through float
    A, BU = problem(n=12, batch=6, kappa=0.8)
    X, stats = solve_fixed_point(A.bfloat16(), BU.bfloat16(), "relu", {"tol": 2e-2, "method": method})
    assert stats.all_converged and X.dtype == torch.bfloat16
    Xf, sf = solve_fixed_point(A, BU, "relu", {"tol": 1e-10, "method": "picard"})
    assert sf.all_converged
    assert float((X.double() - Xf).abs().max()) < 0.1 * float(Xf.abs().max())


def test_an_in_place_user_activation_leaves_the_inputs_intact():
    A, BU = problem()
    before = BU.clone()
    X, stats = solve_fixed_point(
        A, BU, (lambda z: z.clamp_(min=0.0), lambda z: (z > 0).to(z.dtype)), {"tol": 1e-10}
    )
    assert torch.equal(BU, before) and stats.all_converged
    assert torch.allclose(X, torch.relu(X @ A.T + BU), atol=1e-8)
