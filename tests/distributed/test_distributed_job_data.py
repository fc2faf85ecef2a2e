"""``idl-ray sim --data module:function`` where the function returns a Ray Dataset (on the shared local Ray)."""

from __future__ import annotations

import numpy as np
import torch

from idl_ray.jobs.data_sources import load_data


def test_ray_dataset_from_a_function(tmp_path, monkeypatch) -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(50, 6)).astype(np.float32)
    y = rng.integers(0, 4, size=50)
    np.savez(tmp_path / "arrays.npz", x=x, y=y)
    (tmp_path / "user_ray_data.py").write_text(
        "import numpy as np\nimport ray\n\n"
        "def load():\n"
        f"    a = np.load({str(tmp_path / 'arrays.npz')!r})\n"
        "    rows = [{'pixels': a['x'][i], 'target': int(a['y'][i])} for i in range(len(a['x']))]\n"
        "    return ray.data.from_items(rows)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    data = load_data("user_ray_data:load", input_column="pixels", target_column="target", test_fraction=0.2)
    assert (len(data.x_train), len(data.x_test), data.num_features) == (40, 10, 6)
    both = torch.cat([data.x_train, data.x_test]).numpy()
    labels = torch.cat([data.y_train, data.y_test]).numpy()
    # the rows come back whole (inputs with their labels), in some order
    index = {row.tobytes(): k for k, row in enumerate(x)}
    matched = np.array([index[row.tobytes()] for row in both])
    assert sorted(matched.tolist()) == list(range(50))
    assert np.array_equal(labels, y[matched])
