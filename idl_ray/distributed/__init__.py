"""Ray-distributed SIM solvers: actors holding state shards, pinned to GPUs, coordinated by a driver.

Ray is imported only under this package. Names are loaded on first use.

- :class:`RayADMMSolver` (strategies ``"gram"`` and ``"consensus"``), :class:`ADMMMultiGPUSolver`,
  :class:`RayProjectedGDSolver`, :class:`RayCVXSolver`: ``BaseSolver`` s usable with ``SIM.fit``.
- :class:`ShardedProblem` and the shard sources (object store, Parquet, Ray Dataset).
- Streaming state extraction on Ray Data (:class:`StreamConfig`, :func:`stream_states`; used by
  ``SIM.fit`` on a ``ray.data.Dataset``) and the Parquet state sink :func:`write_states`.
- :class:`RayRunConfig`: workers, GPUs, CPUs per worker, restarts, placement, checkpoints, time limits.
- :func:`train_implicit`: gradient training of ``ImplicitModel`` / ``ImplicitRNN`` on Ray Train (DDP),
  with checkpoints every epoch, resume and failures survived; returns a :class:`TrainResult`.
"""

from __future__ import annotations

from idl_ray._lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    "RayADMMSolver": "idl_ray.distributed.solvers",
    "ADMMMultiGPUSolver": "idl_ray.distributed.solvers",
    "RayProjectedGDSolver": "idl_ray.distributed.projected_gd",
    "RayCVXSolver": "idl_ray.distributed.cvx",
    "RayRunConfig": "idl_ray.distributed.config",
    "WorkerPool": "idl_ray.distributed.pool",
    "ShardedProblem": "idl_ray.distributed.sharded",
    "ShardSource": "idl_ray.distributed.shards",
    "ObjectRefShard": "idl_ray.distributed.shards",
    "ParquetShard": "idl_ray.distributed.shards",
    "DatasetShard": "idl_ray.distributed.shards",
    "StatsShard": "idl_ray.distributed.shards",
    "write_parquet_shards": "idl_ray.distributed.shards",
    "StreamConfig": "idl_ray.distributed.extraction",
    "stream_states": "idl_ray.distributed.extraction",
    "write_states": "idl_ray.distributed.state_store",
    "read_manifest": "idl_ray.distributed.state_store",
    "iter_states": "idl_ray.distributed.state_store",
    "SolveCheckpoint": "idl_ray.distributed.checkpoint",
    "load_checkpoint": "idl_ray.distributed.checkpoint",
    "ProgressEvent": "idl_ray.distributed.progress",
    "plot_convergence": "idl_ray.distributed.progress",
    "device_from_assignment": "idl_ray.distributed.device",
    "actor_device": "idl_ray.distributed.device",
    "train_implicit": "idl_ray.distributed.train",
    "TrainResult": "idl_ray.distributed.train",
    "TrainSettings": "idl_ray.distributed.train",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)
