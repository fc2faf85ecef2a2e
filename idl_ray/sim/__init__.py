"""State-driven implicit modelling (SIM): fit a well-posed implicit model to a teacher network's states.

Public names are loaded lazily so that ``import idl_ray.sim`` stays light (no cvxpy until a solver needs it).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    "SIM": "idl_ray.sim.estimator",
    "SIMProblem": "idl_ray.sim.problem",
    "GramStats": "idl_ray.sim.problem",
    "SampleData": "idl_ray.sim.problem",
    "extract_states": "idl_ray.sim.extraction",
    "teacher_weights": "idl_ray.sim.extraction",
    "StateRecorder": "idl_ray.sim.extraction",
    "SIMStates": "idl_ray.sim.extraction",
    "TeacherStructure": "idl_ray.sim.extraction",
    "BaseSolver": "idl_ray.sim.solvers",
    "SolveResult": "idl_ray.sim.solvers",
    "SolverStats": "idl_ray.sim.solvers",
    "LeastSquareSolver": "idl_ray.sim.solvers",
    "CVXSolver": "idl_ray.sim.solvers",
    "ADMMSolver": "idl_ray.sim.solvers",
    "ProjectedGDLowRankSolver": "idl_ray.sim.solvers",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'idl_ray.sim' has no attribute {name!r}")
    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
