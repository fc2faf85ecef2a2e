"""Run-config validation and solver keyword handling (no actors started)."""

from __future__ import annotations

import pytest

from idl_ray.distributed import ADMMMultiGPUSolver, RayADMMSolver, RayRunConfig
from idl_ray.errors import ConfigError


def test_defaults_and_threads():
    config = RayRunConfig()
    assert config.num_workers == 2 and config.use_gpu is None and config.placement_strategy == "PACK"
    assert RayRunConfig(cpus_per_worker=0.5).threads == 1
    assert RayRunConfig(cpus_per_worker=4).threads == 4
    assert RayRunConfig(cpus_per_worker=4, threads_per_worker=2).threads == 2


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("num_workers", 0),
        ("use_gpu", "yes"),
        ("cpus_per_worker", -1.0),
        ("gpus_per_worker", 1.5),
        ("max_restarts", -1),
        ("placement_strategy", "RANDOM"),
        ("checkpoint_every", 0),
        ("timeout_s", 0),
    ],
)
def test_bad_values_name_the_parameter(field, value):
    with pytest.raises(ConfigError, match=f"'{field}' parameter of RayRunConfig"):
        RayRunConfig(**{field: value})


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(ConfigError, match="Valid options are"):
        RayRunConfig.from_dict({"num_workers": 2, "num_wrokers": 3})
    assert RayRunConfig.from_dict({"num_workers": 3, "cpus_per_worker": 0.25}).num_workers == 3


def test_solver_splits_keywords_and_rejects_unknown_ones():
    solver = RayADMMSolver(num_workers=3, cpus_per_worker=0.25, rel_tol=1e-7, strategy="consensus")
    assert solver.run_config.num_workers == 3 and solver.run_config.cpus_per_worker == 0.25
    assert solver.options.rel_tol == 1e-7 and solver.strategy == "consensus"
    with pytest.raises(ConfigError, match="Unknown keyword"):
        RayADMMSolver(num_wrokers=2)
    with pytest.raises(ConfigError, match="strategy"):
        RayADMMSolver(strategy="allreduce")
    with pytest.raises(ConfigError, match="not both"):
        RayADMMSolver(options={"rho": 1.0}, rho=2.0)


def test_multi_gpu_solver_takes_workers_from_gpu_ids():
    solver = ADMMMultiGPUSolver(gpu_ids=[0, 1, 2])
    assert solver.run_config.num_workers == 3 and solver.run_config.use_gpu is True
    with pytest.raises(ConfigError, match="distinct"):
        ADMMMultiGPUSolver(gpu_ids=[0, 0])
    with pytest.raises(ConfigError, match="num_workers"):
        ADMMMultiGPUSolver(gpu_ids=[0], num_workers=2)
