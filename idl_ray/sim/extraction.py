"""State extraction: record a teacher network's inputs, pre-activations, activations and outputs.

For a teacher built from affine layers and element-wise activations, every hidden pre-activation is an
affine function of the input and of the *earlier* activations, so the teacher is exactly the implicit model

    Z = A* X + B* U,   X = phi(Z),   Y = C* X + D* U

with A* strictly block lower-triangular (hidden units stacked in layer order). When the teacher has biases
(or any other constant term), U carries a constant 1 as its LAST feature and the biases are the last
columns of B* and D*.

How it works. The teacher is traced with ``torch.fx``; every node must be an input, a parameter, a supported
activation or an affine operation (whitelist below). An interpreter runs the graph and records the value
entering each activation (cloned first, so in-place activations such as ``nn.ReLU(inplace=True)`` or
``F.relu_`` cannot corrupt it) and the value leaving it. The teacher's own (A*, B*, C*, D*) are read off the
same graph exactly: with every activation's output *substituted* by a free variable the graph is affine in
(u, x), so evaluating it on the zero vector and on basis vectors gives the matrices column by column
(in float64). A first-batch check (recorded Z == A* X + B* U) catches anything non-affine that slipped through.

Supported (exact):
  * affine modules: Linear, Conv1d/2d/3d, ConvTranspose1d/2d/3d, Flatten, Unflatten, Identity,
    AvgPool1d/2d/3d, AdaptiveAvgPool1d/2d/3d, BatchNorm1d/2d/3d (eval mode: an affine map), Dropout*
    (eval mode: the identity), ZeroPad*/ConstantPad*;
  * affine functions and methods: F.linear, F.conv*, F.avg_pool*, F.pad (constant), F.dropout (eval),
    flatten, view, reshape, permute, transpose, squeeze, unsqueeze, contiguous, cat, sum, mean, indexing,
    +, - (of states and constants), * and / by constants (not by another state);
  * activations (one kind per teacher): ReLU, LeakyReLU, Tanh, Sigmoid, as modules, functions
    (``F.relu``, ``torch.relu``, ``x.relu()``, ...) or in place; skip connections between any layers.
Rejected with :class:`UnsupportedLayerError` naming the layer: max pooling, LayerNorm/GroupNorm/
InstanceNorm, attention, recurrent layers, softmax, products of two states, other activations (GELU, SiLU,
ELU, ...), and models that ``torch.fx`` cannot trace (data-dependent control flow).

The teacher always runs in eval mode (its mode is restored afterwards): recorded states are inference
states, so dropout is the identity and batch norm uses its running statistics.
"""

from __future__ import annotations

import copy
import dataclasses
import operator
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from idl_ray._validation import bad_parameter, check_positive_int
from idl_ray.errors import ConfigError, ShapeError, UnsupportedLayerError

__all__ = [
    "SIMStates",
    "StateRecorder",
    "TeacherStructure",
    "extract_states",
    "iter_batches",
    "teacher_weights",
]

# ---------------------------------------------------------------------------------------- whitelists
_AFFINE_MODULES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.Flatten,
    nn.Unflatten,
    nn.Identity,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.ZeroPad1d,
    nn.ZeroPad2d,
    nn.ZeroPad3d,
    nn.ConstantPad1d,
    nn.ConstantPad2d,
    nn.ConstantPad3d,
)

_WHY_UNSUPPORTED: dict[type[nn.Module], str] = {
    nn.MaxPool1d: "max pooling is piecewise linear with a data-dependent selection, not affine",
    nn.MaxPool2d: "max pooling is piecewise linear with a data-dependent selection, not affine",
    nn.MaxPool3d: "max pooling is piecewise linear with a data-dependent selection, not affine",
    nn.AdaptiveMaxPool1d: "max pooling is not affine",
    nn.AdaptiveMaxPool2d: "max pooling is not affine",
    nn.LayerNorm: "normalising by per-sample statistics is not affine",
    nn.GroupNorm: "normalising by per-sample statistics is not affine",
    nn.InstanceNorm1d: "normalising by per-sample statistics is not affine",
    nn.InstanceNorm2d: "normalising by per-sample statistics is not affine",
    nn.MultiheadAttention: "attention multiplies states together (not affine)",
    nn.LSTM: "recurrent layers are not supported by SIM extraction",
    nn.GRU: "recurrent layers are not supported by SIM extraction",
    nn.RNN: "recurrent layers are not supported by SIM extraction",
    nn.Softmax: "softmax is not an element-wise monotone 1-Lipschitz activation",
    nn.LogSoftmax: "log-softmax is not an element-wise monotone 1-Lipschitz activation",
}


