"""Streaming state extraction on Ray Data: a teacher in k Ray workers, each batch reduced at once.

``SIM(...).fit(teacher, dataset)`` with a ``ray.data.Dataset`` of inputs lands here. The pipeline is

    dataset --map_batches(_StateMapper, at most k at a time)--> one row per batch --> driver

Each worker builds the in-process :class:`~idl_ray.sim.extraction.StateRecorder` once (the teacher is
loaded once per worker, on the GPU Ray assigned when there is one) and, for every batch of b inputs,

    U, Z, X, Y = recorder.record(inputs)                       (exactly the in-process states)
    Phi^T, T^T = stage_batch(U, Z, X, Y, scales)               ([X S, U], [Z S, Y]; idl_ray.sim.stages)
    G_b = Phi Phi^T,  Rt_b = T Phi^T,  ||t_b||^2,  m_b = b    (GramStats of the batch, float64)

and returns only those sums (d^2 + rows d + rows + 1 numbers, whatever b is). The driver adds them as
they arrive, so the states are never materialised anywhere and the memory in use is bounded by the
settings of :class:`StreamConfig` (pool size x batch size, and Ray Data's object-store limit), not by
the number of samples m. Stage 2 with ``regenerate_states`` is a second pass over the same dataset in
which each worker solves the fitted model's fixed point X_hat = phi(X_hat A^T + U B^T) on its batch and
returns the statistics of ``[X_hat, U] -> Y``.

Because the per-batch step is the in-process one (same recorder, same ``stage_batch``, same
``regenerated_features``), the statistics equal the in-process ones up to the order of the float64 sums.

Problems with the inputs do not crash a worker: the worker returns the error in its output row and the
driver raises it, typed, naming the rows of the dataset where it happened (the pipeline preserves
order, so the driver knows each batch's position).

**Workers: tasks or actors** (``StreamConfig.compute``). An actor pool (``ActorPoolStrategy``) starts new
processes for every pass: on the 2-core VM 1.0-1.6 s before the first batch for an empty callable class,
~2.2 s with torch imported, whatever the data size. Ray tasks (``TaskPoolStrategy``, at most k at a time)
run in Ray's pooled worker processes, which keep their imports: the same empty pass over 1,400 rows takes
0.04 s once the workers are warm (the first 0.8-1.3 s); the `idl-ray sim --solver ray-admm` job's
extraction went from 2.9-3.0 s to 1.3-1.4 s, and at m = 100,000 (25 batches) both run at ~10,000
samples/s (benchmarks/bench_data.py --compute). Each worker process keeps the teachers of the last
passes it served (:func:`_map_in_task`), so a teacher is still loaded once per worker, not once per
batch. The default ``"auto"`` takes tasks on CPU and actors on GPUs, where an actor holds its device and
the teacher on it for the whole pass.
"""

from __future__ import annotations

import dataclasses
import math
import time
import uuid
from collections.abc import Iterator
from typing import Any

import numpy as np
import ray
import torch
from torch import nn

from idl_ray._validation import Options, bad_parameter, check_positive_float, check_positive_int
from idl_ray.errors import (
    ConfigError,
    DistributedError,
    IDLError,
    ShapeError,
    UnsupportedLayerError,
)
from idl_ray.sim.extraction import StateRecorder, TeacherStructure
from idl_ray.sim.problem import GramStats
from idl_ray.sim.stages import fixed_point_weights, regenerated_features, stage_batch

__all__ = ["StreamConfig", "StreamInfo", "fit_dataset", "reduce_dataset", "stream_states"]

#: what runs the teacher: Ray tasks, an actor pool, or "auto" (tasks on CPU, actors on GPUs)
COMPUTE_CHOICES = ("auto", "tasks", "actors")
#: teachers a pooled worker process keeps: those of the last passes it served
_KEPT_MAPPERS = 2

