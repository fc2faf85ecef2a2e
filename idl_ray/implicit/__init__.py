"""Implicit models trained by gradient descent: fixed-point kernels, implicit differentiation, modules."""

from idl_ray.implicit.activations import Activation, activation_from_module, resolve_activation
from idl_ray.implicit.fixed_point import (
    FIXED_POINT_METHODS,
    FixedPointOptions,
    FixedPointStats,
    register_fixed_point_method,
    solve_adjoint,
    solve_fixed_point,
)
from idl_ray.implicit.functional import implicit_fixed_point
from idl_ray.implicit.model import ImplicitModel, ImplicitTelemetry
from idl_ray.implicit.mu_fixed_point import solve_adjoint_mu, solve_fixed_point_mu
from idl_ray.implicit.mu_projection import mu_inf, project_onto_mu_ball
from idl_ray.implicit.projection import (
    inf_norm,
    l1_ball_thresholds,
    project_onto_kappa_ball,
    project_rows_onto_l1_ball,
)
from idl_ray.implicit.rnn import ImplicitRNN, ImplicitRNNCell

__all__ = [
    "FIXED_POINT_METHODS",
    "Activation",
    "FixedPointOptions",
    "FixedPointStats",
    "ImplicitModel",
    "ImplicitRNN",
    "ImplicitRNNCell",
    "ImplicitTelemetry",
    "activation_from_module",
    "implicit_fixed_point",
    "inf_norm",
    "l1_ball_thresholds",
    "mu_inf",
    "project_onto_kappa_ball",
    "project_onto_mu_ball",
    "project_rows_onto_l1_ball",
    "register_fixed_point_method",
    "resolve_activation",
    "solve_adjoint",
    "solve_adjoint_mu",
    "solve_fixed_point",
    "solve_fixed_point_mu",
]