@dataclasses.dataclass(frozen=True)
class _Act:
    """An activation as the implicit model will use it: a name and, for leaky ReLU, its slope."""

    name: str
    negative_slope: float | None = None
    inplace: bool = False

    @property
    def key(self) -> tuple[str, float | None]:
        return (self.name, self.negative_slope)


_ACT_FUNCTIONS: dict[Any, str] = {
    torch.relu: "relu",
    torch.relu_: "relu",
    F.relu: "relu",
    F.relu_: "relu",
    torch.tanh: "tanh",
    torch.tanh_: "tanh",
    F.tanh: "tanh",
    torch.sigmoid: "sigmoid",
    torch.sigmoid_: "sigmoid",
    F.sigmoid: "sigmoid",
    F.leaky_relu: "leaky_relu",
    F.leaky_relu_: "leaky_relu",
}
_ACT_METHODS = {
    "relu": "relu",
    "relu_": "relu",
    "tanh": "tanh",
    "tanh_": "tanh",
    "sigmoid": "sigmoid",
    "sigmoid_": "sigmoid",
}
_INPLACE_FUNCTIONS = {torch.relu_, F.relu_, torch.tanh_, torch.sigmoid_, F.leaky_relu_}

_AFFINE_FUNCTIONS = {
    F.linear,
    F.conv1d,
    F.conv2d,
    F.conv3d,
    F.avg_pool1d,
    F.avg_pool2d,
    F.avg_pool3d,
    F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d,
    F.dropout,
    F.batch_norm,
    F.pad,
    torch.flatten,
    torch.reshape,
    torch.cat,
    torch.concat,
    torch.squeeze,
    torch.unsqueeze,
    torch.transpose,
    torch.permute,
    torch.sum,
    torch.mean,
    torch.add,
    torch.sub,
    torch.neg,
    operator.add,
    operator.sub,
    operator.neg,
    operator.pos,
    operator.getitem,
    getattr,
}
_SCALING_FUNCTIONS = {operator.mul, operator.truediv, torch.mul, torch.div}
_AFFINE_METHODS = {
    "view",
    "reshape",
    "flatten",
    "permute",
    "transpose",
    "t",
    "contiguous",
    "squeeze",
    "unsqueeze",
    "size",
    "dim",
    "add",
    "sub",
    "neg",
    "sum",
    "mean",
    "clone",
    "float",
    "double",
    "to",
    "type_as",
    "view_as",
    "reshape_as",
    "expand",
}
_SCALING_METHODS = {"mul", "div"}


def _node_label(node: fx.Node, gm: fx.GraphModule) -> str:
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        return f"{type(module).__name__} (layer '{node.target}')"
    if node.op == "call_function":
        name = getattr(node.target, "__name__", str(node.target))
        return f"function {name} (node '{node.name}')"
    return f"method .{node.target}() (node '{node.name}')"


