"""Bad input on the Python API gets a clear error naming the user's argument (never an internal name,
never a silent NaN or a false "converged"); see docs/errors.md."""

from __future__ import annotations

import warnings

import pytest
import torch

from idl_ray import ImplicitModel
from idl_ray.errors import ConfigError, ConfigTypeError, ShapeError
from idl_ray.implicit.fixed_point import solve_fixed_point
from idl_ray.sim import SIM


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))


@pytest.fixture(scope="module")
def fitted(teacher):
    torch.manual_seed(1)
    return SIM(kappa=0.9).fit(teacher, torch.randn(300, 4))


def test_predict_refuses_nan_like_the_module(fitted):
    x = torch.randn(600, 4)
    x[300, 1] = float("nan")  # batch 1 (batch_size 256), row 44 of it
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no ConvergenceWarning: refused before any iteration
        with pytest.raises(ConfigError) as info:
            fitted.predict(x)
    message = str(info.value)
    assert "'inputs' argument of SIM.predict" in message
    assert "batch 1 (samples 256 to 511)" in message and "[44]" in message
    with pytest.raises(ConfigError, match="NaN or Inf"):
        ImplicitModel(4, 2, 8)(x[290:310])


def test_fit_with_nan_names_the_users_data_and_batch(teacher):
    x = torch.randn(300, 4)
    x[7, 0] = float("inf")
    with pytest.raises(ConfigError) as info:
        SIM().fit(teacher, x)
    message = str(info.value)
    assert "'data' argument of SIM.fit" in message and "batch 0 (samples 0 to 255)" in message
    assert "GramStats" not in message and "from_batch" not in message


def test_fit_with_the_wrong_width_is_a_shape_error_before_the_probe(teacher):
    with pytest.raises(ShapeError) as info:
        SIM().fit(teacher, torch.randn(50, 3))
    message = str(info.value)
    assert "(batch, 3)" in message and "in_features=4" in message
    assert "While executing" not in message  # no torch.fx trace of the one-row probe
    with pytest.raises(ShapeError, match="4 input features"):
        SIM(kappa=0.9).fit(teacher, torch.randn(50, 4)).predict(torch.randn(5, 3))


def test_misspelt_keywords_list_the_valid_ones():
    with pytest.raises(ConfigError) as info:
        SIM(kapa=0.9)
    message = str(info.value)
    assert "Did you mean 'kappa'?" in message and "'lam'" in message
    with pytest.raises(ConfigError, match="Did you mean 'kappa'"):
        ImplicitModel(4, 2, 8, kapa=0.9)


def test_float64_input_to_a_float32_model_is_explained_and_integers_are_cast():
    torch.manual_seed(0)
    model = ImplicitModel(4, 2, 8)
    with pytest.raises(ConfigTypeError) as info:
        model(torch.randn(3, 4, dtype=torch.float64))
    assert "torch.float64" in str(info.value) and "model.to(torch.float64)" in str(info.value)
    integers = torch.randint(-3, 4, (5, 4))
    torch.testing.assert_close(model(integers), model(integers.float()))
    # SIM casts any numeric input to its own dtype (an estimator, like scikit-learn's)
    teacher = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    sim = SIM(kappa=0.9).fit(teacher, torch.randn(200, 4))
    torch.testing.assert_close(sim.predict(integers.double()), sim.predict(integers.float()))


def _contraction(n: int = 8, kappa: float = 0.9) -> torch.Tensor:
    A = torch.rand(n, n, generator=torch.Generator().manual_seed(0))
    return A * (kappa / A.abs().sum(dim=1).max())


@pytest.mark.parametrize("method", ["picard", "anderson", "anderson_batch"])
@pytest.mark.parametrize("compaction", ["auto", "never"])
def test_overflowing_states_are_an_error_not_a_false_converged(method, compaction):
    A = _contraction()
    BU = torch.full((3, 8), 1e20)
    options = {"method": method}
    if method == "picard":
        options["compaction"] = compaction
    with pytest.raises(ConfigError, match="overflow") as info:
        solve_fixed_point(A, BU, "relu", options)
    assert "float64" in str(info.value) and "norm='inf'" in str(info.value)
    with pytest.raises(ConfigError, match="overflow"):
        ImplicitModel(4, 2, 8)(torch.full((3, 4), 1e30))


