"""Weight arrays <-> ONNX graphs for the VMAFX sidecar's MLP regressor.

The checkpoint graph is a chain of dense layers with ReLU between them:

    features [batch, n_features] -> Gemm -> Relu -> ... -> Gemm -> score [batch, 1]

Weights are stored the way the sidecar multiplies them, W of shape (in, out) so
that a layer computes x @ W + b; Gemm's default transB=0 then needs no transpose.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
# IR 8 is what opset 17 shipped with; older onnxruntime builds on the nodes refuse newer IRs.
IR_VERSION = 8
INPUT_NAME = "features"
OUTPUT_NAME = "score"

Layer = tuple[np.ndarray, np.ndarray]  # (W (in, out), b (out,))


class UnsupportedModelError(ValueError):
    """The ONNX file is valid but is not a graph this sidecar knows how to train."""


# ---- export: weight arrays -> ModelProto ----

def build_mlp_model(layers: list[Layer], metadata: dict[str, str]) -> onnx.ModelProto:
    """Build the checkpoint graph for `layers`, with `metadata` as metadata_props."""
    n_features = layers[0][0].shape[0]
    nodes, initializers = [], []
    hidden = INPUT_NAME
    for i, (w, b) in enumerate(layers):
        last = i == len(layers) - 1
        initializers.append(numpy_helper.from_array(np.asarray(w, np.float32), f"W{i}"))
        initializers.append(numpy_helper.from_array(np.asarray(b, np.float32), f"b{i}"))
        dense = OUTPUT_NAME if last else f"dense{i}"
        nodes.append(helper.make_node("Gemm", [hidden, f"W{i}", f"b{i}"], [dense], name=f"gemm{i}"))
        if not last:
            hidden = f"relu{i}"
            nodes.append(helper.make_node("Relu", [dense], [hidden], name=hidden))
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


# ---- import: ModelProto -> weight arrays ----

def read_mlp_model(model: onnx.ModelProto) -> list[Layer]:
    """Recover the dense layers of a Gemm/Relu chain such as build_mlp_model writes.

    Raises UnsupportedModelError, naming the node, for anything else.
    """
    graph = model.graph
    weights = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    inputs = [i.name for i in graph.input if i.name not in weights]
    if len(inputs) != 1 or len(graph.output) != 1:
        raise UnsupportedModelError(
            f"expected one input and one output, got inputs {inputs} and "
            f"{len(graph.output)} outputs")
    layers: list[Layer] = []
    hidden = inputs[0]
    expect_dense = True
    for node in graph.node:
        if hidden not in node.input:
            raise UnsupportedModelError(f"node {node.name or node.op_type!r} is not part of a single chain")
        if expect_dense and node.op_type == "Gemm":
            layers.append(_gemm_layer(node, weights))
        elif not expect_dense and node.op_type == "Relu":
            pass
        else:
            raise UnsupportedModelError(
                f"unsupported node {node.op_type} ({node.name!r}); expected "
                f"{'Gemm' if expect_dense else 'Relu'}")
        hidden = node.output[0]
        expect_dense = not expect_dense
    if not layers or expect_dense or hidden != graph.output[0].name:
        raise UnsupportedModelError("graph must end with a Gemm layer that produces the output")
    for i in range(1, len(layers)):
        if layers[i][0].shape[0] != layers[i - 1][0].shape[1]:
            raise UnsupportedModelError(
                f"layer {i} takes {layers[i][0].shape[0]} inputs but layer {i - 1} "
                f"gives {layers[i - 1][0].shape[1]}")
    if layers[-1][0].shape[1] != 1:
        raise UnsupportedModelError(f"output layer has {layers[-1][0].shape[1]} units, expected 1")
    return layers


def _gemm_layer(node: onnx.NodeProto, weights: dict[str, np.ndarray]) -> Layer:
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if attrs.get("transA", 0) != 0 or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
        raise UnsupportedModelError(f"Gemm {node.name!r}: only alpha=1, beta=1, transA=0 are supported")
    if len(node.input) != 3 or node.input[1] not in weights or node.input[2] not in weights:
        raise UnsupportedModelError(f"Gemm {node.name!r}: weight and bias must be initializers")
    w = weights[node.input[1]].astype(np.float32)
    if attrs.get("transB", 0):
        w = w.T
    b = weights[node.input[2]].astype(np.float32).reshape(-1)
    if w.ndim != 2 or b.shape != (w.shape[1],):
        raise UnsupportedModelError(f"Gemm {node.name!r}: weight {w.shape} and bias {b.shape} do not match")
    return np.ascontiguousarray(w), b