def _activation_of(node: fx.Node, gm: fx.GraphModule) -> _Act | None:
    """The activation a node applies, or None if it is not an activation."""
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        inplace = bool(getattr(module, "inplace", False))
        if isinstance(module, nn.ReLU):
            return _Act("relu", None, inplace)
        if isinstance(module, nn.LeakyReLU):
            return _Act("leaky_relu", float(module.negative_slope), inplace)
        if isinstance(module, nn.Tanh):
            return _Act("tanh")
        if isinstance(module, nn.Sigmoid):
            return _Act("sigmoid")
        return None
    if node.op == "call_function" and node.target in _ACT_FUNCTIONS:
        name = _ACT_FUNCTIONS[node.target]
        inplace = node.target in _INPLACE_FUNCTIONS or bool(node.kwargs.get("inplace", False))
        slope = None
        if name == "leaky_relu":
            slope = node.kwargs.get("negative_slope", node.args[1] if len(node.args) > 1 else 0.01)
            if len(node.args) > 2:
                inplace = inplace or bool(node.args[2])
            if not isinstance(slope, (int, float)):
                raise UnsupportedLayerError(
                    f"{_node_label(node, gm)}: the leaky ReLU slope must be a constant; got {slope!r}."
                )
            slope = float(slope)
        elif name == "relu" and len(node.args) > 1:
            inplace = inplace or bool(node.args[1])
        return _Act(name, slope, inplace)
    if node.op == "call_method" and node.target in _ACT_METHODS:
        return _Act(_ACT_METHODS[str(node.target)], None, str(node.target).endswith("_"))
    return None


def _flat_nodes(args: Any) -> list[fx.Node]:
    out: list[fx.Node] = []
    fx.node.map_arg(args, lambda n: out.append(n) or n)
    return out


def _analyse_graph(gm: fx.GraphModule) -> tuple[list[fx.Node], list[_Act]]:
    """Check every node is supported; return the activation nodes (topological order) and their kinds."""
    data_dependent: set[fx.Node] = set()
    act_nodes: list[fx.Node] = []
    acts: list[_Act] = []
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise UnsupportedLayerError(
            f"SIM extraction needs a teacher whose forward takes exactly one input tensor; this one takes "
            f"{len(placeholders)} ({[p.name for p in placeholders]})."
        )
    for node in gm.graph.nodes:
        inputs = _flat_nodes((node.args, node.kwargs))
        depends = any(n in data_dependent for n in inputs)
        if node.op == "placeholder":
            data_dependent.add(node)
            continue
        if node.op in ("get_attr", "output"):
            continue
        if not depends:
            continue  # constant folding of parameters/shapes: any op is fine
        data_dependent.add(node)
        act = _activation_of(node, gm)
        if act is not None:
            act_nodes.append(node)
            acts.append(act)
            continue
        label = _node_label(node, gm)
        if node.op == "call_module":
            module = gm.get_submodule(str(node.target))
            if isinstance(module, _AFFINE_MODULES):
                continue
            why = next((r for t, r in _WHY_UNSUPPORTED.items() if isinstance(module, t)), None)
            if why is None and type(module).__module__.startswith("torch.nn.modules.activation"):
                why = "only ReLU, LeakyReLU, Tanh and Sigmoid activations have an exact implicit counterpart"
            raise UnsupportedLayerError(
                f"SIM cannot represent {label} exactly: {why or 'it is not a supported affine layer'}. "
                "Supported layers: Linear, Conv*, Flatten, AvgPool*, BatchNorm* (eval), Dropout (eval), "
                "padding, and ReLU/LeakyReLU/Tanh/Sigmoid activations; see idl_ray.sim.extraction."
            )
        if node.op == "call_function":
            if node.target in _AFFINE_FUNCTIONS:
                if node.target is F.dropout and node.kwargs.get(
                    "training", len(node.args) > 2 and node.args[2]
                ):
                    raise UnsupportedLayerError(
                        f"SIM cannot represent {label}: dropout in training mode is random."
                    )
                continue
            if node.target in _SCALING_FUNCTIONS:
                dep = [isinstance(a, fx.Node) and a in data_dependent for a in node.args[:2]]
                if node.target in (operator.truediv, torch.div) and dep[1:2] == [True]:
                    raise UnsupportedLayerError(
                        f"SIM cannot represent {label}: division by a state is not affine."
                    )
                if all(dep[:2]):
                    raise UnsupportedLayerError(
                        f"SIM cannot represent {label}: a product of two states is not affine."
                    )
                continue
            raise UnsupportedLayerError(
                f"SIM cannot represent {label}: it is not a supported affine operation."
            )
        if node.op == "call_method":
            if node.target in _AFFINE_METHODS:
                continue
            if node.target in _SCALING_METHODS:
                other = node.args[1] if len(node.args) > 1 else None
                if isinstance(other, fx.Node) and other in data_dependent:
                    raise UnsupportedLayerError(
                        f"SIM cannot represent {label}: a product of two states is not affine."
                    )
                continue
            raise UnsupportedLayerError(
                f"SIM cannot represent {label}: it is not a supported affine operation."
            )
    if not act_nodes:
        raise UnsupportedLayerError(
            "The teacher has no hidden activation (ReLU, LeakyReLU, Tanh or Sigmoid): there are no states to "
            "fit. SIM needs a network with at least one hidden activation layer."
        )
    kinds = {a.key for a in acts}
    if len(kinds) > 1:
        raise UnsupportedLayerError(
            f"The teacher mixes activations {sorted(kinds, key=str)}; an implicit model applies one activation "
            "to all hidden units. Use a teacher with a single activation kind."
        )
    return act_nodes, acts


