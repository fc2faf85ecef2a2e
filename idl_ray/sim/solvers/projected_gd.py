"""Proximal / projected gradient on the Gram form, with an optional low-rank A = L R^T.

Full rank (``rank=None``, and always for unconstrained stages): FISTA with step 1/L (L = largest
eigenvalue of H) and the exact prox of ``lam ||.||_1 + indicator(||a_i||_1 <= kappa)`` (soft-threshold then
l1-ball projection), with adaptive restart; it converges to the same optimum as ADMM and CVX. Every
``check_every`` iterations the duality gap of the iterate (:mod:`~idl_ray.sim.solvers.certificate`) is
computed and the loop stops once every row is certified to ``gap_tol``; rows with a small gap are polished
on their support (:func:`~idl_ray.sim.solvers.polish.polish_if_better`, improvements only). Reaching
``max_iter`` instead emits a :class:`~idl_ray.errors.ConvergenceWarning` naming the gap reached.

Low rank (``rank=r < n``): A = L R^T with L, R of shape (n, r), B free; Adam on the objective plus a
quadratic penalty on row sums above kappa, stopped when the loss changes by less than ``tol`` (relative)
between checks. At the end the rows of L are scaled so that ``||L R^T||_inf <= kappa`` holds exactly (row
scaling keeps the rank), and B is refitted by FISTA with A fixed. The problem is non-convex in (L, R): the
certificate reported (and used as the stopping test) is that of the convex refit of B with A fixed, a
bound on how far B is from the best B for this A, not on the distance to the full-rank optimum.
Everything stays on the device; the host reads a scalar only every ``check_every`` steps.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch

from idl_ray._validation import bad_parameter, check_choice, check_positive_float, check_positive_int
from idl_ray.errors import ConfigError, ConvergenceWarning
from idl_ray.implicit.projection import project_rows_onto_l1_ball
from idl_ray.sim.problem import SIMProblem
from idl_ray.sim.solvers.admm_kernels import ADMMOptions, GramFactor, prox
from idl_ray.sim.solvers.base import BaseSolver, check_dtype, register_solver, resolve_device
from idl_ray.sim.solvers.certificate import DualityGap, duality_gap
from idl_ray.sim.solvers.finish import Finished, finish_rows
from idl_ray.sim.solvers.interior_point import SPARSE_STEPS, interior_point_applies, steps_worth_a_hand_over
from idl_ray.sim.solvers.polish import Polished, polish_if_better
from idl_ray.sim.solvers.weights import Threshold, take_rows

__all__ = ["ProjectedGDLowRankSolver", "fista", "fista_loop", "projected_gd_on_gram", "warn_not_converged"]

#: ``(W) -> DualityGap``: the certificate of an iterate
Certify = Callable[[torch.Tensor], DualityGap]
#: ``(W, gaps, eligible) -> Polished | None``: polished rows of W (improvements only)
Polish = Callable[[torch.Tensor, DualityGap, torch.Tensor], "Polished | None"]


def _quad_grad(W: torch.Tensor, H: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    return W @ H - R


def _span_target_sq(H: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    from idl_ray.sim.solvers.row_block import span_target_sq

    return span_target_sq(GramFactor(H), R)


def fista(
    H: torch.Tensor,
    R: torch.Tensor,
    *,
    lam: Threshold,
    kappa: float | None,
    n_constrained: int,
    target_sq: torch.Tensor | None = None,
    W0: torch.Tensor | None = None,
    max_iter: int = 20_000,
    gap_tol: float = 1e-7,
    check_every: int = 25,
    polish: bool = True,
    interior_point: bool = True,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """FISTA with gradient restart on ``1/2 tr(W H W^T) - tr(W R^T) + lam ||W||_1`` s.t. the row bound,
    stopped on the duality gap, with the rows still uncertified after :func:`hand_over_step` steps finished
    by the batched interior point (as the ADMM does).

    Parameters
    ----------
    H : Tensor (d, d), G/m + l2 I; R : Tensor (rows, d), Rt/m
    lam, kappa, n_constrained : the stage's settings (lam: a float, or per-entry thresholds (rows, d) in
        [0, inf] from l1 weights; the prox soft-thresholds each entry by its own step * t_ij)
    target_sq : Tensor (rows,), ||t_i||^2 / m (the objective's constant, needed by the certificate); None
        uses the smallest value consistent with H and R (exact when the targets lie in the features' span)
    W0 : Tensor (rows, d), starting point (zeros by default)
    max_iter, gap_tol, check_every, polish : see :func:`fista_loop`
    interior_point : bool, hand the rows FISTA has not certified by :func:`hand_over_step` to the batched
        interior point (:mod:`~idl_ray.sim.solvers.interior_point`; once, where its thresholds allow)

    Returns
    -------
    W : Tensor (rows, d), kappa-feasible
    info : dict (iterations, converged, history, step, gap, relative_gap, polished_rows,
        interior_point_rows, interior_point_iterations, vertex_rows)

    The step is 1/L with L the largest eigenvalue of H.
    """
    # the eigendecomposition the interior point works with (its rank sets the hand-over step); it gives L too
    factor = GramFactor(H) if interior_point else None
    spectrum = factor.eigenvalues if factor is not None else torch.linalg.eigvalsh(0.5 * (H + H.T))
    L = float(spectrum.max().clamp_min(1e-300))
    c = _span_target_sq(H, R) if target_sq is None else target_sq.to(device=R.device, dtype=R.dtype)
    settings = {"lam": lam, "kappa": kappa, "n_constrained": n_constrained if kappa is not None else 0}

    def certify(W: torch.Tensor) -> DualityGap:
        return duality_gap(W, H, R, c, **settings)

    def row_settings(idx: torch.Tensor) -> dict[str, Any]:
        return {**settings, "lam": take_rows(lam, idx)}

    def polish_step(W: torch.Tensor, gaps: DualityGap, eligible: torch.Tensor) -> Polished | None:
        rows = torch.arange(W.shape[0], device=W.device)
        return polish_if_better(
            H,
            R,
            W,
            gaps,
            rows=rows,
            certificate=lambda Wc, idx: duality_gap(Wc, H, R[idx], c[idx], **row_settings(idx)),
            eligible=eligible,
            **settings,
        )

    counts = {"interior_point_iterations": 0, "vertex_rows": 0}

    def finish_step(W: torch.Tensor, gaps: DualityGap, eligible: torch.Tensor) -> Finished | None:
        """The interior point and the vertex step on the rows ``eligible`` (``finish.finish_rows``, with the
        interior point's sparse steps: most rows here have fewer nonzeros than the vertex step takes up); the
        rows where it beats FISTA's iterate, on the bound exactly after rounding."""
        rows = torch.nonzero(eligible).flatten()
        nc = settings["n_constrained"]
        if factor is None or factor.rank == 0 or not interior_point_applies(take_rows(lam, rows), nc, kappa):
            return None
        done = finish_rows(
            H, R, c, rows, lam=lam, kappa=kappa, n_constrained=nc, gap_tol=gap_tol,
            current_primal=gaps.primal, factor=factor, sparse_steps=SPARSE_STEPS,
        )  # fmt: skip
        counts["interior_point_iterations"] = done.iterations
        counts["vertex_rows"] += done.vertex_rows
        taken = done.gaps.gaps < gaps.gaps[rows]  # better than FISTA's iterate
        if not bool(taken.any()):
            return None
        positions, weights = rows[taken], done.weights[taken]
        if kappa is not None and nc > 0:  # the exact bound after rounding (a no-op but for the last bits)
            weights = prox(weights, 0.0, kappa, nc)
        new_gaps = duality_gap(weights, H, R[positions], c[positions], **row_settings(positions))
        return Finished(
            rows=positions,
            weights=weights,
            gaps=new_gaps,
            certified=done.certified[taken],
            iterations=done.iterations,
        )

    W, info = fista_loop(
        lambda W: _quad_grad(W, H, R),
        torch.zeros_like(R) if W0 is None else W0,
        step=1.0 / L,
        lam=lam,
        kappa=kappa,
        n_constrained=n_constrained,
        max_iter=max_iter,
        check_every=check_every,
        certify=certify,
        gap_tol=gap_tol,
        polish=polish_step if polish else None,
        finish=finish_step if factor is not None else None,
        finish_at=0 if factor is None else hand_over_step(factor.dim, factor.rank),
    )
    info.update(counts)
    return W, info


#: FISTA hands over no earlier than this many steps: the ADMM's ``interior_point_after`` default (100)
_HAND_OVER_AFTER = ADMMOptions.interior_point_after


def hand_over_step(d: int, rank: int) -> int:
    """The FISTA step after which the uncertified rows go to the interior point: the ADMM's ski rental
    (:func:`~idl_ray.sim.solvers.interior_point.steps_worth_a_hand_over`; one step: a (d x d) product, 2 d^2
    flops per row), and no earlier than ``_HAND_OVER_AFTER``: 100 on both digits teachers' Grams (d = 161, rank 132;
    d = 881, rank ~130); ~900 on a full-rank d = 1000 Gram, where FISTA usually certifies first."""
    return max(_HAND_OVER_AFTER, steps_worth_a_hand_over(rank, d, 2.0 * d * d))


def fista_loop(
    grad: Callable[[torch.Tensor], torch.Tensor],
    W0: torch.Tensor,
    *,
    step: float,
    lam: Threshold,
    kappa: float | None,
    n_constrained: int,
    max_iter: int,
    check_every: int,
    certify: Certify,
    gap_tol: float,
    polish: Polish | None = None,
    finish: Callable[[torch.Tensor, DualityGap, torch.Tensor], Finished | None] | None = None,
    finish_at: int = 0,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Proximal gradient with Nesterov momentum and gradient restart, stopped on the duality gap.

    ``W <- prox(Y - step grad(Y))`` with ``prox`` the l1 soft-threshold plus the row-wise kappa
    projection; momentum is dropped when it points uphill (O'Donoghue & Candes 2015). Every
    ``check_every`` iterations (and at the cap) ``certify(W)`` gives the per-row duality gaps; a row
    certified to ``gap_tol`` (:meth:`DualityGap.certified`) keeps that value (rows are independent
    problems) and the loop stops when every row is certified. Before that test, ``polish`` (if given) may
    finish uncertified rows by polishing them on their support (kept only when better and certified; the
    iteration itself is never disturbed: resetting the momentum at every check made FISTA crawl). At the
    first check from step ``finish_at`` on, ``finish`` (if given: the interior point) gets the rows still
    uncertified, once, and returns those it improved: the certified ones are final like the polished ones,
    the others go on from its point (their iterate and momentum point reset there). ``grad`` and
    ``certify`` may be local (a Gram product) or sums over Ray actors: both solvers share this loop.

    Returns
    -------
    W : Tensor, the last iterate (a prox output, so kappa-feasible) or its polished rows
    info : dict with iterations, converged (every row certified), history (per check: relative gap,
        certified rows), step, gap, relative_gap, polished_rows, interior_point_rows (certified by ``finish``)
    """
    W = W0.clone()
    Y = W.clone()
    t = torch.ones((), dtype=W.dtype, device=W.device)  # momentum state stays on the device: no sync
    one = torch.ones((), dtype=W.dtype, device=W.device)
    zero = torch.zeros((), dtype=W.dtype, device=W.device)
    history: list[dict[str, float]] = []
    converged, k, polished_rows, finished_rows, finish_tried = False, 0, 0, 0, False
    rows = W.shape[0]
    kept = W.clone()  # rows certified at some check, with their certified values
    kept_primal = torch.zeros(rows, dtype=torch.float64, device=W.device)
    kept_dual = torch.zeros(rows, dtype=torch.float64, device=W.device)
    done = torch.zeros(rows, dtype=torch.bool, device=W.device)
    gaps: DualityGap | None = None
    for k in range(1, max_iter + 1):
        W_prev = W
        W = prox(Y - step * grad(Y), step * lam, kappa, n_constrained)
        restart = torch.sum((Y - W) * (W - W_prev)) > 0
        t_next = 0.5 * (1.0 + torch.sqrt(1.0 + 4.0 * t * t))
        momentum = torch.where(restart, zero, (t - 1.0) / t_next)
        Y = W + momentum * (W - W_prev)
        t = torch.where(restart, one, t_next)
        if k % check_every == 0 or k == max_iter:
            gaps = certify(W)
            candidate = W
            ok = gaps.certified(gap_tol)
            if polish is not None and not bool((ok | done).all()):
                polished = polish(W, gaps, ~(ok | done))
                if polished is not None:
                    candidate = W.clone()
                    candidate[polished.positions] = polished.weights
                    gaps.set_rows(polished.positions, polished.gaps)
                    ok = gaps.certified(gap_tol)
                    polished_rows += int((ok & ~done)[polished.positions].sum())
            if finish is not None and not finish_tried and k >= finish_at and not bool((ok | done).all()):
                finish_tried = True
                finished = finish(candidate, gaps, ~(ok | done))
                if finished is not None:  # certified there on the stage's scale as it ends: final
                    candidate = candidate.clone()
                    candidate[finished.rows] = finished.weights
                    gaps.set_rows(finished.rows, finished.gaps)
                    was = ok | done
                    ok = gaps.certified(gap_tol)
                    ok[finished.rows[finished.certified]] = True
                    finished_rows += int((ok & ~was).sum())
                    # rows it improved without certifying them go on from its point
                    again = finished.rows[~finished.certified]
                    W[again] = Y[again] = finished.weights[~finished.certified]
            # certified rows are final (rows are independent problems); the others iterate on, undisturbed
            new = ok & ~done
            kept[new], kept_primal[new], kept_dual[new] = candidate[new], gaps.primal[new], gaps.dual[new]
            done |= ok
            history.append(
                {
                    "iteration": k,
                    "relative_gap": _relative(kept_primal, kept_dual, gaps, done),
                    "certified_rows": int(done.sum()),
                }
            )
            if bool(done.all()):
                converged = True
                break
    if gaps is None:  # max_iter = 0 cannot happen (validated), but keep the result well defined
        gaps = certify(W)
    W = torch.where(done[:, None], kept, W)
    primal = torch.where(done, kept_primal, gaps.primal)
    gap = float((primal - torch.where(done, kept_dual, gaps.dual)).clamp_min(0).sum())
    return W, {
        "iterations": k,
        "converged": converged,
        "history": history,
        "step": step,
        "gap": gap,
        "relative_gap": _relative(kept_primal, kept_dual, gaps, done),
        "polished_rows": polished_rows,
        "interior_point_rows": finished_rows,
    }


def _relative(
    kept_primal: torch.Tensor, kept_dual: torch.Tensor, gaps: DualityGap, done: torch.Tensor
) -> float:
    """Relative gap of the rows as returned: certified rows' kept values, the others' latest."""
    primal = torch.where(done, kept_primal, gaps.primal)
    dual = torch.where(done, kept_dual, gaps.dual)
    return float((primal - dual).clamp_min(0).sum()) / max(
        abs(float(primal.sum())), torch.finfo(torch.float64).tiny
    )


def warn_not_converged(owner: str, what: str, max_iter: int, reached: str, advice: str) -> None:
    """The ConvergenceWarning of the projected-gradient solvers (local and Ray)."""
    warnings.warn(
        f"{owner} ({what}) stopped at max_iter={max_iter} with {reached}. The weights satisfy the kappa "
        f"bound but may be suboptimal: {advice}.",
        ConvergenceWarning,
        stacklevel=4,
    )


def set_gradient_settings(
    solver: Any,
    owner: str,
    *,
    rank: int | None,
    max_iter: int,
    tol: float,
    gap_tol: float,
    lr: float,
    penalty: float,
    check_every: int,
    method: str,
    polish: bool,
    warn: bool,
) -> dict[str, Any]:
    """Validate the projected-gradient settings and store them on ``solver`` (local and Ray solvers);
    return them as given, for the solver's ``get_params``."""
    solver.rank = check_positive_int(rank, "rank", owner, allow_none=True)
    solver.max_iter = check_positive_int(max_iter, "max_iter", owner)
    solver.tol = check_positive_float(tol, "tol", owner)
    solver.gap_tol = check_positive_float(gap_tol, "gap_tol", owner)
    solver.lr = check_positive_float(lr, "lr", owner)
    solver.penalty = check_positive_float(penalty, "penalty", owner, allow_zero=True)
    solver.check_every = check_positive_int(check_every, "check_every", owner)
    solver.method = check_choice(method, "method", owner, ("fista", "adam"))
    for name, value in (("polish", polish), ("warn", warn)):
        if not isinstance(value, bool):
            raise bad_parameter(name, owner, "a bool (True or False)", value)
    solver.polish, solver.warn = polish, warn
    return {
        "rank": rank,
        "max_iter": max_iter,
        "tol": tol,
        "gap_tol": gap_tol,
        "lr": lr,
        "penalty": penalty,
        "check_every": check_every,
        "method": method,
        "polish": polish,
        "warn": warn,
    }


def fista_info(info: dict[str, Any], solver: Any, owner: str) -> dict[str, Any]:
    """The solver info dict of a full-rank FISTA run, warning when it stopped at the cap."""
    if not info["converged"] and solver.warn:
        warn_not_converged(
            owner,
            "fista",
            solver.max_iter,
            f"a relative duality gap of {info['relative_gap']:.3g} (tolerance gap_tol={solver.gap_tol:.3g})",
            "raise max_iter or gap_tol",
        )
    return {
        "iterations": info["iterations"],
        "converged": info["converged"],
        "status": "optimal" if info["converged"] else "max_iter",
        # BaseSolver.solve checks it in float64 (the Ray projected-gradient solver computes in float64)
        "certified_in": (getattr(solver, "dtype", torch.float64), solver.gap_tol),
        "history": info["history"],
        "extra": {
            "method": "fista",
            "step": info["step"],
            "relative_gap": info["relative_gap"],
            "polished_rows": info["polished_rows"],
            "interior_point_rows": info.get("interior_point_rows", 0),
            "interior_point_iterations": info.get("interior_point_iterations", 0),
            "vertex_rows": info.get("vertex_rows", 0),
        },
    }


def adam_stopped(history: list[dict[str, float]], loss: float, k: int, tol: float) -> bool:
    """Record the Adam loss of step k; True when it changed by at most ``tol`` (relative) since the last
    check (the low-rank fit's stopping test)."""
    previous = history[-1]["loss"] if history else None
    history.append({"iteration": k, "loss": loss})
    if previous is None:
        return False
    return abs(previous - loss) <= tol * max(abs(loss), torch.finfo(torch.float64).tiny)


def low_rank_info(solver: Any, owner: str, *, adam: dict[str, Any], refit: dict[str, Any]) -> dict[str, Any]:
    """The solver info dict of a low-rank fit (``adam``: :func:`low_rank_adam`'s info, ``refit``: the FISTA
    refit's): converged when Adam met its test and the convex refit of B (A fixed) is certified; warns
    otherwise."""
    adam_steps, adam_converged = adam["steps"], adam["converged"]
    converged = adam_converged and refit["converged"]
    if solver.warn and not adam_converged:
        warn_not_converged(
            owner,
            "low-rank Adam",
            solver.max_iter,
            f"the loss still changing by more than tol={solver.tol:.3g} between checks",
            "raise max_iter or lr, or loosen tol",
        )
    if solver.warn and not refit["converged"]:
        warn_not_converged(
            owner,
            "refit of B with A fixed",
            solver.max_iter,
            f"a relative duality gap of {refit['relative_gap']:.3g} for B given A (tolerance "
            f"gap_tol={solver.gap_tol:.3g})",
            "raise max_iter or gap_tol",
        )
    return {
        "iterations": adam_steps + refit["iterations"],
        "converged": converged,
        "status": "optimal" if converged else "max_iter",
        "history": adam["history"] + refit["history"],
        "extra": {
            "method": "low_rank_adam",
            "rank": adam["rank"],
            "adam_steps": adam_steps,
            "adam_converged": adam_converged,
            # the certificate of the convex refit of B with A fixed (the (L, R) problem is non-convex)
            "refit_relative_gap": refit["relative_gap"],
            "refit_gap": refit["gap"],
        },
    }


def refit_constant(
    A: torch.Tensor, H: torch.Tensor, R: torch.Tensor, target_sq: torch.Tensor, nc: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """R_B and the constant of the B-subproblem with A fixed: ``R_B = R_B - A H_AB``,
    ``c_B = c - 2 r_A . a + a^T H_AA a`` per row (the objective in B then matches the stage's, minus
    lam ||A||_1)."""
    Rb = R[:, nc:] - A @ H[:nc, nc:]
    c = target_sq - 2.0 * (R[:, :nc] * A).sum(dim=1) + ((A @ H[:nc, :nc]) * A).sum(dim=1)
    return Rb, c


@register_solver("projected_gd")
class ProjectedGDLowRankSolver(BaseSolver):
    """Projected (proximal) gradient on the Gram form, optionally with a low-rank A = L R^T.

    Parameters
    ----------
    rank : int or None
        Rank of A in stage 1; None (default) fits a full A by FISTA (exact prox, same optimum as ADMM).
    max_iter : int, iteration cap (FISTA iterations, or Adam steps for the low-rank fit); a guard:
        reaching it emits a ConvergenceWarning
    tol : float, relative change of the Adam loss between checks that stops the low-rank fit
    gap_tol : float, FISTA stops when every row's duality gap is below gap_tol times its share of the
        objective (:meth:`~idl_ray.sim.solvers.certificate.DualityGap.certified`)
    lr : float, Adam learning rate of the low-rank fit
    penalty : float, weight of the squared row-sum excess penalty during the low-rank fit
    check_every : int, host syncs (stopping tests) every this many steps
    method : "fista" (default) for full rank; "adam" forces Adam + final projection even at full rank
    polish : bool, polish nearly optimal rows on their support (improvements only), default True
    warn : bool, emit a ConvergenceWarning at the cap (default True)
    device : None/"auto" (CUDA when available), or a device
    dtype : torch.float64 (default) or torch.float32
    seed : int, initialisation of L and R

    Notes
    -----
    For the low-rank fit, ``converged`` means Adam met its stopping test *and* the convex refit of B with A
    fixed is certified; ``stats.extra["refit_relative_gap"]`` is that refit's certificate. The stage's own
    certificate (``stats.relative_gap``, against the full-rank optimum) stays large when the rank binds.
    """

    #: full rank (FISTA) honours l1 weights; the low-rank fit raises a ConfigError for them
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
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float64,
        seed: int = 0,
    ) -> None:
        owner = "ProjectedGDLowRankSolver"
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
        self.device = resolve_device(device)
        self.dtype = check_dtype(dtype, owner)
        self.seed = int(seed)
        self._params = {
            **settings,
            "device": str(self.device),
            "dtype": str(dtype),
            "seed": seed,
        }

    def _solve(self, problem: SIMProblem) -> tuple[torch.Tensor, dict[str, Any]]:
        return projected_gd_on_gram(self, problem, device=self.device, dtype=self.dtype)


def projected_gd_on_gram(
    solver: Any, problem: SIMProblem, *, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, dict[str, Any]]:
    """The projected-gradient solve of ``problem`` from its Gram, on ``device`` in ``dtype``: FISTA at full rank,
    Adam on A = L R^T plus a certified refit of B at low rank (module docstring). ``solver`` holds the settings
    (:func:`set_gradient_settings`, and ``seed``) and names the warnings: :class:`ProjectedGDLowRankSolver`,
    and the gram strategy of :class:`~idl_ray.distributed.projected_gd.RayProjectedGDSolver` (the Gram
    summed from the actors' shards, the iterations here)."""
    owner = type(solver).__name__
    H, R = problem.scaled(device=device, dtype=dtype)
    target_sq = (problem.target_sq / problem.num_samples).to(device=device, dtype=dtype)
    lam = problem.thresholds  # a float, or per-entry thresholds (l1 weights)
    if isinstance(lam, torch.Tensor):
        lam = lam.to(device=device, dtype=dtype)
    nc = problem.n_constrained if problem.kappa is not None else 0
    low_rank = nc > 0 and ((solver.rank is not None and solver.rank < nc) or solver.method == "adam")
    if low_rank and isinstance(lam, torch.Tensor):
        raise ConfigError(
            f"{owner}: the low-rank fit (rank < n or method='adam') does not support 'l1_weights'; use "
            "rank=None with method='fista' (full rank), ADMMSolver or CVXSolver."
        )
    if not low_rank:
        W, info = fista(
            H,
            R,
            lam=lam,
            kappa=problem.kappa,
            n_constrained=nc,
            target_sq=target_sq,
            **_loop_settings(solver),
        )
        return W, fista_info(info, solver, owner)
    return _low_rank_fit(solver, float(problem.kappa), H, R, target_sq, lam, nc)


def low_rank_adam(
    gradient: Callable[[torch.Tensor], torch.Tensor],
    R: torch.Tensor,
    *,
    lam: float,
    kappa: float,
    nc: int,
    solver: Any,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Adam on (L, R, B) with A = L R^T (n x n, rank ``solver.rank``) and a penalty on row sums above kappa,
    then the rows of A scaled onto the bound (the scaling keeps the rank) and projected (a no-op guard).

    ``gradient(W)`` is the quadratic part's gradient ``W H - R`` at a detached W (rows x d): a Gram product,
    or a sum over Ray actors; it is injected into autograd through ``sum(W * g)``, and the loss the stopping
    test reads is ``1/2 w.(g - R)`` plus the penalties, from the same gradient. ``solver`` holds rank, lr,
    penalty, tol, max_iter, check_every and seed. Returns (A, the last B, info: steps, converged, history,
    rank)."""
    rows, d = R.shape
    device, dtype = R.device, R.dtype
    rank = min(solver.rank or nc, nc)
    gen = torch.Generator(device="cpu").manual_seed(solver.seed)
    init = 0.1 / rank**0.5
    Lf = (init * torch.randn(nc, rank, generator=gen, dtype=dtype)).to(device).requires_grad_()
    Rf = (init * torch.randn(nc, rank, generator=gen, dtype=dtype)).to(device).requires_grad_()
    Bf = torch.zeros(rows, d - nc, dtype=dtype, device=device, requires_grad=True)
    optimiser = torch.optim.Adam([Lf, Rf, Bf], lr=solver.lr)
    history: list[dict[str, float]] = []
    converged, k = False, 0
    for k in range(1, solver.max_iter + 1):
        optimiser.zero_grad(set_to_none=True)
        A = Lf @ Rf.T
        W = torch.cat([A, Bf], dim=1)
        excess = (A.abs().sum(dim=1) - kappa).clamp_min(0)
        local = lam * W.abs().sum() + solver.penalty * torch.sum(excess * excess)
        g = gradient(W.detach())
        (torch.sum(W * g) + local).backward()
        optimiser.step()
        if k % solver.check_every == 0:
            with torch.no_grad():
                loss = 0.5 * float(torch.sum(W * (g - R))) + float(local)
            if adam_stopped(history, loss, k, solver.tol):
                converged = True
                break
    with torch.no_grad():
        A = Lf @ Rf.T
        sums = A.abs().sum(dim=1, keepdim=True)
        # scaling rows keeps rank r; the margin covers rounding, so the projection below is a no-op guard
        margin = 1.0 - 4 * (nc + 1) * torch.finfo(A.dtype).eps
        scale = torch.where(sums > kappa, kappa * margin / sums.clamp_min(1e-300), torch.ones_like(sums))
        A = project_rows_onto_l1_ball(A * scale, kappa)
    return A, Bf.detach(), {"steps": k, "converged": converged, "history": history, "rank": rank}


def _loop_settings(solver: Any) -> dict[str, Any]:
    """The FISTA loop's settings held by a projected-gradient solver."""
    return {
        "max_iter": solver.max_iter,
        "gap_tol": solver.gap_tol,
        "check_every": solver.check_every,
        "polish": solver.polish,
    }


def _low_rank_fit(
    solver: Any,
    kappa: float,
    H: torch.Tensor,
    R: torch.Tensor,
    target_sq: torch.Tensor,
    lam: float,
    nc: int,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """:func:`low_rank_adam` on the Gram, then the certified FISTA refit of B with A fixed."""
    A, B0, adam = low_rank_adam(lambda W: W @ H - R, R, lam=lam, kappa=kappa, nc=nc, solver=solver)
    with torch.no_grad():
        # refit B with A fixed: FISTA on the B block, certified on that convex subproblem
        Rb, cb = refit_constant(A, H, R, target_sq, nc)
        B, info = fista(
            H[nc:, nc:],
            Rb,
            lam=lam,
            kappa=None,
            n_constrained=0,
            target_sq=cb,
            W0=B0,
            **_loop_settings(solver),
        )
        W = torch.cat([A, B], dim=1)
    return W, low_rank_info(solver, type(solver).__name__, adam=adam, refit=info)
