"""``idl-ray sim`` on the user's own data and teacher: every ``--data`` and ``--teacher`` form, bad inputs.

Each run is checked against an independent reference: the saved model is reloaded with ``SIM.load``
and its predictions compared with the user's teacher run directly on the held-out samples.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest
import torch

from idl_ray.cli import main
from idl_ray.sim import SIM

FAST = ["--solver", "admm", "--quiet"]


def run(args: list[str], tmp_path: pathlib.Path, capsys) -> tuple[int, dict | None, str, str]:
    out = tmp_path / "run"
    code = main(["sim", *args, *FAST, "--output-dir", str(out)])
    captured = capsys.readouterr()
    report = json.loads((out / "report.json").read_text()) if (out / "report.json").exists() else None
    return code, report, captured.out, captured.err


def agreement_with(teacher: torch.nn.Module, folder: pathlib.Path, x: np.ndarray) -> float:
    """Fraction of samples where the saved model's and the teacher's argmax agree (independent of the job)."""
    model = SIM.load(folder / "model")
    inputs = torch.from_numpy(np.asarray(x, dtype=np.float32))
    with torch.no_grad():
        expected = teacher(inputs).argmax(dim=1)
    return float((model.predict(inputs).argmax(dim=1).cpu() == expected).double().mean())


@pytest.mark.parametrize("form", ["torchscript", "state_dict", "function", "function_scripted"])
def test_each_teacher_form(form, user_files, user_module, tmp_path, capsys) -> None:
    spec = {
        "torchscript": str(user_files.torchscript),
        "state_dict": str(user_files.state_dict),
        "function": f"{user_module}:teacher_module",
        "function_scripted": f"{user_module}:teacher",
    }[form]
    code, report, out, err = run(
        ["--data", str(user_files.npz), "--teacher", spec, "--hidden", "10"], tmp_path, capsys
    )
    assert code == 0, err
    assert out.strip().splitlines()[-1] == str((tmp_path / "run").resolve())  # --quiet: only the path
    assert report["teacher"]["source"] == spec
    assert report["data"]["train_samples"] + report["data"]["test_samples"] == len(user_files.x)
    assert report["agreement"] >= 0.95
    assert report["a_inf_norm"] <= 0.95 + 1e-12
    assert "teacher.pt" not in report["files"]  # the user's teacher is not copied
    assert agreement_with(user_files.teacher, tmp_path / "run", user_files.x) >= 0.95


@pytest.mark.parametrize(
    "form", ["npz_split", "npy", "parquet_file", "parquet_dir", "function", "function_dict"]
)
def test_each_data_form(form, user_files, user_module, tmp_path, capsys) -> None:
    columns = ["--input-column", "features", "--target-column", "label"]
    args = {
        "npz_split": ["--data", str(user_files.npz_split)],
        "npy": ["--data", str(user_files.npy)],
        "parquet_file": ["--data", str(user_files.parquet_file), *columns],
        "parquet_dir": ["--data", str(user_files.parquet_dir), *columns],
        "function": ["--data", f"{user_module}:data"],
        "function_dict": ["--data", f"{user_module}:data_dict"],
    }[form]
    code, report, _, err = run(
        [*args, "--teacher", str(user_files.state_dict), "--hidden", "10"], tmp_path, capsys
    )
    assert code == 0, err
    data = report["data"]
    assert data["features"] == user_files.x.shape[1]
    assert data["train_samples"] + data["test_samples"] == len(user_files.x)
    if form in ("npz_split", "function_dict"):
        assert (data["train_samples"], data["test_samples"]) == (180, 60)  # the user's own split is kept
    if form == "npy":  # inputs only: agreement with the teacher, no accuracy
        assert data["labels"] is False and report["sim_accuracy"] is None
    else:
        assert data["labels"] is True and data["classes"] == 3
        teacher_acc = report["teacher_accuracy"]
        assert teacher_acc > 0.9 and report["sim_accuracy"] >= teacher_acc - 0.05
    assert report["agreement"] >= 0.95
    assert agreement_with(user_files.teacher, tmp_path / "run", user_files.x) >= 0.95


def test_parquet_scalar_columns_and_default_label_column(user_files, tmp_path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from idl_ray.jobs.data_sources import load_data

    columns = {f"f{i}": user_files.x[:, i] for i in range(user_files.x.shape[1])}
    path = tmp_path / "wide.parquet"
    pq.write_table(pa.table({**columns, "y": user_files.y}), path)
    data = load_data(str(path), input_column=",".join(columns), test_fraction=0.5, seed=1)
    x = torch.cat([data.x_train, data.x_test])
    y = torch.cat([data.y_train, data.y_test])
    order = np.lexsort(user_files.x.T[::-1])  # compare as sets of rows: the split permutes them
    got = np.lexsort(x.numpy().T[::-1])
    assert np.array_equal(x.numpy()[got], user_files.x[order])
    assert np.array_equal(y.numpy()[got], user_files.y[order])
    assert len(data.x_test) == 120


def test_default_teacher_is_trained_on_user_data(user_files, tmp_path, capsys) -> None:
    code, report, _, err = run(
        ["--data", str(user_files.npz), "--hidden", "8", "--teacher-epochs", "20"], tmp_path, capsys
    )
    assert code == 0, err
    assert report["teacher"]["kind"] == "mlp" and report["teacher"]["widths"] == "12-8-3"
    assert report["teacher_accuracy"] > 0.9
    # the trained teacher is saved as TorchScript and can be passed back with --teacher
    scripted = torch.jit.load(str(tmp_path / "run" / "teacher.pt"))
    assert agreement_with(scripted, tmp_path / "run", user_files.x) >= 0.95


# ---------------------------------------------------------------- bad input: exit 2 and a one-line message
def bad(args: list[str], tmp_path, capsys) -> str:
    code, _, _, err = run(args, tmp_path, capsys)
    assert code == 2, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("idl-ray sim: error:"), err
    return lines[0]


def test_missing_data_file(tmp_path, capsys) -> None:
    message = bad(["--data", str(tmp_path / "nope.npz")], tmp_path, capsys)
    assert "--data" in message and "nope.npz" in message and "no such file" in message


def test_wrong_width(user_files, tmp_path, capsys) -> None:
    narrow = tmp_path / "narrow.npz"
    np.savez(narrow, x=user_files.x[:, :5], y=user_files.y)
    message = bad(["--data", str(narrow), "--teacher", str(user_files.torchscript)], tmp_path, capsys)
    assert "--teacher" in message and "5 features" in message


def test_unknown_columns(user_files, tmp_path, capsys) -> None:
    message = bad(["--data", str(user_files.parquet_file), "--input-column", "pixels"], tmp_path, capsys)
    assert "--input-column" in message and "pixels" in message and "features" in message
    message = bad(
        ["--data", str(user_files.parquet_file), "--input-column", "features", "--target-column", "class"],
        tmp_path,
        capsys,
    )
    assert "--target-column" in message and "'class'" in message and "label" in message


def test_function_that_does_not_import(tmp_path, capsys) -> None:
    message = bad(["--data", "no_such_module_xyz:load"], tmp_path, capsys)
    assert "--data" in message and "no_such_module_xyz" in message and "cannot import" in message
    message = bad(["--teacher", "no_such_module_xyz:net"], tmp_path, capsys)
    assert "--teacher" in message and "cannot import" in message


def test_function_returning_the_wrong_thing(user_files, user_module, tmp_path, capsys) -> None:
    message = bad(
        ["--data", str(user_files.npz), "--teacher", f"{user_module}:not_a_model"], tmp_path, capsys
    )
    assert "nn.Module" in message and "int" in message
    message = bad(["--data", f"{user_module}:missing_function"], tmp_path, capsys)
    assert "has no function 'missing_function'" in message


def test_state_dict_needs_matching_hidden(user_files, tmp_path, capsys) -> None:
    message = bad(
        ["--data", str(user_files.npz), "--teacher", str(user_files.state_dict), "--hidden", "32"],
        tmp_path,
        capsys,
    )
    assert "--hidden 10" in message  # says what to pass


def test_no_labels_and_no_teacher(user_files, tmp_path, capsys) -> None:
    message = bad(["--data", str(user_files.npy)], tmp_path, capsys)
    assert "no labels" in message and "--teacher" in message


def test_failure_during_the_run_exits_1(user_files, tmp_path, capsys, monkeypatch) -> None:
    (tmp_path / "flaky_source.py").write_text("def load():\n    raise RuntimeError('database unreachable')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    code, _, _, err = run(["--data", "flaky_source:load"], tmp_path, capsys)
    assert code == 1
    assert "idl-ray sim: failed: RuntimeError: database unreachable" in err
    monkeypatch.setenv("IDL_RAY_DEBUG", "1")  # the traceback, for bug reports
    with pytest.raises(RuntimeError, match="database unreachable"):
        main(["sim", "--data", "flaky_source:load", "--output-dir", str(tmp_path / "again")])


def test_ragged_vector_column(tmp_path, capsys) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "ragged.parquet"
    pq.write_table(pa.table({"x": pa.array([[1.0, 2.0], [3.0]]), "y": [0, 1]}), path)
    message = bad(["--data", str(path)], tmp_path, capsys)
    assert "--input-column" in message and "one length" in message


def test_ray_pgd_job_in_both_strategies_equals_the_single_process_fit(user_files, tmp_path, capsys) -> None:
    """``--solver ray-pgd``: the gram strategy (the Gram from Ray Data's extraction, the steps in the job's
    process, no actor) and the data strategy (a gradient summed over the actors every step) reach the pgd
    job's certified optimum: the same stage objectives, and the same predictions."""
    common = ["--data", str(user_files.npz), "--teacher", str(user_files.torchscript), "--quiet"]
    # CPU actors: a session Ray of the distributed tests may advertise a fake GPU, which torch here cannot use
    on_ray = ["--workers", "1", "--cpus-per-worker", "0.5", "--no-use-gpu"]
    reports = {}
    for name, extra in {
        "pgd": ["--solver", "pgd"],
        "gram": ["--solver", "ray-pgd", *on_ray],
        "data": ["--solver", "ray-pgd", "--strategy", "data", *on_ray],
    }.items():
        out = tmp_path / name
        assert main(["sim", *common, *extra, "--output-dir", str(out)]) == 0, capsys.readouterr().err
        reports[name] = json.loads((out / "report.json").read_text())
    for stage in ("stage1", "stage2"):
        single = reports["pgd"]["certificate"][stage]
        assert single["converged"]
        for name in ("gram", "data"):
            ours = reports[name]["certificate"][stage]
            assert ours["converged"] and ours["strategy"] == name
            assert abs(ours["objective"] - single["objective"]) <= 1e-6 * abs(single["objective"])
    assert "pids" not in reports["gram"]["certificate"]["stage1"]  # no actor
    assert len(reports["data"]["certificate"]["stage1"]["pids"]) == 1
    x = torch.from_numpy(user_files.x)
    predictions = {name: SIM.load(tmp_path / name / "model").predict(x).argmax(dim=1) for name in reports}
    assert bool((predictions["gram"] == predictions["pgd"]).all())
    assert bool((predictions["data"] == predictions["pgd"]).all())
