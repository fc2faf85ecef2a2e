"""Robustness of implicit models: certified Lipschitz bounds and empirical attacks.

- :func:`lipschitz_bound`: an upper bound on the l-infinity input-output Lipschitz constant of
  ``X = phi(A X + B U)``, ``Y = C X + D U`` (see :mod:`idl_ray.robustness.lipschitz`).
"""

from idl_ray.robustness.lipschitz import lipschitz_bound, well_posedness_constant

__all__ = ["lipschitz_bound", "well_posedness_constant"]
