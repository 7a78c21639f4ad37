"""Weight arrays <-> ONNX graphs for the VMAFX sidecar's MLP regressor.

The checkpoint graph is a chain of dense layers with an activation between them:

    features [batch, n_features] -> Gemm -> act -> ... -> Gemm -> score [batch, 1]

Weights are stored the way the sidecar multiplies them, W of shape (in, out) so
that a layer computes x @ W + b; Gemm's default transB=0 then needs no transpose.

Reading goes the other way for the MLPs people export with torch.onnx.export (either
exporter, opsets 13-20): it walks the single chain from the input and recognises dense
layers, activations, a constant input normalisation and no-op nodes, and refuses any
other node by name. It never evaluates an arbitrary graph.
"""
from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
# IR 8 is what opset 17 shipped with; older onnxruntime builds on the nodes refuse newer IRs.
IR_VERSION = 8
INPUT_NAME = "features"
OUTPUT_NAME = "score"
ACTIVATION_KINDS = ("relu", "leaky_relu", "tanh", "sigmoid", "gelu")
FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")

Layer = tuple[np.ndarray, np.ndarray]  # (W (in, out), b (out,))


LEAKY_RELU_SLOPE = float(np.float32(0.01))  # torch's and ONNX's default, as a float32 attribute holds it


@dataclass(frozen=True)
class Activation:
    kind: str  # one of ACTIVATION_KINDS
    alpha: float = LEAKY_RELU_SLOPE  # leaky_relu's negative slope, float32 as in the checkpoints

    def __str__(self) -> str:
        return f"leaky_relu({self.alpha:g})" if self.kind == "leaky_relu" else self.kind


ACTIVATIONS_ALLOWED = f"one of {', '.join(ACTIVATION_KINDS)}, or leaky_relu(SLOPE) such as leaky_relu(0.2)"


def parse_activation(text: str) -> Activation:
    """An activation as str() writes it: a kind, or leaky_relu(SLOPE) with a slope finite in float32 (a state-dict
    holds no slope); ValueError, saying what is allowed, for anything else."""
    slope = re.fullmatch(r"leaky_relu\((.*)\)", text)
    try:
        alpha = float(slope.group(1)) if slope else None
    except ValueError:
        alpha = None
    if slope and alpha is not None and abs(alpha) <= float(np.finfo(np.float32).max):  # not NaN, nor infinite
        return Activation("leaky_relu", float(np.float32(alpha)))  # as ONNX holds it, and the model computes it
    if text not in ACTIVATION_KINDS:
        raise ValueError(f"activation {text!r} is not {ACTIVATIONS_ALLOWED}")
    return Activation(text)


@dataclass
class MLPWeights:
    """What a model file holds: dense layers and the activation after each hidden one. A constant input
    normalisation before the first layer is folded into it, and also kept as read (its scale and shift:
    x * scale + shift) for a trainer that standardizes its inputs the same way."""
    layers: list[Layer]
    activations: list[Activation]
    normalisation: tuple[np.ndarray, np.ndarray] | None = None

    def sizes(self) -> list[int]:
        return [self.layers[0][0].shape[0]] + [w.shape[1] for w, _ in self.layers]


class UnsupportedModelError(ValueError):
    """The file is readable but is not a model this sidecar can train; the message says why."""


# ---- export: weight arrays -> ModelProto ----

def build_mlp_model(weights: MLPWeights, metadata: dict[str, str]) -> onnx.ModelProto:
    """Build the checkpoint graph for `weights`, with `metadata` as metadata_props."""
    n_features = weights.layers[0][0].shape[0]
    nodes, initializers = [], []
    hidden = INPUT_NAME
    for i, (w, b) in enumerate(weights.layers):
        last = i == len(weights.layers) - 1
        initializers.append(numpy_helper.from_array(np.asarray(w, np.float32), f"W{i}"))
        initializers.append(numpy_helper.from_array(np.asarray(b, np.float32), f"b{i}"))
        dense = OUTPUT_NAME if last else f"dense{i}"
        nodes.append(helper.make_node("Gemm", [hidden, f"W{i}", f"b{i}"], [dense], name=f"gemm{i}"))
        if not last:
            hidden = f"act{i}"
            nodes += activation_nodes(weights.activations[i], dense, hidden, initializers)
    graph = helper.make_graph(
        nodes,
        "vmafx_mlp",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", n_features])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", 1])],
        initializer=initializers,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="vmafx-sidecar",
        ir_version=IR_VERSION,
    )
    helper.set_model_props(model, metadata)
    return model


