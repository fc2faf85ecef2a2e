"""The per-row cvxpy programs of :class:`~idl_ray.sim.solvers.cvx.CVXSolver` as Ray tasks.

Rows of W are independent given the problem's statistics, so the problem is put once in the object store
and each task solves a block of rows with the single-process ``CVXSolver`` (one reusable cvxpy program
per block, Clarabel by default): the per-row maths is not repeated here. Tasks are retried by Ray when
their worker dies (``max_restarts`` retries), and every wait has a time limit.
"""

from __future__ import annotations

import time
import warnings
from typing import Any

import ray
import torch

from idl_ray._validation import check_positive_int
from idl_ray.distributed import resources
from idl_ray.distributed.config import RayRunConfig
from idl_ray.distributed.shards import split_rows
from idl_ray.distributed.solvers import _split_run_config
from idl_ray.errors import ConvergenceWarning, DistributedError, SolverError
from idl_ray.sim.problem import SIMProblem
from idl_ray.sim.solvers.base import BaseSolver, register_solver
from idl_ray.sim.solvers.cvx import CVXSolver

__all__ = ["RayCVXSolver"]


def _solve_block(
    problem: SIMProblem, block: slice, settings: dict[str, Any]
) -> tuple[torch.Tensor, str, float]:
    """One block of rows with the single-process CVXSolver (inside a Ray task)."""
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # reported once by the driver instead
        result = CVXSolver(n_jobs=1, **settings).solve(problem.row_block(block))
    return result.weights, result.stats.status, time.perf_counter() - start


@register_solver("ray_cvx")
class RayCVXSolver(BaseSolver):
    """Reference cvxpy solves, one Ray task per block of rows.

    Parameters
    ----------
    solver, exact_tol, solver_options, verbose :
        As in :class:`~idl_ray.sim.solvers.cvx.CVXSolver` (Clarabel by default).
    num_tasks : int or None
        Blocks of rows (tasks); None: one per CPU the tasks can use (cluster CPUs / ``cpus_per_worker``),
        at most the number of rows.
    run_config / run keywords :
        ``cpus_per_worker`` (CPUs per task), ``max_restarts`` (task retries), ``timeout_s``.
    """

    variants = CVXSolver.variants

    #: each task solves ``problem.row_block(block)``, which slices the l1 weights
    supports_l1_weights = True

    def __init__(
        self,
        *,
        solver: str = "CLARABEL",
        exact_tol: float = 1e-4,
        solver_options: dict[str, Any] | None = None,
        verbose: bool = False,
        num_tasks: int | None = None,
        run_config: RayRunConfig | dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        owner = "RayCVXSolver"
        self.settings = {
            "solver": solver,
            "exact_tol": exact_tol,
            "solver_options": dict(solver_options or {}),
            "verbose": verbose,
        }
        CVXSolver(**self.settings)  # validates the settings here, not in the tasks
        self.num_tasks = check_positive_int(num_tasks, "num_tasks", owner, allow_none=True)
        self.run_config = _split_run_config(owner, run_config, kwargs)
        self._params = {**self.settings, "num_tasks": num_tasks, **self.run_config.to_dict()}

    def _solve(self, problem: SIMProblem) -> tuple[torch.Tensor, dict[str, Any]]:
        resources.ensure_ray()
        config = self.run_config
        cpus = resources.cluster_totals()["CPU"]
        if config.cpus_per_worker > cpus:
            raise DistributedError(
                f"RayCVXSolver tasks ask for {config.cpus_per_worker:g} CPU(s) each but the cluster has "
                f"{cpus:g}. Lower cpus_per_worker."
            )
        slots = max(1, int(cpus // config.cpus_per_worker)) if config.cpus_per_worker > 0 else problem.rows
        tasks = min(problem.rows, self.num_tasks or slots)
        start = time.perf_counter()
        problem_ref = ray.put(problem)
        remote = ray.remote(_solve_block).options(
            num_cpus=config.cpus_per_worker, max_retries=config.max_restarts
        )
        blocks = [b for b in split_rows(problem.rows, tasks) if b.stop > b.start]
        refs = [remote.remote(problem_ref, block, self.settings) for block in blocks]
        try:
            results = resources.get(refs, config.timeout_s, f"{len(refs)} cvxpy row-block task(s)")
        except ray.exceptions.RayTaskError as exc:
            raise SolverError(
                f"RayCVXSolver: a row-block task failed: {exc.cause if hasattr(exc, 'cause') else exc}"
            ) from exc
        W = torch.cat([r[0] for r in results])
        statuses = [r[1] for r in results]
        inaccurate = sum(s != "optimal" for s in statuses)
        if inaccurate:
            warnings.warn(
                f"RayCVXSolver: {inaccurate} of {len(blocks)} row blocks were solved inaccurately. Try another "
                "solver or tighter solver_options.",
                ConvergenceWarning,
                stacklevel=3,
            )
        wall = time.perf_counter() - start
        compute = max(r[2] for r in results)
        return W, {
            "iterations": problem.rows,
            "converged": True,
            "status": "optimal" if not inaccurate else "optimal_inaccurate",
            "extra": {
                "tasks": len(blocks),
                "backend": self.settings["solver"],
                "timings": {"iterations": compute, "communication": max(0.0, wall - compute)},
            },
        }
