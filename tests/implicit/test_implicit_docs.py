"""The examples in the implicit modules' docstrings run and print what they show."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "idl_ray.implicit.activations",
    "idl_ray.implicit.fixed_point",
    "idl_ray.implicit.functional",
    "idl_ray.implicit.model",
    "idl_ray.implicit.projection",
    "idl_ray.implicit.rnn",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, extraglobs={"torch": importlib.import_module("torch")})
    assert result.attempted > 0 and result.failed == 0