def activation_nodes(act: Activation, x: str, out: str, initializers: list[TensorProto]) -> list[onnx.NodeProto]:
    if act.kind == "relu":
        return [helper.make_node("Relu", [x], [out], name=out)]
    if act.kind == "leaky_relu":
        return [helper.make_node("LeakyRelu", [x], [out], name=out, alpha=act.alpha)]
    if act.kind in ("tanh", "sigmoid"):
        return [helper.make_node(act.kind.capitalize(), [x], [out], name=out)]
    # Exact GELU, x * 0.5 * (1 + erf(x / sqrt 2)), as torch exports it below opset 20.
    if not any(t.name == "sqrt2" for t in initializers):
        for name, value in (("sqrt2", math.sqrt(2.0)), ("one", 1.0), ("half", 0.5)):
            initializers.append(numpy_helper.from_array(np.array(value, np.float32), name))
    return [
        helper.make_node("Div", [x, "sqrt2"], [f"{out}_scaled"], name=f"{out}_div"),
        helper.make_node("Erf", [f"{out}_scaled"], [f"{out}_erf"], name=f"{out}_erf"),
        helper.make_node("Add", [f"{out}_erf", "one"], [f"{out}_cdf2"], name=f"{out}_add"),
        helper.make_node("Mul", [x, f"{out}_cdf2"], [f"{out}_2x"], name=f"{out}_mul"),
        helper.make_node("Mul", [f"{out}_2x", "half"], [out], name=out),
    ]


# ---- import: ModelProto -> weight arrays, by recognising the chain from the input ----

SHAPE_NOOPS = ("Flatten", "Reshape", "Squeeze", "Unsqueeze")  # at the output ((batch,) or (batch, 1)); a Flatten
# also first, of the input
PASS_THROUGH = ("Identity", "Dropout")  # inference no-ops
SIMPLE_ACTIVATIONS = {"Relu": "relu", "LeakyRelu": "leaky_relu", "Tanh": "tanh", "Sigmoid": "sigmoid"}
# Exporters compute a Reshape's target shape from the tensor's own shape with these.
SHAPE_ARITHMETIC = ("Shape", "Gather", "Slice", "Concat", "Cast", "Squeeze", "Unsqueeze")
MLP_OPS = {"Gemm", "MatMul", "Add", "Sub", "Mul", "Div", "Gelu", "Erf",  # Constant nodes are read as initializers
           *SIMPLE_ACTIVATIONS, *SHAPE_NOOPS, *PASS_THROUGH, *SHAPE_ARITHMETIC}
# Shape plumbing that surrounds unsupported layers (RNN prologues), beside MLP_OPS' own: never the op worth naming.
PLUMBING = {"ConstantOfShape", "Transpose", "Expand", "Range"}


def read_mlp_model(model: onnx.ModelProto) -> MLPWeights:
    """Recover dense layers and activations from an MLP graph; UnsupportedModelError names
    the first node (op type and name), input or initializer that does not fit."""
    return _ChainReader(model.graph).read()


def node_label(node: onnx.NodeProto) -> str:
    return f"{node.op_type} node {node.name!r}" if node.name else f"{node.op_type} node"


