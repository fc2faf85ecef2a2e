"""Accelerated, certified ADMM on a block of rows: the loop every Gram-form ADMM solve runs.

Rows of W are independent given H = G/m + l2 I, so a block of rows (all of them in one process, a shard on a
Ray worker) is solved on its own and certified on its own: the duality gaps of
:mod:`~idl_ray.sim.solvers.certificate` add over blocks, so blocks that each meet ``gap_tol`` on their share of
the objective give a stage that meets it too.

One round of the loop (:meth:`RowBlockADMM.run`) on the rows not yet certified:

1. ``check_every`` over-relaxed ADMM steps (:func:`~idl_ray.sim.solvers.admm_kernels.relaxed_step`) on the
   state (Z, U), extrapolated by safeguarded type-II Anderson acceleration per row
   (:class:`~idl_ray.sim.solvers.anderson.AndersonAccelerator`, SCS 3);
2. the duality gap of every row's Z (feasible: it is a projection's output); certified rows are frozen;
3. polishing (:mod:`~idl_ray.sim.solvers.polish`) of the others whose sign pattern did not change since the
   previous check or whose gap is below 1e-2 of their objective, and of all of them every few checks (a
   period that doubles, up to 64 checks, after a round that certified nothing); a polished row is kept
   only when its gap and objective both improve, and then its dual is reset to the polished point's
   (U = (r - H w) / rho, the fixed point of ADMM at w);
4. rho adapted from the ratio of the normalised primal and dual residuals (OSQP), by factors of at least
   2 so the map changes rarely (a change resets Anderson's memory);
5. once per solve, after ``interior_point_after`` steps or at a stall, the rows still uncertified go to the
   batched interior point (:mod:`~idl_ray.sim.solvers.interior_point`): on the rank-deficient Grams of
   upsampled images ADMM's end game crawls (gap ~1e-5 after 8,000 steps) where 20-30 Newton steps certify
   every row. A row takes the interior point's answer where its gap is smaller (U reset as for a polish).
6. at the end, certified rows with more nonzeros than rank(H) move to a vertex of their optimal face (the
   optimum is not unique there; :mod:`~idl_ray.sim.solvers.vertex`) where that still certifies.

Iterations are counted as ADMM map evaluations, accelerated or not. The cap ``max_iter`` is a guard: a solve
that reaches it reports ``converged=False`` with the gap it reached, never a success. A solve whose objective
and gap stop moving for ``stall_checks`` checks while rows remain uncertified stops early with
``stalled=True`` (and ``converged=False``): on a very ill-conditioned Gram the remaining steps would change
the objective by less than gap_tol / 100 of itself.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from typing import Any

import torch

from idl_ray._validation import bad_parameter
from idl_ray.sim.solvers.active_set import ActiveSetResult, dual_active_set, dual_active_set_applies
from idl_ray.sim.solvers.admm_kernels import (
    ADMMOptions,
    ADMMState,
    GramFactor,
    initial_rho,
    prox,
    relaxed_step,
)
from idl_ray.sim.solvers.anderson import AndersonAccelerator
from idl_ray.sim.solvers.certificate import DualityGap, duality_gap
from idl_ray.sim.solvers.interior_point import (
    SPARSE_STEPS,
    interior_point_applies,
    interior_point_cost,
    interior_point_rows,
    positive_thresholds,
    steps_worth_a_hand_over,
)
from idl_ray.sim.solvers.polish import POLISH_BELOW, Polished, polish_if_better
from idl_ray.sim.solvers.vertex import move_to_vertices
from idl_ray.sim.solvers.weights import Threshold, take_rows

__all__ = ["BLOCK_COUNTS", "ADMMStats", "BlockReport", "RowBlockADMM", "admm_solve", "dual_point"]

#: rho changes only when the residual ratio calls for a factor of at least this (OSQP uses 5; 2 measured
#: better here: on the 28x28 digits stage 1 a 5x smaller gap after 4,000 steps, and no more steps at p = 64)
_RHO_CHANGE = 2.0
#: rho stays within this factor of its start (both ways)
_RHO_SPAN = 1e6
_TINY = torch.finfo(torch.float64).tiny
#: every this many checks, every uncertified row is polished (a support can be nearly right while its
#: gap, whose dual point is rescaled, still looks poor)
_POLISH_ALL_EVERY = 4
_POLISH_PERIOD_MAX = 64


def _most(values: Any) -> int:
    return max(values, default=0)


#: the per-route counts a block reports (attributes of :class:`BlockReport`, :class:`ADMMStats` and the Ray
#: drivers' run info, keys of ``SolverStats.extra``) and how blocks combine them: rows add up; Newton and
#: active-set steps are the most one block took (blocks run side by side)
BLOCK_COUNTS: dict[str, Callable[[Any], int]] = {
    "polished_rows": sum,
    "interior_point_rows": sum,
    "interior_point_iterations": _most,
    "vertex_rows": sum,
    "active_set_rows": sum,
    "active_set_steps": _most,
}


@dataclasses.dataclass
class ADMMStats:
    """Telemetry of one ADMM solve (missing values are None).

    ``gap`` is the total duality gap of the returned weights (a bound on ``P(W) - P*``), ``relative_gap``
    the same divided by the objective; ``polished_rows`` counts rows finished by polishing.
    """

    iterations: int
    converged: bool
    stalled: bool
    gap: float | None
    relative_gap: float | None
    objective: float | None
    rho: float
    time_s: float
    factor_time_s: float
    polished_rows: int = 0
    certified_rows: int = 0
    rows: int = 0
    #: rows certified by the interior-point hand-over, and its Newton steps (0 when it did not run)
    interior_point_rows: int = 0
    interior_point_iterations: int = 0
    #: rows moved to a sparser vertex of their optimal face (:mod:`~idl_ray.sim.solvers.vertex`)
    vertex_rows: int = 0
    #: rows certified by the dual active-set method, and its steps (0 when it did not run)
    active_set_rows: int = 0
    active_set_steps: int = 0
    history: list[dict[str, float]] = dataclasses.field(default_factory=list)
    #: ADMM's unconstrained iterate at the end, a second dual point for the certificate (rows x d)
    dual_point: torch.Tensor | None = None


@dataclasses.dataclass
class BlockReport:
    """What one :meth:`RowBlockADMM.run` returns; ``primal_sum`` / ``dual_sum`` add over blocks."""

    iterations: int
    certified: bool
    stalled: bool
    certified_rows: int
    rows: int
    primal_sum: float
    dual_sum: float
    rho: float
    polished_rows: int
    time_s: float
    interior_point_rows: int = 0
    interior_point_iterations: int = 0
    vertex_rows: int = 0
    active_set_rows: int = 0
    active_set_steps: int = 0

    @property
    def gap(self) -> float:
        return max(self.primal_sum - self.dual_sum, 0.0)


class RowBlockADMM:
    """The accelerated ADMM state and loop for a block of rows (see the module docstring).

    Parameters
    ----------
    factor : GramFactor of H (d x d)
    H : Tensor (d, d), R : Tensor (rows, d), target_sq : Tensor (rows,) (= ||t_i||^2 / m)
    lam, kappa, n_constrained : the stage's settings; lam is a float or per-entry thresholds (rows x d,
        aligned with R; :mod:`~idl_ray.sim.solvers.weights`)
    options : ADMMOptions
    state : ADMMState to start from (a warm start or a checkpoint); zeros by default
    polish_first : bool, polish every row at the first check (a warm start from a nearby problem, e.g. the
        previous point of a lambda path: its support is a good guess, and a polish on the right support
        certifies the row without a step)
    active_set_source : ``rows -> ActiveSetResult or None``, the dual active-set method's answer for the block's
        rows ``rows`` from elsewhere (a batch with other stages' rows, :mod:`~idl_ray.sim.solvers.joint`), asked
        where the block would run the method; None from it (or no source): the block runs the method itself
    """

    def __init__(
        self,
        factor: GramFactor,
        H: torch.Tensor,
        R: torch.Tensor,
        target_sq: torch.Tensor,
        *,
        lam: Threshold,
        kappa: float | None,
        n_constrained: int,
        options: ADMMOptions,
        state: ADMMState | None = None,
        condition: str = "inf_norm",
        diagonal: torch.Tensor | None = None,
        polish_first: bool = False,
        active_set_source: Callable[[torch.Tensor], ActiveSetResult | None] | None = None,
    ) -> None:
        self.factor, self.H, self.R = factor, H, R
        self._active_set_source = active_set_source
        # "mu_inf": the diagonal column of each row of the block (the prox and the certificate need it)
        self.condition = condition if kappa is not None and n_constrained > 0 else "inf_norm"
        if self.condition == "mu_inf":
            rows_ = R.shape[0]
            self.diagonal = (
                (torch.arange(rows_) if diagonal is None else diagonal).to(R.device).reshape(rows_)
            )
        self.target_sq = target_sq.to(device=R.device, dtype=R.dtype)
        self.lam: Threshold = (
            lam.to(device=R.device, dtype=R.dtype) if isinstance(lam, torch.Tensor) else float(lam)
        )
        self.kappa = kappa
        self.n_constrained = n_constrained if kappa is not None else 0
        self.options = options
        rows, d = R.shape
        rho0 = initial_rho(H, options)
        self.state = state or ADMMState.zeros(rows, d, rho0, dtype=R.dtype, device=R.device)
        # rho stays within _RHO_SPAN of its start either way (OSQP clamps it too): in float32 on a rank-deficient
        # Gram at lam = 0 the residual ratio once drove it to 1e-24, and (H + rho I)^{-1} blew W up to 1e18
        self._rho_bounds = (rho0 / _RHO_SPAN, rho0 * _RHO_SPAN)
        self.certified = torch.zeros(rows, dtype=torch.bool, device=R.device)
        self.gaps: DualityGap | None = None
        self.polished_rows = 0
        self.interior_point_rows = 0
        self.interior_point_iterations = 0
        self._interior_point_tried = False
        # the interior point is enabled and applies to this block: the l1 ball (or no bound), thresholds it
        # handles (interior_point_applies: > 0, or 0 on free columns), a Gram of rank > 0
        self._interior_point_applies = (
            options.interior_point
            and self.condition != "mu_inf"
            and factor.rank > 0
            and interior_point_applies(self.lam, n_constrained, kappa)
        )
        # the dual active-set method applies: a low-rank Gram (where ADMM crawls; on a full-rank one its r x r
        # steps cost more than ADMM's), thresholds > 0, the l1 ball or no bound
        self.active_set_rows = 0
        self.active_set_steps = 0
        self._active_set_pending = (
            options.active_set
            and self.condition != "mu_inf"
            and factor.rank > 0
            and factor.low_rank
            and dual_active_set_applies(self.lam)
        )
        # every threshold > 0: a support larger than rank(H) then marks a non-unique optimum (see _polish)
        self._sparse_optimum = positive_thresholds(self.lam)
        # a warm start (a lambda path's previous point) on a low-rank Gram hands over at its first check: the
        # rows its polish did not certify are where ADMM crawls (measured: p = 784 path 1.63x -> 2.18x the cold
        # fits); on a well-conditioned Gram ADMM finishes them in tens of steps, cheaper than Newton steps
        self._hand_over_at = (
            self.state.iteration
            if polish_first and factor.low_rank
            else max(options.interior_point_after, self._steps_worth_a_hand_over())
        )
        self._vertex_tried = torch.zeros(rows, dtype=torch.bool, device=R.device)
        self.vertex_rows = 0
        self.history: list[dict[str, float]] = []
        # the sign pattern of each row at the previous check: an unchanged pattern calls for a polish
        self._last_signs = torch.full_like(R, 2.0)
        self._checks = 0
        # every uncertified row is polished every _polish_period checks; the period doubles after a
        # round that certified nothing (a support far from right costs solves and gains nothing)
        self._polish_period = _POLISH_ALL_EVERY
        self._next_periodic = 1 if polish_first else _POLISH_ALL_EVERY
        # the first polish of a warm start keeps only the rows it certifies, so the others run ADMM from
        # the given start, as they would without it
        self._first_polish_certifies_only = polish_first

    # ------------------------------------------------------------------ the map and its pieces
    def _settings(self) -> dict[str, Any]:
        return {"lam": self.lam, "kappa": self.kappa, "n_constrained": self.n_constrained}

    def _constraint_settings(self, rows: torch.Tensor) -> dict[str, Any]:
        """``condition`` and ``diagonal`` of the rows ``rows`` under mu_inf; empty for the l1 ball."""
        if self.condition != "mu_inf":
            return {}
        return {"condition": "mu_inf", "diagonal": self.diagonal[rows]}

    def _map(
        self, R_rows: torch.Tensor, rho: float, lam_rows: Threshold, rows: torch.Tensor | None = None
    ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """T(x) for x = [Z, U] (rows x 2d) of the rows ``idx`` of the active block (``lam_rows``: their l1
        thresholds; ``rows``: the block rows behind ``R_rows``, needed under mu_inf)."""
        d = R_rows.shape[1]
        settings = self._settings()
        diagonal = None if self.condition != "mu_inf" or rows is None else self.diagonal[rows]

        def step(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
            extra = {} if diagonal is None else {"condition": "mu_inf", "diagonal": diagonal[idx]}
            _, Z, U = relaxed_step(
                self.factor,
                R_rows[idx],
                x[:, :d],
                x[:, d:],
                rho=rho,
                relaxation=self.options.relaxation,
                **{**settings, "lam": take_rows(lam_rows, idx)},
                **extra,
            )
            return torch.cat([Z, U], dim=1)

        return step

    def certificate(
        self, Z: torch.Tensor, rows: torch.Tensor, U: torch.Tensor | None = None, rho: float | None = None
    ) -> DualityGap:
        """Duality gaps of the rows ``rows`` at weights Z (len(rows) x d).

        With ADMM's scaled dual U (and rho), the dual bound is the better, row by row, of the dual points
        built from Z and from W = (r + rho (Z - U)) (H + rho I)^{-1}, ADMM's next unconstrained iterate: any
        point gives a valid dual bound, and W's residual is the smoother one (on an ill-conditioned Gram,
        measured on the 28x28 digits teacher: a relative gap of 2e-3 where Z's alone gives 3e-1).
        """
        R_rows = self.R[rows]
        W = (
            None
            if U is None or rho is None
            else dual_point(self.factor, R_rows, ADMMState(W=Z, Z=Z, U=U, rho=rho))
        )
        settings = {**self._settings(), "lam": take_rows(self.lam, rows)}
        return duality_gap(
            Z,
            self.H,
            R_rows,
            self.target_sq[rows],
            dual_point=W,
            **settings,
            **self._constraint_settings(rows),
        )

    def _dual_at(self, W: torch.Tensor, rows: torch.Tensor, rho: float) -> torch.Tensor:
        """U = (r - H w) / rho: the scaled dual of ADMM's fixed point at W."""
        return (self.R[rows] - W @ self.H) / rho

    # ------------------------------------------------------------------ the loop
    def run(self, max_steps: int, progress: str | None = None) -> BlockReport:
        """Iterate until every row is certified or ``max_steps`` more ADMM steps were taken.

        ``progress``: a description for a tqdm bar of the steps (with the gap and the certified rows), or
        None for no bar.
        """
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=max_steps, desc=progress, leave=False)
        try:
            return self._run(max_steps, bar)
        finally:
            if bar is not None:
                bar.close()

    def _run(self, max_steps: int, bar: Any) -> BlockReport:
        start = time.perf_counter()
        options = self.options
        d = self.R.shape[1]
        state = self.state
        rho = state.rho
        Z, U = state.Z.clone(), state.U.clone()
        budget_end = state.iteration + max_steps
        iteration = state.iteration
        while True:
            active = torch.nonzero(~self.certified).flatten()
            gaps = self.certificate(Z[active], active, U[active], rho) if active.numel() else None
            if gaps is not None:
                self._record_gaps(active, gaps)
                ok = self._certified(gaps)
                # polishing solves on the l1-ball's active set; under mu_inf it is not done
                if options.polish and self.condition != "mu_inf" and not bool(ok.all()):
                    Z, U, ok = self._polish(Z, U, active, gaps, ok, rho)
                if not bool(ok.all()) and self._active_set_pending:
                    Z, U, ok = self._active_set(Z, U, active, gaps, ok, rho)
                if not bool(ok.all()) and self._interior_point_due(iteration):
                    Z, U, ok = self._interior_point(Z, U, active, gaps, rho)
                self.certified[active[ok]] = True
                primal, dual = self.gaps_total()
                self.history.append(
                    {
                        "iteration": iteration,
                        "relative_gap": max(primal - dual, 0.0) / max(abs(primal), _TINY),
                        "objective": primal,
                        "certified_rows": int(self.certified.sum()),
                        "rho": rho,
                    }
                )
                if bar is not None:
                    bar.n = iteration - state.iteration
                    bar.set_postfix(
                        gap=f"{self.history[-1]['relative_gap']:.1e}",
                        certified=f"{int(self.certified.sum())}/{self.R.shape[0]}",
                    )
            if bool(self.certified.all()) or iteration >= budget_end or self._stalled():
                break
            active = torch.nonzero(~self.certified).flatten()
            R_active = self.R[active]
            x = torch.cat([Z[active], U[active]], dim=1)
            local = torch.arange(active.numel(), device=x.device)
            step = self._map(R_active, rho, take_rows(self.lam, active), active)
            accelerator = AndersonAccelerator(step, options.anderson) if options.anderson else None
            gx = step(x, local)
            iteration += 1
            steps = min(options.check_every, budget_end - iteration)
            for _ in range(max(steps, 0)):
                if accelerator is None:
                    x, gx = gx, step(gx, local)
                    iteration += 1
                else:
                    before = accelerator.evaluations
                    x, gx = accelerator.iterate(x, gx, local)
                    iteration += accelerator.evaluations - before
                if iteration >= budget_end:
                    break
            Z[active], U[active] = gx[:, :d], gx[:, d:]
            if options.adaptive_rho:
                new_rho = self._adapted_rho(x, gx, rho, d)
                if new_rho != rho:
                    U[active] = U[active] * (rho / new_rho)
                    rho = new_rho
        if options.vertex:
            Z = self._to_vertices(Z)
        self.state = ADMMState(W=Z.clone(), Z=Z, U=U, rho=rho, iteration=iteration)
        primal, dual = self.gaps_total()
        certified = bool(self.certified.all())
        return BlockReport(
            iterations=iteration,
            certified=certified,
            stalled=not certified and self._stalled(),
            certified_rows=int(self.certified.sum()),
            rows=self.R.shape[0],
            primal_sum=primal,
            dual_sum=dual,
            rho=rho,
            polished_rows=self.polished_rows,
            time_s=time.perf_counter() - start,
            interior_point_rows=self.interior_point_rows,
            interior_point_iterations=self.interior_point_iterations,
            vertex_rows=self.vertex_rows,
            active_set_rows=self.active_set_rows,
            active_set_steps=self.active_set_steps,
        )

    # ------------------------------------------------------------------ the sparsest optimum
    def _to_vertices(self, Z: torch.Tensor) -> torch.Tensor:
        """Certified rows with more nonzeros than rank(H) move to a vertex of their optimal face where it
        still certifies (:mod:`~idl_ray.sim.solvers.vertex`); each row is tried once per solve. The dual
        (U) is unchanged: every point of the face has the same H w."""
        if self.condition == "mu_inf":
            return Z
        rows = torch.nonzero(self.certified & ~self._vertex_tried).flatten()
        self._vertex_tried |= self.certified

        def certify(W: torch.Tensor, rows_: torch.Tensor) -> tuple[DualityGap, torch.Tensor]:
            gaps = self.certificate(W, rows_)
            return gaps, self._certified(gaps)

        Z, moved, gaps = move_to_vertices(
            self.factor,
            Z,
            rows,
            lam=self.lam,
            kappa=self.kappa,
            n_constrained=self.n_constrained,
            certify=certify,
        )
        if gaps is not None:
            self._record_gaps(moved, gaps)
            self.vertex_rows += int(moved.numel())
        return Z

    # ------------------------------------------------------------------ the dual active-set method
    def _active_set(
        self,
        Z: torch.Tensor,
        U: torch.Tensor,
        active: torch.Tensor,
        gaps: DualityGap,
        ok: torch.Tensor,
        rho: float,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Solve the uncertified rows of ``active`` by :func:`~idl_ray.sim.solvers.active_set.dual_active_set`
        (once per solve), polish its answers on their supports and take those that improve on Z."""
        self._active_set_pending = False
        open_ = torch.nonzero(~ok).flatten()
        rows = active[open_]
        source = self._active_set_source
        result = None if source is None else source(rows)  # with other stages' rows (joint.py)
        if result is None:  # a warm start's rows (a lambda path's previous point) start from their supports
            result = dual_active_set(
                self.factor,
                self.R[rows],
                lam=take_rows(self.lam, rows),
                kappa=self.kappa,
                n_constrained=self.n_constrained,
                start=Z[rows],
            )
        self.active_set_steps = result.steps
        # the rows it does not finish are the degenerate ones (an optimum inside a face where the bound cuts
        # it, the guard): they go to the interior point at once rather than to ADMM's crawl on this Gram
        self._hand_over_at = 0
        eligible = torch.zeros_like(ok)
        eligible[open_] = result.finished
        if not bool(eligible.any()):
            return Z, U, ok
        source = Z.clone()
        source[rows] = result.weights
        # the method's values carry its rank-one updates' rounding, yet most of its rows certify as they are
        # (83 of 112 on the 28x28 bias-free teacher's stage 1 at lam 1e-4, 9 of 10 of stage 2): only the
        # others are polished
        taken = self._take_certified(Z, U, active, gaps, eligible, rho, source[active])
        self.active_set_rows += int(taken.sum())
        eligible &= ~taken
        if bool(eligible.any()):
            self.active_set_rows += self._polish_rows(Z, U, active, gaps, eligible, rho, source=source)
        self._first_polish_certifies_only = False  # this was the first polish (a warm start's included)
        return Z, U, self._certified(gaps)

    def _take_certified(
        self,
        Z: torch.Tensor,
        U: torch.Tensor,
        active: torch.Tensor,
        gaps: DualityGap,
        eligible: torch.Tensor,
        rho: float,
        weights: torch.Tensor,
    ) -> torch.Tensor:
        """Take ``weights`` (aligned with ``active``) for the rows ``active[eligible]`` where they certify and
        have a smaller gap than the rows' current weights (Z, U and gaps updated in place); returns the mask
        (over ``active``) of the rows taken."""
        positions = torch.nonzero(eligible).flatten()
        chosen = active[positions]
        # the exact bound after rounding
        candidate = prox(weights[positions], 0.0, self.kappa, self.n_constrained)
        new = self.certificate(candidate, chosen)
        # against the rows' own objectives (not the block's mean, which falls as the other rows are solved and
        # would leave a row taken on it uncertified later)
        better = new.certified(self.options.gap_tol, mean_primal=0.0) & (new.gaps < gaps.gaps[positions])
        taken = torch.zeros_like(eligible)
        if bool(better.any()):
            self._set_rows(Z, U, gaps, active, positions[better], candidate[better], new.take(better), rho)
            taken[positions[better]] = True
        return taken

    def _set_rows(
        self,
        Z: torch.Tensor,
        U: torch.Tensor,
        gaps: DualityGap,
        active: torch.Tensor,
        take: torch.Tensor,
        weights: torch.Tensor,
        new_gaps: DualityGap,
        rho: float,
    ) -> None:
        """The rows ``active[take]`` take ``weights`` and their certificate ``new_gaps`` (Z, gaps and the block's
        record in place); their dual restarts at ADMM's fixed point there, U = (r - H w) / rho."""
        rows = active[take]
        Z[rows] = weights
        U[rows] = self._dual_at(weights, rows, rho)
        gaps.set_rows(take, new_gaps)  # with its baseline: the rounding allowance moves with the weights
        self._record_gaps(rows, new_gaps)

    # ------------------------------------------------------------------ the interior-point hand-over
    def _interior_point_due(self, iteration: int) -> bool:
        """Whether the uncertified rows go to the interior point now (see the module docstring, step 5)."""
        options = self.options
        if not self._interior_point_applies or self._interior_point_tried:
            return False
        if iteration < self._hand_over_at and not self._stalled():
            return False
        # never when it is predicted dearer than all the ADMM steps the budget still allows
        left = max(options.max_iter - iteration, 0)
        return interior_point_cost(1, self.factor.rank, self.R.shape[1]) <= left * self._step_cost()

    def _step_cost(self) -> float:
        """Flops of one ADMM step per row: two thin products on a low-rank Gram, one dense one otherwise."""
        rank, d = self.factor.rank, self.factor.dim
        return 4.0 * d * (rank if self.factor.low_rank else d)

    def _steps_worth_a_hand_over(self) -> int:
        """ADMM steps after which the hand-over pays (ski rental): when the steps taken cost
        ``1 / HAND_OVER_SHARE`` of the interior point (by flops; an ADMM step costs several times its flops
        in practice, and on the Grams where ADMM crawls it would take thousands more). 50-60 steps on the
        digits teachers (below the default ``interior_point_after``), ~400 on a full-rank d = 900 Gram, where
        ADMM usually certifies first and the interior point would cost minutes."""
        return steps_worth_a_hand_over(self.factor.rank, self.R.shape[1], self._step_cost())

    def _interior_point(
        self, Z: torch.Tensor, U: torch.Tensor, active: torch.Tensor, gaps: DualityGap, rho: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Run the interior point on the uncertified rows of ``active``; take its rows whose gap is smaller."""
        self._interior_point_tried = True
        ok = self._certified(gaps)
        open_ = torch.nonzero(~ok).flatten()
        rows = active[open_]

        assert self.gaps is not None
        primal = self.gaps.primal.clone()  # the block's objective with the interior point's rows updated

        def certify(W: torch.Tensor, local: torch.Tensor) -> tuple[DualityGap, torch.Tensor]:
            row_gaps = self.certificate(W, rows[local])
            primal[rows[local]] = torch.minimum(primal[rows[local]], row_gaps.primal)
            mean = float(primal.abs().mean())
            return row_gaps, row_gaps.certified(self.options.gap_tol, mean_primal=mean)

        result = interior_point_rows(
            self.factor,
            self.R[rows],
            lam=take_rows(self.lam, rows),
            kappa=self.kappa,
            n_constrained=self.n_constrained,
            certify=certify,
            sparse_steps=0 if self.options.vertex and self.condition != "mu_inf" else SPARSE_STEPS,
        )
        self.interior_point_iterations = result.iterations
        better = result.gaps.gaps < gaps.gaps[open_]
        take, positions = rows[better], open_[better]
        Z[take] = result.weights[better]
        U[take] = self._dual_at(result.weights[better], take, rho)
        gaps.set_rows(positions, result.gaps, better)
        self._record_gaps(active, gaps)
        # a row the interior point certified stays certified, as a row frozen by ADMM does, although the
        # block's mean objective (the scale of the test) fell with the rows it improved
        now = self._certified(gaps)
        now[positions[result.certified[better]]] = True
        self.interior_point_rows += int((now & ~ok).sum())
        return Z, U, now

    # ------------------------------------------------------------------ helpers
    def _stalled(self) -> bool:
        """Over the last ``stall_checks`` checks the objective fell by less than gap_tol / 100 of itself and
        the gap did not halve: more steps would not certify the remaining rows (an ill-conditioned Gram whose
        supports do not settle), so the solve stops early, uncertified, and says so."""
        k = self.options.stall_checks
        if k == 0 or len(self.history) <= k:
            return False
        old, new = self.history[-k - 1], self.history[-1]
        if new["certified_rows"] > old["certified_rows"]:
            return False
        progress = (old["objective"] - new["objective"]) / max(abs(new["objective"]), _TINY)
        return progress < 0.01 * self.options.gap_tol and new["relative_gap"] > 0.5 * old["relative_gap"]

    def _certified(self, gaps: DualityGap) -> torch.Tensor:
        """Rows of ``gaps`` that meet gap_tol, against the block's mean objective (recorded first)."""
        assert self.gaps is not None
        return gaps.certified(self.options.gap_tol, mean_primal=float(self.gaps.primal.abs().mean()))

    def _record_gaps(self, rows: torch.Tensor, gaps: DualityGap) -> None:
        if self.gaps is None:
            n = self.R.shape[0]
            zeros = torch.zeros(n, dtype=torch.float64, device=self.R.device)
            self.gaps = DualityGap(
                primal=zeros.clone(), dual=zeros.clone(), baseline=zeros.clone(), rounding=gaps.rounding
            )
        self.gaps.primal[rows] = gaps.primal
        self.gaps.dual[rows] = gaps.dual
        self.gaps.baseline[rows] = gaps.baseline

    def gaps_total(self) -> tuple[float, float]:
        """(sum of primal values, sum of dual bounds) over the block's rows (latest certificate)."""
        if self.gaps is None:
            return math.nan, math.nan
        return float(self.gaps.primal.sum()), float(self.gaps.dual.sum())

    def _polish(
        self,
        Z: torch.Tensor,
        U: torch.Tensor,
        active: torch.Tensor,
        gaps: DualityGap,
        ok: torch.Tensor,
        rho: float,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Polish the uncertified rows that call for it (see the module docstring); keep improvements only."""
        relative = gaps.gaps / gaps.primal.abs().clamp_min(_TINY)
        signs = torch.sign(Z[active])
        settled = (signs == self._last_signs[active]).all(dim=1)
        self._last_signs[active] = signs
        self._checks += 1
        periodic = self._checks >= self._next_periodic
        if periodic:
            self._next_periodic = self._checks + self._polish_period
        # a support larger than rank(H) makes H_SS singular: the optimum on it is not unique and the polish
        # (a ridge solve) almost never certifies; at p = 784 such attempts were 2/3 of the solve's time
        # (such rows go to the interior point when it applies; with zero thresholds (lam = 0) a support larger
        # than the rank is the dense least-squares optimum, which the ridge solve does certify)
        eligible = ~ok & ((relative < POLISH_BELOW) | settled | periodic)
        if self._interior_point_applies and self._sparse_optimum:
            eligible &= (Z[active] != 0).sum(dim=1) <= self.factor.rank
        first = self._first_polish_certifies_only
        newly = self._polish_rows(Z, U, active, gaps, eligible, rho) if bool(eligible.any()) else 0
        self.polished_rows += newly
        if first:  # a warm start's extra polish: the other rows keep a cold start's schedule
            self._checks, self._next_periodic = 0, _POLISH_ALL_EVERY
            self._last_signs[active] = 2.0
        elif periodic and newly == 0:
            self._polish_period = min(2 * self._polish_period, _POLISH_PERIOD_MAX)
        return Z, U, self._certified(gaps)

    def _polish_rows(
        self,
        Z: torch.Tensor,
        U: torch.Tensor,
        active: torch.Tensor,
        gaps: DualityGap,
        eligible: torch.Tensor,
        rho: float,
        source: torch.Tensor | None = None,
    ) -> int:
        """Polish the rows ``active[eligible]`` in place (Z, U, gaps) from the supports and signs of
        ``source`` (default Z; improvements over Z only); the number newly certified."""
        polished = polish_if_better(
            self.H,
            self.R,
            Z if source is None else source,
            gaps,
            rows=active,
            certificate=self.certificate,
            eligible=eligible,
            below=math.inf,
            **self._settings(),
        )
        if polished is not None and self._first_polish_certifies_only:
            polished = self._certifying_only(polished)
        self._first_polish_certifies_only = False
        if polished is None:
            return 0
        self._set_rows(Z, U, gaps, active, polished.positions, polished.weights, polished.gaps, rho)
        return int(self._certified(gaps)[polished.positions].sum())

    def _certifying_only(self, polished: Polished) -> Polished | None:
        """The polished rows that meet gap_tol (None if none does)."""
        assert self.gaps is not None
        keep = polished.gaps.certified(self.options.gap_tol, mean_primal=float(self.gaps.primal.abs().mean()))
        if not bool(keep.any()):
            return None
        return Polished(
            positions=polished.positions[keep], weights=polished.weights[keep], gaps=polished.gaps.take(keep)
        )

    def _adapted_rho(self, x: torch.Tensor, gx: torch.Tensor, rho: float, d: int) -> float:
        """OSQP's rule on the last step: rho * sqrt(normalised primal / normalised dual residual).

        With x = (Z, U) and T(x) = (Z+, U+): the primal residual is U+ - U (= W_hat - Z+), the dual residual
        rho (Z+ - Z); they are normalised by ||Z+|| and ||rho U+||.
        """
        tiny = torch.finfo(x.dtype).tiny
        primal = float((gx[:, d:] - x[:, d:]).norm()) / max(float(gx[:, :d].norm()), tiny)
        dual = float((gx[:, :d] - x[:, :d]).norm()) / max(float(gx[:, d:].norm()), tiny)
        if primal <= tiny or dual <= tiny:
            return rho
        factor = math.sqrt(primal / dual)
        if 1.0 / _RHO_CHANGE < factor < _RHO_CHANGE:
            return rho
        low, high = self._rho_bounds
        return min(max(rho * factor, low), high)


def admm_solve(
    G: torch.Tensor,
    Rt: torch.Tensor,
    *,
    lam: Threshold,
    kappa: float | None,
    n_constrained: int,
    target_sq: torch.Tensor | None = None,
    options: ADMMOptions | None = None,
    state: ADMMState | None = None,
    factor: GramFactor | None = None,
    progress: str | None = None,
    condition: str = "inf_norm",
    diagonal: torch.Tensor | None = None,
    polish_first: bool = False,
    active_set_source: Callable[[torch.Tensor], ActiveSetResult | None] | None = None,
) -> tuple[torch.Tensor, ADMMStats]:
    """Solve the Gram-form problem for all rows of W at once, certified by the duality gap.

    Parameters
    ----------
    G : Tensor, shape (d, d), symmetric PSD (G/m + l2 I for a SIM stage)
    Rt : Tensor, shape (rows, d), same dtype and device as G (Rt/m)
    lam : float >= 0, the l1 weight, or a Tensor (rows, d) of per-entry thresholds in [0, inf] (l1 weights
        times lam; inf holds an entry at 0)
    kappa : float in [0, 1) or None (no constraint)
    n_constrained : int in [0, d], leading columns under the l1-ball bound
    target_sq : Tensor (rows,), ||t_i||^2 (/m): the constant of the objective, needed for the certificate;
        None uses the smallest value consistent with G and Rt (Rt G^+ Rt^T per row), exact when the targets
        lie in the span of the features
    options : ADMMOptions
    state : ADMMState to resume from (a checkpoint or warm start); zeros by default
    factor : a precomputed GramFactor of G (reused across stages or restarts)
    progress : a description for a tqdm bar of the steps, or None (no bar)
    condition : "inf_norm" (the l1-ball bound) or "mu_inf" (``w_d + sum_{j<n, j != d} |w_j| <= kappa``,
        :func:`~idl_ray.implicit.mu_projection.prox_mu_rows`; no polishing)
    diagonal : Tensor of int64 (rows,), the diagonal column of each row under "mu_inf" (default: row i
        at column i)
    polish_first : polish every row at the first check (see :class:`RowBlockADMM`; for warm starts)
    active_set_source : where the block's rows take the dual active-set method's answer from (see
        :class:`RowBlockADMM`; a batch with other stages' rows, :mod:`~idl_ray.sim.solvers.joint`)

    Returns
    -------
    W : Tensor, shape (rows, d), with ||W[i, :n_constrained]||_1 <= kappa exactly
    stats : ADMMStats (iterations, certificate, rho, time)

    Examples
    --------
    >>> import torch
    >>> Phi = torch.randn(6, 200, dtype=torch.float64); T = torch.randn(3, 200, dtype=torch.float64)
    >>> W, stats = admm_solve(Phi @ Phi.T / 200, T @ Phi.T / 200, lam=0.1, kappa=0.5, n_constrained=3,
    ...                       target_sq=(T * T).sum(1) / 200)
    >>> bool(W[:, :3].abs().sum(1).max() <= 0.5), stats.converged
    (True, True)
    """
    options = options or ADMMOptions()
    if Rt.dim() != 2 or G.dim() != 2 or Rt.shape[1] != G.shape[0] or G.shape[0] != G.shape[1]:
        raise bad_parameter(
            "Rt", "admm_solve", f"a (rows, d) tensor with d = G.shape[0] = {G.shape[0]}", tuple(Rt.shape)
        )
    if not 0 <= n_constrained <= G.shape[0]:
        raise bad_parameter("n_constrained", "admm_solve", f"an int in [0, {G.shape[0]}]", n_constrained)
    if isinstance(lam, torch.Tensor):
        if lam.shape != Rt.shape or bool(torch.isnan(lam).any()) or bool((lam < 0).any()):
            raise bad_parameter(
                "lam", "admm_solve", f"a float >= 0 or a tensor of shape {tuple(Rt.shape)} in [0, inf]",
                f"a tensor of shape {tuple(lam.shape)}",
            )  # fmt: skip
    elif lam < 0:
        raise bad_parameter("lam", "admm_solve", "a float >= 0", lam)
    start = time.perf_counter()
    factor = factor or GramFactor(G)
    if target_sq is None:
        target_sq = span_target_sq(factor, Rt)
    block = RowBlockADMM(
        factor,
        G,
        Rt,
        target_sq,
        lam=lam,
        kappa=kappa,
        n_constrained=n_constrained,
        options=options,
        state=state,
        condition=condition,
        diagonal=diagonal,
        polish_first=polish_first,
        active_set_source=active_set_source,
    )
    report = block.run(options.max_iter - block.state.iteration, progress=progress)
    stats = ADMMStats(
        iterations=report.iterations,
        converged=report.certified,
        stalled=report.stalled,
        gap=report.gap,
        relative_gap=report.gap / max(abs(report.primal_sum), torch.finfo(torch.float64).tiny),
        objective=report.primal_sum,
        rho=report.rho,
        time_s=time.perf_counter() - start,
        factor_time_s=factor.factor_time_s,
        certified_rows=report.certified_rows,
        rows=report.rows,
        history=block.history,
        **{name: getattr(report, name) for name in BLOCK_COUNTS},
    )
    stats.dual_point = dual_point(factor, Rt, block.state)
    return block.state.Z, stats


def dual_point(factor: GramFactor, R: torch.Tensor, state: ADMMState) -> torch.Tensor:
    """W = (R + rho (Z - U)) (H + rho I)^{-1}: ADMM's unconstrained iterate at ``state``, whose residual is
    the better dual point on ill-conditioned Grams (see :meth:`RowBlockADMM.certificate`)."""
    return factor.solve(R + state.rho * (state.Z - state.U), state.rho)


def span_target_sq(factor: GramFactor, Rt: torch.Tensor) -> torch.Tensor:
    """min over t consistent with (G, Rt) of ||t||^2 = r^T G^+ r per row (eigenvalues below the rank cut
    dropped): the target norm when the targets lie in the span of the features."""
    s = factor.eigenvalues
    keep = s > factor.RANK_CUT * float(s.max().clamp_min(torch.finfo(s.dtype).tiny))
    projected = Rt @ factor.Q[:, keep]
    return (projected * projected / s[keep]).sum(dim=1)
