"""ADMM on the Gram form: a thin wrapper around :func:`~idl_ray.sim.solvers.admm_kernels.admm_solve`."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from idl_ray._validation import resolve_settings
from idl_ray.errors import ConvergenceWarning
from idl_ray.sim.problem import SIMProblem
from idl_ray.sim.solvers.active_set import ActiveSetResult
from idl_ray.sim.solvers.admm_kernels import (
    ADMMOptions,
    GramFactor,
    initial_rho,
)
from idl_ray.sim.solvers.base import BaseSolver, check_dtype, register_solver, resolve_device
from idl_ray.sim.solvers.joint import joint_active_set, joint_applies
from idl_ray.sim.solvers.row_block import BLOCK_COUNTS, admm_solve
from idl_ray.sim.solvers.scaling import ScaledStage
from idl_ray.sim.solvers.start import start_state

__all__ = ["ADMMSolver"]


@register_solver("admm")
class ADMMSolver(BaseSolver):
    """Accelerated ADMM for all rows of W at once on (G/m + l2 I, Rt/m), certified by the duality gap.

    Each step is one (rows x d)(d x d) product (two thin ones when G has low rank), a soft-threshold and a
    batched l1-ball projection; steps are over-relaxed and extrapolated by safeguarded Anderson
    acceleration, rho adapts from normalised residuals, rows are polished on their support once nearly
    optimal, and the solve stops when the duality gap, a bound on the suboptimality, is below
    ``gap_tol`` times the objective (:mod:`~idl_ray.sim.solvers.row_block`). It returns a projected
    iterate, so ``||A||_inf <= kappa`` holds exactly. The eigendecomposition of G is cached on the solver
    and reused when the same Gram comes back: a SIM fit factors G once per stage (stage 1 on
    block-equilibrated columns, ``equilibrate``), and a refit or a lambda path on the same G reuses them.
    Inside :meth:`planned_stages` (a SIM fit's two stages) the dual active-set method runs once for both
    stages' rows on a low-rank G (:mod:`~idl_ray.sim.solvers.joint`).

    It supports ``SIMProblem(constraint="mu_inf")``: the Z-step is then the prox
    :func:`~idl_ray.implicit.mu_projection.prox_mu_rows`, the certificate uses that set's conjugate, and
    rows are not polished.

    ``solve(problem, initial=W0)`` starts from given weights (a lambda path passes the previous point):
    Z0 = W0 with its A-parts projected onto the kappa ball (a feasible start), U0 = (R - Z0 H) / rho (the
    scaled dual of ADMM's fixed point at Z0), kept per row where its duality gap is at most a cold
    start's, and every row is polished on that support at the first check. Rows where the least-squares
    warm point (``warm_start``) is already certified still take that one.

    Parameters
    ----------
    rho, max_iter, gap_tol, adaptive_rho, check_every, relaxation, anderson, polish, rho_scale, ... :
        See :class:`~idl_ray.sim.solvers.admm_kernels.ADMMOptions` (validated there).
    options : ADMMOptions, optional; alternative to the keywords above (not both)
    device : None/"auto" (CUDA when available), or a device
    dtype : torch.float64 (default) or torch.float32
    warn : bool, emit a ConvergenceWarning when max_iter is reached (default True)
    progress : bool, a tqdm bar per solve with the relative gap and the certified rows (default False)
    warm_start : bool, try the prox of the (minimum-norm) least-squares fit first, computed from the
        cached eigendecomposition for rows * d^2 flops (default True): rows where it is already certified
        optimal (lam = 0 without an active bound, an exactly representable teacher) take no ADMM step, and
        with lam = 0 every row starts there; other rows start cold from W = 0.

    Examples
    --------
    >>> import torch
    >>> from idl_ray.sim.problem import SIMProblem
    >>> Phi = torch.randn(300, 6, dtype=torch.float64); T = torch.randn(300, 3, dtype=torch.float64)
    >>> problem = SIMProblem.from_samples(Phi, T, n_constrained=3, lam=1e-3, kappa=0.5)
    >>> result = ADMMSolver(device="cpu").solve(problem)
    >>> result.stats.constraint_violation, result.stats.converged
    (0.0, True)
    """

    supports_l1_weights = True
    constraints = frozenset({"inf_norm", "mu_inf"})

    def __init__(
        self,
        *,
        options: ADMMOptions | dict[str, Any] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float64,
        warn: bool = True,
        warm_start: bool = True,
        progress: bool = False,
        **option_values: Any,
    ) -> None:
        self.options = resolve_settings(
            "ADMMSolver", "options", "option", options, option_values, ADMMOptions
        )
        self.device = resolve_device(device)
        self.dtype = check_dtype(dtype, "ADMMSolver")
        self.warn = bool(warn)
        self.warm_start = bool(warm_start)
        self.progress = bool(progress)
        # factors of the G last seen (held, not its id, so a freed G cannot alias), per setting (l2, m, dtype,
        # device), each with its column scales (None: unscaled): a fit's stage 1 (equilibrated) and stage 2
        # share one eigendecomposition on a low-rank G, and a lambda path or a refit factors it once
        self._factor_G: torch.Tensor | None = None
        self._factors: dict[tuple[Any, ...], list[tuple[torch.Tensor | None, GramFactor]]] = {}
        # the problems of the current planned_stages scope and their joint active-set answers (by position)
        self._planned: list[SIMProblem] = []
        self._joint_answers: dict[int, ActiveSetResult] | None = None
        self._planned_solved: set[int] = set()  # planned problems solved already (not in a later joint run)
        self._params = {
            **self.options.to_dict(),
            "device": str(self.device),
            "dtype": str(dtype),
            "warm_start": self.warm_start,
            "progress": self.progress,
        }

    def factor_for(
        self, problem: SIMProblem, H: torch.Tensor, scales: torch.Tensor | None = None
    ) -> GramFactor:
        """The eigendecomposition of H (= the problem's Gram, columns divided by ``scales`` when given),
        reused when the same G (same object, l2, m) comes back with the same scales, and derived from one with
        other scales when G has low rank (:meth:`GramFactor.column_scaled`: a thin SVD, not a second
        eigendecomposition)."""
        key = (problem.l2, problem.num_samples, H.dtype, H.device)
        if self._factor_G is not problem.G:
            self._factor_G, self._factors = problem.G, {}
        known = self._factors.setdefault(key, [])
        for known_scales, factor in known:
            if _same_scales(known_scales, scales):
                return factor
        for known_scales, factor in known:
            relative = _scales_or_ones(scales, H) / _scales_or_ones(known_scales, H)
            derived = factor.column_scaled(relative)
            if derived is not None:
                known.append((scales, derived))
                return derived
        factor = GramFactor(H)
        known.append((scales, factor))
        return factor

    uses_initial = True

    @contextlib.contextmanager
    def planned_stages(self, problems: Sequence[SIMProblem]) -> Iterator[ADMMSolver]:
        """A scope whose solves of ``problems`` (a SIM fit's stages, on one G, solved cold) share the dual
        active-set method: on a low-rank G the first solve that needs it runs it once for its open rows and every
        row of the planned problems not solved yet (:mod:`~idl_ray.sim.solvers.joint`), and each solve takes its
        rows' answers, then polishes and certifies them as usual. Its time counts in that solve's stats. Other
        solves in the scope are unchanged."""
        self._planned, self._joint_answers, self._planned_solved = list(problems), None, set()
        try:
            yield self
        finally:
            self._planned, self._joint_answers, self._planned_solved = [], None, set()

    def _stage(
        self, problem: SIMProblem, initial: torch.Tensor | None
    ) -> tuple[ScaledStage, GramFactor, torch.Tensor, int]:
        """The problem in the variables ADMM iterates on (equilibrated for a bounded stage), its factor, the
        targets' squared norms / m, and the bounded columns."""
        H, R = problem.scaled(device=self.device, dtype=self.dtype)
        target_sq = (problem.target_sq / problem.num_samples).to(device=self.device, dtype=self.dtype)
        lam = problem.thresholds  # a float, or per-entry thresholds (l1 weights)
        if isinstance(lam, torch.Tensor):
            lam = lam.to(device=self.device, dtype=self.dtype)
        nc = problem.n_constrained if problem.kappa is not None else 0
        if initial is not None:
            initial = initial.to(device=self.device, dtype=self.dtype)
        scaled = ScaledStage.of(
            H, R, lam, problem.kappa, nc, equilibrate=self.options.equilibrate, initial=initial
        )
        factor = self.factor_for(problem, scaled.H, None if scaled.scaling is None else scaled.scaling.scales)
        return scaled, factor, target_sq, nc

    def _planned_answer(
        self, problem: SIMProblem, set_up: tuple[Any, ...], rows: torch.Tensor
    ) -> ActiveSetResult | None:
        """The joint active-set answer for the rows ``rows`` of a planned problem (:meth:`planned_stages`);
        the first planned solve that needs the method runs it for its own open rows and every row of the
        other planned problems. None when the problem is not planned or the joint run does not apply (not the
        same G, or a G or thresholds the method does not take): the solve then runs the method itself."""
        index = next((i for i, planned in enumerate(self._planned) if planned is problem), None)
        if index is None:
            return None
        if self._joint_answers is None:
            self._joint_answers = self._joint_run(index, set_up, rows)
        answer = self._joint_answers.pop(index, None)
        if answer is None:
            return None
        return ActiveSetResult(answer.weights[rows], answer.finished[rows], answer.steps)

    def _joint_run(
        self, index: int, set_up: tuple[Any, ...], rows: torch.Tensor
    ) -> dict[int, ActiveSetResult]:
        """The joint answers of every planned problem; ``set_up`` and ``rows``: :meth:`_stage` and the rows
        that need the method of the planned problem ``index`` (the solve under way)."""
        planned = self._planned
        reference = planned[0]
        shared = all(
            p.G is reference.G and p.l2 == reference.l2 and p.num_samples == reference.num_samples
            and p.constraint == "inf_norm"
            for p in planned
        )  # fmt: skip
        if not (shared and self.options.active_set and self.options.polish):
            return {}
        stages = [set_up if i == index else self._stage(p, None) for i, p in enumerate(planned)]
        scaled = [entry[0] for entry in stages]
        counts = [entry[3] for entry in stages]
        factor = stages[0][1]
        if not joint_applies(factor, scaled, counts):
            return {}
        nothing = torch.zeros(0, dtype=torch.long)
        chosen = [
            rows if i == index else (nothing if i in self._planned_solved else None)
            for i in range(len(planned))
        ]
        return dict(enumerate(joint_active_set(factor, scaled, counts[0], chosen)))

    def _solve(
        self, problem: SIMProblem, initial: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        # the same problem in equilibrated columns (for a bounded stage); mapped back below
        set_up = self._stage(problem, initial)
        scaled, factor, target_sq, nc = set_up
        H, R, initial = scaled.H, scaled.R, scaled.initial
        joint: list[bool] = []  # whether the rows took the joint batch's answer (planned_stages)

        def from_joint_batch(rows: torch.Tensor) -> ActiveSetResult | None:
            answer = self._planned_answer(problem, set_up, rows)
            joint.append(answer is not None)
            return answer

        settings = {
            "lam": scaled.lam, "kappa": scaled.kappa, "n_constrained": nc, **problem.constraint_settings(self.device)
        }  # fmt: skip
        state = start_state(
            factor, H, R, target_sq, initial_rho(H, self.options), warm_start=self.warm_start,
            gap_tol=self.options.gap_tol, initial=initial, **settings,
        )  # fmt: skip
        stage = "ADMM (A, B)" if nc else "ADMM"
        W, stats = admm_solve(
            H, R, target_sq=target_sq, options=self.options, state=state, factor=factor,
            progress=stage if self.progress else None, polish_first=initial is not None,
            active_set_source=from_joint_batch if initial is None and self._planned else None, **settings,
        )  # fmt: skip
        self._planned_solved.update(i for i, planned in enumerate(self._planned) if planned is problem)
        W, dual_point = scaled.weights(W, problem), scaled.dual_point(stats.dual_point)
        if not stats.converged and self.warn:
            stop = (
                f"stalled after {stats.iterations} steps (objective and gap unchanged for "
                f"{self.options.stall_checks} checks)"
                if stats.stalled
                else f"stopped at max_iter={self.options.max_iter}"
            )
            warnings.warn(
                f"ADMMSolver {stop} with a relative duality gap of {stats.relative_gap:.3g} (tolerance "
                f"gap_tol={self.options.gap_tol:.3g}; {stats.certified_rows} of {stats.rows} rows certified). "
                "The weights satisfy the kappa bound and their objective is within the gap of the optimum: "
                "raise max_iter or gap_tol, or a larger lam (the Gram may be very ill-conditioned).",
                ConvergenceWarning,
                stacklevel=3,
            )
        info = {
            "iterations": stats.iterations,
            "converged": stats.converged,
            "status": "optimal" if stats.converged else ("stalled" if stats.stalled else "max_iter"),
            "certified_in": (self.dtype, self.options.gap_tol),  # BaseSolver.solve checks it in float64
            "history": stats.history,
            "dual_point": dual_point,
            "extra": {
                "rho": stats.rho,
                "factor_time_s": stats.factor_time_s,
                "rank": factor.rank,
                "certified_rows": stats.certified_rows,
                **{name: getattr(stats, name) for name in BLOCK_COUNTS},
                "warm_start": state is not None,
                "equilibrated": scaled.scaling is not None,
                "initial": initial is not None,
                "joint_active_set": any(joint),
            },
        }
        return W, info


def _same_scales(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.shape == b.shape and bool(torch.equal(a.to(b), b))


def _scales_or_ones(scales: torch.Tensor | None, H: torch.Tensor) -> torch.Tensor:
    return torch.ones(H.shape[0], dtype=H.dtype, device=H.device) if scales is None else scales.to(H)