def test_large_states_are_solved_correctly_where_the_test_can_be_evaluated():
    A = _contraction()
    BU = torch.rand(3, 8, generator=torch.Generator().manual_seed(1)) * 1e20
    reference, _ = solve_fixed_point(A.double(), BU.double(), "relu", {"tol": 1e-12, "max_iter": 2000})
    # the max-norm test cannot overflow: a correct float32 answer at 1e20
    X, stats = solve_fixed_point(A, BU, "relu", {"norm": "inf", "tol": 1e-6})
    assert stats.all_converged
    assert float((X.double() - reference).abs().max() / reference.abs().max()) < 1e-5
    # below the 2-norm limit the default test is right too
    small = BU / 1e8
    X, stats = solve_fixed_point(A, small, "relu", {"tol": 1e-6})
    assert stats.all_converged
    assert float((X.double() - reference / 1e8).abs().max() / (reference / 1e8).abs().max()) < 1e-5


def test_a_missing_cuda_device_is_refused_when_the_solver_is_built():
    from idl_ray.sim.solvers import ADMMSolver

    device = "cuda" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"
    with pytest.raises(ConfigError, match="'device'"):
        ADMMSolver(device=device)
    with pytest.raises(ConfigError, match="'device'"):
        SIM(device=device).fit(torch.nn.Sequential(torch.nn.Linear(2, 2)), torch.randn(5, 2))


def test_teacher_overflow_on_finite_inputs_is_named_not_an_internal_error():
    teacher = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    with torch.no_grad():
        teacher[0].weight.fill_(1.0)
    x = torch.randn(300, 4)
    x[260] = 3e38  # finite in float32; the first layer's sum (4 x 3e38) overflows to Inf on batch 1
    with pytest.raises(ConfigError) as info:
        SIM().fit(teacher, x)
    message = str(info.value)
    assert "overflowed" in message and "batch 1 (samples 256 to 299)" in message
    assert "GramStats" not in message


def test_diverged_parameters_are_named_not_called_an_input_overflow():
    model = ImplicitModel(4, 2, 8)
    with torch.no_grad():
        model.B[0, 0] = float("nan")
    with pytest.raises(ConfigError, match=r"parameter B .* NaN or Inf"):
        model(torch.randn(3, 4))


def test_an_unreachable_ray_address_in_the_environment_fails_in_seconds():
    import os
    import subprocess
    import sys
    import time

    code = (
        "from idl_ray.distributed import resources\n"
        "from idl_ray.errors import DistributedError\n"
        "try:\n    resources.ensure_ray()\nexcept DistributedError as e:\n    print('refused:', e)\n"
    )
    env = dict(os.environ, RAY_ADDRESS="127.0.0.1:1", RAY_USAGE_STATS_ENABLED="0")
    env["PYTHONPATH"] = os.getcwd() + os.pathsep + env.get("PYTHONPATH", "")
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "refused:" in out.stdout and "127.0.0.1:1" in out.stdout
    assert time.monotonic() - start < 60


def test_a_solver_that_cannot_solve_the_variant_is_refused_before_the_states_are_recorded(teacher):
    from idl_ray.sim.solvers import ADMMSolver

    consumed = []

    class Batches:
        def __iter__(self):
            for i in range(3):
                consumed.append(i)
                yield torch.randn(20, 4), None

    with pytest.raises(ConfigError, match=r"'exact' variant.*CVXSolver"):
        SIM(variant="exact").fit(teacher, Batches(), solver=ADMMSolver(device="cpu"))
    assert consumed == []  # refused before the teacher ran on any batch


def test_score_refuses_nan_targets_and_mismatched_targets(fitted):
    x = torch.randn(40, 4)
    y = torch.randn(40, 2)
    assert isinstance(fitted.score(x, y), float)
    y[3, 1] = float("nan")
    with pytest.raises(ConfigError, match=r"'targets' argument of SIM\.score"):
        fitted.score(x, y)
    with pytest.raises(ShapeError, match=r"targets of shape \(40, 3\)"):
        fitted.score(x, torch.randn(40, 3))
