"""Asking for more than the cluster has fails fast with a clear error; waits never hang."""

from __future__ import annotations

import time

import pytest
import ray
from distributed_helpers import random_problem

from idl_ray.distributed import ADMMMultiGPUSolver, RayADMMSolver, RayRunConfig, resources
from idl_ray.errors import DistributedError


def test_more_gpus_than_the_cluster_fails_fast():
    gpus = ray.cluster_resources().get("GPU", 0.0)
    start = time.perf_counter()
    with pytest.raises(DistributedError, match=r"asks for \d+ GPU\(s\).*has \d+ in total"):
        ADMMMultiGPUSolver(gpu_ids=list(range(int(gpus) + 2)), cpus_per_worker=0.1).solve(
            random_problem(m=100, n=3, p=3)
        )
    assert time.perf_counter() - start < 5.0


def test_more_cpus_than_the_cluster_fails_fast():
    start = time.perf_counter()
    with pytest.raises(DistributedError, match="CPU"):
        RayADMMSolver(num_workers=3, cpus_per_worker=1.0, use_gpu=False).solve(
            random_problem(m=100, n=3, p=3)
        )
    assert time.perf_counter() - start < 5.0


def test_auto_gpu_uses_cpu_when_there_are_too_few_gpus():
    totals = {"CPU": 2.0, "GPU": 1.0}
    assert resources.resolve_use_gpu(RayRunConfig(num_workers=2), totals) is False
    assert resources.resolve_use_gpu(RayRunConfig(num_workers=1), totals) is True
    assert resources.resolve_use_gpu(RayRunConfig(num_workers=1), {"CPU": 2.0, "GPU": 0.0}) is False
    assert resources.resolve_use_gpu(RayRunConfig(num_workers=4, use_gpu=False), totals) is False


def test_unplaceable_group_times_out_with_a_clear_error():
    # two bundles on two different nodes cannot exist on this one-node cluster: the wait must end
    config = RayRunConfig(
        num_workers=2, cpus_per_worker=0.1, use_gpu=False, placement_strategy="STRICT_SPREAD", timeout_s=3.0
    )
    start = time.perf_counter()
    with pytest.raises(DistributedError, match=r"placement group|place"):
        RayADMMSolver(run_config=config).solve(random_problem(m=100, n=3, p=3))
    assert time.perf_counter() - start < 30.0


def test_get_times_out_instead_of_hanging():
    @ray.remote(num_cpus=0.1)
    def slow() -> int:
        time.sleep(30)
        return 1

    ref = slow.remote()
    with pytest.raises(DistributedError, match=r"Timed out after 0\.5 s waiting for a slow task"):
        resources.get(ref, 0.5, "a slow task")
    ray.cancel(ref, force=True)
