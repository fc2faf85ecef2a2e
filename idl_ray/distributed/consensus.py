"""Global-variable consensus ADMM across sample shards (Boyd et al. 2011, s7.1).

With K shards, f_k(W) = 1/(2m) ||T_k - W Phi_k||^2 + l2/(2K) ||W||^2 (m: all samples) and
g(W) = lam ||W||_1 + indicator(||W[i, :n_constrained]||_1 <= kappa), the stage objective is
sum_k f_k(W) + g(W). Consensus ADMM splits it as f_k(W_k) + g(Z) with W_k = Z::

    W_k <- (Rt_k + rho (Z - U_k)) (H_k + rho I)^{-1}          on worker k (its own factor of H_k)
    Z   <- prox_{g / (K rho)}(mean_k (W_k + U_k))              on the driver (soft-threshold + kappa projection)
    U_k <- U_k + W_k - Z                                       on worker k

with H_k = G_k / m + (l2/K) I and Rt_k = T_k Phi_k^T / m: no worker ever holds more than its shard's
d x d statistics, and the driver never forms G. One round trip per iteration: the driver broadcasts Z
(one object, fetched by every worker) and receives W_k + U_k from each; the worker's dual update for
iteration t and its local step for t + 1 are fused into that call.

Stopping (Boyd s7.1 residuals with the tolerances of the single-process test)::

    r^2 = sum_k ||W_k - Z||^2,   s^2 = K rho^2 ||Z - Z_prev||^2,
    eps_pri  = sqrt(K N) abs_tol + rel_tol max(sqrt(sum_k ||W_k||^2), sqrt(K) ||Z||),
    eps_dual = sqrt(K N) abs_tol + rel_tol sqrt(sum_k ||rho U_k||^2),

evaluated by :func:`~idl_ray.sim.solvers.admm_kernels.check_convergence` on those sums. rho adapts by the
same residual balancing every ``check_every`` iterations (applied one iteration later, when the workers
next hear from the driver). The answer is Z, the output of the prox, so the kappa bound holds exactly.
"""

from __future__ import annotations

import time
from typing import Any

import ray
import torch

from idl_ray.distributed import resources
from idl_ray.distributed.actors import ConsensusLocalState
from idl_ray.distributed.checkpoint import Checkpointer, SolveCheckpoint
from idl_ray.distributed.gram import RunInfo
from idl_ray.distributed.pool import WorkerPool
from idl_ray.distributed.progress import ProgressEvent, ProgressReporter, Timings
from idl_ray.sim.solvers.admm_kernels import ADMMOptions, ResidualSums, balanced_rho, check_convergence, prox

_INLINE_BYTES = 64 * 1024


def consensus_rho(
    trace_G: float, total_samples: int, d: int, l2: float, K: int, options: ADMMOptions
) -> float:
    """Initial rho per worker: the single-process choice (trace(H)/d, or options.rho) divided by K.

    The consensus variable sees K rho in total, which then matches the single-process penalty.
    """
    if options.rho is not None:
        return float(options.rho) / K
    mean_eigenvalue = trace_G / float(total_samples) / max(d, 1) + l2
    return (mean_eigenvalue if mean_eigenvalue > 0 else 1.0) / K