class _StateInterpreter(fx.Interpreter):
    """Runs the traced teacher, recording activation inputs/outputs, optionally substituting outputs."""

    def __init__(self, gm: fx.GraphModule, act_nodes: list[fx.Node], acts: list[_Act]) -> None:
        super().__init__(gm, garbage_collect_values=True)
        self.index = {node: i for i, node in enumerate(act_nodes)}
        self.acts = acts
        self.substitute: list[torch.Tensor] | None = None
        self.pre: list[torch.Tensor] = []
        self.post: list[torch.Tensor] = []

    def run_states(self, x: torch.Tensor, substitute: list[torch.Tensor] | None = None) -> torch.Tensor:
        k = len(self.acts)
        self.pre = [None] * k  # type: ignore[list-item]
        self.post = [None] * k  # type: ignore[list-item]
        self.substitute = substitute
        # garbage collection of values must not drop an in-place activation's input before we reassign it
        return self.run(x)

    def run_node(self, n: fx.Node) -> Any:
        i = self.index.get(n)
        if i is None:
            return super().run_node(n)
        args, _ = self.fetch_args_kwargs_from_env(n)
        z = args[0]
        self.pre[i] = z.detach().clone()
        if self.substitute is not None:
            out = self.substitute[i].reshape(z.shape).to(z.dtype)
            if self.acts[i].inplace and isinstance(n.args[0], fx.Node) and n.args[0] in self.env:
                self.env[n.args[0]] = out  # later users of the mutated tensor see the activation output
        else:
            out = super().run_node(n)
        self.post[i] = out.detach().clone()
        return out


@dataclasses.dataclass
class TeacherStructure:
    """What extraction learned about a teacher: shapes, the activation, and its exact implicit weights.

    Attributes
    ----------
    input_shape : tuple, the shape of one input sample (without the batch dimension)
    num_inputs : int, p: flattened input features, including the constant-ones feature when ``bias``
    layer_sizes : list of int, hidden units per activation layer (n = sum)
    layer_shapes : list of tuple, each hidden layer's per-sample shape (for convolutional layers)
    num_outputs : int, q
    activation : str, ``"relu"``, ``"leaky_relu"``, ``"tanh"`` or ``"sigmoid"``
    negative_slope : float or None, leaky ReLU slope
    bias : bool, whether U carries a constant 1 as its last feature
    A, B, C, D : Tensor (float64), the teacher as an implicit model: Z = A X + B U, Y = C X + D U;
        A is (n, n) strictly block lower-triangular, B is (n, p), C is (q, n), D is (q, p)
    """

    input_shape: tuple[int, ...]
    num_inputs: int
    layer_sizes: list[int]
    layer_shapes: list[tuple[int, ...]]
    num_outputs: int
    activation: str
    negative_slope: float | None
    bias: bool
    A: torch.Tensor
    B: torch.Tensor
    C: torch.Tensor
    D: torch.Tensor

    @property
    def num_hidden(self) -> int:
        return sum(self.layer_sizes)

    @property
    def layer_slices(self) -> list[slice]:
        out, start = [], 0
        for size in self.layer_sizes:
            out.append(slice(start, start + size))
            start += size
        return out

    def activation_spec(self) -> dict[str, Any]:
        """Keyword form for ``resolve_activation(name, **options)``."""
        spec: dict[str, Any] = {"name": self.activation}
        if self.negative_slope is not None:
            spec["negative_slope"] = self.negative_slope
        return spec


