"""Global-variable consensus ADMM across sample shards (Boyd et al. 2011, s7.1).

With K shards, f_k(W) = 1/(2m) ||T_k - W Phi_k||^2 + l2/(2K) ||W||^2 (m: all samples) and
g(W) = lam ||W||_1 + indicator(||W[i, :n_constrained]||_1 <= kappa), the stage objective is
sum_k f_k(W) + g(W). Consensus ADMM splits it as f_k(W_k) + g(Z) with W_k = Z::

    W_k <- (Rt_k + rho (Z - U_k)) (H_k + rho I)^{-1}          on worker k (its own factor of H_k)
    Z   <- prox_{g / (K rho)}(mean_k (W_k + U_k))              on the driver (soft-threshold + kappa projection)
    U_k <- U_k + W_k - Z                                       on worker k

with H_k = G_k / m + (l2/K) I and Rt_k = T_k Phi_k^T / m: no worker ever holds more than its shard's
d x d statistics, and the driver never forms G. One round trip per iteration: the driver broadcasts Z
(one object, fetched by every worker) and receives the value to average from each; the worker's dual
update for iteration t and its local step for t + 1 are fused into that call.

Acceleration: over-relaxation (``options.relaxation`` = alpha, Eckstein & Bertsekas 1992; Boyd s3.4.3):
the workers send alpha W_k + (1 - alpha) Z_prev + U_k and update U_k with the same mix.

Stopping: the duality-gap certificate of Z, the same test as every other solver
(:mod:`~idl_ray.sim.solvers.certificate`). Every ``check_every`` iterations one gradient round trip gives
``Z H - R`` (:class:`~idl_ray.distributed.certify.ShardCertificate`; R = Rt/m and ||t||^2/m per row are
gathered once), hence every row's exact gap; a row certified to ``gap_tol`` keeps its certified value
(rows are independent problems, so the stage's gap is the sum of the kept rows' gaps), and rows that are
nearly optimal are first polished on their support with H_SS gathered from the workers (improvements
only). The solve stops when every row is certified. Boyd's residuals (s7.1)::

    r^2 = sum_k ||W_k - Z||^2,   s^2 = K rho^2 ||Z - Z_prev||^2

are kept for rho balancing only (``mu``/``tau``, every ``check_every`` iterations, applied one iteration
later, when the workers next hear from the driver). The answer is Z (or the polished rows), the output of
the prox, so the kappa bound holds exactly.

Interior-point hand-over: as in the single-process solver, the rows still uncertified after
``interior_point_after`` iterations go once to the batched interior point, here on the driver: H is gathered
once (``sum_k G_k / m + l2 I``, one d x d round trip, the full-column case of the polish's H_SS), and
:func:`~idl_ray.sim.solvers.finish.finish_rows` solves and certifies them (and moves them to a vertex of their
optimal face where the optimum is not unique).
"""

from __future__ import annotations

import time
from typing import Any

import ray
import torch

from idl_ray.distributed import resources
from idl_ray.distributed.actors import ConsensusLocalState
from idl_ray.distributed.certify import ShardCertificate
from idl_ray.distributed.checkpoint import Checkpointer, SolveCheckpoint
from idl_ray.distributed.gram import RunInfo, roll_back
from idl_ray.distributed.pool import WorkerPool
from idl_ray.distributed.progress import ProgressEvent, ProgressReporter, Timings
from idl_ray.sim.solvers.admm_kernels import ADMMOptions, ResidualSums, balanced_rho, check_convergence, prox
from idl_ray.sim.solvers.certificate import DualityGap
from idl_ray.sim.solvers.finish import finish_rows
from idl_ray.sim.solvers.interior_point import interior_point_applies

_INLINE_BYTES = 64 * 1024


def consensus_rho(
    trace_G: float, total_samples: int, d: int, l2: float, K: int, options: ADMMOptions
) -> float:
    """Initial rho per worker: the single-process choice (``rho_scale`` trace(H)/d, or options.rho) divided
    by K.

    The consensus variable sees K rho in total, which then matches the single-process penalty. (The full
    mean eigenvalue, used before, is far too stiff on rank-deficient Grams: on the ill-conditioned test
    problem consensus then had a relative gap of 4e-3 after 2,000 iterations, where a fifth of it
    converged in 1,550.)
    """
    if options.rho is not None:
        return float(options.rho) / K
    mean_eigenvalue = trace_G / float(total_samples) / max(d, 1) + l2
    return options.rho_scale * (mean_eigenvalue if mean_eigenvalue > 0 else 1.0) / K


