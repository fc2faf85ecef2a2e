"""idl_ray: implicit deep learning and state-driven implicit modelling (SIM) on Ray.

An implicit model finds its state by solving ``X = phi(A X + B U)`` and predicts ``Y = C X + D U``;
it is well-posed when ``||A||_inf <= kappa < 1``.

Public names are importable from here directly; they are loaded on first use so that
``import idl_ray`` stays light (no torch, cvxpy or Ray import until needed).
"""

from __future__ import annotations

from idl_ray._lazy import lazy_exports
from idl_ray._version import __version__

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    # implicit models
    "ImplicitModel": "idl_ray.implicit.model",
    "ImplicitRNN": "idl_ray.implicit.rnn",
    "project_onto_kappa_ball": "idl_ray.implicit.projection",
    "project_rows_onto_l1_ball": "idl_ray.implicit.projection",
    "solve_fixed_point": "idl_ray.implicit.fixed_point",
    # the wider well-posedness condition mu_inf(A) <= kappa
    "mu_inf": "idl_ray.implicit.mu_projection",
    "project_onto_mu_ball": "idl_ray.implicit.mu_projection",
    "solve_fixed_point_mu": "idl_ray.implicit.mu_fixed_point",
    "FixedPointOptions": "idl_ray.implicit.fixed_point",
    "resolve_activation": "idl_ray.implicit.activations",
    "activation_from_module": "idl_ray.implicit.activations",
    # SIM
    "SIM": "idl_ray.sim.estimator",
    "SIMProblem": "idl_ray.sim.problem",
    "extract_states": "idl_ray.sim.extraction",
    "ADMMOptions": "idl_ray.sim.solvers.admm_kernels",
    "get_solver": "idl_ray.sim.solvers",
    "BaseSolver": "idl_ray.sim.solvers",
    "LeastSquareSolver": "idl_ray.sim.solvers",
    "CVXSolver": "idl_ray.sim.solvers",
    "ADMMSolver": "idl_ray.sim.solvers",
    "ProjectedGDLowRankSolver": "idl_ray.sim.solvers",
    # robustness
    "lipschitz_bound": "idl_ray.robustness.lipschitz",
    "attack_accuracy": "idl_ray.robustness.attacks",
    "fgsm": "idl_ray.robustness.attacks",
    "pgd": "idl_ray.robustness.attacks",
    # Ray
    "RayADMMSolver": "idl_ray.distributed",
    "RayProjectedGDSolver": "idl_ray.distributed",
    "RayCVXSolver": "idl_ray.distributed",
    "ADMMMultiGPUSolver": "idl_ray.distributed",
    "RayRunConfig": "idl_ray.distributed",
    "ShardedProblem": "idl_ray.distributed",
    "train_implicit": "idl_ray.distributed",
    # errors
    "IDLError": "idl_ray.errors",
    "ConfigError": "idl_ray.errors",
    "ShapeError": "idl_ray.errors",
    "WellPosednessError": "idl_ray.errors",
    "UnsupportedLayerError": "idl_ray.errors",
    "SolverError": "idl_ray.errors",
    "NotFittedError": "idl_ray.errors",
    "DistributedError": "idl_ray.errors",
    "ClusterConfigError": "idl_ray.errors",
    "ConvergenceWarning": "idl_ray.errors",
    "WellPosednessWarning": "idl_ray.errors",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)