@dataclasses.dataclass
class SIMStates:
    """Recorded teacher states, feature-major (one column per sample) as in DESIGN.md.

    Attributes
    ----------
    U : Tensor, shape (p, m), inputs flattened (+ a last row of ones when the teacher has biases)
    Z : Tensor, shape (n, m), pre-activations of all hidden layers stacked in layer order
    X : Tensor, shape (n, m), X = phi(Z)
    Y : Tensor, shape (q, m), teacher outputs
    labels : Tensor of shape (m,) or (m, ...) or None, the data's targets when the data had them
    structure : TeacherStructure
    """

    U: torch.Tensor
    Z: torch.Tensor
    X: torch.Tensor
    Y: torch.Tensor
    labels: torch.Tensor | None
    structure: TeacherStructure

    @property
    def num_samples(self) -> int:
        return self.U.shape[1]

    def features(self) -> torch.Tensor:
        """Phi^T = [X; U]^T, batch-first, shape (m, n + p)."""
        return torch.cat([self.X.T, self.U.T], dim=1)

    def as_dict(self) -> dict[str, np.ndarray]:
        """``{'U', 'Z', 'X', 'Y'}`` as numpy arrays (the torchidl ``get_states`` layout)."""
        return {k: getattr(self, k).cpu().numpy() for k in ("U", "Z", "X", "Y")}