def _run_consensus(
    pool: WorkerPool,
    *,
    rows: int,
    d: int,
    total_samples: int,
    trace_G: float,
    target_sq: torch.Tensor,
    lam: float | torch.Tensor,
    l2: float,
    kappa: float | None,
    n_constrained: int,
    options: ADMMOptions,
    checkpointer: Checkpointer,
    reporter: ProgressReporter,
    timings: Timings,
) -> tuple[torch.Tensor, RunInfo]:
    """Consensus ADMM over the pool's sample shards (the workers must hold samples), certified.

    Parameters
    ----------
    target_sq : Tensor (rows,), ||t_i||^2 summed over the shards (divided by m here)

    Returns
    -------
    W : Tensor (rows, d), the consensus Z with certified (possibly polished) rows kept (kappa-feasible)
    info : RunInfo (with the relative duality gap of W)
    """
    K = pool.size
    alpha = float(options.relaxation)
    nc = n_constrained if kappa is not None else 0
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
            [a.consensus_step.remote(Z_ref, rho, alpha) for a in pool.actors], timeout, "a consensus step"
        )
        timings.round_trip(time.perf_counter() - begin, [r[2] for r in results])
        return [r[0] for r in results], [r[1] for r in results]

    def gradient(W: torch.Tensor) -> torch.Tensor:
        begin = time.perf_counter()
        parts = pool.call("gradient_part", W, total_samples, what="gradient parts")
        timings.round_trip(time.perf_counter() - begin, [p[1] for p in parts], phase="iterations")
        grad = parts[0][0]
        for part, _ in parts[1:]:
            grad = grad + part
        return grad + l2 * W if l2 else grad

    def restricted_hessian(index: torch.Tensor) -> torch.Tensor:
        blocks = pool.call("gram_restricted", index, total_samples, what="restricted Gram blocks")
        H = blocks[0]
        for block in blocks[1:]:
            H = H + block
        return H + l2 * torch.eye(H.shape[0], dtype=H.dtype) if l2 else H

    def recover(exc: BaseException) -> SolveCheckpoint:
        """Recreate dead actors and roll every worker back to the last checkpoint."""
        return roll_back(pool, checkpointer, exc, setup=setup, restore="set_consensus_state", timings=timings)

    pool.retry("factor", lambda: setup(list(range(K)), [zero_local] * K))
    Z = torch.zeros(rows, d, dtype=torch.float64)
    kept = Z.clone()  # rows certified at some check, with their certified values
    kept_primal = torch.zeros(rows, dtype=torch.float64)
    kept_dual = torch.zeros(rows, dtype=torch.float64)
    done = torch.zeros(rows, dtype=torch.bool)
    rho = pending = rho0
    iteration = polished_rows = interior_point_rows = 0
    handed = False
    history: list[dict[str, float]] = []
    converged = False
    sums: ResidualSums | None = None
    eps_pri = eps_dual = None
    relative_gap: float | None = None
    V: list[torch.Tensor] | None = None

    def extra() -> dict[str, Any]:
        return {
            "kept": kept.clone(),
            "done": done.clone(),
            "primal": kept_primal.clone(),
            "dual": kept_dual.clone(),
        }

    checkpointer.save(
        SolveCheckpoint("consensus", 0, rho0, rho0, [zero_local] * K, consensus=Z.clone(), extra=extra())
    )
    m = float(total_samples)
    while True:  # R = -grad(0) = Rt/m: one round trip (retried if a worker dies before the first step)
        try:
            R = -gradient(torch.zeros(rows, d, dtype=torch.float64))
            break
        except Exception as exc:
            recover(exc)
    certificate = ShardCertificate(
        gradient,
        R,
        target_sq.to(torch.float64) / m,
        lam=lam,
        kappa=kappa,
        n_constrained=nc,
        restricted_hessian=restricted_hessian if options.polish else None,
    )
    while iteration < options.max_iter:
        try:
            if V is None:  # first local step (or after a restore): W_k from the current Z and U_k
                V, _ = step(Z, rho)
            begin = time.perf_counter()
            mean = torch.stack(V).mean(dim=0)
            Z_next = prox(mean, lam / (K * rho), kappa, n_constrained)
            timings.add("iterations", time.perf_counter() - begin)
            V_next, parts = step(Z_next, pending)
            check = (iteration + 1) % options.check_every == 0 or iteration + 1 >= options.max_iter
            gaps = certificate(Z_next) if check else None
            polished = certificate.polish(Z_next, gaps, ~done) if gaps is not None else None
        except Exception as exc:
            checkpoint = recover(exc)
            iteration, rho, pending = checkpoint.iteration, checkpoint.rho, checkpoint.pending_rho
            Z = checkpoint.consensus.clone()
            history = list(checkpoint.history)
            kept, done = checkpoint.extra["kept"].clone(), checkpoint.extra["done"].clone()
            kept_primal, kept_dual = checkpoint.extra["primal"].clone(), checkpoint.extra["dual"].clone()
            V = _values(checkpoint.worker_states, alpha)
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
        _, eps_pri, eps_dual = check_convergence(sums, options)  # Boyd's residuals: reported, balance rho
        record: dict[str, float] = {
            "iteration": iteration,
            "primal": sums.primal,
            "dual": sums.dual,
            "rho": used_rho,
        }
        if gaps is not None:
            candidate = Z
            if polished is not None:
                candidate = Z.clone()
                candidate[polished.positions] = polished.weights
                gaps.set_rows(polished.positions, polished.gaps)
            ok = gaps.certified(options.gap_tol) & ~done
            if polished is not None:
                polished_rows += int(ok[polished.positions].sum())
            kept[ok], kept_primal[ok], kept_dual[ok] = candidate[ok], gaps.primal[ok], gaps.dual[ok]
            done |= ok
            relative_gap = _relative_gap(done, kept_primal, kept_dual, gaps)
            converged = bool(done.all())
            if not converged and not handed and _hand_over_due(options, iteration, lam, nc, kappa):
                handed = True
                with timings.phase("interior point"):
                    H = restricted_hessian(torch.arange(d))
                    current = torch.where(done, kept_primal, gaps.primal)
                    finished = finish_rows(
                        H, R, certificate.target_sq, torch.nonzero(~done).flatten(), lam=lam, kappa=kappa,
                        n_constrained=nc, gap_tol=options.gap_tol, current_primal=current,
                        vertex=options.vertex,
                    )  # fmt: skip
                got = finished.rows[finished.certified]
                kept[got] = finished.weights[finished.certified]
                kept_primal[got] = finished.gaps.primal[finished.certified]
                kept_dual[got] = finished.gaps.dual[finished.certified]
                done[got] = True
                interior_point_rows += int(got.numel())
                relative_gap = _relative_gap(done, kept_primal, kept_dual, gaps)
                converged = bool(done.all())
            record.update({"relative_gap": relative_gap, "certified_rows": int(done.sum())})
        history.append(record)
        reporter.update(
            ProgressEvent(
                "consensus",
                iteration,
                sums.primal,
                sums.dual,
                eps_pri,
                eps_dual,
                used_rho,
                list(pool.actors),
                relative_gap=relative_gap,
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
                        extra=extra(),
                    )
                )
    W = torch.where(done[:, None], kept, Z)
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
        relative_gap=relative_gap,
    )
    info.polished_rows = polished_rows
    info.interior_point_rows = interior_point_rows
    return W, info


