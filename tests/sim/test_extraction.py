"""State extraction: exact implicit representation of MLP and CNN teachers, in-place activations,
data sources, and rejection of layers SIM cannot represent."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from idl_ray.errors import ConfigError, UnsupportedLayerError
from idl_ray.sim.extraction import StateRecorder, extract_states, teacher_weights


def _check_exact(states, atol: float = 1e-5) -> None:
    s = states.structure
    X, U, Z, Y = (t.double() for t in (states.X, states.U, states.Z, states.Y))
    torch.testing.assert_close(s.A @ X + s.B @ U, Z, atol=atol, rtol=1e-5)
    torch.testing.assert_close(s.C @ X + s.D @ U, Y, atol=atol, rtol=1e-5)


def test_mlp_with_biases_is_exactly_an_implicit_model(mlp_teacher, digits) -> None:
    states = extract_states(mlp_teacher, digits.X_train, progress=False)
    s = states.structure
    assert s.bias and s.layer_sizes == [48, 24] and s.activation == "relu"
    assert states.U.shape == (65, 1300) and states.Z.shape == (72, 1300) and states.Y.shape == (10, 1300)
    assert torch.all(states.U[-1] == 1)  # the constant feature is last
    torch.testing.assert_close(states.X, torch.relu(states.Z))
    with torch.no_grad():
        torch.testing.assert_close(states.Y.T, mlp_teacher(digits.X_train))
    _check_exact(states)
    # block structure: A strictly lower block-triangular, with the teacher's own second-layer weights
    assert torch.all(s.A[:48] == 0) and torch.all(s.A[48:, 48:] == 0)
    torch.testing.assert_close(s.A[48:, :48], mlp_teacher[2].weight.double())
    torch.testing.assert_close(s.B[:48, -1], mlp_teacher[0].bias.double())


def test_float64_states_are_exact_to_double_precision(mlp_teacher, digits) -> None:
    states = extract_states(mlp_teacher, digits.X_test.numpy(), dtype=torch.float64, progress=False)
    assert states.Z.dtype == torch.float64
    _check_exact(states, atol=1e-12)


class _InPlace(nn.Module):
    """Activations written every awkward way: in-place module, F.relu_, x.relu_(), mutated input reused."""

    def __init__(self, bias: bool) -> None:
        super().__init__()
        self.l1 = nn.Linear(6, 8, bias=bias)
        self.act = nn.ReLU(inplace=True)
        self.l2 = nn.Linear(8, 7, bias=bias)
        self.l3 = nn.Linear(7, 5, bias=bias)
        self.l4 = nn.Linear(5, 3, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.l1(x))
        g = self.l2(h)
        F.relu_(g)  # result discarded: later code uses the mutated g
        k = self.l3(g).relu_()
        return self.l4(k) + 0.5 * g[:, :3]  # a skip connection from an earlier layer


@pytest.mark.parametrize("bias", [True, False])
def test_in_place_activations_record_the_true_pre_activation(bias: bool) -> None:
    model = _InPlace(bias)
    inputs = torch.randn(40, 6)
    states = extract_states(model, inputs, progress=False)
    assert states.structure.bias is bias
    assert states.U.shape[0] == 6 + int(bias)
    with torch.no_grad():
        z1 = model.l1(inputs)
    torch.testing.assert_close(states.Z[:8].T, z1)  # not relu(z1): the in-place op did not corrupt it
    assert (states.Z < 0).any()
    torch.testing.assert_close(states.X, torch.relu(states.Z))
    _check_exact(states)
    with torch.no_grad():
        torch.testing.assert_close(states.Y.T, model(inputs))


def test_cnn_is_unrolled_exactly(cnn_teacher, digits) -> None:
    images = digits.images(digits.X_test[:50])
    states = extract_states(cnn_teacher, images, batch_size=16, progress=False)
    s = states.structure
    assert s.input_shape == (1, 8, 8) and s.layer_sizes == [32, 16] and s.layer_shapes[0] == (2, 4, 4)
    conv_out = cnn_teacher.conv(images).flatten(1)
    torch.testing.assert_close(states.Z[:32].T, conv_out)
    torch.testing.assert_close(states.X, torch.relu(states.Z))
    with torch.no_grad():  # the recorded outputs are the teacher's own
        torch.testing.assert_close(states.Y.T, cnn_teacher(images))
    _check_exact(states, atol=1e-4)
    # the extracted implicit model, solved as a fixed point from the inputs alone, is the teacher
    from idl_ray.implicit.fixed_point import solve_fixed_point

    U = states.U.double().T
    X, stats = solve_fixed_point(s.A, U @ s.B.T, "relu", {"tol": 1e-12, "max_iter": 100})
    assert stats.all_converged
    with torch.no_grad():
        torch.testing.assert_close(X @ s.C.T + U @ s.D.T, cnn_teacher(images).double(), atol=1e-4, rtol=1e-4)


def test_leaky_relu_tanh_and_average_pooling_batchnorm_are_supported() -> None:
    torch.manual_seed(0)
    leaky = nn.Sequential(nn.Linear(5, 6), nn.LeakyReLU(0.1), nn.Linear(6, 2))
    states = extract_states(leaky, torch.randn(30, 5), progress=False)
    assert states.structure.activation == "leaky_relu" and states.structure.negative_slope == pytest.approx(
        0.1
    )
    _check_exact(states)
    bn = nn.BatchNorm2d(2)
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    conv = nn.Sequential(
        nn.Conv2d(1, 2, 3),
        bn,
        nn.Tanh(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Dropout(0.5),
        nn.Linear(2 * 3 * 3, 3),
    )
    conv.train()  # extraction runs the teacher in eval mode, and restores nothing on the caller's model
    states = extract_states(conv, torch.randn(20, 1, 8, 8), progress=False)
    assert states.structure.activation == "tanh"
    _check_exact(states)
    assert conv.training  # the caller's teacher is untouched


@pytest.mark.parametrize(
    ("model", "match"),
    [
        (
            nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(18, 2)),
            "MaxPool2d",
        ),
        (
            nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 2)),
            "LayerNorm",
        ),
        (nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.GELU(), nn.Linear(8, 2)), "GELU"),
        (
            nn.Sequential(
                nn.Flatten(), nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2)
            ),
            "mixes",
        ),
        (nn.Sequential(nn.Flatten(), nn.Linear(64, 2)), "no hidden activation"),
        (
            nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 2), nn.Softmax(dim=1)),
            "Softmax",
        ),
    ],
)
def test_unsupported_layers_are_named(model: nn.Module, match: str) -> None:
    with pytest.raises(UnsupportedLayerError, match=match):
        extract_states(model, torch.randn(4, 1, 8, 8), progress=False)


class _Gated(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x))
        return self.b(h * x)  # product of two states


class _Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent control flow cannot be traced
            return torch.relu(self.a(x))
        return x


def test_products_of_states_and_untraceable_models_are_rejected() -> None:
    with pytest.raises(UnsupportedLayerError, match="product of two states"):
        StateRecorder(_Gated())
    with pytest.raises(UnsupportedLayerError, match="trace"):
        StateRecorder(_Branchy())


class _Scaled(Dataset):
    """A dataset with a transform: extraction must see the transformed inputs."""

    def __init__(self, X: torch.Tensor, y: torch.Tensor) -> None:
        self.X, self.y = X, y

    def __len__(self) -> int:
        return len(self.X)

    def __getitem__(self, i: int):
        return self.X[i] * 2.0 - 1.0, self.y[i]


def test_dataloader_transforms_labels_and_max_samples(mlp_teacher, digits) -> None:
    loader = DataLoader(_Scaled(digits.X_test, digits.y_test), batch_size=64)
    states = extract_states(mlp_teacher, loader, progress=True, max_samples=300)
    assert states.num_samples == 300
    torch.testing.assert_close(states.U[:-1].T, digits.X_test[:300] * 2.0 - 1.0)
    assert torch.equal(states.labels, digits.y_test[:300])
    plain = extract_states(
        mlp_teacher, DataLoader(TensorDataset(digits.X_test), batch_size=100), progress=False
    )
    assert plain.num_samples == digits.X_test.shape[0] and plain.labels is None
    arrays = states.as_dict()
    assert isinstance(arrays["Z"], np.ndarray) and arrays["Z"].shape == (72, 300)


def test_empty_or_wrong_data_is_rejected(mlp_teacher) -> None:
    with pytest.raises(ConfigError, match="empty"):
        extract_states(mlp_teacher, torch.zeros(0, 64), progress=False)
    with pytest.raises(ConfigError, match="DataLoader"):
        extract_states(mlp_teacher, 3.0, progress=False)
    recorder = StateRecorder(mlp_teacher)
    recorder.record(torch.zeros(2, 64))
    with pytest.raises(ConfigError, match="shape"):
        recorder.record(torch.zeros(2, 63))


def test_teacher_weights_helper(mlp_teacher, digits) -> None:
    s = teacher_weights(mlp_teacher, digits.X_test[:2])
    assert s.A.shape == (72, 72) and s.B.shape == (72, 65) and s.C.shape == (10, 72) and s.D.shape == (10, 65)
    assert s.A.dtype == torch.float64