class _ChainReader:
    def __init__(self, graph: onnx.GraphProto):
        self.graph = graph
        self.constants = {t.name: t for t in graph.initializer}
        self.nodes = []
        for node in graph.node:
            if node.op_type == "Constant":
                self.constants[node.output[0]] = constant_tensor(node)
            else:
                self.nodes.append(node)
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in self.nodes:
            for name in node.input:
                self.consumers[name].append(node)
        self.visited: set[int] = set()
        self.layers: list[Layer] = []
        self.activations: list[Activation] = []
        self.scale: np.ndarray | float = 1.0  # input normalisation x * scale + shift, before layer 0
        self.shift: np.ndarray | float = 0.0
        self.normalised = False  # whether the graph has one
        self.shaped = False  # a shape op was seen: only more shape ops may follow

    def read(self) -> MLPWeights:
        custom = [n for n in self.nodes if n.domain not in ("", "ai.onnx")]
        if custom:  # an operator of its own, whatever its name: not the standard one this reader knows
            raise UnsupportedModelError(f"unsupported {node_label(custom[0])} of the operator set {custom[0].domain!r}")
        foreign = [n for n in self.nodes if n.op_type not in MLP_OPS and n.op_type not in PLUMBING]
        if foreign:
            raise UnsupportedModelError(f"unsupported {node_label(foreign[0])} ({foreign[0].op_type} is not "
                                        "part of an MLP this sidecar trains)")
        inputs = [i.name for i in self.graph.input if i.name not in self.constants]
        if len(inputs) != 1:
            raise UnsupportedModelError(
                f"expected one input (the feature vector), the graph has {len(inputs)}: {', '.join(inputs)}")
        if len(self.graph.output) != 1:
            raise UnsupportedModelError(f"expected one output, the graph has {len(self.graph.output)}")
        cursor, passed = inputs[0], set()
        while self.consumers[cursor]:
            passed.add(cursor)
            cursor = self.step(cursor)
            if cursor in passed:  # not a chain: reading on would never end
                raise UnsupportedModelError(f"the graph has a cycle through {cursor!r}")
        left = [n for n in self.nodes if id(n) not in self.visited]
        if left:
            raise UnsupportedModelError(f"{node_label(left[0])} is not on the chain from the input to the output")
        if cursor != self.graph.output[0].name:
            raise UnsupportedModelError(f"the chain from the input ends at {cursor!r}, not at the graph output")
        if not self.layers or len(self.activations) != len(self.layers) - 1:
            raise UnsupportedModelError("the graph must end with a dense layer (no activation after the output)")
        if self.layers[-1][0].shape[1] != 1:
            raise UnsupportedModelError(f"the output layer has {self.layers[-1][0].shape[1]} units, expected 1")
        return MLPWeights(self.fold_normalisation(), self.activations, self.read_normalisation())

    def step(self, cursor: str) -> str:
        """Consume the node(s) that take `cursor`; return the tensor the chain continues from."""
        users = self.consumers[cursor]
        if len(users) > 1 and self.layers:
            users = self.skip_shape_arithmetic(users)
        if len(users) > 1:
            return self.gelu_decomposition(cursor, users)
        node = users[0]
        self.visited.add(id(node))
        op = node.op_type
        if op in PASS_THROUGH:
            return node.output[0]
        if op in SHAPE_NOOPS:
            if not self.layers and self.flattens_the_input(node):  # nn.Flatten() first: (batch, n) stays as it is
                return node.output[0]
            if not self.layers:
                raise UnsupportedModelError(f"{node_label(node)}: shape operations are only supported at the output")
            self.shaped = True
            return node.output[0]
        if self.shaped and not (op in ("Sub", "Add", "Mul", "Div") and self.layers[-1][0].shape[1] == 1):
            raise UnsupportedModelError(f"{node_label(node)} follows a shape operation; only the output may be "
                                        "reshaped")
        if op in ("Gemm", "MatMul"):
            return self.dense(node, cursor)
        if op in SIMPLE_ACTIVATIONS or op == "Gelu":
            self.add_activation(node, self.simple_activation(node))
            return node.output[0]
        if op in ("Sub", "Add", "Mul", "Div") and not self.layers:
            self.normalisation(node, cursor)
            return node.output[0]
        if op in ("Sub", "Add", "Mul", "Div") and len(self.activations) == len(self.layers) - 1:
            self.fold_into_layer(node, cursor)
            return node.output[0]
        raise UnsupportedModelError(f"unsupported {node_label(node)} ({op} is not part of an MLP this sidecar trains)")

    def flattens_the_input(self, node: onnx.NodeProto) -> bool:
        """Whether `node` is a Flatten from axis 1 of the graph's input, declared of rank 2: a no-op."""
        source = next((i.type.tensor_type for i in self.graph.input if i.name == node.input[0]), None)
        return (node.op_type == "Flatten" and attributes(node).get("axis", 1) == 1 and source is not None
                and source.HasField("shape") and len(source.shape.dim) == 2)

    def skip_shape_arithmetic(self, users: list[onnx.NodeProto]) -> list[onnx.NodeProto]:
        """Drop the Shape -> Slice/Concat/... nodes that only feed a Reshape its target shape."""
        frontier = [n for n in users if n.op_type == "Shape"]
        plumbing = {}  # by id: a node that two paths reach is walked once (else the walk grows with their number)
        while frontier:
            node = frontier.pop()
            if id(node) in plumbing:
                continue
            if node.op_type not in SHAPE_ARITHMETIC:
                return users
            plumbing[id(node)] = node
            for out in node.output:
                frontier += [n for n in self.consumers[out] if not (n.op_type == "Reshape" and n.input[1] == out)]
        self.visited.update(plumbing)
        return [n for n in users if n.op_type != "Shape"]

    # -- dense layers

    def dense(self, node: onnx.NodeProto, cursor: str) -> str:
        if node.input[0] != cursor:
            raise UnsupportedModelError(f"{node_label(node)}: the features must be its first operand")
        if len(self.layers) > len(self.activations):
            raise UnsupportedModelError(f"{node_label(node)}: two dense layers without an activation between them")
        if node.op_type == "Gemm":
            attrs = attributes(node)
            if attrs.get("transA", 0):
                raise UnsupportedModelError(f"{node_label(node)}: transA=1 is not supported")
            w = self.weight(node, 1)
            w = (w.T if attrs.get("transB", 0) else w) * attrs.get("alpha", 1.0)
            b = self.weight(node, 2) * attrs.get("beta", 1.0) if len(node.input) > 2 and node.input[2] else 0.0
            out = node.output[0]
        else:
            w, b, out = self.weight(node, 1), 0.0, node.output[0]
            bias_nodes = self.consumers[out]
            if len(bias_nodes) == 1 and bias_nodes[0].op_type == "Add":
                add = bias_nodes[0]
                other = [n for n in add.input if n != out]
                if len(other) == 1 and other[0] in self.constants:
                    self.visited.add(id(add))
                    b, out = self.constant(other[0], add), add.output[0]
        if w.ndim != 2:
            raise UnsupportedModelError(f"{node_label(node)}: weight has shape {w.shape}, expected 2-D")
        if not broadcasts_over_rows(b):
            raise UnsupportedModelError(f"{node_label(node)}: bias of shape {np.shape(b)} does not add the same "
                                        "to every sample")
        if np.size(b) not in (1, w.shape[1]):
            raise UnsupportedModelError(f"{node_label(node)}: bias of shape {np.shape(b)} is not one value for each "
                                        f"of its {w.shape[1]} units")
        b = np.broadcast_to(np.asarray(b, np.float64).reshape(-1) if np.ndim(b) else b, (w.shape[1],))
        if self.layers and self.layers[-1][0].shape[1] != w.shape[0]:
            raise UnsupportedModelError(f"{node_label(node)} takes {w.shape[0]} inputs but the layer before "
                                        f"gives {self.layers[-1][0].shape[1]}")
        if not self.layers and np.size(self.shift) not in (1, w.shape[0]):  # the shift has every constant's size
            raise UnsupportedModelError(f"{node_label(node)} takes {w.shape[0]} features but the normalisation "
                                        f"before it has {np.size(self.shift)} values")
        self.layers.append((w, b.copy()))
        return out

    def weight(self, node: onnx.NodeProto, index: int) -> np.ndarray:
        if index >= len(node.input) or node.input[index] not in self.constants:
            raise UnsupportedModelError(f"{node_label(node)}: operand {index} must be a constant weight")
        return self.constant(node.input[index], node)

    def constant(self, name: str, node: onnx.NodeProto) -> np.ndarray:
        tensor = self.constants[name]
        if tensor.data_location == TensorProto.EXTERNAL and not tensor.raw_data:
            raise UnsupportedModelError(f"{node_label(node)}: the external data of {name!r} was not loaded")
        value = numpy_helper.to_array(tensor)
        if value.dtype.name not in FLOAT_DTYPES:
            raise UnsupportedModelError(f"{node_label(node)}: {name!r} holds {value.dtype} values, not floats")
        return value.astype(np.float64)

    def fold_into_layer(self, node: onnx.NodeProto, cursor: str) -> None:
        """A dense layer's outputs times, over, plus or minus constants, one per unit or one for all (a regressor's
        de-standardisation, net(x) * y_std + y_mean, or net(x).squeeze(-1) * y_std + y_mean after the output's
        shape operation, which leaves one value a sample): folded into that layer, in float64."""
        w, b = self.layers[-1]
        c = self.applied_constant(node, cursor, "h", "after a dense layer", "unit of the layer before")
        if c.size not in (1, w.shape[1]) or (self.shaped and c.size != 1):
            raise UnsupportedModelError(f"{node_label(node)}: constant of shape {c.shape} is not one value per unit "
                                        "of the layer before")
        c = np.broadcast_to(c.reshape(-1), (w.shape[1],))
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):  # the reader's caller judges the weights
            if node.op_type == "Mul":
                w, b = w * c, b * c
            elif node.op_type == "Div":
                w, b = w / c, b / c
            else:
                b = b + c if node.op_type == "Add" else b - c
        self.layers[-1] = (w, b)

    # -- activations

    def simple_activation(self, node: onnx.NodeProto) -> Activation:
        attrs = attributes(node)
        if node.op_type == "Gelu":
            if attrs.get("approximate", b"none") != b"none":  # a string attribute reads as bytes
                raise UnsupportedModelError(f"{node_label(node)}: only the exact (erf) GELU is supported")
            return Activation("gelu")
        if node.op_type == "LeakyRelu":
            return Activation("leaky_relu", float(attrs.get("alpha", LEAKY_RELU_SLOPE)))
        return Activation(SIMPLE_ACTIVATIONS[node.op_type])

    def add_activation(self, node: onnx.NodeProto, act: Activation) -> None:
        if len(self.activations) != len(self.layers) - 1:
            raise UnsupportedModelError(f"{node_label(node)}: an activation must follow a dense layer")
        self.activations.append(act)

    def gelu_decomposition(self, x: str, users: list[onnx.NodeProto]) -> str:
        """x * 0.5 * (1 + erf(x / sqrt 2)): Div, Erf, Add, then two Muls in any grouping."""
        div = next((n for n in users if n.op_type == "Div" and n.input[0] == x), None)
        if div is None or len(users) != 2 or not self.is_constant(div.input[1], math.sqrt(2.0)):
            raise UnsupportedModelError(f"{node_label(users[1])}: the value {x!r} branches, and not as exact GELU does")
        erf = self.only_consumer(div.output[0], "Erf", users[1])
        add = self.only_consumer(erf.output[0], "Add", erf)
        if not any(self.is_constant(n, 1.0) for n in add.input if n != erf.output[0]):
            raise UnsupportedModelError(f"{node_label(add)}: expected erf(...) + 1 of exact GELU")
        # x, (1 + erf) and 0.5 are multiplied by two Muls, in any grouping.
        mul_x = next(n for n in users if n is not div)
        mul_a = self.only_consumer(add.output[0], "Mul", add)
        muls = [mul_x, mul_a] if mul_x is not mul_a else [mul_x, self.only_consumer(mul_x.output[0], "Mul", mul_x)]
        inner, outer = muls if muls[0].output[0] in muls[1].input else muls[::-1]
        operands = [n for n in (*inner.input, *outer.input) if n != inner.output[0]]
        factors = sorted((x, add.output[0]))
        halves = [n for n in operands if n not in factors]
        if mul_x.op_type != "Mul" or inner.output[0] not in outer.input \
                or sorted(n for n in operands if n in factors) != factors \
                or len(halves) != 1 or not self.is_constant(halves[0], 0.5):
            raise UnsupportedModelError(f"{node_label(outer)}: expected x * 0.5 * (1 + erf(x / sqrt 2))")
        self.visited.update(id(n) for n in (div, erf, add, inner, outer))
        self.add_activation(outer, Activation("gelu"))
        return outer.output[0]

    def only_consumer(self, name: str, op_type: str, after: onnx.NodeProto) -> onnx.NodeProto:
        users = self.consumers[name]
        if len(users) != 1 or users[0].op_type != op_type:
            raise UnsupportedModelError(f"{node_label(after)}: expected it to feed one {op_type}, as in exact GELU")
        return users[0]

    def is_constant(self, name: str, value: float) -> bool:
        if name not in self.constants:
            return False
        array = numpy_helper.to_array(self.constants[name])
        return array.size == 1 and abs(float(array.reshape(-1)[0]) - value) <= 1e-6 * abs(value)

    # -- input normalisation, folded into the first layer

    def normalisation(self, node: onnx.NodeProto, cursor: str) -> None:
        c = self.applied_constant(node, cursor, "x", "before the first layer", "feature")
        if c.ndim > 1:  # one row: one value per feature, or one for all of them
            c = c.reshape(-1)
        if c.size != 1 and np.size(self.shift) not in (1, c.size):
            raise UnsupportedModelError(f"{node_label(node)}: constant of shape {c.shape} is not one value per "
                                        f"feature, as the {np.size(self.shift)} before it are")
        self.normalised = True
        if node.op_type == "Sub":
            self.shift = self.shift - c
        elif node.op_type == "Add":
            self.shift = self.shift + c
        elif node.op_type == "Mul":
            self.scale, self.shift = self.scale * c, self.shift * c
        else:
            self.scale, self.shift = self.scale / c, self.shift / c

    def applied_constant(self, node: onnx.NodeProto, cursor: str, value: str, where: str, per: str) -> np.ndarray:
        """The constant c of `node`, a Sub, Div, Mul or Add of the chain's value (`cursor`, named `value` in errors)
        by it, the same for every sample (one value per `per`, or one for all)."""
        others = [n for n in node.input if n != cursor]
        if len(others) != 1 or others[0] not in self.constants or (
                node.op_type in ("Sub", "Div") and node.input[0] != cursor):
            raise UnsupportedModelError(f"unsupported {node_label(node)}: {where}, only {value} - c, {value} / c, "
                                        f"{value} * c and {value} + c by constants are supported")
        c = self.constant(others[0], node)
        if not broadcasts_over_rows(c):
            raise UnsupportedModelError(f"{node_label(node)}: constant of shape {c.shape} is not one value per "
                                        f"{per}, the same for every sample")
        return c

    def read_normalisation(self) -> tuple[np.ndarray, np.ndarray] | None:
        """The scale and shift, one per feature, in float64; None without a normalisation."""
        if not self.normalised:
            return None
        n = self.layers[0][0].shape[0]
        return tuple(np.broadcast_to(np.asarray(a, np.float64), (n,)).copy() for a in (self.scale, self.shift))

    def fold_normalisation(self) -> list[Layer]:
        """(x * s + t) @ W + b == x @ (s[:, None] * W) + (t @ W + b), computed in float64."""
        w, b = self.layers[0]
        n = w.shape[0]
        scale = np.broadcast_to(np.asarray(self.scale, np.float64), (n,))
        shift = np.broadcast_to(np.asarray(self.shift, np.float64), (n,))
        with np.errstate(over="ignore", invalid="ignore"):  # weights not finite stay so: the reader's caller judges
            layers = [(scale[:, None] * w, shift @ w + b)] + self.layers[1:]
        return [(np.ascontiguousarray(w, np.float32), np.asarray(b, np.float32)) for w, b in layers]


def broadcasts_over_rows(value: np.ndarray | float) -> bool:
    """Whether `value` is the same for every row of a (batch, n) operand: a scalar, a vector, or one row; an (n, 1)
    constant would broadcast along the batch, which only a batch of n can run."""
    return np.ndim(value) <= 1 or (np.ndim(value) == 2 and np.shape(value)[0] == 1)


def constant_tensor(node: onnx.NodeProto) -> TensorProto:
    attrs = attributes(node)
    if "value" in attrs:
        tensor = attrs["value"]
    elif "value_float" in attrs or "value_floats" in attrs:
        tensor = numpy_helper.from_array(np.array(attrs.get("value_float", attrs.get("value_floats")), np.float32))
    else:
        raise UnsupportedModelError(f"{node_label(node)}: only tensor and float constants are supported")
    tensor = TensorProto.FromString(tensor.SerializeToString())
    tensor.name = node.output[0]
    return tensor


def attributes(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}
