"""The gram strategy: reduce the Gram once, shard the rows of W, iterate with no data per iteration.

Rows of W are independent given H = G/m + l2 I, so after one reduction of the shards' statistics (a sum
tree of Ray tasks: log2(K) levels, no actor waits on the driver), H is broadcast once through the object
store, every worker factors it once and runs the accelerated, certified ADMM of
:class:`~idl_ray.sim.solvers.row_block.RowBlockADMM` (the loop of the single-process solver) on its block
of rows. A block certifies itself: its duality gap is below ``gap_tol`` times its share of the objective,
and those sums add over blocks, so the driver only adds the blocks' reports and needs no per-iteration
decision. Each round trip lets the workers run up to ``max(checkpoint_every, 10 check_every)`` steps (they
return as soon as their rows are certified); between round trips the driver checkpoints the states, so
a dead worker costs at most one chunk.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import ray
import torch

from idl_ray.distributed import resources
from idl_ray.distributed.checkpoint import Checkpointer, SolveCheckpoint
from idl_ray.distributed.pool import WorkerPool
from idl_ray.distributed.progress import ProgressEvent, ProgressReporter, Timings
from idl_ray.distributed.shards import split_rows
from idl_ray.sim.problem import GramStats
from idl_ray.sim.solvers.admm_kernels import ADMMOptions, ADMMState, ResidualSums, initial_rho
from idl_ray.sim.solvers.row_block import BLOCK_COUNTS, BlockReport
from idl_ray.sim.solvers.weights import take_rows


@ray.remote(num_cpus=0)
def _merge(a: GramStats, b: GramStats) -> GramStats:
    return a.merge(b)


def reduce_stats(pool: WorkerPool, timings: Timings) -> GramStats:
    """Sum the workers' shard statistics with a tree of merge tasks; the driver fetches only the total.

    A worker lost during the reduction is recreated with its shard and the reduction runs again."""

    def attempt() -> GramStats:
        start = time.perf_counter()
        refs = [actor.gram_stats.remote() for actor in pool.actors]
        while len(refs) > 1:
            merged = [_merge.remote(refs[i], refs[i + 1]) for i in range(0, len(refs) - 1, 2)]
            refs = merged + ([refs[-1]] if len(refs) % 2 else [])
        total = resources.get(refs[0], pool.config.timeout_s, "the Gram reduction")
        timings.add("communication", time.perf_counter() - start)
        return total

    return pool.retry("gram", attempt)


@dataclasses.dataclass
class RunInfo:
    """What a distributed ADMM run reports besides the weights (residuals for consensus, the certificate
    for gram; missing values are None)."""

    iterations: int
    converged: bool
    primal: float | None
    dual: float | None
    eps_primal: float | None
    eps_dual: float | None
    rho: float
    history: list[dict[str, float]]
    restarts: int
    checkpoints: int
    relative_gap: float | None = None
    stalled: bool = False
    #: rows finished by support polishing (consensus; gram: rows the workers' polish certified)
    polished_rows: int = 0
    #: workers H was shipped to and factored on (gram; 0 when all held it from an earlier solve)
    gram_shipped: int = 0
    #: rows the workers certified by the interior-point hand-over (gram)
    interior_point_rows: int = 0
    #: the most Newton steps one worker's interior point took (gram; the blocks run side by side)
    interior_point_iterations: int = 0
    #: rows the workers' vertex step moved (gram)
    vertex_rows: int = 0
    #: rows the workers certified by the dual active-set method, and the most steps one worker took (gram)
    active_set_rows: int = 0
    active_set_steps: int = 0

    @classmethod
    def of_loop(
        cls,
        *,
        iteration: int,
        converged: bool,
        sums: ResidualSums | None,
        eps_primal: float | None,
        eps_dual: float | None,
        rho: float,
        history: list[dict[str, float]],
        pool: WorkerPool,
        checkpointer: Checkpointer,
        relative_gap: float | None = None,
        stalled: bool = False,
    ) -> RunInfo:
        """The report of a driver loop (gram or consensus) from its final state."""
        return cls(
            iterations=iteration,
            converged=converged,
            primal=None if sums is None else sums.primal,
            dual=None if sums is None else sums.dual,
            eps_primal=eps_primal,
            eps_dual=eps_dual,
            rho=rho,
            history=history,
            restarts=pool.restarts,
            checkpoints=checkpointer.count,
            relative_gap=relative_gap,
            stalled=stalled,
        )


def roll_back(
    pool: WorkerPool,
    checkpointer: Checkpointer,
    exc: BaseException,
    *,
    setup: Callable[[list[int], list[Any]], None],
    restore: str,
    timings: Timings,
) -> SolveCheckpoint:
    """Recover from a lost actor (any other error is raised again): recreate the dead actors, set them up
    from the last checkpoint's worker states (``setup(ranks, states)``), and give every other worker its
    state through its ``restore`` method; returns that checkpoint. Shared by the gram and consensus loops."""
    if not resources.is_actor_failure(exc):
        raise exc
    with timings.phase("recovery"):
        needs_setup = pool.recover(exc)
        checkpoint = checkpointer.restore()
        if needs_setup:
            setup(needs_setup, checkpoint.worker_states)
        others = [k for k in range(pool.size) if k not in needs_setup]
        resources.get(
            [getattr(pool.actors[k], restore).remote(checkpoint.worker_states[k]) for k in others],
            pool.config.timeout_s,
            "restoring the checkpoint",
        )
    return checkpoint


def _run_gram(
    pool: WorkerPool,
    H: torch.Tensor,
    Rt: torch.Tensor,
    target_sq: torch.Tensor,
    *,
    lam: float | torch.Tensor,
    kappa: float | None,
    n_constrained: int,
    options: ADMMOptions,
    checkpointer: Checkpointer,
    reporter: ProgressReporter,
    timings: Timings,
    initial: torch.Tensor | None = None,
    warm_start: bool = True,
    gram_key: Any = None,
) -> tuple[torch.Tensor, RunInfo]:
    """Row-sharded, certified ADMM on ``1/2 tr(W H W^T) - tr(W Rt^T) + lam ||W||_1`` with the kappa bound.

    Parameters
    ----------
    pool : WorkerPool (its workers need no samples here)
    H : Tensor (d, d) float64, Rt : Tensor (rows, d) float64, target_sq : Tensor (rows,) (||t||^2 / m)
    lam : float, or per-entry thresholds (rows, d) from l1 weights: each worker gets its block's rows
    initial : Tensor (rows, d) or None, weights to start from
    warm_start : bool, start rows at the least-squares fit where it is certified or lam = 0 (see
        :func:`~idl_ray.sim.solvers.start.start_state`; each worker computes its rows' start from its factor)
    gram_key : hashable or None, a name for H: workers that already hold the factored H under this name
        (from an earlier solve on a kept pool) do not fetch it again

    Returns
    -------
    W : Tensor (rows, d), the feasible iterates Z gathered from the workers
    info : RunInfo (with the relative duality gap of W)
    """
    blocks = split_rows(Rt.shape[0], pool.size)
    rho0 = initial_rho(H, options)
    start = time.perf_counter()
    Rt_refs = [ray.put(Rt[block].contiguous()) for block in blocks]
    # in the object store once; nested in a list, so only a worker without it cached fetches it
    H_ref = [ray.put(H.contiguous())]
    timings.add("communication", time.perf_counter() - start)
    settings = {
        "kappa": kappa,
        "n_constrained": n_constrained,
        "options": options,
        "polish_first": initial is not None,  # a warm start: polish its support at the first check
        "warm_start": warm_start,
    }
    initials = [None if initial is None else initial[block].contiguous() for block in blocks]
    lams = [take_rows(lam, block) for block in blocks]
    lams = [t.contiguous() if isinstance(t, torch.Tensor) else t for t in lams]
    chunk = max(checkpointer.every, 10 * options.check_every)
    shipped = 0

    def setup(ranks: list[int], states: list[ADMMState | None]) -> None:
        nonlocal shipped
        begin = time.perf_counter()
        refs = [
            pool.actors[k].setup_rows.remote(
                H_ref,
                Rt_refs[k],
                target_sq[blocks[k]].contiguous(),
                states[k],
                lam=lams[k],
                initial=initials[k],
                key=gram_key,
                **settings,
            )
            for k in ranks
        ]
        results = resources.get(refs, pool.config.timeout_s, "the workers to factor H")
        shipped += sum(fetched for _, fetched in results)
        timings.round_trip(time.perf_counter() - begin, [seconds for seconds, _ in results], phase="factor")

    starts: list[ADMMState | None] = [None] * pool.size  # each worker computes its block's start
    pool.retry("factor", lambda: setup(list(range(pool.size)), starts))
    checkpointer.save(SolveCheckpoint("gram", 0, rho0, rho0, starts))

    def recover(exc: BaseException) -> tuple[int, list[dict[str, float]]]:
        """Roll every worker back to the last checkpoint; the loop state to resume from."""
        checkpoint = roll_back(pool, checkpointer, exc, setup=setup, restore="set_state", timings=timings)
        return checkpoint.iteration, list(checkpoint.history)

    iteration = 0
    W: torch.Tensor | None = None
    history: list[dict[str, float]] = []
    converged = stalled = False
    reports: list[BlockReport] = []
    relative_gap: float | None = None
    rho = rho0
    while iteration < options.max_iter or W is None:
        if iteration >= options.max_iter:  # max_iter reached: gather; a lost worker replays from a checkpoint
            begin = time.perf_counter()
            try:
                W = torch.cat(pool.call("weights", what="gathering the weights"))
            except Exception as exc:
                iteration, history = recover(exc)
                continue
            timings.add("communication", time.perf_counter() - begin)
            break
        steps = min(chunk, options.max_iter - iteration)
        begin = time.perf_counter()
        try:
            results = pool.call("run_rows", steps, what="ADMM iterations on the workers")
        except Exception as exc:
            iteration, history = recover(exc)
            continue
        timings.round_trip(time.perf_counter() - begin, [r[1] for r in results])
        reports = [r[0] for r in results]
        # blocks run at their own pace: the solve has taken as many steps as its slowest block
        iteration = max(r.iterations for r in reports)
        primal = sum(r.primal_sum for r in reports)
        gap = sum(r.gap for r in reports)
        relative_gap = gap / max(abs(primal), torch.finfo(torch.float64).tiny)
        converged = all(r.certified for r in reports)
        stalled = not converged and all(r.certified or r.stalled for r in reports)
        rho = max(r.rho for r in reports)
        certified_rows = sum(r.certified_rows for r in reports)
        history.append(
            {
                "iteration": iteration,
                "relative_gap": relative_gap,
                "certified_rows": certified_rows,
                "rho": rho,
            }
        )
        reporter.update(
            ProgressEvent(
                "gram", iteration, None, None, None, None, rho, list(pool.actors), relative_gap=relative_gap
            )
        )
        if converged or stalled or iteration >= options.max_iter:
            finished = [r[2] for r in results]
            if all(w is not None for w in finished):  # every block sent its weights with its report
                W = torch.cat(finished)
                break
            begin = time.perf_counter()
            try:
                W = torch.cat(pool.call("weights", what="gathering the weights"))
            except Exception as exc:  # a worker died after the last check: replay from the checkpoint
                iteration, history = recover(exc)
                converged = False
                continue
            timings.add("communication", time.perf_counter() - begin)
            break
        with timings.phase("checkpoint"):
            try:
                states = pool.call("get_state", what="a checkpoint of the workers' states")
            except Exception as exc:
                if not resources.is_actor_failure(exc):
                    raise
                continue  # the next run_rows call fails the same way and recovers
            checkpointer.save(SolveCheckpoint("gram", iteration, rho, rho, states, history=list(history)))
    info = RunInfo.of_loop(
        iteration=iteration,
        converged=converged,
        sums=None,
        eps_primal=None,
        eps_dual=None,
        rho=rho,
        history=history,
        pool=pool,
        checkpointer=checkpointer,
        relative_gap=relative_gap,
        stalled=stalled,
    )
    info.gram_shipped = shipped
    for name, combine in BLOCK_COUNTS.items():
        setattr(info, name, combine(getattr(r, name) for r in reports))
    return W, info


def run_gram(
    pool: WorkerPool, H: torch.Tensor, Rt: torch.Tensor, target_sq: torch.Tensor, **kwargs: Any
) -> tuple[torch.Tensor, RunInfo]:
    """See :func:`_run_gram`; the progress bar is closed however the run ends."""
    try:
        return _run_gram(pool, H, Rt, target_sq, **kwargs)
    finally:
        kwargs["reporter"].close()


__all__ = ["RunInfo", "reduce_stats", "roll_back", "run_gram"]
