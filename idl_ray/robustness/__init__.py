"""Robustness of implicit models: certified Lipschitz bounds and empirical attacks.

- :func:`lipschitz_bound`: an upper bound on the l-infinity input-output Lipschitz constant of
  ``X = phi(A X + B U)``, ``Y = C X + D U`` (see :mod:`idl_ray.robustness.lipschitz`).
- :func:`fgsm`, :func:`pgd`, :func:`attack_accuracy`: l-infinity attacks through any torch module, an
  ImplicitModel (by implicit differentiation) or a fitted SIM (see :mod:`idl_ray.robustness.attacks`).
"""

from idl_ray.robustness.attacks import ATTACK_METHODS, attack_accuracy, fgsm, pgd
from idl_ray.robustness.lipschitz import (
    LIPSCHITZ_METHODS,
    WELL_POSEDNESS_CONDITIONS,
    lipschitz_bound,
    well_posedness_constant,
)

__all__ = [
    "ATTACK_METHODS",
    "LIPSCHITZ_METHODS",
    "WELL_POSEDNESS_CONDITIONS",
    "attack_accuracy",
    "fgsm",
    "lipschitz_bound",
    "pgd",
    "well_posedness_constant",
]
