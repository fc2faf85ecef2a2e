"""Settings a distributed solver would silently ignore are refused."""

from __future__ import annotations

import pytest

from idl_ray.distributed import RayADMMSolver, RayProjectedGDSolver
from idl_ray.errors import ConfigError, ConfigTypeError


@pytest.mark.parametrize("solver", [RayADMMSolver, RayProjectedGDSolver])
def test_resource_settings_next_to_a_started_pool_are_refused(solver, worker_pools):
    pool = worker_pools(2)
    with pytest.raises(ConfigError, match=r"\['num_workers'\] would be ignored with workers=.*num_workers=2"):
        solver(workers=pool, num_workers=3)
    with pytest.raises(ConfigError, match="cpus_per_worker"):
        solver(workers=pool, cpus_per_worker=0.5)
    with pytest.raises(ConfigTypeError, match="WorkerPool"):
        solver(workers="two")
    assert solver(workers=pool, timeout_s=30.0).run_config.timeout_s == 30.0  # run-time settings are fine


def test_an_unknown_projected_gd_strategy_is_refused() -> None:
    with pytest.raises(
        ConfigError, match=r"'strategy' parameter of RayProjectedGDSolver.*'data', 'gram'.*'consensus'"
    ):
        RayProjectedGDSolver(strategy="consensus")