class StateRecorder:
    """Trace a teacher once; record the states of any batch with it.

    Parameters
    ----------
    teacher : nn.Module with a single tensor input
    dtype : torch.dtype, the dtype the teacher runs in and states are recorded in (float32 default)
    device : device to run the teacher on (default: the teacher's own)

    Raises
    ------
    UnsupportedLayerError when the teacher has a layer SIM cannot represent exactly.
    """

    def __init__(
        self,
        teacher: nn.Module,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        if not isinstance(teacher, nn.Module):
            raise bad_parameter("teacher", "StateRecorder", "a torch.nn.Module", type(teacher).__name__)
        if dtype not in (torch.float32, torch.float64):
            raise bad_parameter("dtype", "StateRecorder", "torch.float32 or torch.float64", dtype)
        self.dtype = dtype
        if device is None:
            param = next(teacher.parameters(), None)
            device = param.device if param is not None else torch.device("cpu")
        self.device = torch.device(device)
        model = copy.deepcopy(teacher).eval()
        try:
            gm = fx.symbolic_trace(model)
        except Exception as exc:
            raise UnsupportedLayerError(
                f"SIM could not trace the teacher with torch.fx ({type(exc).__name__}: {exc}). Teachers must "
                "be traceable: no data-dependent Python control flow in forward()."
            ) from exc
        self._act_nodes, self._acts = _analyse_graph(gm)
        self._gm = gm.to(device=self.device, dtype=dtype)
        self._interp = _StateInterpreter(self._gm, self._act_nodes, self._acts)
        self._gm64: fx.GraphModule = gm  # float64 copy built lazily for the exact weights
        self.structure: TeacherStructure | None = None

    @torch.no_grad()
    def _run(self, inputs: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        y = self._interp.run_states(inputs)
        if not isinstance(y, torch.Tensor):
            raise UnsupportedLayerError(
                f"SIM extraction needs a teacher that returns one tensor; it returned {type(y).__name__}."
            )
        return y, self._interp.pre, self._interp.post

    @torch.no_grad()
    def analyse(self, example: torch.Tensor) -> TeacherStructure:
        """Shapes and the exact (A*, B*, C*, D*) from one example batch (cached after the first call)."""
        if self.structure is not None:
            return self.structure
        example = example[:1].to(device=self.device, dtype=self.dtype)
        try:
            y, pre, _ = self._run(example)
        except (RuntimeError, ValueError, IndexError) as exc:
            # the user's batch did not fit the teacher (e.g. a wrong number of features): say so in the
            # user's terms, not with the one-row probe's matmul shapes
            expects = _first_layer_input(self._gm)
            raise ShapeError(
                f"The teacher cannot take the SIM inputs: a batch of shape (batch, "
                f"{', '.join(map(str, example.shape[1:]))}) failed in its forward ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0]})."
                + (f" Its first layer is {expects}." if expects else "")
                + " Pass inputs of the shape the teacher was built for."
            ) from None
        input_shape = tuple(example.shape[1:])
        p = int(np.prod(input_shape)) if input_shape else 1
        layer_shapes = [tuple(z.shape[1:]) for z in pre]
        sizes = [int(np.prod(s)) if s else 1 for s in layer_shapes]
        n, q = sum(sizes), int(y[0].numel())
        # evaluate the substituted graph on 0 and basis vectors of (u, x), in float64, in chunks
        gm64 = copy.deepcopy(self._gm64).to(device=self.device, dtype=torch.float64)
        interp = _StateInterpreter(gm64, self._map_nodes(gm64), self._acts)
        total = 1 + p + n
        z_rows, y_rows = [], []
        chunk = max(1, min(total, 2048))
        for start in range(0, total, chunk):
            idx = torch.arange(start, min(total, start + chunk), device=self.device)
            basis = torch.zeros(len(idx), p + n, dtype=torch.float64, device=self.device)
            cols = idx - 1
            valid = cols >= 0
            basis[valid.nonzero().flatten(), cols[valid]] = 1.0
            u = basis[:, :p].reshape(len(idx), *input_shape)
            subs, offset = [], p
            for size in sizes:
                subs.append(basis[:, offset : offset + size])
                offset += size
            out = interp.run_states(u, subs)
            z_rows.append(torch.cat([z.reshape(len(idx), -1) for z in interp.pre], dim=1))
            y_rows.append(out.reshape(len(idx), -1))
        Zm, Ym = torch.cat(z_rows), torch.cat(y_rows)
        z0, y0 = Zm[0], Ym[0]
        Bst, Ast = (Zm[1 : 1 + p] - z0).T, (Zm[1 + p :] - z0).T
        Dst, Cst = (Ym[1 : 1 + p] - y0).T, (Ym[1 + p :] - y0).T
        bias = bool(z0.abs().max() > 0 or y0.abs().max() > 0)
        if bias:
            Bst = torch.cat([Bst, z0[:, None]], dim=1)
            Dst = torch.cat([Dst, y0[:, None]], dim=1)
        act = self._acts[0]
        self.structure = TeacherStructure(
            input_shape=input_shape,
            num_inputs=p + int(bias),
            layer_sizes=sizes,
            layer_shapes=layer_shapes,
            num_outputs=q,
            activation=act.name,
            negative_slope=act.negative_slope,
            bias=bias,
            A=Ast.contiguous().cpu(),
            B=Bst.contiguous().cpu(),
            C=Cst.contiguous().cpu(),
            D=Dst.contiguous().cpu(),
        )
        self._check_exact(example)
        return self.structure

    def _map_nodes(self, gm: fx.GraphModule) -> list[fx.Node]:
        names = {node.name for node in self._act_nodes}
        by_name = {node.name: node for node in gm.graph.nodes if node.name in names}
        return [by_name[node.name] for node in self._act_nodes]

    def _check_exact(self, example: torch.Tensor) -> None:
        """Recorded Z must equal A* X + B* U on an example: catches any non-affine op we let through."""
        states = self.record(example.to(torch.float64) if self.dtype == torch.float64 else example)
        s = self.structure
        assert s is not None
        Zhat = s.A @ states.X.double().cpu() + s.B @ states.U.double().cpu()
        Yhat = s.C @ states.X.double().cpu() + s.D @ states.U.double().cpu()
        scale = 1.0 + float(states.Z.abs().max()) + float(states.Y.abs().max())
        err = max(
            float((Zhat - states.Z.double().cpu()).abs().max()),
            float((Yhat - states.Y.double().cpu()).abs().max()),
        )
        tol = (1e-3 if self.dtype == torch.float32 else 1e-9) * scale
        if err > tol:
            raise UnsupportedLayerError(
                f"The teacher is not affine between its activations (max error {err:.3g} > {tol:.3g} between "
                "the recorded states and the extracted implicit weights); it uses an operation SIM cannot "
                "represent exactly."
            )

    @torch.no_grad()
    def record(self, inputs: Any) -> SIMStates:
        """States of one batch (batch-first inputs of the teacher's input shape)."""
        x = _to_tensor(inputs, "inputs", "StateRecorder.record")
        if x.dim() == 0 or x.shape[0] == 0:
            raise ConfigError("StateRecorder.record got an empty batch; pass at least one sample.")
        x = x.to(device=self.device, dtype=self.dtype)
        structure = self.structure if self.structure is not None else self.analyse(x)
        if tuple(x.shape[1:]) != structure.input_shape:
            raise ShapeError(
                f"The teacher was analysed with inputs of shape (batch, {', '.join(map(str, structure.input_shape))}); "
                f"got a batch of shape {tuple(x.shape)}."
            )
        y, pre, post = self._run(x)
        b = x.shape[0]
        U = x.reshape(b, -1)
        if structure.bias:
            U = torch.cat([U, torch.ones(b, 1, dtype=U.dtype, device=U.device)], dim=1)
        Z = torch.cat([z.reshape(b, -1) for z in pre], dim=1)
        X = torch.cat([v.reshape(b, -1) for v in post], dim=1)
        Y = y.reshape(b, -1)
        return SIMStates(U=U.T, Z=Z.T, X=X.T, Y=Y.T, labels=None, structure=structure)


def _first_layer_input(module: nn.Module) -> str | None:
    """A description of the first layer with a fixed input size (e.g. ``Linear(in_features=64, ...)``)."""
    for layer in module.modules():
        if isinstance(layer, (nn.Linear, nn.Bilinear)):
            return f"Linear(in_features={layer.in_features}, out_features={layer.out_features})"
        if isinstance(layer, nn.modules.conv._ConvNd):
            return f"{type(layer).__name__}(in_channels={layer.in_channels}, ...)"
    return None


def _to_tensor(value: Any, name: str, owner: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    raise ConfigError(
        f"The '{name}' argument of {owner} must be a tensor or numpy array. Got {type(value).__name__}."
    )


def iter_batches(data: Any, batch_size: int = 256) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """Yield (inputs, targets-or-None) batches from a DataLoader/iterable, a tensor/array, or a pair.

    A DataLoader (or any iterable of batches) is iterated as is, so its transforms and batch size apply;
    each item may be ``inputs``, ``(inputs, targets, ...)`` or ``[inputs, targets, ...]``. A tensor or numpy
    array is split into ``batch_size`` chunks; a tuple ``(inputs, targets)`` of tensors/arrays likewise.
    """
    check_positive_int(batch_size, "batch_size", "iter_batches")
    if isinstance(data, (torch.Tensor, np.ndarray)):
        x = _to_tensor(data, "data", "SIM")
        for start in range(0, x.shape[0], batch_size):
            yield x[start : start + batch_size], None
        return
    if (
        isinstance(data, tuple)
        and len(data) == 2
        and all(isinstance(v, (torch.Tensor, np.ndarray)) for v in data)
    ):
        x = _to_tensor(data[0], "data[0]", "SIM")
        y = _to_tensor(data[1], "data[1]", "SIM")
        if x.shape[0] != y.shape[0]:
            raise ShapeError(f"SIM got {x.shape[0]} inputs but {y.shape[0]} targets; they must match.")
        for start in range(0, x.shape[0], batch_size):
            yield x[start : start + batch_size], y[start : start + batch_size]
        return
    if not isinstance(data, Iterable):
        raise ConfigError(
            "SIM data must be a DataLoader (or iterable of batches), a tensor/array of inputs, or a pair "
            f"(inputs, targets). Got {type(data).__name__}."
        )
    for item in data:
        if isinstance(item, (tuple, list)):
            if not item:
                continue
            x = _to_tensor(item[0], "batch inputs", "SIM")
            y = item[1] if len(item) > 1 else None
            yield x, (None if y is None else _to_tensor(y, "batch targets", "SIM"))
        elif isinstance(item, dict):
            raise ConfigError(
                "SIM data batches that are dicts are not supported; yield (inputs, targets) tuples."
            )
        else:
            yield _to_tensor(item, "batch", "SIM"), None


def _num_batches(data: Any, batch_size: int) -> int | None:
    if isinstance(data, (torch.Tensor, np.ndarray)):
        return -(-data.shape[0] // batch_size)
    if isinstance(data, tuple) and len(data) == 2 and hasattr(data[0], "shape"):
        return -(-data[0].shape[0] // batch_size)
    try:
        return len(data)
    except TypeError:
        return None


def progress_bar(iterable: Iterable[Any], *, total: int | None, desc: str, enabled: bool) -> Iterable[Any]:
    """A tqdm bar when enabled (tqdm imported only then)."""
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False)


def extract_states(
    teacher: nn.Module,
    data: Any,
    *,
    batch_size: int = 256,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    progress: bool = True,
    max_samples: int | None = None,
) -> SIMStates:
    """Record a teacher's states U, Z, X = phi(Z), Y on data (all in memory; see ``StateRecorder`` to stream).

    Parameters
    ----------
    teacher : nn.Module
        MLP or small CNN (see the module docstring for supported layers); run in eval mode.
    data : DataLoader, iterable of batches, tensor/array of inputs, or (inputs, targets) pair
    batch_size : int, chunk size for tensor/array data (a DataLoader keeps its own)
    dtype : torch.float32 (default) or torch.float64: the teacher runs in, and states are stored in, it
    device : where the teacher runs (default: where its parameters are); states come back on it
    progress : show a tqdm progress bar
    max_samples : stop after this many samples (None: all)

    Returns
    -------
    SIMStates with U (p, m), Z (n, m), X (n, m), Y (q, m) feature-major, ``labels`` when the data had them,
    and ``structure`` (shapes, activation, bias flag and the teacher's exact (A*, B*, C*, D*)).

    Examples
    --------
    >>> import torch
    >>> teacher = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> states = extract_states(teacher, torch.randn(100, 4), progress=False)
    >>> states.U.shape, states.Z.shape, states.Y.shape   # U has a ones row: the teacher has biases
    (torch.Size([5, 100]), torch.Size([8, 100]), torch.Size([2, 100]))
    """
    check_positive_int(max_samples, "max_samples", "extract_states", allow_none=True)
    recorder = StateRecorder(teacher, dtype=dtype, device=device)
    parts: list[SIMStates] = []
    labels: list[torch.Tensor] = []
    count = 0
    batches = iter_batches(data, batch_size)
    for x, y in progress_bar(
        batches, total=_num_batches(data, batch_size), desc="SIM states", enabled=progress
    ):
        if x.shape[0] == 0:
            continue
        if max_samples is not None and count + x.shape[0] > max_samples:
            x = x[: max_samples - count]
            y = None if y is None else y[: max_samples - count]
        states = recorder.record(x)
        parts.append(states)
        if y is not None:
            labels.append(y)
        count += x.shape[0]
        if max_samples is not None and count >= max_samples:
            break
    if not parts:
        raise ConfigError(
            "extract_states got no samples: the data is empty. Pass at least one batch of inputs."
        )
    structure = recorder.structure
    assert structure is not None
    return SIMStates(
        U=torch.cat([s.U for s in parts], dim=1),
        Z=torch.cat([s.Z for s in parts], dim=1),
        X=torch.cat([s.X for s in parts], dim=1),
        Y=torch.cat([s.Y for s in parts], dim=1),
        labels=torch.cat(labels) if len(labels) == len(parts) else None,
        structure=structure,
    )


def teacher_weights(teacher: nn.Module, example_inputs: Any) -> TeacherStructure:
    """The teacher as an exact implicit model (A*, B*, C*, D*), with its shapes and activation.

    ``example_inputs`` is any batch of the teacher's inputs (only its shape is used, plus a consistency
    check on it).
    """
    recorder = StateRecorder(teacher, dtype=torch.float64)
    return recorder.analyse(_to_tensor(example_inputs, "example_inputs", "teacher_weights"))
