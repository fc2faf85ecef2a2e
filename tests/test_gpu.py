"""CUDA code paths against their CPU float64 references (run by ``benchmarks/gpu_check.py`` on a lent
GPU with ``pytest -m gpu``; skipped where there is no CUDA device, the only tests allowed to skip)."""

from __future__ import annotations

import pytest
import torch

from idl_ray import ImplicitModel
from idl_ray.errors import ConfigError, ConfigTypeError

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_implicit_model_outputs_and_gradients_match_the_cpu():
    torch.manual_seed(0)
    kwargs = dict(kappa=0.9, bias=True, tol=1e-12, max_iter=1000, dtype=torch.float64)
    cpu = ImplicitModel(20, 3, 30, **kwargs)
    gpu = ImplicitModel(20, 3, 30, **kwargs)
    gpu.load_state_dict(cpu.state_dict())
    gpu = gpu.cuda()
    x, y = torch.randn(64, 20, dtype=torch.float64), torch.randint(0, 3, (64,))
    for model, device in ((cpu, "cpu"), (gpu, "cuda")):
        torch.nn.functional.cross_entropy(model(x.to(device)), y.to(device)).backward()
    with torch.no_grad():
        torch.testing.assert_close(gpu(x.cuda()).cpu(), cpu(x), atol=1e-10, rtol=1e-10)
    for (name, p_cpu), (_, p_gpu) in zip(cpu.named_parameters(), gpu.named_parameters()):
        torch.testing.assert_close(p_gpu.grad.cpu(), p_cpu.grad, atol=1e-9, rtol=1e-8, msg=name)


def test_bad_input_is_refused_on_cuda_as_on_the_cpu():
    model = ImplicitModel(4, 2, 8).cuda()
    bad = torch.randn(3, 4, device="cuda")
    bad[1, 2] = float("nan")
    with pytest.raises(ConfigError, match="NaN or Inf"):
        model(bad)
    with pytest.raises(ConfigTypeError, match="float64"):
        model(torch.randn(3, 4, dtype=torch.float64, device="cuda"))
    with pytest.raises(ConfigError, match="overflow"):
        model(torch.full((3, 4), 1e20, device="cuda"))


def test_admm_on_cuda_matches_the_cpu_solve():
    from idl_ray.sim.problem import SIMProblem
    from idl_ray.sim.solvers import ADMMSolver

    generator = torch.Generator().manual_seed(1)
    features = torch.randn(400, 14, generator=generator, dtype=torch.float64)
    targets = features @ torch.randn(14, 6, generator=generator, dtype=torch.float64)
    problem = SIMProblem.from_samples(features, targets, n_constrained=6, lam=1e-3, kappa=0.5)
    tol = dict(abs_tol=1e-10, rel_tol=1e-9)
    cpu = ADMMSolver(device="cpu", **tol).solve(problem)
    gpu = ADMMSolver(device="cuda", **tol).solve(problem)
    assert gpu.stats.converged and gpu.stats.constraint_violation == 0.0
    torch.testing.assert_close(gpu.weights.cpu().double(), cpu.weights, atol=1e-6, rtol=1e-6)


def test_sim_predicts_the_same_on_cuda():
    from idl_ray.sim import SIM

    torch.manual_seed(0)
    teacher = torch.nn.Sequential(torch.nn.Linear(5, 12), torch.nn.ReLU(), torch.nn.Linear(12, 2))
    x = torch.randn(300, 5)
    sim = SIM(kappa=0.9, dtype=torch.float64, device="cpu").fit(teacher, x)
    on_cpu = sim.predict(x)
    on_gpu = sim.set_params(device="cuda").predict(x)
    assert on_gpu.device.type == "cuda"
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, atol=1e-8, rtol=1e-8)


def test_a_cuda_index_past_the_visible_gpus_is_refused():
    from idl_ray.sim.solvers import ADMMSolver

    with pytest.raises(ConfigError, match="CUDA device index"):
        ADMMSolver(device=f"cuda:{torch.cuda.device_count()}")
