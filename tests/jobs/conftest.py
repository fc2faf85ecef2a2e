"""Small user data and a user's trained teacher in every form ``idl-ray sim`` accepts (session-wide)."""

from __future__ import annotations

import dataclasses
import pathlib
import textwrap
import warnings

import numpy as np
import pytest
import torch

FEATURES, CLASSES, HIDDEN = 12, 3, (10,)


@dataclasses.dataclass(frozen=True)
class UserFiles:
    folder: pathlib.Path
    x: np.ndarray
    y: np.ndarray
    teacher: torch.nn.Module
    npz: pathlib.Path
    npz_split: pathlib.Path
    npy: pathlib.Path
    parquet_file: pathlib.Path
    parquet_dir: pathlib.Path
    torchscript: pathlib.Path
    state_dict: pathlib.Path
    module_name: str


@pytest.fixture(scope="session")
def user_files(tmp_path_factory) -> UserFiles:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from idl_ray.datasets import Split
    from idl_ray.teachers import mlp_teacher, train_classifier

    folder = tmp_path_factory.mktemp("user")
    rng = np.random.default_rng(0)
    centres = rng.normal(scale=3.0, size=(CLASSES, FEATURES))
    y = rng.integers(0, CLASSES, size=240)
    x = (centres[y] + rng.normal(size=(240, FEATURES))).astype(np.float32)
    torch.manual_seed(0)
    teacher = mlp_teacher(FEATURES, HIDDEN, CLASSES)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    train_classifier(teacher, Split(xt[:180], yt[:180], xt[180:], yt[180:]), epochs=15, lr=1e-2)
    teacher.eval()

    npz = folder / "data.npz"
    np.savez(npz, x=x, y=y)
    npz_split = folder / "split.npz"
    np.savez(npz_split, x=x[:180], y=y[:180], x_test=x[180:], y_test=y[180:])
    npy = folder / "inputs.npy"
    np.save(npy, x)
    table = pa.table({"features": pa.array(list(x), type=pa.list_(pa.float32())), "label": y})
    parquet_file = folder / "data.parquet"
    pq.write_table(table, parquet_file)
    parquet_dir = folder / "shards"
    parquet_dir.mkdir()
    pq.write_table(table.slice(0, 120), parquet_dir / "part-0.parquet")
    pq.write_table(table.slice(120), parquet_dir / "part-1.parquet")
    torchscript = folder / "teacher_scripted.pt"
    with warnings.catch_warnings():  # torch >= 2.10 deprecates TorchScript; users still ship it
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(teacher), str(torchscript))
    state_dict = folder / "teacher_state.pt"
    torch.save(teacher.state_dict(), state_dict)
    module_name = "idl_user_code"
    (folder / f"{module_name}.py").write_text(
        textwrap.dedent(
            f"""
            import numpy as np
            import torch

            def data():
                archive = np.load({str(npz)!r})
                return archive["x"], archive["y"]

            def data_dict():
                archive = np.load({str(npz_split)!r})
                return {{k: archive[k] for k in archive.files}}

            def teacher():
                return torch.jit.load({str(torchscript)!r})  # a ScriptModule is rebuilt by the job

            def teacher_module():
                from idl_ray.teachers import mlp_teacher
                model = mlp_teacher({FEATURES}, {HIDDEN!r}, {CLASSES})
                model.load_state_dict(torch.load({str(state_dict)!r}))
                return model

            def not_a_model():
                return 42
            """
        )
    )
    return UserFiles(
        folder,
        x,
        y,
        teacher,
        npz,
        npz_split,
        npy,
        parquet_file,
        parquet_dir,
        torchscript,
        state_dict,
        module_name,
    )


@pytest.fixture
def user_module(user_files, monkeypatch) -> str:
    """The user's module importable (as it would be from the job's working_dir)."""
    monkeypatch.syspath_prepend(str(user_files.folder))
    return user_files.module_name
