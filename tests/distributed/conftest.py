"""One local Ray instance for the distributed tests: 2 CPUs, one *fake* GPU, loopback only, no dashboard.

The fake GPU (``num_gpus=1``) lets Ray assign a GPU id to an actor on a machine without one, so the tests
can check what Ray reports and how we map it to a device; nothing here ever touches CUDA. Solvers in the
tests pass ``use_gpu=False`` unless a test is about GPUs.
"""

from __future__ import annotations

import pytest
import ray

NUM_CPUS = 2
NUM_FAKE_GPUS = 1


@pytest.fixture(scope="session", autouse=True)
def ray_cluster():
    """Start (and at the end stop) the local Ray instance, unless the session already has one."""
    started = False
    if not ray.is_initialized():
        ray.init(
            num_cpus=NUM_CPUS,
            num_gpus=NUM_FAKE_GPUS,
            include_dashboard=False,
            object_store_memory=300 * 1024 * 1024,
            log_to_driver=False,
            _node_ip_address="127.0.0.1",
        )
        started = True
    yield ray.cluster_resources()
    if started:
        ray.shutdown()


@pytest.fixture
def fake_gpus(ray_cluster) -> float:
    """The cluster's GPU count; tests about GPU assignment skip when there is none to fake with."""
    count = float(ray_cluster.get("GPU", 0.0))
    if count < 1:
        pytest.skip("the shared Ray instance has no (fake) GPU resource")
    return count


@pytest.fixture(scope="session")
def worker_pools(ray_cluster):
    """Started CPU worker pools by size, shared by the tests (actor start-up dominates small solves)."""
    from idl_ray.distributed import RayRunConfig, WorkerPool

    pools: dict[int, WorkerPool] = {}

    def get(size: int) -> WorkerPool:
        if size not in pools or not pools[size].actors:
            config = RayRunConfig(num_workers=size, cpus_per_worker=0.1, use_gpu=False, timeout_s=120.0)
            pools[size] = WorkerPool(config)
        return pools[size]

    yield get
    for pool in pools.values():
        pool.shutdown()
