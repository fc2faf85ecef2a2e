"""Ray-distributed SIM solvers: drop-in :class:`~idl_ray.sim.solvers.base.BaseSolver` s.

``SIM(...).fit(teacher, data, solver=RayADMMSolver(num_workers=2))`` works like the single-process
``ADMMSolver`` and returns the same answer; ``solver.solve(ShardedProblem(...))`` solves a stage whose
samples stay in shards (object store, Parquet files, Ray Dataset) loaded inside the actors.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import ray
import torch

from idl_ray._validation import check_choice, resolve_settings
from idl_ray.distributed import resources
from idl_ray.distributed.checkpoint import Checkpointer
from idl_ray.distributed.config import RayRunConfig
from idl_ray.distributed.consensus import run_consensus
from idl_ray.distributed.gram import RunInfo, reduce_stats, run_gram
from idl_ray.distributed.pool import WorkerPool
from idl_ray.distributed.progress import ProgressEvent, ProgressReporter, Timings, plot_convergence
from idl_ray.distributed.sharded import ShardedProblem
from idl_ray.distributed.shards import ShardSource, StatsShard, assign, split_rows, tensor_sources
from idl_ray.errors import ConfigError, ConfigTypeError, ConvergenceWarning
from idl_ray.sim.problem import GramStats, SIMProblem
from idl_ray.sim.solvers.admm_kernels import ADMMOptions
from idl_ray.sim.solvers.base import BaseSolver, SolveResult, SolverStats, register_solver
from idl_ray.sim.solvers.row_block import BLOCK_COUNTS
from idl_ray.sim.solvers.scaling import ScaledStage

STRATEGIES = ("gram", "consensus")


def _split_settings(
    owner: str, options: Any, run_config: Any, kwargs: dict[str, Any], option_type: type
) -> tuple[Any, RayRunConfig]:
    """Sort keyword arguments into algorithm options and the run config; unknown names are rejected."""
    option_names = {f.name for f in dataclasses.fields(option_type)}
    run_names = {f.name for f in dataclasses.fields(RayRunConfig)}
    unknown = sorted(set(kwargs) - option_names - run_names)
    if unknown:
        raise ConfigError(
            f"Unknown keyword argument(s) {unknown} for {owner}. Valid ones are "
            f"{sorted(option_names | run_names | {'options', 'run_config', 'strategy', 'callback'})}."
        )
    option_values = {k: v for k, v in kwargs.items() if k in option_names}
    run_values = {k: v for k, v in kwargs.items() if k in run_names}
    options = resolve_settings(owner, "options", "option", options, option_values, option_type)
    run_config = resolve_settings(owner, "run_config", "run", run_config, run_values, RayRunConfig)
    return options, run_config


def _split_run_config(owner: str, run_config: Any, kwargs: dict[str, Any]) -> RayRunConfig:
    """The run config from ``run_config=`` or run keywords (not both); unknown keywords are rejected."""
    run_names = {f.name for f in dataclasses.fields(RayRunConfig)}
    unknown = sorted(set(kwargs) - run_names)
    if unknown:
        raise ConfigError(
            f"Unknown keyword argument(s) {unknown} for {owner}. Valid run settings are {sorted(run_names)}."
        )
    return resolve_settings(owner, "run_config", "run", run_config, kwargs, RayRunConfig)


#: run settings a started pool fixed when it was made: with ``workers=`` they would be ignored
POOL_SETTINGS = (
    "num_workers",
    "use_gpu",
    "cpus_per_worker",
    "gpus_per_worker",
    "placement_strategy",
    "threads",
)


def check_shared_pool(owner: str, workers: Any, kwargs: dict[str, Any]) -> None:
    """Refuse resource keywords next to ``workers=`` (the pool's own config decides them)."""
    if workers is None:
        return
    if not isinstance(workers, WorkerPool):
        raise ConfigTypeError(f"workers must be a WorkerPool. Got {type(workers).__name__}.")
    clashing = sorted(k for k in POOL_SETTINGS if k in kwargs)
    if clashing:
        raise ConfigError(
            f"{owner}: {clashing} would be ignored with workers=: the started pool's own config decides "
            f"them ({', '.join(f'{k}={getattr(workers.config, k)!r}' for k in clashing)}). Drop them, or "
            "start a WorkerPool with the settings you want."
        )


def _even_stats_split(problem: SIMProblem, parts: int) -> list[ShardSource]:
    """Split a problem's statistics into ``parts`` weighted pieces that sum to it (consensus without samples)."""
    sizes = [s.stop - s.start for s in split_rows(problem.num_samples, parts)]
    sources: list[ShardSource] = []
    for size in sizes:
        w = size / problem.num_samples
        piece = GramStats(
            G=problem.G * w, Rt=problem.Rt * w, target_sq=problem.target_sq * w, num_samples=size
        )
        sources.append(StatsShard(ray.put(piece)))
    return sources


class _RaySolverMixin:
    """Shared plumbing: the run config, telemetry, plotting."""

    # sample shards are preferred (data parallel); without them the Gram statistics are split instead
    samples_optional = True
    run_config: RayRunConfig
    last_timings_: dict[str, float]
    _pool: WorkerPool | None = None
    _shared_pool: WorkerPool | None = None
    _starting: threading.Thread | None = None
    _start_error: BaseException | None = None
    _sessions: int = 0  # open session() scopes: a pool started inside one is kept until the last ends

    def start_workers(self) -> None:
        """Start the kept actors now, on a background thread, so their start-up overlaps the caller's own work
        (the sim job trains its teacher meanwhile); the next solve waits for them, and a failure to start is
        raised there. Needs ``keep_workers=True``; a no-op when they are started or starting."""
        if not self.run_config.keep_workers:
            raise ConfigError(
                f"{type(self).__name__}.start_workers() keeps the actors for later solves: construct the "
                "solver with keep_workers=True."
            )
        if self._pool is not None or self._starting is not None:
            return

        def start() -> None:
            try:
                self._pool = WorkerPool(self.run_config)
            except BaseException as exc:  # raised by the solve that waits for the pool
                self._start_error = exc

        self._starting = threading.Thread(target=start, name="idl_ray-start-workers", daemon=True)
        self._starting.start()

    def _wait_started(self) -> None:
        """Join a :meth:`start_workers` thread; re-raise its failure."""
        if self._starting is None:
            return
        self._starting.join()
        self._starting = None
        if self._start_error is not None:
            error, self._start_error = self._start_error, None
            raise error

    @contextlib.contextmanager
    def session(self) -> Iterator[Any]:
        """Keep the actors for every solve inside the ``with`` block and stop them at its end: the two
        stages of :meth:`SIM.fit <idl_ray.sim.estimator.SIM.fit>` (which holds one) then share one pool, and
        each worker keeps the factored H of a stage for the next solve on the same Gram. Measured on the
        784-input digits teacher: starting two actors takes 1.2-1.5 s, paid once per fit instead of once per
        stage (except a fit on a Ray Dataset with ``regenerate_states``, whose regeneration pass between the
        stages needs the CPUs). A no-op when the actors are kept anyway (``keep_workers=True``,
        ``workers=``); scopes nest."""
        owns = self._sessions == 0 and not self.run_config.keep_workers and self._shared_pool is None
        self._sessions += 1
        try:
            yield self
        finally:
            self._sessions -= 1
            if owns:
                self.close()

    def _acquire_pool(self) -> WorkerPool:
        """A started pool: the caller's (``workers=``), the kept one (``keep_workers``), or a new one."""
        self._wait_started()
        if self._shared_pool is not None:
            if not self._shared_pool.actors:
                raise ConfigError("The WorkerPool passed as workers= was shut down; start a new one.")
            self._shared_pool.restarts = 0  # the budget is per solve (and covers a loss found at reset)
            self._shared_pool.release_data()
            return self._shared_pool
        if self._pool is not None:
            try:
                self._pool.restarts = 0
                self._pool.release_data()
                return self._pool
            except Exception:  # a kept actor died between solves: start afresh
                self.close()
        pool = WorkerPool(self.run_config)
        if self.run_config.keep_workers or self._sessions:
            self._pool = pool
        return pool

    def _release_pool(self, pool: WorkerPool) -> None:
        if pool is not self._pool and pool is not self._shared_pool:
            pool.shutdown()

    def close(self) -> None:
        """Stop kept actors and free their resources (no-op without ``keep_workers``)."""
        try:
            self._wait_started()
        except BaseException:  # closing: a pool that failed to start holds nothing
            pass
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def __enter__(self):
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_pool"] = state["_shared_pool"] = None  # actor handles do not travel with a pickled solver
        state["_starting"] = state["_start_error"] = None
        state["callback"] = None
        return state

    def _stats_extra(self, pool: WorkerPool, timings: Timings, info: RunInfo | None) -> dict[str, Any]:
        extra: dict[str, Any] = {
            "num_workers": pool.size,
            "use_gpu": pool.use_gpu,
            "devices": [i.get("device") for i in pool.infos],
            "pids": [i.get("pid") for i in pool.infos],
            "timings": timings.as_dict(),
        }
        if info is not None:
            extra.update(
                {
                    "rho": info.rho,
                    "primal_residual": info.primal,
                    "dual_residual": info.dual,
                    "eps_primal": info.eps_primal,
                    "eps_dual": info.eps_dual,
                    "restarts": info.restarts,
                    "checkpoints": info.checkpoints,
                    "relative_gap": info.relative_gap,
                    "gram_shipped": info.gram_shipped,
                    **{name: getattr(info, name) for name in BLOCK_COUNTS},
                }
            )
        return extra

    @staticmethod
    def plot(stats: SolverStats, path: str | None = None) -> Any:
        """Convergence plot (primal/dual residuals) of a solve's ``stats.history`` (matplotlib, lazy)."""
        return plot_convergence(stats.history, path, title=f"{stats.solver} convergence")

    @staticmethod
    def _record_load(pool: WorkerPool, timings: Timings) -> None:
        # shards load in parallel inside the actors' constructors: the slowest one is what the solve waits for
        timings.add("load", max((i.get("load_s", 0.0) for i in pool.infos), default=0.0))
        timings.add("gram", max((i.get("gram_s", 0.0) for i in pool.infos), default=0.0))


@register_solver("ray_admm")
class RayADMMSolver(_RaySolverMixin, BaseSolver):
    """ADMM for a SIM stage on Ray actors, with the single-process answer and telemetry.

    Minimises ``1/(2m) ||T - W Phi||^2 + lam ||W||_1 + l2/2 ||W||^2`` subject to
    ``||W[i, :n_constrained]||_1 <= kappa`` (see :class:`~idl_ray.sim.problem.SIMProblem`).

    Warm starts and repeated solves (gram strategy): ``solve(problem, initial=W0)`` starts every block from
    the given weights (see :class:`~idl_ray.sim.solvers.ADMMSolver`); the consensus strategy starts cold.
    With kept workers (``keep_workers=True`` or ``workers=``) each worker keeps the factored H of its last
    solve, named after the problem's G object, l2 and m: a solve on the same G (stage 2 after stage 1, every
    point of :meth:`SIM.fit_path <idl_ray.sim.estimator.SIM.fit_path>`) sends and factors nothing, and
    ``stats.extra["gram_shipped"]`` counts the workers H was sent to.

    Parameters
    ----------
    num_workers : int, default 2
        Solver actors (one per GPU on GPU clusters).
    use_gpu : bool or None, default None
        See :class:`~idl_ray.distributed.config.RayRunConfig`.
    strategy : {"gram", "consensus"}, default "gram"
        ``"gram"``: the workers' statistics are reduced once, H = G/m + l2 I is broadcast once, rows of W
        are sharded across workers, and each runs cached-factor ADMM on its rows; only six residual sums
        travel per check. ``"consensus"``: global-variable consensus ADMM across sample shards; each
        worker factors its own H_k, the driver forms the (over-relaxed) consensus, applies the prox and the
        kappa projection, and every ``check_every`` iterations certifies it by the duality gap from one
        gradient round trip, polishing nearly optimal rows with H_SS gathered from the workers; (rows x d)
        values travel per iteration, only |S| x |S| blocks at polishing checks (none with polish=False). See ``docs/distributed.md`` for when to use which.
    options : ADMMOptions or dict, optional
        Algorithm settings (or pass them as keywords: ``rho``, ``max_iter``, ``abs_tol``, ``rel_tol``,
        ``adaptive_rho``, ``check_every``, ``mu``, ``tau``).
    run_config : RayRunConfig or dict, optional
        Ray settings (or pass them as keywords: ``cpus_per_worker``, ``max_restarts``,
        ``placement_strategy``, ``checkpoint_every``, ``checkpoint_dir``, ``timeout_s``, ``progress``, ...).
    callback : callable, optional
        Called with a :class:`~idl_ray.distributed.progress.ProgressEvent` after every stopping test.
    warn : bool, default True
        Emit a :class:`~idl_ray.errors.ConvergenceWarning` when ``max_iter`` is reached.
    workers : WorkerPool, optional
        Started actors to use (shared between solvers, never stopped by them); their resources come from
        the pool's own config, which then replaces ``num_workers``, ``use_gpu`` and ``cpus_per_worker``.
    warm_start : bool, default True
        Gram strategy: start rows at the prox of the least-squares fit where it is already certified, and
        every row at lam = 0, as :class:`~idl_ray.sim.solvers.ADMMSolver` does (each worker computes its
        rows' start from its factored H: :func:`~idl_ray.sim.solvers.start.start_state`).

    Attributes
    ----------
    last_timings_ : dict, seconds per phase of the last solve (startup, load, gram, factor, iterations,
        communication, checkpoint, recovery); also in ``stats.extra["timings"]``.

    Examples
    --------
    >>> import ray, torch
    >>> from idl_ray.sim.problem import SIMProblem
    >>> ray.init(num_cpus=2, include_dashboard=False)  # doctest: +SKIP
    >>> Phi = torch.randn(500, 8, dtype=torch.float64); T = torch.randn(500, 4, dtype=torch.float64)
    >>> problem = SIMProblem.from_samples(Phi, T, n_constrained=4, lam=1e-3, kappa=0.5)
    >>> result = RayADMMSolver(num_workers=2, cpus_per_worker=0.5).solve(problem)  # doctest: +SKIP
    >>> result.stats.constraint_violation  # doctest: +SKIP
    0.0
    """

    variants = frozenset({"lasso", "elastic_net", "least_squares"})
    uses_initial = True  # the gram strategy starts from ``solve(problem, initial=W0)``; consensus ignores it
    _gram_G: torch.Tensor | None = None
    _gram_name: tuple[Any, ...] | None = None

    #: both strategies honour ``problem.l1_weights``: gram gives each worker its rows' thresholds,
    #: consensus applies them in the driver's prox and certificate
    supports_l1_weights = True

    def __init__(
        self,
        *,
        num_workers: int | None = None,
        use_gpu: bool | None = None,
        strategy: str = "gram",
        options: ADMMOptions | dict[str, Any] | None = None,
        run_config: RayRunConfig | dict[str, Any] | None = None,
        callback: Callable[[ProgressEvent], None] | None = None,
        warn: bool = True,
        workers: WorkerPool | None = None,
        warm_start: bool = True,
        **kwargs: Any,
    ) -> None:
        self._shared_pool = workers
        self.warm_start = bool(warm_start)
        self.strategy = check_choice(strategy, "strategy", type(self).__name__, STRATEGIES)
        # consensus shards samples: ask SIM to keep them (without them the Gram is split evenly instead)
        self.needs_samples = self.strategy == "consensus"
        if num_workers is not None:
            kwargs["num_workers"] = num_workers
        if use_gpu is not None:
            kwargs["use_gpu"] = use_gpu
        check_shared_pool(type(self).__name__, workers, kwargs)
        self.options, self.run_config = _split_settings(
            type(self).__name__, options, run_config, kwargs, ADMMOptions
        )
        self.callback = callback
        self.warn = bool(warn)
        self.last_timings_: dict[str, float] = {}
        self._params = {
            "strategy": self.strategy,
            "warm_start": self.warm_start,
            **self.options.to_dict(),
            **self.run_config.to_dict(),
        }

    # ------------------------------------------------------------------ public entry points
    def solve(  # type: ignore[override]
        self, problem: SIMProblem | ShardedProblem, initial: torch.Tensor | None = None
    ) -> SolveResult:
        """Solve a :class:`SIMProblem` (like ``ADMMSolver``) or a :class:`ShardedProblem` (shards in actors)."""
        if isinstance(problem, ShardedProblem):
            return self._solve_sharded(problem)
        return super().solve(problem, initial=initial)

    def reduce(self, problem: ShardedProblem) -> SIMProblem:
        """Load the shards inside the actors and return the summed single-process problem (no solve)."""
        pool = self._acquire_pool()
        try:
            pool.load(assign(problem.sources, pool.size))
            return problem.with_stats(reduce_stats(pool, Timings()))
        finally:
            self._release_pool(pool)

    # ------------------------------------------------------------------ BaseSolver hook (SIMProblem)
    def _solve(
        self, problem: SIMProblem, initial: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        timings = Timings()
        if self.strategy == "gram":
            with timings.phase("startup"):
                pool = self._acquire_pool()
            try:
                W, info = self._gram(pool, problem, timings, initial, self._gram_key(problem))
                return W, self._info(pool, timings, info)
            finally:
                self._release_pool(pool)
        with timings.phase("startup"):
            pool = self._acquire_pool()
        try:
            if problem.samples is not None:
                sources = tensor_sources(problem.samples.features, problem.samples.targets, pool.size)
            else:
                sources = _even_stats_split(problem, pool.size)
            pool.load([[s] for s in sources])
            self._record_load(pool, timings)
            W, info = self._consensus(pool, problem.num_samples, problem, timings)
            return W, self._info(pool, timings, info)
        finally:
            self._release_pool(pool)

    def _gram_key(self, problem: SIMProblem) -> str:
        """A name for this problem's H = G/m + l2 I: the same while the same G object (and l2, m) comes back
        (stage 2 after stage 1, every point of a lambda path), so kept workers factor it once."""
        ident = (problem.l2, problem.num_samples, problem.dim)
        if self._gram_G is not problem.G or self._gram_name is None or self._gram_name[0] != ident:
            self._gram_G, self._gram_name = problem.G, (ident, uuid.uuid4().hex)
        return self._gram_name[1]

    def _gram(
        self,
        pool: WorkerPool,
        problem: SIMProblem,
        timings: Timings,
        initial: torch.Tensor | None = None,
        gram_key: str | None = None,
    ) -> tuple[torch.Tensor, RunInfo]:
        """The gram strategy on started workers: broadcast H once (or not at all when the workers hold it
        under ``gram_key``), rows sharded, ADMM on each block from ``initial`` (zeros by default)."""
        lam, kappa, n_constrained = self._penalties(problem)
        H, R = problem.scaled(dtype=torch.float64)
        # the workers solve the block-equilibrated problem of a bounded stage, as ADMMSolver does
        scaled = ScaledStage.of(
            H, R, lam, kappa, n_constrained, equilibrate=self.options.equilibrate, initial=initial
        )
        if gram_key is not None and scaled.scaling is not None:  # another matrix: its own name on the workers
            gram_key = f"{gram_key}:equilibrated-{n_constrained}"
        W, info = run_gram(
            pool,
            scaled.H,
            scaled.R,
            problem.target_sq / problem.num_samples,
            lam=scaled.lam,
            kappa=scaled.kappa,
            n_constrained=n_constrained,
            options=self.options,
            checkpointer=self._checkpointer(),
            reporter=self._reporter(),
            timings=timings,
            initial=scaled.initial,
            warm_start=self.warm_start,
            gram_key=gram_key,
        )
        return scaled.weights(W, problem), info

    # ------------------------------------------------------------------ ShardedProblem
    def _solve_sharded(self, sharded: ShardedProblem) -> SolveResult:
        start = time.perf_counter()
        timings = Timings()
        with timings.phase("startup"):
            pool = self._acquire_pool()
        try:
            pool.load(assign(sharded.sources, pool.size))
            self._record_load(pool, timings)
            if self.strategy == "gram":
                problem = sharded.with_stats(reduce_stats(pool, timings))
                W, info = self._gram(pool, problem, timings)
                objective = problem.objective(W)
                violation = problem.constraint_violation(W)
                norm = problem.constraint_norm(W) if problem.n_constrained else None
            else:
                W, info = self._consensus(pool, None, sharded, timings)
                objective, violation, norm = self._sharded_objective(pool, sharded, W)
            info_dict = self._info(pool, timings, info)
        finally:
            self._release_pool(pool)
        stats = SolverStats(
            solver=self.name,
            iterations=info_dict["iterations"],
            converged=info_dict["converged"],
            objective=objective,
            constraint_violation=violation,
            constraint_norm=norm,
            time_s=time.perf_counter() - start,
            status=info_dict["status"],
            history=info_dict["history"],
            extra=info_dict["extra"],
        )
        return SolveResult(weights=W, stats=stats)

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _penalties(problem: Any) -> tuple[Any, float | None, int]:
        """(lam or per-entry thresholds, kappa, n_constrained) of a SIMProblem or a ShardedProblem."""
        if isinstance(problem, SIMProblem):
            lam = problem.thresholds
        else:
            lam = 0.0 if problem.variant == "least_squares" else problem.lam
        kappa = problem.kappa
        return lam, kappa, problem.n_constrained if kappa is not None else 0

    def _consensus(self, pool: WorkerPool, m: int | None, problem: Any, timings: Timings):
        """Consensus ADMM on the pool's shards; ``m`` (all samples) defaults to the sum of the shards'."""
        lam, kappa, n_constrained = self._penalties(problem)
        l2 = 0.0 if problem.variant == "least_squares" else problem.l2
        summaries = pool.retry(
            "shard summaries",
            lambda: resources.get(
                [a.shard_summary.remote() for a in pool.actors],
                self.run_config.timeout_s,
                "the shard summaries",
            ),
        )
        d, rows = summaries[0]["dim"], summaries[0]["rows"]
        m = sum(s["num_samples"] for s in summaries) if m is None else m
        trace_G = sum(s["trace"] for s in summaries)
        target_sq = summaries[0]["target_sq"]
        for summary in summaries[1:]:
            target_sq = target_sq + summary["target_sq"]
        self._last_m = m
        return run_consensus(
            pool,
            rows=rows,
            d=d,
            total_samples=m,
            trace_G=trace_G,
            target_sq=target_sq,
            lam=lam,
            l2=l2,
            kappa=kappa,
            n_constrained=n_constrained,
            options=self.options,
            checkpointer=self._checkpointer(),
            reporter=self._reporter(),
            timings=timings,
        )

    def _sharded_objective(self, pool: WorkerPool, sharded: ShardedProblem, W: torch.Tensor):
        m = self._last_m
        parts = pool.retry(
            "objective",
            lambda: resources.get(
                [a.quadratic_part.remote(W) for a in pool.actors],
                self.run_config.timeout_s,
                "the objective parts",
            ),
        )
        objective = 0.5 * max(sum(parts), 0.0) / m
        if sharded.variant != "least_squares":
            objective += sharded.lam * float(W.abs().sum()) + 0.5 * sharded.l2 * float((W * W).sum())
        if sharded.kappa is not None and sharded.n_constrained:
            norm = float(W[:, : sharded.n_constrained].abs().sum(dim=1).max())
            violation = max(0.0, norm - sharded.kappa)
        else:
            norm = None
            violation = 0.0
        return objective, violation, norm

    def _checkpointer(self) -> Checkpointer:
        return Checkpointer(
            self.run_config.checkpoint_every, self.run_config.checkpoint_dir, name=f"ray-admm-{self.strategy}"
        )

    def _reporter(self) -> ProgressReporter:
        return ProgressReporter(
            self.strategy,
            self.options.max_iter,
            progress=self.run_config.progress,
            log_every=self.run_config.log_every,
            callback=self.callback,
        )

    def _info(self, pool: WorkerPool, timings: Timings, info: RunInfo) -> dict[str, Any]:
        self.last_timings_ = timings.as_dict()
        if not info.converged and self.warn:
            if info.relative_gap is not None:
                reached = (
                    f"a relative duality gap of {info.relative_gap:.3g} (tolerance gap_tol="
                    f"{self.options.gap_tol:.3g})"
                )
                advice = "raise max_iter or gap_tol"
            else:
                reached = (
                    f"primal residual {info.primal:.3g} (tolerance {info.eps_primal:.3g}) and dual residual "
                    f"{info.dual:.3g} (tolerance {info.eps_dual:.3g})"
                )
                advice = "raise max_iter or loosen abs_tol/rel_tol"
            stop = (
                "stalled (objective and gap unchanged)"
                if info.stalled
                else f"stopped at max_iter={self.options.max_iter}"
            )
            warnings.warn(
                f"{type(self).__name__} ({self.strategy}) {stop} with "
                f"{reached}. The weights satisfy the kappa bound but may be suboptimal: {advice}.",
                ConvergenceWarning,
                stacklevel=4,
            )
        return {
            "iterations": info.iterations,
            "converged": info.converged,
            "status": "optimal" if info.converged else ("stalled" if info.stalled else "max_iter"),
            "history": info.history,
            "extra": {"strategy": self.strategy, **self._stats_extra(pool, timings, info)},
        }


@register_solver("admm_multi_gpu")
class ADMMMultiGPUSolver(RayADMMSolver):
    """torchidl's ``ADMMMultiGPUSolver(gpu_ids=...)``, working: one GPU actor per listed GPU.

    Built on :class:`RayADMMSolver` (gram strategy by default) with ``num_workers = len(gpu_ids)`` and
    ``use_gpu=True``. Ray, not the caller, decides which physical GPU each actor gets (each actor reads its
    device from its assignment), so ``gpu_ids`` fixes how many GPUs are used; to pin physical devices,
    start Ray with ``CUDA_VISIBLE_DEVICES`` set to them. Asking for more GPUs than the cluster has fails at
    once with :class:`~idl_ray.errors.DistributedError`.

    Parameters
    ----------
    gpu_ids : sequence of int, default (0,)
    **kwargs : as :class:`RayADMMSolver` (not ``num_workers`` / ``use_gpu``)
    """

    def __init__(self, gpu_ids: Any = (0,), **kwargs: Any) -> None:
        if isinstance(gpu_ids, int):
            gpu_ids = [gpu_ids]
        ids = list(gpu_ids)
        if not ids or len(set(ids)) != len(ids):
            raise ConfigError(
                f"ADMMMultiGPUSolver needs a non-empty list of distinct gpu_ids. Got {gpu_ids!r}."
            )
        for key in ("num_workers", "use_gpu"):
            if key in kwargs:
                raise ConfigError(f"ADMMMultiGPUSolver sets {key} from gpu_ids; do not pass it.")
        super().__init__(num_workers=len(ids), use_gpu=True, **kwargs)
        self.gpu_ids = ids
        self._params["gpu_ids"] = ids


__all__ = ["STRATEGIES", "ADMMMultiGPUSolver", "RayADMMSolver"]
