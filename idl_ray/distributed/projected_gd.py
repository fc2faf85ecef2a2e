"""Projected (proximal) gradient on Ray: the Gram summed over the solver actors' shards once, or the gradient
summed over them every step.

**gram** (the default): the actors build the Gram of their sample shards, a tree of Ray tasks sums them
(:func:`~idl_ray.distributed.gram.reduce_stats`), and the driver runs the single-process solve on H
(:func:`~idl_ray.sim.solvers.projected_gd.projected_gd_on_gram`: the same iterations and answer as
:class:`~idl_ray.sim.solvers.projected_gd.ProjectedGDLowRankSolver`). A step costs rows x d^2 flops wherever
it runs, and a round trip per step (~8-16 ms on one machine) costs more than the step at the digits
teachers' sizes: the `idl-ray sim` job's default fit took 74.5 s with the gradient summed every step and takes
5.8 s so (docs/benchmarks/sim.md, thirteenth session). Once the Gram is summed no actor is needed, so a lost one
costs nothing. A :class:`SIMProblem` already holds its Gram: it is solved on the driver without actors.

**data**: for a Gram too large to gather (or to keep the statistics in the actors), the gradient of the
quadratic part splits over sample shards::

    grad(W) = W H - R = sum_k (W G_k - Rt_k) / m + l2 W,

so each step broadcasts the iterate once, every worker returns its part from its own (G_k, Rt_k), and the
driver sums the parts and takes the step: FISTA with gradient restart and the exact prox (soft-threshold
then kappa projection, :func:`~idl_ray.sim.solvers.admm_kernels.prox`) at full rank, or Adam on
A = L R^T (low rank) through autograd on the driver, with the same final row scaling and B refit as the
single-process :class:`~idl_ray.sim.solvers.projected_gd.ProjectedGDLowRankSolver`. The step size 1/L uses
L = sum_k lambda_max(G_k / m) + l2 >= lambda_max(H) (tight for similar shards), so no worker ever ships
its d x d statistics. The iterate lives on the driver, so a dead worker costs only its recreation: the
step it was in is retried.

Stopping: every ``check_every`` iterations one more gradient round trip at the iterate W gives
``W H = grad(W) + R``, and with R = Rt/m and ||t||^2/m (the stage's totals, held by the driver) the exact
duality gap of :func:`~idl_ray.sim.solvers.certificate.duality_gap_from_product`; FISTA stops when every
row is certified to ``gap_tol``. Polishing needs H restricted to the union S of the rows' supports:
the workers return their ``G_k[S, S] / m`` (:meth:`~idl_ray.distributed.actors.SolverWorker.gram_restricted`),
whose sum plus l2 I is H_SS.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from idl_ray._validation import check_choice
from idl_ray.distributed import resources
from idl_ray.distributed.certify import ShardCertificate
from idl_ray.distributed.config import RayRunConfig
from idl_ray.distributed.gram import reduce_stats
from idl_ray.distributed.pool import WorkerPool
from idl_ray.distributed.progress import Timings
from idl_ray.distributed.sharded import ShardedProblem
from idl_ray.distributed.shards import assign, tensor_sources
from idl_ray.distributed.solvers import (
    _even_stats_split,
    _RaySolverMixin,
    _split_run_config,
    check_shared_pool,
)
from idl_ray.errors import ConfigError
from idl_ray.sim.problem import SIMProblem
from idl_ray.sim.solvers.base import BaseSolver, SolveResult, SolverStats, register_solver
from idl_ray.sim.solvers.projected_gd import (
    fista_info,
    fista_loop,
    low_rank_adam,
    low_rank_info,
    projected_gd_on_gram,
    set_gradient_settings,
)

__all__ = ["STRATEGIES", "RayProjectedGDSolver"]

#: where the iterations run: on the summed Gram (the driver), or on gradients summed over the actors each step
STRATEGIES = ("gram", "data")


class _DistributedGradient:
    """grad(W) = sum_k (W G_k - Rt_k)/m + l2 W over a pool, retrying a step when a worker dies."""

    def __init__(self, pool: WorkerPool, total_samples: int, l2: float, timings: Timings) -> None:
        self.pool, self.m, self.l2, self.timings = pool, total_samples, l2, timings
        self.calls = 0

    def __call__(self, W: torch.Tensor) -> torch.Tensor:
        while True:
            begin = time.perf_counter()
            try:
                parts = self.pool.call("gradient_part", W.detach().cpu(), self.m, what="gradient parts")
            except Exception as exc:
                if not resources.is_actor_failure(exc):
                    raise
                with self.timings.phase("recovery"):
                    self.pool.recover(exc)  # the recreated worker reloads its shard; the step is retried
                continue
            self.timings.round_trip(time.perf_counter() - begin, [p[1] for p in parts])
            self.calls += 1
            grad = parts[0][0]
            for part, _ in parts[1:]:
                grad = grad + part
            return grad + self.l2 * W.detach() if self.l2 else grad

    def lipschitz(self) -> float:
        values = self.pool.retry(
            "eigenvalues",
            lambda: resources.get(
                [a.max_eigenvalue.remote(self.m) for a in self.pool.actors],
                self.pool.config.timeout_s,
                "eigenvalues",
            ),
        )
        return max(sum(values) + self.l2, 1e-300)

    def restricted_hessian(self, index: torch.Tensor) -> torch.Tensor:
        """H_SS = sum_k G_k[S, S] / m + l2 I for the columns ``index`` (retried when a worker dies)."""
        while True:
            try:
                parts = self.pool.call("gram_restricted", index, self.m, what="restricted Gram blocks")
            except Exception as exc:
                if not resources.is_actor_failure(exc):
                    raise
                with self.timings.phase("recovery"):
                    self.pool.recover(exc)
                continue
            H = parts[0]
            for part in parts[1:]:
                H = H + part
            if self.l2:
                H = H + self.l2 * torch.eye(H.shape[0], dtype=H.dtype)
            return H


def certified_fista(
    grad: Any,
    R: torch.Tensor,
    target_sq: torch.Tensor,
    *,
    lam: float | torch.Tensor,
    kappa: float | None,
    n_constrained: int,
    max_iter: int,
    gap_tol: float,
    check_every: int,
    polish: bool,
    lipschitz: float,
    W0: torch.Tensor | None = None,
    restricted_hessian: Any = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """FISTA (:func:`~idl_ray.sim.solvers.projected_gd.fista_loop`) on a gradient summed over the actors,
    certified by the duality gap from ``W H = grad(W) + R`` (R: rows x d, Rt/m; target_sq: ||t||^2/m) and
    polished on the union of the supports (:class:`~idl_ray.distributed.certify.ShardCertificate`)."""
    certificate = ShardCertificate(
        grad,
        R,
        target_sq,
        lam=lam,
        kappa=kappa,
        n_constrained=n_constrained,
        restricted_hessian=restricted_hessian if polish else None,
    )
    return fista_loop(
        grad,
        torch.zeros_like(R) if W0 is None else W0,
        step=1.0 / lipschitz,
        lam=lam,
        kappa=kappa,
        n_constrained=n_constrained,
        max_iter=max_iter,
        check_every=check_every,
        certify=certificate,
        gap_tol=gap_tol,
        polish=certificate.polish if polish and restricted_hessian is not None else None,
    )


@register_solver("ray_projected_gd")
class RayProjectedGDSolver(_RaySolverMixin, BaseSolver):
    """Projected gradient (FISTA, or low-rank A = L R^T with Adam) on the Gram of the Ray actors' shards.

    Same algorithm and settings as :class:`~idl_ray.sim.solvers.projected_gd.ProjectedGDLowRankSolver`;
    the samples stay in the workers' shards (a :class:`ShardedProblem`, or the problem's samples with
    ``strategy="data"``).

    Parameters
    ----------
    rank, max_iter, tol, gap_tol, lr, penalty, check_every, method, polish, warn, seed :
        As in ``ProjectedGDLowRankSolver`` (FISTA stops on the duality gap; the low-rank fit reports the
        certificate of the convex refit of B with A fixed).
    strategy : {"gram", "data"}, default "gram"
        "gram": the actors' shard Grams are summed once and the iterations run on the driver with no round
        trip (a SIMProblem, which holds its Gram, needs no actor); "data": every step sums the gradient
        over the actors (no d x d matrix leaves them: for a Gram too large to gather). See the module
        docstring.
    num_workers, use_gpu, run_config, workers, **run keywords :
        As in :class:`~idl_ray.distributed.solvers.RayADMMSolver`.
    """

    #: full rank (FISTA) honours ``problem.l1_weights``; the low-rank fit raises a ConfigError for them
    supports_l1_weights = True

    def __init__(
        self,
        *,
        rank: int | None = None,
        max_iter: int = 20_000,
        tol: float = 1e-9,
        gap_tol: float = 1e-7,
        lr: float = 1e-2,
        penalty: float = 10.0,
        check_every: int = 25,
        method: str = "fista",
        polish: bool = True,
        warn: bool = True,
        seed: int = 0,
        strategy: str = "gram",
        num_workers: int | None = None,
        use_gpu: bool | None = None,
        run_config: RayRunConfig | dict[str, Any] | None = None,
        workers: WorkerPool | None = None,
        **kwargs: Any,
    ) -> None:
        owner = "RayProjectedGDSolver"
        settings = set_gradient_settings(
            self,
            owner,
            rank=rank,
            max_iter=max_iter,
            tol=tol,
            gap_tol=gap_tol,
            lr=lr,
            penalty=penalty,
            check_every=check_every,
            method=method,
            polish=polish,
            warn=warn,
        )
        self.seed = int(seed)
        self.strategy = check_choice(strategy, "strategy", owner, STRATEGIES)
        if num_workers is not None:
            kwargs["num_workers"] = num_workers
        if use_gpu is not None:
            kwargs["use_gpu"] = use_gpu
        check_shared_pool(owner, workers, kwargs)
        self.run_config = _split_run_config(owner, run_config, kwargs)
        self._shared_pool = workers
        # data-parallel over sample shards (the Gram is split evenly without them); the gram strategy sums Grams
        self.needs_samples = self.strategy == "data"
        self.last_timings_: dict[str, float] = {}
        self._params = {
            **settings,
            "seed": seed,
            "strategy": self.strategy,
            **self.run_config.to_dict(),
        }

    def solve(  # type: ignore[override]
        self, problem: SIMProblem | ShardedProblem, initial: torch.Tensor | None = None
    ) -> SolveResult:
        """Solve a :class:`SIMProblem` or a :class:`ShardedProblem` (``initial`` is checked and ignored)."""
        if isinstance(problem, ShardedProblem):
            start = time.perf_counter()
            W, info, stats_problem = self._run(problem)
            result_stats = SolverStats(
                solver=self.name,
                iterations=info["iterations"],
                converged=info["converged"],
                objective=stats_problem.objective(W),
                constraint_violation=stats_problem.constraint_violation(W),
                constraint_norm=stats_problem.constraint_norm(W) if stats_problem.n_constrained else None,
                time_s=time.perf_counter() - start,
                status=info["status"],
                history=info["history"],
                extra=info["extra"],
            )
            return SolveResult(weights=W, stats=result_stats)
        return super().solve(problem, initial=initial)

    def _solve(self, problem: SIMProblem) -> tuple[torch.Tensor, dict[str, Any]]:
        W, info, _ = self._run(problem)
        return W, info

    def _fits_low_rank(self, problem: SIMProblem | ShardedProblem) -> bool:
        """Whether the low-rank fit runs (rank < n, or method='adam', on a bounded stage)."""
        nc = problem.n_constrained if problem.kappa is not None else 0
        return nc > 0 and ((self.rank is not None and self.rank < nc) or self.method == "adam")

    def _run(self, problem: SIMProblem | ShardedProblem) -> tuple[torch.Tensor, dict[str, Any], SIMProblem]:
        if (
            self._fits_low_rank(problem)
            and isinstance(problem, SIMProblem)
            and problem.l1_weights is not None
        ):
            raise ConfigError(  # before any actor starts
                "RayProjectedGDSolver: the low-rank fit (rank < n or method='adam') does not support "
                "'l1_weights'; use rank=None with method='fista', or RayADMMSolver."
            )
        if self.strategy == "gram":
            return self._run_gram(problem)
        timings = Timings()
        with timings.phase("startup"):
            pool = self._acquire_pool()
        try:
            if isinstance(problem, ShardedProblem):
                pool.load(assign(problem.sources, pool.size))
            elif problem.samples is not None:
                pool.load(
                    [
                        [s]
                        for s in tensor_sources(problem.samples.features, problem.samples.targets, pool.size)
                    ]
                )
            else:
                pool.load([[s] for s in _even_stats_split(problem, pool.size)])
            self._record_load(pool, timings)
            summaries = pool.retry(
                "shard summaries",
                lambda: resources.get(
                    [a.shard_summary.remote() for a in pool.actors],
                    pool.config.timeout_s,
                    "the shard summaries",
                ),
            )
            m = sum(s["num_samples"] for s in summaries)
            if isinstance(problem, ShardedProblem):
                # the objective needs the totals: reduce them once (also what the stats report)
                evaluation = problem.with_stats(reduce_stats(pool, timings))
            else:
                evaluation = problem
            # per-entry thresholds from l1 weights (a SIMProblem only), else one lam
            lam = problem.thresholds if isinstance(problem, SIMProblem) else problem.lam
            lam = 0.0 if problem.variant == "least_squares" else lam
            l2 = 0.0 if problem.variant == "least_squares" else problem.l2
            nc = problem.n_constrained if problem.kappa is not None else 0
            grad = _DistributedGradient(pool, m, l2, timings)
            R = (evaluation.Rt / evaluation.num_samples).to(torch.float64)
            target_sq = (evaluation.target_sq / evaluation.num_samples).to(torch.float64)
            start = time.perf_counter()
            if self._fits_low_rank(problem):
                W, info = self._low_rank(grad, R, target_sq, lam, float(problem.kappa), nc)
            else:
                W, info = certified_fista(
                    grad,
                    R,
                    target_sq,
                    lam=lam,
                    kappa=problem.kappa,
                    n_constrained=nc,
                    max_iter=self.max_iter,
                    gap_tol=self.gap_tol,
                    check_every=self.check_every,
                    polish=self.polish,
                    lipschitz=grad.lipschitz(),
                    restricted_hessian=grad.restricted_hessian,
                )
                info = fista_info(info, self, type(self).__name__)
            elapsed = time.perf_counter() - start
            timings.add(
                "iterations",
                max(0.0, elapsed - timings.seconds["communication"] - timings.seconds["iterations"]),
            )
            self.last_timings_ = timings.as_dict()
            info["extra"].update(self._stats_extra(pool, timings, None))
            info["extra"]["strategy"] = "data"
            info["extra"]["gradient_calls"] = grad.calls
            info["extra"]["restarts"] = pool.restarts
            return W, info, evaluation
        finally:
            self._release_pool(pool)

    def _run_gram(
        self, problem: SIMProblem | ShardedProblem
    ) -> tuple[torch.Tensor, dict[str, Any], SIMProblem]:
        """The gram strategy: the shards' Grams summed by the actors (a SIMProblem holds its own), then the
        single-process solve on the driver (module docstring)."""
        timings = Timings()
        extra: dict[str, Any] = {"strategy": "gram"}
        if isinstance(problem, ShardedProblem):
            with timings.phase("startup"):
                pool = self._acquire_pool()
            try:
                pool.load(assign(problem.sources, pool.size))
                self._record_load(pool, timings)
                evaluation = problem.with_stats(reduce_stats(pool, timings))
                extra.update(self._stats_extra(pool, timings, None))
                extra["restarts"] = pool.restarts
            finally:
                self._release_pool(pool)
        else:
            evaluation = problem
        start = time.perf_counter()
        W, info = projected_gd_on_gram(self, evaluation, device=torch.device("cpu"), dtype=torch.float64)
        timings.add("iterations", time.perf_counter() - start)
        extra["timings"] = timings.as_dict()
        self.last_timings_ = timings.as_dict()
        info["extra"].update(extra)
        return W, info, evaluation

    def _low_rank(
        self,
        grad: _DistributedGradient,
        R: torch.Tensor,
        target_sq: torch.Tensor,
        lam: float,
        kappa: float,
        nc: int,
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """Adam on (L, R, B) with A = L R^T; the quadratic part's gradient comes from the workers. The
        refit of B (A fixed) is certified FISTA on the B-subproblem (data from two gradient calls)."""
        rows, d = R.shape
        A, B0, adam = low_rank_adam(grad, R, lam=lam, kappa=kappa, nc=nc, solver=self)
        dtype = A.dtype
        with torch.no_grad():
            # the B-subproblem with A fixed: grad at [A, 0] gives R_B - A H_AB and A H_AA
            g0 = grad(torch.cat([A, torch.zeros(rows, d - nc, dtype=dtype)], dim=1))
            Rb = -g0[:, nc:]
            cb = target_sq - 2.0 * (R[:, :nc] * A).sum(dim=1) + ((g0[:, :nc] + R[:, :nc]) * A).sum(dim=1)
        B, info = certified_fista(
            _BlockGradient(grad, A, nc),
            Rb,
            cb,
            lam=lam,
            kappa=None,
            n_constrained=0,
            max_iter=self.max_iter,
            gap_tol=self.gap_tol,
            check_every=self.check_every,
            polish=self.polish,
            lipschitz=grad.lipschitz(),
            W0=B0,
            restricted_hessian=lambda index: grad.restricted_hessian(index + nc),
        )
        W = torch.cat([A, B], dim=1)
        return W, low_rank_info(self, type(self).__name__, adam=adam, refit=info)


class _BlockGradient:
    """The gradient with respect to the B block of W = [A, B] with A fixed."""

    def __init__(self, grad: _DistributedGradient, A: torch.Tensor, nc: int) -> None:
        self.grad, self.A, self.nc = grad, A, nc

    def __call__(self, B: torch.Tensor) -> torch.Tensor:
        return self.grad(torch.cat([self.A, B], dim=1))[:, self.nc :]

    def lipschitz(self) -> float:  # pragma: no cover - the caller passes it
        return self.grad.lipschitz()
