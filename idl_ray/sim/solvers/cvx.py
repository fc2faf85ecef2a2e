"""Per-row convex programs with cvxpy and an open-source conic solver (Clarabel by default).

Each row i of W solves (H = G/m + l2 I, r_i = Rt[i]/m)::

    minimise_w  1/2 ||F w||^2 - r_i^T w + lam ||w||_1      subject to  ||w[:n_constrained]||_1 <= kappa

(or ``sum_j t_ij |w_j|`` with per-entry thresholds t = lam * l1_weights, entries of infinite weight
constrained to 0), with F^T F = H (F from H's eigendecomposition, dropping null directions), which is the
problem's objective up to a constant. One cvxpy program is built per worker with ``r_i`` as a :class:`cvxpy.Parameter`, so
cvxpy canonicalises once and each further row only updates parameter data (DPP). Rows are split across
``n_jobs`` workers (threads or processes). The ``"exact"`` variant (|W Phi - T| <= tol element-wise,
minimise the regulariser) needs the raw samples. A final l1-ball projection of the constrained part
removes the solver's tolerance-level violations, so the bound holds exactly. With
``SIMProblem(constraint="mu_inf")`` the constraint is ``w_d + sum_{j<n, j != d} |w_j| <= kappa`` (the row's
diagonal column ``d`` selected by parameters, so the program is still built once) and the final step is
the projection onto that set (:func:`~idl_ray.implicit.mu_projection.prox_mu_rows`).
"""

from __future__ import annotations

import concurrent.futures as futures
import os
import warnings
from typing import Any

import numpy as np
import torch

from idl_ray._validation import bad_parameter, check_choice, check_positive_float, check_positive_int
from idl_ray.errors import ConvergenceWarning, SolverError
from idl_ray.implicit.mu_projection import prox_mu_rows
from idl_ray.implicit.projection import project_rows_onto_l1_ball
from idl_ray.sim.problem import SIMProblem
from idl_ray.sim.solvers.base import BaseSolver, register_solver

__all__ = ["CVXSolver"]

_OK = ("optimal",)
_INACCURATE = ("optimal_inaccurate",)


def _row_programs(payload: dict[str, Any]) -> tuple[np.ndarray, list[str]]:
    """Solve a block of rows with one reusable cvxpy program (runs in a worker)."""
    import cvxpy as cp

    d = payload["d"]
    lam, kappa, nc = payload["lam"], payload["kappa"], payload["n_constrained"]
    w = cp.Variable(d)
    constraints = []
    mu_rows = payload.get("diagonal")  # the diagonal column of each row under mu_inf, else None
    if kappa is not None and nc > 0 and mu_rows is not None:
        # w_d + sum_{j<n, j != d} |w_j| <= kappa with d changing per row: parameters (DPP) select it
        pick = cp.Parameter(nc)
        others = cp.Parameter(nc, nonneg=True)
        constraints.append(pick @ w[:nc] + cp.norm1(cp.multiply(others, w[:nc])) <= kappa)
    elif kappa is not None and nc > 0:
        constraints.append(cp.norm1(w[:nc]) <= kappa)
    reg = 0
    weighted = payload.get("thresholds") is not None
    if weighted:
        # per-entry thresholds t (finite part as a parameter) and a 0/1 mask of the entries held at 0
        t_param = cp.Parameter(d, nonneg=True)
        fixed = cp.Parameter(d, nonneg=True)
        reg = cp.norm1(cp.multiply(t_param, w))
        constraints.append(cp.multiply(fixed, w) == 0)
    elif lam > 0:
        reg = lam * cp.norm1(w)
    if payload["mode"] == "exact":
        P = payload["features"]
        t = cp.Parameter(P.shape[0])
        tol = cp.Parameter(nonneg=True)
        constraints.append(cp.abs(P @ w - t) <= tol)
        l2 = payload["l2"]
        objective = (lam if lam > 0 else 1.0) * cp.norm1(w) + (0.5 * l2 * cp.sum_squares(w) if l2 else 0)
        targets = payload["targets"]
    else:
        F = payload["factor"]
        r = cp.Parameter(d)
        objective = 0.5 * cp.sum_squares(F @ w) - r @ w + reg
        targets = payload["rhs"]
    program = cp.Problem(cp.Minimize(objective), constraints)
    out = np.zeros((targets.shape[0], d))
    statuses = []
    for i in range(targets.shape[0]):
        if mu_rows is not None and kappa is not None and nc > 0:
            pick.value = np.eye(nc)[mu_rows[i]]
            others.value = 1.0 - pick.value
        if payload["mode"] == "exact":
            t.value = targets[i]
            tol.value = payload["exact_tol"][i]
        else:
            r.value = targets[i]
        if weighted:
            t_row = payload["thresholds"][i]
            held = np.isinf(t_row)
            t_param.value = np.where(held, 0.0, t_row)
            fixed.value = held.astype(float)
        try:
            program.solve(solver=payload["solver"], warm_start=True, **payload["solver_options"])
        except cp.error.SolverError as exc:
            statuses.append(f"error: {exc}")
            continue
        statuses.append(str(program.status))
        if w.value is not None:
            out[i] = w.value
    return out, statuses