def _run_consensus(
    pool: WorkerPool,
    *,
    rows: int,
    d: int,
    total_samples: int,
    trace_G: float,
    lam: float,
    l2: float,
    kappa: float | None,
    n_constrained: int,
    options: ADMMOptions,
    checkpointer: Checkpointer,
    reporter: ProgressReporter,
    timings: Timings,
) -> tuple[torch.Tensor, RunInfo]:
    """Consensus ADMM over the pool's sample shards (the workers must hold samples).

    Returns
    -------
    W : Tensor (rows, d), the consensus Z (kappa-feasible)
    info : RunInfo
    """
    K = pool.size
    rho0 = consensus_rho(trace_G, total_samples, d, l2, K, options)
    zero_local = ConsensusLocalState(W=None, U=torch.zeros(rows, d, dtype=torch.float64), rho=rho0)
    timeout = pool.config.timeout_s

    def setup(ranks: list[int], states: list[ConsensusLocalState]) -> None:
        begin = time.perf_counter()
        refs = [pool.actors[k].setup_consensus.remote(total_samples, l2 / K, states[k]) for k in ranks]
        factor_s = resources.get(refs, timeout, "the workers to factor their H_k")
        timings.round_trip(time.perf_counter() - begin, factor_s, phase="factor")

    def step(Z: torch.Tensor, rho: float) -> tuple[list[torch.Tensor], list[dict[str, float]]]:
        begin = time.perf_counter()
        # small Z travels inline with the calls; a large one is put once and fetched by every worker
        Z_ref = ray.put(Z) if Z.numel() * Z.element_size() > _INLINE_BYTES else Z
        results = resources.get(
            [a.consensus_step.remote(Z_ref, rho) for a in pool.actors], timeout, "a consensus step"
        )
        timings.round_trip(time.perf_counter() - begin, [r[2] for r in results])
        return [r[0] for r in results], [r[1] for r in results]

    pool.retry("factor", lambda: setup(list(range(K)), [zero_local] * K))
    Z = torch.zeros(rows, d, dtype=torch.float64)
    rho = pending = rho0
    iteration = 0
    history: list[dict[str, float]] = []
    converged = False
    sums: ResidualSums | None = None
    eps_pri = eps_dual = None
    V: list[torch.Tensor] | None = None
    checkpointer.save(SolveCheckpoint("consensus", 0, rho0, rho0, [zero_local] * K, consensus=Z.clone()))
    while iteration < options.max_iter:
        try:
            if V is None:  # first local step (or after a restore): W_k from the current Z and U_k
                V, _ = step(Z, rho)
            begin = time.perf_counter()
            mean = torch.stack(V).mean(dim=0)
            Z_next = prox(mean, lam / (K * rho), kappa, n_constrained)
            timings.add("iterations", time.perf_counter() - begin)
            V_next, parts = step(Z_next, pending)
        except Exception as exc:
            if not resources.is_actor_failure(exc):
                raise
            with timings.phase("recovery"):
                needs_setup = pool.recover(exc)
                checkpoint = checkpointer.restore()
                if needs_setup:
                    setup(needs_setup, checkpoint.worker_states)
                others = [k for k in range(K) if k not in needs_setup]
                resources.get(
                    [pool.actors[k].set_consensus_state.remote(checkpoint.worker_states[k]) for k in others],
                    timeout,
                    "restoring the checkpoint",
                )
                iteration, rho, pending = checkpoint.iteration, checkpoint.rho, checkpoint.pending_rho
                Z = checkpoint.consensus.clone()
                history = list(checkpoint.history)
                V = _values(checkpoint.worker_states)
            continue
        iteration += 1
        diff = Z_next - Z
        sums = ResidualSums(
            primal_sq=sum(p["primal_sq"] for p in parts),
            dual_sq=K * rho * rho * float(torch.sum(diff * diff)),
            w_sq=sum(p["w_sq"] for p in parts),
            z_sq=K * float(torch.sum(Z_next * Z_next)),
            y_sq=sum(p["y_sq"] for p in parts),
            entries=K * rows * d,
        )
        Z, V = Z_next, V_next
        used_rho, rho = rho, pending
        converged, eps_pri, eps_dual = check_convergence(sums, options)
        history.append({"iteration": iteration, "primal": sums.primal, "dual": sums.dual, "rho": used_rho})
        reporter.update(
            ProgressEvent(
                "consensus", iteration, sums.primal, sums.dual, eps_pri, eps_dual, used_rho, list(pool.actors)
            )
        )
        if converged:
            break
        if iteration % options.check_every == 0:
            pending = balanced_rho(rho, sums, options)
        if checkpointer.due(iteration):
            with timings.phase("checkpoint"):
                try:
                    states = pool.call("get_consensus_state", what="a checkpoint of the consensus states")
                except Exception as exc:
                    if not resources.is_actor_failure(exc):
                        raise
                    continue
                checkpointer.save(
                    SolveCheckpoint(
                        "consensus",
                        iteration,
                        rho,
                        pending,
                        states,
                        consensus=Z.clone(),
                        history=list(history),
                    )
                )
    info = RunInfo.of_loop(
        iteration=iteration,
        converged=converged,
        sums=sums,
        eps_primal=eps_pri,
        eps_dual=eps_dual,
        rho=rho,
        history=history,
        pool=pool,
        checkpointer=checkpointer,
    )
    return Z, info


def _values(states: list[ConsensusLocalState]) -> list[torch.Tensor] | None:
    """W_k + U_k of each worker (what the driver averages), or None before the first local step."""
    if any(s.W is None for s in states):
        return None
    return [s.W + s.U for s in states]


def run_consensus(pool: WorkerPool, **kwargs: Any) -> tuple[torch.Tensor, RunInfo]:
    """See :func:`_run_consensus`; the progress bar is closed however the run ends."""
    try:
        return _run_consensus(pool, **kwargs)
    finally:
        kwargs["reporter"].close()


__all__ = ["consensus_rho", "run_consensus"]
