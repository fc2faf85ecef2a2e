"""State-driven implicit modelling (SIM): fit a well-posed implicit model to a teacher network's states.

Public names are loaded lazily so that ``import idl_ray.sim`` stays light (no cvxpy until a solver needs it).
"""

from __future__ import annotations

from idl_ray._lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    "SIM": "idl_ray.sim.estimator",
    "SIMProblem": "idl_ray.sim.problem",
    "GramStats": "idl_ray.sim.problem",
    "SampleData": "idl_ray.sim.problem",
    "SparsityTarget": "idl_ray.sim.targets",
    "SIMPath": "idl_ray.sim.path",
    "sim_path": "idl_ray.sim.path",
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


__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)
