"""Your own data and teacher through the idl-ray pipeline: sim, then extract -> solve -> evaluate.

    python examples/your_data_pipeline.py [--workdir /tmp/idl-ray-example] [--epochs 30]

Stands in for a user's project: it writes a data set as ``.npz`` and a trained network as TorchScript,
then runs the same jobs the ``idl-ray`` command runs (here through :func:`idl_ray.cli.main`, so each step
is exactly a command line you can type). The state extraction writes Parquet shards one batch at a time,
so the data set never has to fit in memory twice; ``solve`` streams them into the Gram statistics.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import tempfile
import warnings

import numpy as np
import torch

from idl_ray.cli import main as idl_ray
from idl_ray.datasets import Split, load_dataset
from idl_ray.teachers import mlp_teacher, train_classifier


def make_user_project(folder: pathlib.Path, epochs: int) -> tuple[pathlib.Path, pathlib.Path]:
    """A user's data (.npz with a held-out part) and trained teacher (TorchScript)."""
    split = load_dataset("synthetic", seed=1)  # 4,000 samples, 32 features, 5 classes
    data = folder / "data.npz"
    np.savez(
        data,
        x=split.x_train.numpy(),
        y=split.y_train.numpy(),
        x_test=split.x_test.numpy(),
        y_test=split.y_test.numpy(),
    )
    teacher = mlp_teacher(32, (24, 16), 5)
    train_classifier(teacher, Split(split.x_train, split.y_train, split.x_test, split.y_test), epochs=epochs)
    path = folder / "teacher.pt"
    with warnings.catch_warnings():  # TorchScript is deprecated in recent torch; still a common format
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(teacher.eval()), str(path))
    return data, path


def run(*argv: str) -> None:
    print("$ idl-ray", " ".join(argv))
    code = idl_ray(list(argv))
    if code != 0:
        raise SystemExit(f"idl-ray {argv[0]} exited with {code}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", default=None, help="where the files and runs go (default: a temp dir)")
    parser.add_argument("--epochs", type=int, default=30, help="epochs of the stand-in user teacher")
    parser.add_argument("--solver", default="admm", help="any `idl-ray sim --solver` value, e.g. ray-admm")
    args = parser.parse_args()
    folder = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="idl-ray-example-"))
    folder.mkdir(parents=True, exist_ok=True)
    data, teacher = make_user_project(folder, args.epochs)
    user = ["--data", str(data), "--teacher", str(teacher)]

    # one step: states, both SIM stages, evaluation, plots and report in one run directory
    run("sim", *user, "--solver", args.solver, "--kappa", "0.9", "--output-dir", str(folder / "runs" / "sim"))
    # the same in stages: states to Parquet, a fit from them, an evaluation of the saved model
    run(
        "extract",
        *user,
        "--rows-per-file",
        "1000",
        "--output-dir",
        str(folder / "runs" / "extract"),
        "--quiet",
    )
    run("solve", "--states", str(folder / "runs" / "extract"), "--solver", args.solver, "--kappa", "0.9",
        "--output-dir", str(folder / "runs" / "solve"), "--quiet")  # fmt: skip
    run("evaluate", "--model", str(folder / "runs" / "solve"))

    one = json.loads((folder / "runs" / "sim" / "report.json").read_text())
    two = json.loads((folder / "runs" / "solve" / "report.json").read_text())
    print(f"one step : agreement with the teacher {one['agreement']:.4f}, ||A||_inf {one['a_inf_norm']:.4f}")
    print(f"in stages: ||A||_inf {two['a_inf_norm']:.4f}; see {folder / 'runs'}")


if __name__ == "__main__":
    main()
