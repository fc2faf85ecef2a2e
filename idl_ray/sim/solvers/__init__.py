"""SIM solvers: every one takes a :class:`~idl_ray.sim.problem.SIMProblem` and returns
``SolveResult(weights, stats)``; they are registered by name (:func:`get_solver`, :func:`available_solvers`).

cvxpy is imported only when :class:`CVXSolver` solves something.
"""

from __future__ import annotations

from idl_ray.sim.solvers.admm import ADMMSolver
from idl_ray.sim.solvers.base import (
    SOLVERS,
    BaseSolver,
    SolveResult,
    SolverStats,
    available_solvers,
    get_solver,
    register_solver,
    resolve_device,
)
from idl_ray.sim.solvers.cvx import CVXSolver
from idl_ray.sim.solvers.least_squares import LeastSquareSolver
from idl_ray.sim.solvers.projected_gd import ProjectedGDLowRankSolver

__all__ = [
    "SOLVERS",
    "ADMMSolver",
    "BaseSolver",
    "CVXSolver",
    "LeastSquareSolver",
    "ProjectedGDLowRankSolver",
    "SolveResult",
    "SolverStats",
    "available_solvers",
    "get_solver",
    "register_solver",
    "resolve_device",
]