def _relative_gap(
    done: torch.Tensor, kept_primal: torch.Tensor, kept_dual: torch.Tensor, gaps: DualityGap
) -> float:
    """The stage's relative duality gap: sum of (P - D)_+ over sum of P, certified rows at their kept answer."""
    primal = torch.where(done, kept_primal, gaps.primal)
    dual = torch.where(done, kept_dual, gaps.dual)
    return float((primal - dual).clamp_min(0).sum()) / max(
        abs(float(primal.sum())), torch.finfo(torch.float64).tiny
    )


def _hand_over_due(
    options: ADMMOptions, iteration: int, lam: float | torch.Tensor, n_constrained: int, kappa: float | None
) -> bool:
    """The interior-point hand-over applies (enabled, thresholds it handles) and its step count came."""
    if not options.interior_point or iteration < options.interior_point_after:
        return False
    return interior_point_applies(lam, n_constrained, kappa)


def _values(states: list[ConsensusLocalState], relaxation: float) -> list[torch.Tensor] | None:
    """The value each worker sends the driver to average, or None before the first local step."""
    if any(s.W is None for s in states):
        return None
    return [s.value(relaxation) for s in states]


def run_consensus(pool: WorkerPool, **kwargs: Any) -> tuple[torch.Tensor, RunInfo]:
    """See :func:`_run_consensus`; the progress bar is closed however the run ends."""
    try:
        return _run_consensus(pool, **kwargs)
    finally:
        kwargs["reporter"].close()


__all__ = ["consensus_rho", "run_consensus"]