_ERROR_TYPES: dict[str, type[IDLError]] = {
    "ConfigError": ConfigError,
    "ShapeError": ShapeError,
    "UnsupportedLayerError": UnsupportedLayerError,
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class StreamConfig(Options):
    """How the teacher runs on Ray Data: the workers, the batches, the memory budget.

    Parameters
    ----------
    num_actors : int, default 2
        Workers running the teacher at once (the actors of the pool, or the concurrent tasks); each loads
        the teacher once. A materialised dataset with fewer blocks or batches gets that many
        (:func:`useful_workers`).
    compute : {"auto", "tasks", "actors"}, default "auto"
        ``"tasks"``: Ray tasks in Ray's pooled worker processes (no pool to start: a pass over small data
        takes ~0.05 s on a warm cluster where an actor pool takes ~2 s); ``"actors"``: an actor pool
        (``ray.data.ActorPoolStrategy``), new processes per pass that hold the teacher on their device;
        ``"auto"``: actors when the workers take GPUs, tasks otherwise.
    batch_size : int, default 4096
        Rows per ``map_batches`` batch. Each batch returns one d x d Gram, so larger batches send fewer
        bytes per sample; memory per actor grows with ``batch_size * (p + 2 n + q)``.
    cpus_per_actor : float, default 1.0
        CPUs Ray reserves per actor (fractional values share a core). Leave CPUs for the dataset's own
        upstream tasks (reads, ``map_batches`` functions): with ``num_actors * cpus_per_actor`` equal to
        the cluster's CPUs those tasks cannot be scheduled and the pipeline waits.
    use_gpu : bool or None, default None
        ``True``: ``gpus_per_actor`` GPUs per actor; ``False``: CPU actors; ``None``: GPUs when the cluster
        has at least ``num_actors * gpus_per_actor`` of them.
    gpus_per_actor : float, default 1.0
        GPUs per actor when GPUs are used.
    threads_per_actor : int or None, default None
        Torch intra-op threads in each actor; ``None`` means ``max(1, round(cpus_per_actor))``.
    object_store_memory : int or None, default None
        Ray Data's object-store budget for this pipeline in bytes (``ExecutionResources``); ``None``
        leaves Ray Data's default (a fraction of the store).
    progress : bool, default False
        Ray Data's progress bars.
    """

    num_actors: int = 2
    compute: str = "auto"
    batch_size: int = 4096
    cpus_per_actor: float = 1.0
    use_gpu: bool | None = None
    gpus_per_actor: float = 1.0
    threads_per_actor: int | None = None
    object_store_memory: int | None = None
    progress: bool = False

    def _validate(self) -> None:
        owner = "StreamConfig"
        check_positive_int(self.num_actors, "num_actors", owner)
        if self.compute not in COMPUTE_CHOICES:
            raise bad_parameter("compute", owner, f"one of {COMPUTE_CHOICES}", self.compute)
        check_positive_int(self.batch_size, "batch_size", owner)
        check_positive_float(self.cpus_per_actor, "cpus_per_actor", owner, allow_zero=True)
        check_positive_float(self.gpus_per_actor, "gpus_per_actor", owner)
        if self.use_gpu is not None and not isinstance(self.use_gpu, bool):
            raise bad_parameter("use_gpu", owner, "True, False or None", self.use_gpu)
        check_positive_int(self.threads_per_actor, "threads_per_actor", owner, allow_none=True)
        check_positive_int(self.object_store_memory, "object_store_memory", owner, allow_none=True)
        if not isinstance(self.progress, bool):
            raise bad_parameter("progress", owner, "a bool", self.progress)

    def resolve_use_gpu(self) -> bool:
        """Whether the actors take GPUs (``use_gpu``, or for None: enough GPUs in the cluster)."""
        if self.use_gpu is not None:
            return self.use_gpu
        return float(ray.cluster_resources().get("GPU", 0.0)) >= self.num_actors * self.gpus_per_actor

    def uses_actors(self, use_gpu: bool) -> bool:
        """Whether the pass runs on an actor pool (else on tasks), for workers with or without GPUs."""
        return self.compute == "actors" or (self.compute == "auto" and use_gpu)

    def check_cpus(self, cluster_cpus: float) -> None:
        """Refuse a pool that cannot start, instead of letting Ray Data wait for it forever."""
        needed = self.num_actors * self.cpus_per_actor
        if needed > cluster_cpus:
            raise ConfigError(
                f"StreamConfig asks for {self.num_actors} actor(s) x {self.cpus_per_actor:g} CPU = {needed:g} "
                f"CPUs but the Ray cluster has {cluster_cpus:g}. Lower num_actors or cpus_per_actor, and leave "
                "room for the dataset's own read/map tasks (they need CPUs too)."
            )

    def threads(self) -> int:
        return self.threads_per_actor or max(1, round(self.cpus_per_actor))


@dataclasses.dataclass
class StreamInfo:
    """Telemetry of one streaming pass.

    Attributes
    ----------
    num_samples : int, rows streamed
    num_batches : int, batches (one reduced row each)
    actors : int, distinct workers (actors, or worker processes running tasks) that produced batches; each
        loaded the teacher once
    time_s : float, wall-clock time of the pass (teacher, reduction in the actors, transfer, driver sums)
    driver_reduce_s : float, of which the driver spent adding the batches' statistics
    """

    num_samples: int = 0
    num_batches: int = 0
    actors: int = 0
    time_s: float = 0.0
    driver_reduce_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------- inputs
def _check_dataset(dataset: Any, owner: str) -> None:
    if not isinstance(dataset, ray.data.Dataset):
        raise ConfigError(f"{owner} needs a ray.data.Dataset of inputs. Got {type(dataset).__name__}.")


def column_array(values: Any, column: str) -> np.ndarray:
    """A numeric numpy array (batch, *sample_shape) from a batch's column (tensor, list or scalar)."""
    array = np.asarray(values)
    if array.dtype == object:  # variable-shaped tensors or lists: stack them (shapes must agree)
        try:
            array = np.stack([np.asarray(v) for v in array]) if len(array) else array
        except ValueError as exc:
            raise ShapeError(
                f"The input column {column!r} has samples of different shapes ({exc}); every sample must "
                "have the teacher's input shape."
            ) from exc
    if array.dtype.kind not in "fiub":
        raise ConfigError(
            f"The input column {column!r} holds {array.dtype} values, not numbers; pass the column of "
            "numeric inputs with input_column=..."
        )
    return array


def pick_input_column(example: dict[str, Any], input_column: str | None, owner: str) -> str:
    """The column of inputs: ``input_column``, the only column, or the only tensor (vector) column."""
    columns = list(example)
    if input_column is not None:
        if input_column not in example:
            raise ConfigError(
                f"The input_column {input_column!r} of {owner} is not in the dataset; its columns are "
                f"{columns}."
            )
        return input_column
    if len(columns) == 1:
        return columns[0]
    shapes = {c: np.asarray(v).shape[1:] for c, v in example.items()}
    tensors = [c for c, v in example.items() if np.asarray(v).dtype != object and np.asarray(v).ndim >= 2]
    if len(tensors) == 1:
        return tensors[0]
    raise ConfigError(
        f"{owner} cannot tell which column of the dataset holds the inputs: it has columns "
        f"{ {c: tuple(s) for c, s in shapes.items()} } (per-sample shapes) and "
        f"{'no' if not tensors else len(tensors)} tensor column(s). Pass input_column=<name>."
    )


def prepare(
    teacher: Any, dataset: Any, *, input_column: str | None, dtype: torch.dtype, owner: str
) -> tuple[str, TeacherStructure]:
    """Check the teacher (before any Ray work), pick the input column, analyse the teacher on one row.

    Returns (column, structure). Raises UnsupportedLayerError, ConfigError (empty dataset, no usable
    column) or ShapeError (inputs the teacher cannot take).
    """
    _check_dataset(dataset, owner)
    module = teacher() if callable(teacher) and not isinstance(teacher, nn.Module) else teacher
    recorder = StateRecorder(module, dtype=dtype, device="cpu")  # unsupported layers fail here
    try:
        example = dataset.take_batch(1, batch_format="numpy")
    except ValueError as exc:
        if "empty" not in str(exc).lower():
            raise
        raise ConfigError(
            f"{owner} got an empty dataset (no rows); pass a ray.data.Dataset with at least one input."
        ) from exc
    column = pick_input_column(example, input_column, owner)
    x = torch.from_numpy(np.array(column_array(example[column], column)))
    try:
        structure = recorder.analyse(x)
    except IDLError:
        raise
    except Exception as exc:
        raise ShapeError(
            f"The teacher cannot take the samples of column {column!r} (per-sample shape "
            f"{tuple(x.shape[1:])}): {type(exc).__name__}: {exc}. Check input_column and the data's width."
        ) from exc
    return column, structure


# ---------------------------------------------------------------------------------------- workers
class _StateMapper:
    """The ``map_batches`` callable class: one instance per worker, the teacher loaded in ``__init__``.

    Modes: ``"stats"`` (one row per batch: the GramStats of ``[X S, U] -> [Z S, Y]``), ``"regenerate"``
    (the GramStats of ``[X_hat, U] -> Y``) and ``"states"`` (the states themselves, one row per sample,
    for the Parquet sink). A batch that cannot be recorded comes back as a row with ``error`` set.
    """

    def __init__(self, payload: list[Any]) -> None:
        from idl_ray.distributed.device import actor_device

        spec = ray.get(payload[0])
        torch.set_num_threads(spec["threads"])
        teacher = spec["teacher"]
        if callable(teacher) and not isinstance(teacher, nn.Module):
            teacher = teacher()  # a factory: the teacher is built (or loaded) here, once per worker
        self.device = actor_device()
        self.dtype = spec["dtype"]
        self.recorder = StateRecorder(teacher, dtype=self.dtype, device=self.device)
        structure: TeacherStructure = spec["structure"]
        self.recorder.structure = structure  # analysed once in the driver
        self.structure = structure
        self.column = spec["column"]
        self.mode = spec["mode"]
        self.scales = spec.get("scales")
        self.actor_id = uuid.uuid4().hex
        if self.mode == "regenerate":
            from idl_ray.implicit.activations import resolve_activation

            self.Ad, self.Bd = fixed_point_weights(
                spec["A"], spec["B"], spec["kappa"], self.dtype, self.device
            )
            slope = structure.negative_slope
            options = {} if slope is None else {"negative_slope": slope}
            self.activation = resolve_activation(structure.activation, **options)
            self.fixed_point = spec["fixed_point"]

    def __call__(self, batch: dict[str, Any]) -> dict[str, np.ndarray]:
        try:
            x = torch.from_numpy(np.array(column_array(batch[self.column], self.column)))
            b = x.shape[0]
            if x.is_floating_point():
                bad = ~torch.isfinite(x.reshape(b, -1)).all(dim=1)
                if bool(bad.any()):
                    first = int(bad.nonzero()[0, 0])
                    raise ConfigError(
                        f"non-finite input values (NaN or Inf) in {int(bad.sum())} of the batch's {b} rows "
                        f"(first at row {first} of the batch). Clean or filter the inputs first."
                    )
            states = self.recorder.record(x)
        except IDLError as exc:
            return self._error(exc, len(batch[self.column]))
        U, Y = states.U.T, states.Y.T
        if self.mode == "states":
            return {
                "U": U.cpu().numpy(),
                "Z": states.Z.T.cpu().numpy(),
                "X": states.X.T.cpu().numpy(),
                "Y": Y.cpu().numpy(),
                "error": np.full(b, "", dtype=object),
            }
        if self.mode == "regenerate":
            features = regenerated_features(self.Ad, self.Bd, U, self.activation, self.fixed_point)
            targets = Y
        else:
            features, targets = stage_batch(U, states.Z.T, states.X.T, Y, self.scales)
        stats = GramStats.from_batch(features, targets).to("cpu")
        return self._row(stats.G.numpy(), stats.Rt.numpy(), stats.target_sq.numpy(), b, "")

    def _row(self, G: np.ndarray, Rt: np.ndarray, tsq: np.ndarray, m: int, error: str) -> dict[str, Any]:
        return {
            "G": G[None],
            "Rt": Rt[None],
            "target_sq": tsq[None],
            "m": np.array([m], dtype=np.int64),
            "actor": np.array([self.actor_id], dtype=object),
            "error": np.array([error], dtype=object),
        }

    def _error(self, exc: IDLError, b: int) -> dict[str, Any]:
        message = f"{type(exc).__name__}|{b}|{exc}"
        s = self.structure
        if self.mode == "states":  # same column types as a good batch, so Ray Data can concatenate them
            dtype = np.float32 if self.dtype == torch.float32 else np.float64
            return {
                "U": np.zeros((1, s.num_inputs), dtype),
                "Z": np.zeros((1, s.num_hidden), dtype),
                "X": np.zeros((1, s.num_hidden), dtype),
                "Y": np.zeros((1, s.num_outputs), dtype),
                "error": np.array([message], dtype=object),
            }
        d = s.num_hidden + s.num_inputs
        rows = s.num_outputs if self.mode == "regenerate" else s.num_hidden + s.num_outputs
        return self._row(np.zeros((d, d)), np.zeros((rows, d)), np.zeros(rows), 0, message)


_MAPPERS: dict[str, _StateMapper] = {}


def _map_in_task(batch: dict[str, Any], payload: list[Any]) -> dict[str, np.ndarray]:
    """The ``map_batches`` function of a task-based pass: the worker process's mapper for this pass (built
    at its first batch, from the pass's payload, and kept for the next ones) maps the batch. A worker keeps
    the mappers of its last :data:`_KEPT_MAPPERS` passes, so an old teacher does not stay loaded for long."""
    from idl_ray.distributed.device import assigned_gpu_ids

    key = f"{payload[0].hex()}:{assigned_gpu_ids()}"  # a task on other GPUs builds its own
    mapper = _MAPPERS.pop(key, None) or _StateMapper(payload)
    _MAPPERS[key] = mapper  # most recent last
    while len(_MAPPERS) > _KEPT_MAPPERS:
        _MAPPERS.pop(next(iter(_MAPPERS)))
    return mapper(batch)


def raise_batch_error(message: str, first_row: int, column: str) -> None:
    """Re-raise a worker's error (``"Type|rows|text"``) in the driver, naming the dataset rows."""
    kind, rows, text = message.split("|", 2)
    cls = _ERROR_TYPES.get(kind, ConfigError)
    raise cls(
        f"Input column {column!r}, the batch of rows {first_row}..{first_row + int(rows) - 1} of the "
        f"dataset (in dataset order): {text}"
    )


def mapped(
    dataset: Any,
    teacher: Any,
    structure: TeacherStructure,
    column: str,
    config: StreamConfig,
    *,
    mode: str,
    dtype: torch.dtype,
    **extra: Any,
) -> Any:
    """``dataset.map_batches(_StateMapper, ...)`` on tasks or an actor pool (``config.compute``), order
    preserved, memory bounded."""
    spec = {
        "teacher": teacher,
        "structure": structure,
        "column": column,
        "mode": mode,
        "dtype": dtype,
        "threads": config.threads(),
        **extra,
    }
    use_gpu = config.resolve_use_gpu()
    config.check_cpus(float(ray.cluster_resources().get("CPU", 0.0)))
    payload = [ray.put(spec)]  # nested: fetched inside each worker, once
    workers = useful_workers(dataset, config)
    if config.uses_actors(use_gpu):
        work: dict[str, Any] = {
            "fn": _StateMapper,
            "fn_constructor_kwargs": {"payload": payload},
            "compute": ray.data.ActorPoolStrategy(size=workers),
        }
    else:
        work = {
            "fn": _map_in_task,
            "fn_kwargs": {"payload": payload},
            "compute": ray.data.TaskPoolStrategy(size=workers),
        }
    out = dataset.map_batches(
        **work,
        batch_size=config.batch_size,
        batch_format="numpy",
        num_cpus=config.cpus_per_actor,
        num_gpus=config.gpus_per_actor if use_gpu else 0,
    )
    ctx = out.context
    ctx.execution_options.preserve_order = True  # the driver names failing rows by position
    ctx.enable_progress_bars = config.progress
    if config.object_store_memory is not None:
        ctx.execution_options.resource_limits = ctx.execution_options.resource_limits.copy(
            object_store_memory=config.object_store_memory
        )
    return out


def useful_workers(dataset: Any, config: StreamConfig) -> int:
    """``config.num_actors``, or fewer for a materialised dataset (``ray.data.from_numpy`` and friends, whose
    blocks and rows are known without running anything) with fewer blocks or batches of ``config.batch_size``
    rows: a worker that gets no batch would only start (an actor pool's idle actor takes ~2 s and its CPU)
    and Ray Data warns that the concurrency cannot be used."""
    from ray.data.dataset import MaterializedDataset  # public, but not re-exported by ray.data

    if isinstance(dataset, MaterializedDataset):  # a block is never split between workers
        inputs = min(dataset.num_blocks(), math.ceil(dataset.count() / config.batch_size))
        return max(1, min(config.num_actors, inputs))
    return config.num_actors


def iterate(out: Any, owner: str, **kwargs: Any) -> Iterator[dict[str, np.ndarray]]:
    """The pipeline's output batches; a crash inside Ray becomes a DistributedError with its reason."""
    iterator = iter(out.iter_batches(batch_format="numpy", **kwargs))
    while True:
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except ray.exceptions.RayError as exc:
            lines = [line for line in str(exc).strip().splitlines() if line.strip()]
            raise DistributedError(
                f"{owner}: the Ray Data pipeline failed: {lines[-1] if lines else type(exc).__name__}"
            ) from exc
        yield batch


def reduce_dataset(
    dataset: Any,
    teacher: Any,
    structure: TeacherStructure,
    column: str,
    config: StreamConfig,
    *,
    mode: str = "stats",
    dtype: torch.dtype = torch.float32,
    owner: str = "SIM.fit",
    **extra: Any,
) -> tuple[GramStats, StreamInfo]:
    """One streaming pass: the summed GramStats of every batch (``mode`` "stats" or "regenerate")."""
    start = time.perf_counter()
    info = StreamInfo()
    G = Rt = tsq = None
    actors: set[str] = set()
    out = mapped(dataset, teacher, structure, column, config, mode=mode, dtype=dtype, **extra)
    for block in iterate(out, owner, batch_size=None):
        middle = time.perf_counter()
        for i in range(len(block["m"])):
            if block["error"][i]:
                raise_batch_error(str(block["error"][i]), info.num_samples, column)
            if G is None:  # copies: the block's arrays are read-only views of the object store
                G, Rt, tsq = (np.array(block[k][i]) for k in ("G", "Rt", "target_sq"))
            else:
                G += block["G"][i]
                Rt += block["Rt"][i]
                tsq += block["target_sq"][i]
            info.num_samples += int(block["m"][i])
            info.num_batches += 1
            actors.add(str(block["actor"][i]))
        info.driver_reduce_s += time.perf_counter() - middle
    if G is None:
        raise ConfigError(f"{owner} got an empty dataset (no rows); pass at least one input.")
    info.actors = len(actors)
    info.time_s = time.perf_counter() - start
    stats = GramStats(
        G=torch.from_numpy(G),
        Rt=torch.from_numpy(Rt),
        target_sq=torch.from_numpy(tsq),
        num_samples=info.num_samples,
    )
    return stats, info


def stream_states(
    teacher: Any,
    dataset: Any,
    *,
    input_column: str | None = None,
    dtype: torch.dtype = torch.float32,
    stream: StreamConfig | dict[str, Any] | None = None,
    rows: int | None = None,
) -> tuple[Iterator[dict[str, np.ndarray]], TeacherStructure, str]:
    """The teacher's states on a dataset as an ordered stream of batches ``{"U", "Z", "X", "Y"}``.

    Batch-first arrays (b, p), (b, n), (b, n), (b, q) in ``dtype``, exactly :class:`StateRecorder`'s
    states, in dataset order; ``rows`` sets the rows per yielded batch (None: as the pipeline makes them).
    Returns ``(batches, structure, column)``: the stream, the teacher's structure, the input column used.
    Used by :func:`idl_ray.distributed.write_states`; also handy to inspect states without a sink.
    """
    config = StreamConfig.coerce(stream)
    column, structure = prepare(
        teacher, dataset, input_column=input_column, dtype=dtype, owner="stream_states"
    )
    out = mapped(dataset, teacher, structure, column, config, mode="states", dtype=dtype)

    def batches() -> Iterator[dict[str, np.ndarray]]:
        seen = 0
        for batch in iterate(out, "stream_states", batch_size=rows):
            errors = np.flatnonzero(batch["error"] != "")
            if len(errors):
                raise_batch_error(str(batch["error"][errors[0]]), seen + int(errors[0]), column)
            seen += len(batch["error"])
            yield {k: batch[k] for k in ("U", "Z", "X", "Y")}

    return batches(), structure, column


# ---------------------------------------------------------------------------------------- SIM.fit
def fit_dataset(sim: Any, teacher: Any, dataset: Any, solver: Any, cfg: dict[str, Any]) -> Any:
    """``SIM.fit`` on a ``ray.data.Dataset``: stage statistics from streaming passes, then the solves.

    Stage 1 and (without ``regenerate_states``) stage 2 come from one pass; with ``regenerate_states``
    a second pass runs the fitted model's fixed point in the actors. The driver only ever holds the
    summed statistics, which go to ``solver`` as a :class:`~idl_ray.sim.problem.SIMProblem` (for the Ray
    solvers' gram strategy the driver forms H = G/m anyway; the consensus strategy splits the Gram).
    Timings per stage are in ``sim.stream_info_`` (``{"extraction", "regeneration"}`` -> StreamInfo).
    """
    config = StreamConfig.coerce(sim.stream)
    if cfg.get("well_posedness") == "mu_inf" and sim.regenerate_states:
        raise ConfigError(
            "SIM.fit on a ray.data.Dataset does not support well_posedness='mu_inf' with "
            "regenerate_states=True (the streaming actors solve the inf_norm fixed point). Use "
            "regenerate_states=False, or fit in process (tensors or a DataLoader)."
        )
    if cfg["variant"] == "exact" or (solver.needs_samples and not getattr(solver, "samples_optional", False)):
        raise ConfigError(
            f"SIM.fit streams a ray.data.Dataset into Gram statistics and keeps no samples, but "
            f"{'variant=exact' if cfg['variant'] == 'exact' else type(solver).__name__} needs the samples. "
            "Use a Gram solver (ADMMSolver, RayADMMSolver, LeastSquareSolver, ...), or write the states "
            "with idl_ray.distributed.write_states and fit them with SIM.fit_states."
        )
    dtype = cfg["dtype"]
    column, structure = prepare(teacher, dataset, input_column=sim.input_column, dtype=dtype, owner="SIM.fit")
    scales = sim._setup(structure, cfg)
    stats, info1 = reduce_dataset(
        dataset, teacher, structure, column, config, mode="stats", dtype=dtype, scales=scales
    )
    sim.stream_info_ = {"extraction": info1}

    def regenerate(A: torch.Tensor, B: torch.Tensor) -> tuple[GramStats, None]:
        stats2, info2 = reduce_dataset(
            dataset,
            teacher,
            structure,
            column,
            config,
            mode="regenerate",
            dtype=dtype,
            A=A,
            B=B,
            kappa=cfg["kappa"],
            fixed_point=cfg["fixed_point"],
        )
        sim.stream_info_["regeneration"] = info2
        return stats2, None

    # the regeneration pass runs Ray Data workers between the stages: a Ray solver's actors are not held
    # across it (on a small cluster they would leave it no CPU and the pass would wait forever)
    return sim._fit_stages(
        structure, scales, stats, None, solver, cfg, regenerate, info1.time_s,
        hold_solver=not sim.regenerate_states,
    )  # fmt: skip
