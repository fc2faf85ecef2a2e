"""The device comes from Ray's assignment: the mapping on the ids Ray reports (fake GPU, no CUDA)."""

from __future__ import annotations

import os
import time

import pytest
import ray
import torch
from distributed_helpers import TIMEOUT_S, random_problem

from idl_ray.distributed import RayADMMSolver
from idl_ray.distributed.device import device_from_assignment
from idl_ray.errors import DistributedError


def test_mapping_without_gpus_is_cpu():
    assert device_from_assignment([], None, cuda_available=False) == torch.device("cpu")
    assert device_from_assignment([], "0,1", cuda_available=True) == torch.device("cpu")


@pytest.mark.parametrize(
    ("ids", "visible", "expected"),
    [
        (["0"], "0", 0),
        (["3"], "3", 0),  # Ray restricts CUDA_VISIBLE_DEVICES: the assigned GPU is cuda:0
        (["3"], "1,3", 1),
        (["2", "3"], "2,3", 0),
        (["2"], None, 2),  # RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES: the id is the index
        ([5], "", 5),
    ],
)
def test_mapping_of_assigned_ids(ids, visible, expected):
    assert device_from_assignment(ids, visible, cuda_available=True) == torch.device("cuda", expected)


def test_mapping_errors_are_clear():
    with pytest.raises(DistributedError, match="cannot use CUDA"):
        device_from_assignment(["0"], "0", cuda_available=False)
    with pytest.raises(DistributedError, match="does not list it"):
        device_from_assignment(["4"], "0,1", cuda_available=True)
    with pytest.raises(DistributedError, match="sees only 1"):
        device_from_assignment(["1"], None, cuda_available=True, cuda_count=1)


@ray.remote
def _report() -> tuple[list[str], str | None]:
    ids = ray.get_runtime_context().get_accelerator_ids().get("GPU", [])
    return [str(i) for i in ids], os.environ.get("CUDA_VISIBLE_DEVICES")


def test_mapping_on_what_ray_reports_for_a_gpu_task(fake_gpus):
    ids, visible = ray.get(_report.options(num_cpus=0.1, num_gpus=1).remote(), timeout=TIMEOUT_S)
    assert len(ids) == 1
    # what the actor would pick if CUDA were there: the GPU Ray assigned, renumbered by CUDA_VISIBLE_DEVICES
    device = device_from_assignment(ids, visible, cuda_available=True)
    assert device.type == "cuda"
    expected = visible.split(",").index(ids[0]) if visible else int(ids[0])
    assert device.index == expected


def test_mapping_on_what_ray_reports_for_a_cpu_task():
    ids, visible = ray.get(_report.options(num_cpus=0.1).remote(), timeout=TIMEOUT_S)
    assert ids == []
    assert device_from_assignment(ids, visible, cuda_available=torch.cuda.is_available()).type == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only torch error path")
def test_gpu_actor_without_cuda_fails_clearly(fake_gpus):
    solver = RayADMMSolver(num_workers=1, use_gpu=True, cpus_per_worker=0.25, timeout_s=TIMEOUT_S)
    start = time.perf_counter()
    with pytest.raises(DistributedError, match="cannot use CUDA"):
        solver.solve(random_problem(m=200, n=3, p=3))
    assert time.perf_counter() - start < TIMEOUT_S