@register_solver("cvx")
class CVXSolver(BaseSolver):
    """Reference solver: one convex program per row of W, solved by cvxpy (Clarabel by default).

    The most accurate and the slowest solver; use it to check the others and for small problems, and
    for the ``"exact"`` variant. Works from the Gram form (an eigen-factor of H, cost independent of the
    number of samples) unless the variant needs the samples.

    Parameters
    ----------
    solver : str, a cvxpy solver name (default "CLARABEL"; "SCS", "ECOS", ... if installed)
    n_jobs : int or None, parallel workers over rows (None: all CPUs; 1: sequential)
    executor : "thread" (default) or "process"
    exact_tol : float, element-wise tolerance of the exact variant, relative to max(1, max |t_i|)
    solver_options : dict, passed to ``Problem.solve`` (e.g. ``{"tol_gap_rel": 1e-10}``)
    verbose : bool, cvxpy solver output
    """

    variants = frozenset({"lasso", "elastic_net", "least_squares", "exact"})
    supports_l1_weights = True
    constraints = frozenset({"inf_norm", "mu_inf"})

    def __init__(
        self,
        *,
        solver: str = "CLARABEL",
        n_jobs: int | None = 1,
        executor: str = "thread",
        exact_tol: float = 1e-4,
        solver_options: dict[str, Any] | None = None,
        verbose: bool = False,
    ) -> None:
        owner = "CVXSolver"
        if not isinstance(solver, str):
            raise bad_parameter("solver", owner, "a cvxpy solver name such as 'CLARABEL'", solver)
        self.solver = solver.upper()
        self.n_jobs = check_positive_int(n_jobs, "n_jobs", owner, allow_none=True)
        self.executor = check_choice(executor, "executor", owner, ("thread", "process"))
        self.exact_tol = check_positive_float(exact_tol, "exact_tol", owner)
        self.solver_options = dict(solver_options or {})
        self.verbose = bool(verbose)
        self._params = {
            "solver": self.solver,
            "n_jobs": n_jobs,
            "executor": executor,
            "exact_tol": exact_tol,
            "solver_options": self.solver_options,
        }

    def _check_backend(self) -> None:
        try:
            import cvxpy as cp
        except ImportError as exc:  # pragma: no cover - cvxpy is a dependency
            raise SolverError("CVXSolver needs cvxpy: pip install cvxpy clarabel") from exc
        if self.solver not in cp.installed_solvers():
            raise SolverError(
                f"CVXSolver: the cvxpy solver {self.solver!r} is not installed. Installed: "
                f"{cp.installed_solvers()}. Clarabel (pip install clarabel) is the default."
            )

    def _solve(self, problem: SIMProblem) -> tuple[torch.Tensor, dict[str, Any]]:
        self._check_backend()
        H, R = problem.scaled(dtype=torch.float64, device="cpu")
        lam = 0.0 if problem.variant == "least_squares" else problem.lam
        base: dict[str, Any] = {
            "d": problem.dim,
            "lam": lam,
            "l2": problem.l2,
            "kappa": problem.kappa,
            "n_constrained": problem.n_constrained,
            "solver": self.solver,
            "solver_options": {"verbose": self.verbose, **self.solver_options},
        }
        if problem.variant == "exact":
            if problem.samples is None:
                raise SolverError(
                    "CVXSolver: the 'exact' variant needs the raw samples; build the problem with "
                    "keep_samples=True (SIM does this for CVXSolver)."
                )
            P = problem.samples.features.double().cpu().numpy()
            T = problem.samples.targets.double().cpu().numpy().T
            scale = np.maximum(1.0, np.abs(T).max(axis=1))
            base.update(mode="exact", features=P)
            blocks = {"targets": T, "exact_tol": self.exact_tol * scale}
        else:
            s, Q = torch.linalg.eigh(0.5 * (H + H.T))
            keep = s > 1e-12 * float(s.abs().max().clamp_min(1e-300))
            factor = (Q[:, keep] * s[keep].sqrt()).T.contiguous().numpy()
            base.update(mode="gram", factor=factor)
            blocks = {"rhs": R.numpy()}
            thresholds = problem.thresholds
            if isinstance(thresholds, torch.Tensor):  # l1 weights: per-entry thresholds, inf = held at 0
                blocks["thresholds"] = thresholds.double().cpu().numpy()
        rows = problem.rows
        jobs = self.n_jobs or os.cpu_count() or 1
        jobs = max(1, min(jobs, rows))
        bounds = [(rows * k) // jobs for k in range(jobs + 1)]
        payloads = []
        for k in range(jobs):
            lo, hi = bounds[k], bounds[k + 1]
            payloads.append({**base, **{name: value[lo:hi] for name, value in blocks.items()}})
            if problem.mu_constrained:
                payloads[-1]["diagonal"] = problem.diagonal_columns().numpy()[lo:hi]
        if jobs == 1:
            results = [_row_programs(payloads[0])]
        else:
            pool_cls = (
                futures.ThreadPoolExecutor if self.executor == "thread" else futures.ProcessPoolExecutor
            )
            with pool_cls(max_workers=jobs) as pool:
                results = list(pool.map(_row_programs, payloads))
        W = torch.from_numpy(np.concatenate([r[0] for r in results]))
        statuses = [s for r in results for s in r[1]]
        bad = [(i, s) for i, s in enumerate(statuses) if s not in _OK + _INACCURATE]
        if bad:
            i, status = bad[0]
            hint = (
                " The exact variant is infeasible when the kappa bound is too tight for the teacher's states: "
                "use rescale='auto' or a larger kappa."
                if problem.variant == "exact"
                else ""
            )
            raise SolverError(
                f"CVXSolver ({self.solver}): {len(bad)} of {rows} row program(s) failed; row {i} ended with "
                f"status {status!r}.{hint}"
            )
        inaccurate = sum(s in _INACCURATE for s in statuses)
        if inaccurate:
            warnings.warn(
                f"CVXSolver ({self.solver}): {inaccurate} of {rows} row programs were solved inaccurately. "
                "Try another solver (solver='SCS' or 'CLARABEL') or tighter solver_options.",
                ConvergenceWarning,
                stacklevel=3,
            )
        if problem.l1_weights is not None:  # entries of infinite weight: exactly 0, not the solver's 1e-12
            W[torch.isinf(problem.l1_weights.cpu())] = 0.0
        if problem.mu_constrained:  # the prox with no threshold: the Euclidean projection onto the mu set
            W = prox_mu_rows(
                W, float(problem.kappa), problem.n_constrained, diagonal=problem.diagonal_columns()
            )
        elif problem.constrained:
            nc = problem.n_constrained
            W[:, :nc] = project_rows_onto_l1_ball(W[:, :nc], float(problem.kappa))
        status = "optimal" if not inaccurate else "optimal_inaccurate"
        return W, {
            "iterations": rows,
            "converged": True,
            "status": status,
            "extra": {"workers": jobs, "backend": self.solver, "inaccurate_rows": inaccurate},
        }
