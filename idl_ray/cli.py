"""The ``idl-ray`` command (also ``python -m idl_ray``).

Every sub-command is a job: a settings dataclass (``idl_ray.jobs.*Config``) plus a ``run`` function.
The flags of a sub-command are generated from its dataclass fields, so the CLI, JSON config files
(``--config file.json`` or ``.yaml``) and Python calls are validated by the same code. Usable locally or as a Ray job::

    idl-ray sim --solver ray-admm --workers 2
    idl-ray train --workers 2 --storage-path runs --name digits
    ray job submit --working-dir . -- idl-ray sim --address auto
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any

from idl_ray._version import __version__


def _field_parser(annotation: Any) -> tuple[Callable[[str], Any] | None, bool]:
    """(converter from a command-line string, is_flag) for a dataclass field's type."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _field_parser(inner[0])
    if annotation is bool:
        return None, True
    if origin is tuple:
        item = typing.get_args(annotation)[0]

        def parse_list(text: str) -> tuple:
            return tuple(item(part) for part in text.split(",") if part)

        # argparse names the converter in its error: "invalid comma-separated int list value: '16,x'"
        parse_list.__name__ = f"comma-separated {item.__name__} list"
        return parse_list, False
    return annotation, False


def add_options_arguments(parser: argparse.ArgumentParser, options_class: type) -> None:
    """Add one ``--flag`` per field of ``options_class`` (defaults come from the dataclass)."""
    hints = typing.get_type_hints(options_class)
    helps = getattr(options_class, "FLAG_HELP", {})  # optional one-line help per field
    choices = getattr(options_class, "CHOICES", {})
    notes = getattr(options_class, "NOTES", {})
    for field in dataclasses.fields(options_class):
        flag = "--" + field.name.replace("_", "-")
        converter, is_flag = _field_parser(hints[field.name])
        default = field.default
        help_text = f"default: {default}"
        if field.name in choices:  # listed here, checked by the config's validation (one message)
            help_text = f"one of {', '.join(choices[field.name])}; {help_text}"
        if field.name in notes:
            help_text = f"{notes[field.name]}; {help_text}"
        if field.name in helps:
            help_text = f"{helps[field.name]} ({help_text})"
        if is_flag:
            parser.add_argument(
                flag, dest=field.name, action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
        else:
            parser.add_argument(flag, dest=field.name, type=converter, default=None, help=help_text)


def load_config_file(path: str) -> dict[str, Any]:
    """Settings from a JSON file, or YAML for ``.yaml``/``.yml`` (PyYAML comes with Ray).

    A missing or unreadable file, a folder, or text that does not parse is a :class:`ConfigError`
    naming ``--config``, the file and the first problem."""
    from idl_ray.errors import ConfigError

    is_yaml = path.endswith((".yaml", ".yml"))
    try:
        with open(path) as handle:
            text = handle.read()
    except FileNotFoundError:
        raise ConfigError(f"--config {path!r}: no such file.") from None
    except IsADirectoryError:
        raise ConfigError(f"--config {path!r} is a folder; pass a .json or .yaml file.") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--config {path!r} cannot be read: {exc}.") from None
    if is_yaml:
        import yaml

        try:
            values = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            where = getattr(exc, "problem_mark", None)
            at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise ConfigError(f"--config {path!r} is not valid YAML{at}: {problem}.") from None
    else:
        try:
            values = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(
                f"--config {path!r} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}). "
                "Files are read as JSON unless they end in .yaml or .yml."
            ) from None
    if not isinstance(values, dict):
        raise ConfigError(
            f"The config file {path!r} must hold a mapping of settings. Got {type(values).__name__}."
        )
    return values


def options_from_args(options_class: type, args: argparse.Namespace) -> Any:
    """Merge ``--config`` (JSON) with explicit flags (flags win) and validate via ``from_dict``."""
    values: dict[str, Any] = {}
    if getattr(args, "config", None):
        values.update(load_config_file(args.config))
    for field in dataclasses.fields(options_class):
        value = getattr(args, field.name, None)
        if value is not None:
            values[field.name] = value
    return options_class.from_dict(values)


def _jobs() -> dict[str, tuple[str, str, str]]:
    """sub-command -> (module, config class, run function), imported only when used."""
    return {
        "sim": ("idl_ray.jobs.sim_job", "SimJobConfig", "run_sim_job"),
        "train": ("idl_ray.jobs.train_job", "TrainJobConfig", "run_train_job"),
        "evaluate": ("idl_ray.jobs.evaluate_job", "EvaluateJobConfig", "run_evaluate_job"),
        "extract": ("idl_ray.jobs.extract_job", "ExtractJobConfig", "run_extract_job"),
        "solve": ("idl_ray.jobs.solve_job", "SolveJobConfig", "run_solve_job"),
    }


_HELP = {
    "sim": "fit a SIM implicit model to a trained teacher network (default job)",
    "train": "train an ImplicitModel by gradient descent (in this process, or with --workers N on Ray Train)",
    "info": "print versions and devices (and Ray resources with --ray or --address)",
    "evaluate": "evaluate a saved SIM model on data: accuracy, agreement with the teacher, ||A||_inf",
    "extract": "record a teacher's states on data and write them as Parquet shards",
    "solve": "fit a SIM model from the states `idl-ray extract` wrote",
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with one sub-command per job."""
    import importlib

    parser = argparse.ArgumentParser(
        prog="idl-ray",
        description="Implicit deep learning and state-driven implicit modelling (SIM) on Ray.",
        allow_abbrev=False,  # --teacher must never be read as --teacher-epochs
    )
    parser.add_argument("--version", action="version", version=f"idl-ray {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, config_name, _) in _jobs().items():
        sub = commands.add_parser(name, help=_HELP[name], description=_HELP[name], allow_abbrev=False)
        sub.add_argument("--config", help="JSON or YAML file of settings (command-line flags override it)")
        add_options_arguments(sub, getattr(importlib.import_module(module), config_name))
    info = commands.add_parser("info", help=_HELP["info"], description=_HELP["info"], allow_abbrev=False)
    info.add_argument("--ray", action="store_true", help="also start/connect to Ray and list its resources")
    info.add_argument("--address", default=None, help="Ray address to list the resources of (implies --ray)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``idl-ray`` console script; returns the process exit code.

    0: success; 2: bad input (a one-line message naming the flag: bad value, missing file, wrong
    width, unknown column, ...); 1: a failure during the run (solver, Ray, I/O).
    """
    import importlib

    from idl_ray.errors import ConfigError, ConfigTypeError, IDLError

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stdout)
        return 0
    try:
        if args.command == "info":
            from idl_ray.jobs.info_job import run_info_job

            run_info_job(with_ray=args.ray or args.address is not None, address=args.address)
            return 0
        module, config_name, run_name = _jobs()[args.command]
        job = importlib.import_module(module)
        config = options_from_args(getattr(job, config_name), args)
        getattr(job, run_name)(config)
    except (ConfigError, ConfigTypeError) as error:  # bad input: nothing (or little) was computed
        print(f"idl-ray {args.command}: error: {error}", file=sys.stderr)
        return 2
    except (IDLError, Exception) as error:  # a failure during the run
        if os.environ.get("IDL_RAY_DEBUG"):
            raise  # the full traceback, for bug reports
        print(f"idl-ray {args.command}: failed: {type(error).__name__}: {error}", file=sys.stderr)
        print("(set IDL_RAY_DEBUG=1 for the full traceback)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
