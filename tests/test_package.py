"""Package-level checks: light import, version, CLI entry point."""

from __future__ import annotations

import subprocess
import sys

import idl_ray
from idl_ray.cli import main


def test_import_is_light() -> None:
    code = (
        "import sys, idl_ray; "
        "heavy = [m for m in ('torch', 'ray', 'cvxpy') if m in sys.modules]; "
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_version_and_help(capsys) -> None:
    assert idl_ray.__version__.count(".") == 2
    assert main([]) == 0
    assert "idl-ray" in capsys.readouterr().out


def test_unknown_attribute() -> None:
    try:
        idl_ray.DoesNotExist  # noqa: B018
    except AttributeError as err:
        assert "DoesNotExist" in str(err)
    else:
        raise AssertionError("expected AttributeError")


def test_every_public_name_resolves() -> None:
    for name in idl_ray.__all__:
        assert getattr(idl_ray, name) is not None, name


def test_ray_solvers_are_found_by_name_without_importing_them_first() -> None:
    code = (
        "from idl_ray.sim.solvers import get_solver; "
        "print(type(get_solver('ray_admm', num_workers=1)).__name__)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "RayADMMSolver"
