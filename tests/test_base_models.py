"""Base models in the formats people have: torch-exported ONNX, torch.save state-dicts, .npz.

The fixtures under tests/fixtures/ were generated once with PyTorch by make_fixtures.py (see its
docstring); torch is not needed to run these tests.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
import sys
import time
import tracemalloc
import zipfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import vmafx_onnx_builder as builder
import vmafx_sidecar as vs
from conftest import ROOT, UNGATED, sample

FIXTURES = Path(__file__).resolve().parent / "fixtures"
MANIFEST = json.loads((FIXTURES / "manifest.json").read_text()) if (FIXTURES / "manifest.json").exists() else []
LOADABLE = [f for f in MANIFEST if f["expect"] == "load"]
REFUSED = [f for f in MANIFEST if f["expect"] == "refuse"]


def config_for(fixture: dict, tmp_path: Path, **settings) -> vs.Config:
    activation = fixture["activations"][0].split(":")[0] if fixture["activations"] else "relu"
    return vs.Config(base_model_path=str(FIXTURES / fixture["file"]), n_features=fixture["n_features"],
                     checkpoint_dir=str(tmp_path / "ckpt"), activation=activation, **settings)


def ort_scores(path: Path, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x})
    return out.reshape(len(x))


def relative_change(got: np.ndarray, before: np.ndarray) -> float:
    """The largest change of an output, relative to the outputs' scale (at least 1)."""
    return float(np.abs(got - before).max()) / max(1.0, float(np.abs(before).max()))


def assert_close(got: np.ndarray, want: np.ndarray) -> None:
    """<= 1e-5 relative, with an absolute floor for outputs near zero."""
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * max(1.0, float(np.abs(want).max())))


# ---- every fixture that must load: same outputs as the original, before and after export ----

@pytest.mark.parametrize("fixture", LOADABLE, ids=[f["name"] for f in LOADABLE])
def test_loaded_model_reproduces_the_original_and_exports_faithfully(fixture, tmp_path):
    io_arrays = np.load(FIXTURES / f"{fixture['name']}.io.npz")
    x, y = io_arrays["x"], io_arrays["y"]
    # The steps below must move the outputs by far more than float32 rounding could, or the test would
    # compare the checkpoint with the base again: a large step, no warmup, an EMA that follows the weights.
    config = config_for(fixture, tmp_path, lr=0.01, warmup_steps=0, ema_decay=0.5)
    model = vs.MLP.from_weights(vs.load_base_model(config))
    assert [str(a) for a in model.activations] == [a.replace(":", "(") + ")" if ":" in a else a
                                                   for a in fixture["activations"]] or not fixture["activations"]
    assert_close(model.forward(x)[:, 0], y)

    # The first checkpoint, written before any step, gives the same outputs through onnxruntime, whether the
    # trainer took the base's input normalisation as its coordinates or not.
    trainer, _ = vs.build_trainer(config)  # on this base model, as serve builds it
    rng = trainer.rng  # the samples below come from the generator of the trainer's replay draws
    first = vs.write_checkpoint(trainer.checkpoints, trainer.raw_weights(trainer.ema), 0, 0, UNGATED, x).path
    onnx.checker.check_model(onnx.load(str(first)), full_check=True)
    assert_close(ort_scores(first, x), y)

    # After training steps the exported checkpoint equals the numpy forward pass of the EMA weights.
    for _ in range(3 * trainer.n_new):
        trainer.add(rng.normal(0, 1, fixture["n_features"]).tolist(), float(rng.normal(50, 10)))
    assert trainer.steps == 3
    raw = trainer.raw_weights(trainer.ema)
    after = vs.write_checkpoint(trainer.checkpoints, raw, trainer.steps, trainer.samples_trained, UNGATED, x).path
    moved = relative_change(ort_scores(after, x), y)
    assert moved > 1e-3, f"{fixture['name']}: 3 steps moved the outputs by {moved:.2e} of their scale"
    assert_close(ort_scores(after, x), vs.MLP.from_weights(raw).forward(x)[:, 0])
    reread = vs.MLP.from_weights(builder.read_mlp_model(onnx.load(str(after))))
    assert reread.activations == model.activations


# ---- every fixture that must be refused: a clear error naming the culprit ----

@pytest.mark.parametrize("fixture", REFUSED, ids=[f["name"] for f in REFUSED])
def test_unsupported_models_are_refused_by_name(fixture, tmp_path):
    config = config_for(fixture, tmp_path)
    with pytest.raises(vs.StartupError) as error:
        vs.load_base_model(config)
    message = str(error.value)
    assert fixture["file"] in message
    for part in fixture["refuse_mentions"]:
        assert part in message, message


def test_refusal_exits_non_zero_without_a_traceback(tmp_path):
    fixture = next(f for f in REFUSED if "Conv" in f["refuse_mentions"])
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT), "VMAFX_SIDECAR_SOCKET": str(tmp_path / "s.sock"),
           "VMAFX_SIDECAR_CHECKPOINT_DIR": str(tmp_path / "ckpt"),
           "VMAFX_SIDECAR_N_FEATURES": str(fixture["n_features"]),
           "VMAFX_BASE_MODEL_PATH": str(FIXTURES / fixture["file"])}
    done = subprocess.run([sys.executable, "-m", "vmafx_sidecar", "serve"], env=env, capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "Conv" in done.stderr and fixture["file"] in done.stderr
    assert not (tmp_path / "s.sock").exists()


# ---- graphs the reader must refuse, not misread or loop on ----

def mlp_graph(nodes: list, initializers: dict[str, np.ndarray], opset: int = 17,
              domains: tuple = ()) -> onnx.ModelProto:
    """A 4-feature graph from x to y around the 8-unit layer W0, b0 and the output layer W1, b1 (torch's layout)."""
    rng = np.random.default_rng(0)
    weights = {"W0": rng.normal(size=(8, 4)), "b0": rng.normal(size=8), "W1": rng.normal(size=(1, 8)),
               "b1": rng.normal(size=1), **initializers}
    graph = onnx.helper.make_graph(
        nodes, "g", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 4])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", 1])],
        [onnx.numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in weights.items()])
    opsets = [onnx.helper.make_opsetid("", opset), *(onnx.helper.make_opsetid(d, 1) for d in domains)]
    return onnx.helper.make_model(graph, opset_imports=opsets, ir_version=8)


def gemm(x: str, w: str, b: str, out: str) -> onnx.NodeProto:
    return onnx.helper.make_node("Gemm", [x, w, b], [out], transB=1)


HIDDEN_TO_OUTPUT = gemm("a", "W1", "b1", "y")


@pytest.mark.parametrize("nodes, initializers, message", [
    ([onnx.helper.make_node("Identity", ["x"], ["a"]), onnx.helper.make_node("Identity", ["a"], ["x"])], {},
     "cycle"),
    ([gemm("x", "W0", "b0", "h"), onnx.helper.make_node("Relu", ["h"], ["x"]), HIDDEN_TO_OUTPUT], {}, "cycle"),
    ([gemm("x", "W0", "b0", "h"), onnx.helper.make_node("Relu", ["h"], ["a"], domain="my.ops"), HIDDEN_TO_OUTPUT],
     {}, "operator set 'my.ops'"),
    ([gemm("x", "W0", "column", "h"), onnx.helper.make_node("Relu", ["h"], ["a"]), HIDDEN_TO_OUTPUT],
     {"column": np.ones((8, 1))}, r"bias of shape \(8, 1\)"),
    ([onnx.helper.make_node("MatMul", ["x", "W0t"], ["m"]), onnx.helper.make_node("Add", ["m", "b3"], ["h"]),
      onnx.helper.make_node("Relu", ["h"], ["a"]), HIDDEN_TO_OUTPUT],
     {"W0t": np.ones((4, 8)), "b3": np.ones((1, 1, 8))}, r"bias of shape \(1, 1, 8\)"),
    ([onnx.helper.make_node("Sub", ["x", "c"], ["s"]), gemm("s", "W0", "b0", "h"),
      onnx.helper.make_node("Relu", ["h"], ["a"]), HIDDEN_TO_OUTPUT],
     {"c": np.ones((4, 1))}, r"constant of shape \(4, 1\)"),
], ids=["identity-cycle", "layer-cycle", "custom-domain", "bias-per-row", "bias-3d", "normalisation-per-row"])
def test_the_reader_refuses_graphs_it_cannot_read_as_onnxruntime_runs_them(nodes, initializers, message):
    """A cycle used to loop for ever (the layer cycle growing memory); the others would be misread: run on a
    batch of any size as if they held one value per unit, where onnxruntime refuses them or adds per row."""
    domains = ("my.ops",) if "my.ops" in message else ()
    with pytest.raises(builder.UnsupportedModelError, match=message):
        builder.read_mlp_model(mlp_graph(nodes, initializers, domains=domains))


RELU = onnx.helper.make_node("Relu", ["h"], ["a"])


def assert_read_as_onnxruntime_runs_it(path: Path, model: onnx.ModelProto) -> None:
    """`model`, saved at `path`, reads as mlp_graph's 4-8-1 layers that score as onnxruntime scores the file."""
    onnx.save(model, path)
    weights = builder.read_mlp_model(onnx.load(path))
    assert weights.sizes() == [4, 8, 1]
    x = np.random.default_rng(2).normal(size=(16, 4)).astype(np.float32)
    assert_close(vs.MLP.from_weights(weights).forward(x).ravel(), ort_scores(path, x))


@pytest.mark.parametrize("nodes, initializers, message", [
    ([gemm("x", "W0", "b3", "h"), RELU, HIDDEN_TO_OUTPUT], {"b3": np.ones(3)},
     r"^Gemm node: bias of shape \(3,\) is not one value for each of its 8 units$"),
    ([onnx.helper.make_node("MatMul", ["x", "W0t"], ["m"]), onnx.helper.make_node("Add", ["m", "b3"], ["h"]), RELU,
      HIDDEN_TO_OUTPUT], {"W0t": np.ones((4, 8)), "b3": np.ones(3)},
     r"^MatMul node: bias of shape \(3,\) is not one value for each of its 8 units$"),
    ([onnx.helper.make_node("Sub", ["x", "c"], ["s"]), gemm("s", "W0", "b0", "h"), RELU, HIDDEN_TO_OUTPUT],
     {"c": np.ones(3)}, r"^Gemm node takes 4 features but the normalisation before it has 3 values$"),
    ([onnx.helper.make_node("Sub", ["x", "m"], ["s"]), onnx.helper.make_node("Div", ["s", "d"], ["t"]),
      gemm("t", "W0", "b0", "h"), RELU, HIDDEN_TO_OUTPUT], {"m": np.ones(4), "d": np.ones(3)},
     r"^Div node: constant of shape \(3,\) is not one value per feature, as the 4 before it are$"),
], ids=["gemm-bias", "matmul-add-bias", "normalisation", "normalisations"])
def test_a_constant_of_another_length_than_its_layer_is_refused_by_name(nodes, initializers, message):
    """Each ended in numpy's bare "operands could not be broadcast together", which the sidecar reported as a base
    model it "cannot read", not one it does not support, naming no node (the static-analysis hunt: 10 kinds of it
    over the fixtures with an initializer a value shorter or longer)."""
    with pytest.raises(builder.UnsupportedModelError, match=message):
        builder.read_mlp_model(mlp_graph(nodes, initializers))


@pytest.mark.parametrize("nodes, initializers", [
    ([gemm("x", "W0", "one", "h"), RELU, HIDDEN_TO_OUTPUT], {"one": np.array(0.25)}),
    ([gemm("x", "W0", "one", "h"), RELU, HIDDEN_TO_OUTPUT], {"one": np.array([0.25])}),
    ([onnx.helper.make_node("MatMul", ["x", "W0t"], ["m"]), onnx.helper.make_node("Add", ["m", "one"], ["h"]), RELU,
      HIDDEN_TO_OUTPUT], {"W0t": np.arange(32).reshape(4, 8) / 32, "one": np.array([-0.5])}),
], ids=["gemm-scalar", "gemm-one-value", "matmul-add-one-value"])
def test_a_bias_of_one_value_for_every_unit_is_read_as_onnxruntime_runs_it(tmp_path, nodes, initializers):
    """One value added to every unit broadcasts, as onnxruntime runs it: read as that value for each unit, never
    refused as a bias "not one value for each of its units" (the check of d825a0b allows size 1)."""
    assert_read_as_onnxruntime_runs_it(tmp_path / "one-value-bias.onnx", mlp_graph(nodes, initializers))


def test_a_leaky_relu_without_its_alpha_reads_as_the_slope_a_checkpoint_of_it_holds():
    """ONNX's LeakyRelu without an alpha attribute has the default 0.01, which a float attribute holds as float32's
    0.0099999998: read as that, a base model's slope is the one its checkpoints write and a restart reads back
    (1ed2e9a: at 0.01 in memory, a restarted sidecar's incumbent scored other figures than one never stopped)."""
    nodes = [gemm("x", "W0", "b0", "h"), onnx.helper.make_node("LeakyRelu", ["h"], ["a"]), HIDDEN_TO_OUTPUT]
    base = builder.read_mlp_model(mlp_graph(nodes, {}))
    assert base.activations == [builder.Activation("leaky_relu", builder.LEAKY_RELU_SLOPE)]
    published = builder.read_mlp_model(builder.build_mlp_model(base, {}))  # a checkpoint of it, read back
    assert published.activations == base.activations


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_only_the_exact_gelu_operator_is_read_as_gelu(approximate):
    """Opset 20's Gelu with approximate="tanh" computes another function than the exact GELU the sidecar trains."""
    model = mlp_graph([gemm("x", "W0", "b0", "h"), onnx.helper.make_node("Gelu", ["h"], ["a"], approximate=approximate),
                       HIDDEN_TO_OUTPUT], {}, opset=20)
    if approximate == "none":
        assert builder.read_mlp_model(model).activations == [builder.Activation("gelu")]
    else:
        with pytest.raises(builder.UnsupportedModelError, match=r"only the exact \(erf\) GELU is supported"):
            builder.read_mlp_model(model)


@pytest.mark.parametrize("constant, value, message", [
    ("sqrt2", 2.0, "not as exact GELU does"), ("one", 2.0, r"expected erf\(\.\.\.\) \+ 1"),
    ("half", 0.25, r"expected x \* 0\.5"),
])
def test_a_gelu_decomposition_with_another_constant_is_refused_not_read_as_gelu(constant, value, message):
    """x * 0.5 * (1 + erf(x / 2)) is not GELU: when the reader checked only that each constant held one value, it
    read such a graph as GELU and the model computed something else than its file (mutation hunt)."""
    rng = np.random.default_rng(0)
    weights = builder.MLPWeights([(rng.normal(size=(3, 4)).astype(np.float32), np.zeros(4, np.float32)),
                                  (rng.normal(size=(4, 1)).astype(np.float32), np.zeros(1, np.float32))],
                                 [builder.Activation("gelu")])
    model = builder.build_mlp_model(weights, {})
    assert builder.read_mlp_model(model).activations == [builder.Activation("gelu")]
    (tensor,) = [t for t in model.graph.initializer if t.name == constant]
    tensor.CopyFrom(onnx.numpy_helper.from_array(np.array(value, np.float32), constant))
    with pytest.raises(builder.UnsupportedModelError, match=message):
        builder.read_mlp_model(model)


@pytest.mark.parametrize("nodes, initializers", [
    ([gemm("x", "W0", "b0", "h"), onnx.helper.make_node("Relu", ["h"], ["a"]), gemm("a", "W1", "b1", "z"),
      onnx.helper.make_node("Mul", ["z", "y_std"], ["m"]), onnx.helper.make_node("Add", ["y_mean", "m"], ["y"])],
     {"y_std": np.array(18.0), "y_mean": np.array([62.5])}),
    ([gemm("x", "W0", "b0", "h"), onnx.helper.make_node("Div", ["h", "per_unit"], ["d"]),
      onnx.helper.make_node("Sub", ["d", "one"], ["s"]), onnx.helper.make_node("Relu", ["s"], ["a"]),
      gemm("a", "W1", "b1", "y")], {"per_unit": np.arange(1, 9).reshape(1, 8), "one": np.array(1.0)}),
], ids=["output-destandardised", "hidden-scaled-per-unit"])
def test_constants_applied_to_a_dense_layers_outputs_are_folded_into_it(tmp_path, nodes, initializers):
    """net(x) * y_std + y_mean, as both of torch's exporters write a regressor trained on standardized scores."""
    assert_read_as_onnxruntime_runs_it(tmp_path / "folded.onnx", mlp_graph(nodes, initializers))


@pytest.mark.parametrize("squeezed", [True, False], ids=["squeezed-first", "squeezed-last"])
def test_an_output_squeezed_before_its_destandardisation_is_folded_as_after_it(tmp_path, squeezed):
    """net(x).squeeze(-1) * y_std + y_mean, as torch exports a forward that squeezes first: refused, as an
    arithmetic node after a shape operation, where the same model squeezed last was read."""
    rng = np.random.default_rng(4)
    weights = {"W0": rng.normal(size=(8, 4)), "b0": rng.normal(size=8), "W1": rng.normal(size=(1, 8)),
               "b1": rng.normal(size=1), "y_std": np.array(12.5), "y_mean": np.array(60.0)}
    squeeze = onnx.helper.make_node("Squeeze", ["z" if squeezed else "a2"], ["s" if squeezed else "y"], axes=[1])
    arithmetic = [onnx.helper.make_node("Mul", ["s" if squeezed else "z", "y_std"], ["m"]),
                  onnx.helper.make_node("Add", ["m", "y_mean"], ["y" if squeezed else "a2"])]
    nodes = [gemm("x", "W0", "b0", "h"), onnx.helper.make_node("Relu", ["h"], ["a"]), gemm("a", "W1", "b1", "z"),
             *([squeeze, *arithmetic] if squeezed else [*arithmetic, squeeze])]
    graph = onnx.helper.make_graph(
        nodes, "g", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 4])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch"])],
        [onnx.numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in weights.items()])
    path = tmp_path / "squeezed.onnx"
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 11)], ir_version=8), path)
    read = builder.read_mlp_model(onnx.load(path))
    x = rng.normal(size=(16, 4)).astype(np.float32)
    assert read.sizes() == [4, 8, 1]
    assert_close(vs.MLP.from_weights(read).forward(x).ravel(), ort_scores(path, x))
    # Three values: one for each of three samples, not one for all, which no dense layer's weights can hold.
    graph.initializer[4].CopyFrom(onnx.numpy_helper.from_array(np.full(3, 12.5, np.float32), "y_std"))
    with pytest.raises(builder.UnsupportedModelError, match=r"constant of shape \(3,\)"):
        builder.read_mlp_model(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 11)],
                                                      ir_version=8))


def test_a_flatten_of_the_input_first_is_read_as_the_no_op_it_is(tmp_path):
    """nn.Sequential(nn.Flatten(), nn.Linear(...), ...), as torch's TorchScript exporter writes it: refused as a
    shape operation before the first layer."""
    path = tmp_path / "flatten_first.onnx"
    nodes = [onnx.helper.make_node("Flatten", ["x"], ["f"]), gemm("f", "W0", "b0", "h"),
             onnx.helper.make_node("Relu", ["h"], ["a"]), HIDDEN_TO_OUTPUT]
    onnx.save(mlp_graph(nodes, {}), path)
    x = np.random.default_rng(3).normal(size=(8, 4)).astype(np.float32)
    assert_close(vs.MLP.from_weights(builder.read_mlp_model(onnx.load(path))).forward(x).ravel(), ort_scores(path, x))
    with pytest.raises(builder.UnsupportedModelError, match="shape operations are only supported at the output"):
        nodes[0] = onnx.helper.make_node("Flatten", ["x"], ["f"], axis=0)  # all of a batch in one row
        builder.read_mlp_model(mlp_graph(nodes, {}))


@pytest.mark.parametrize("nodes, initializers, message", [
    ([gemm("x", "W0", "b0", "h"), onnx.helper.make_node("Relu", ["h"], ["a"]), gemm("a", "W1", "b1", "z"),
      onnx.helper.make_node("Sub", ["c", "z"], ["y"])], {"c": np.array(1.0)}, "only h - c, h / c"),
    ([gemm("x", "W0", "b0", "h"), onnx.helper.make_node("Mul", ["h", "three"], ["m"]),
      onnx.helper.make_node("Relu", ["m"], ["a"]), gemm("a", "W1", "b1", "y")], {"three": np.ones(3)},
     r"constant of shape \(3,\) is not one value per unit"),
    ([gemm("x", "W0", "b0", "h"), onnx.helper.make_node("Relu", ["h"], ["a"]),
      onnx.helper.make_node("Mul", ["a", "two"], ["m"]), gemm("m", "W1", "b1", "y")], {"two": np.array(2.0)},
     "Mul is not part of an MLP"),
], ids=["constant-minus-output", "wrong-size", "after-an-activation"])
def test_what_is_applied_to_a_dense_layers_outputs_and_cannot_be_folded_is_refused(nodes, initializers, message):
    with pytest.raises(builder.UnsupportedModelError, match=message):
        builder.read_mlp_model(mlp_graph(nodes, initializers))


def test_the_shape_arithmetic_before_an_output_reshape_is_read_once_however_many_paths_reach_it(tmp_path):
    """Shape -> (Concat(s, s) -> Slice) x 40 -> Reshape: a 3 KB graph onnxruntime runs at once, where the reader
    walked each of the 2**40 paths (4 s at 20 levels, its memory growing)."""
    node, levels = onnx.helper.make_node, 40
    nodes = [gemm("x", "W0", "b0", "h"), node("Relu", ["h"], ["a"]), gemm("a", "W1", "b1", "z"),
             node("Shape", ["z"], ["s0"])]
    for k in range(levels):
        nodes += [node("Concat", [f"s{k}", f"s{k}"], [f"c{k}"], axis=0),
                  node("Slice", [f"c{k}", "start", "end"], [f"s{k + 1}"])]
    nodes.append(node("Reshape", ["z", f"s{levels}"], ["y"]))
    model = mlp_graph(nodes, {})
    model.graph.initializer.extend([onnx.numpy_helper.from_array(np.array([v], np.int64), name)
                                    for name, v in (("start", 0), ("end", 2))])
    onnx.checker.check_model(model)
    path = tmp_path / "diamond.onnx"
    onnx.save(model, path)
    x = np.random.default_rng(1).normal(size=(3, 4)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    read = subprocess.run([sys.executable, "-c", "import sys, numpy as np, onnx, vmafx_sidecar as vs; "
                           "w = vs.onnx_builder.read_mlp_model(onnx.load(sys.argv[1])); "
                           "np.save(sys.argv[2], vs.MLP.from_weights(w).forward(np.load(sys.argv[3])))",
                           str(path), str(tmp_path / "y.npy"), str(tmp_path / "x.npy")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert read.returncode == 0, read.stderr
    assert_close(np.load(tmp_path / "y.npy").ravel(), ort_scores(path, x))


@pytest.mark.parametrize("nodes, opset, message", [
    ([gemm("x", "W0", "b0", "h"), onnx.helper.make_node("Relu", ["h"], ["x"]), HIDDEN_TO_OUTPUT], 17,
     "single static assignment"),
    ([gemm("x", "W0", "b0", "h"), onnx.helper.make_node("Gelu", ["h"], ["a"]), HIDDEN_TO_OUTPUT], 17,
     "No Op registered for Gelu"),
], ids=["cycle", "gelu-before-opset-20"])
def test_a_base_model_onnx_itself_finds_invalid_is_refused_in_one_line(tmp_path, nodes, opset, message):
    path = tmp_path / "base.onnx"
    onnx.save(mlp_graph(nodes, {}, opset), path)
    config = vs.Config(base_model_path=str(path), n_features=4, checkpoint_dir=str(tmp_path / "ckpt"))
    with pytest.raises(vs.StartupError, match=f"base model {path} is not a valid ONNX model: .*{message}") as error:
        vs.load_base_model(config)
    assert "\n" not in str(error.value)


# ---- state-dicts: the unpickler runs nothing it was not built for ----

def torch_like_archive(path: Path, payload: bytes) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("model/data.pkl", payload)
        archive.writestr("model/byteorder", "little")
        archive.writestr("model/version", "3\n")


class RunsACommand:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_malicious_state_dict_is_refused_without_running_its_payload(tmp_path):
    control, marker = tmp_path / "control-pwned", tmp_path / "pwned"
    # The payload is real: the standard unpickler, in a throwaway process, runs it.
    torch_like_archive(tmp_path / "control.pt", pickle.dumps({"0.weight": RunsACommand(control)}, protocol=2))
    subprocess.run([sys.executable, "-c", "import pickle, sys, zipfile; "
                    "pickle.loads(zipfile.ZipFile(sys.argv[1]).read('model/data.pkl'))",
                    str(tmp_path / "control.pt")], check=True, timeout=30)
    assert control.exists()

    path = tmp_path / "evil.pt"
    torch_like_archive(path, pickle.dumps({"0.weight": RunsACommand(marker)}, protocol=2))
    with pytest.raises(builder.UnsupportedModelError, match=r"posix\.system|os\.system"):
        vs.read_state_dict(str(path), vs.Activation("relu"))
    assert not marker.exists()


@pytest.mark.parametrize("payload", [
    pickle.dumps(eval, protocol=2),  # any global outside the allow-list
    b"\x80\x02cbuiltins\nexec\nq\x00.",  # a hand-written reference to exec
])
def test_state_dict_refuses_any_other_global(tmp_path, payload):
    path = tmp_path / "other.pt"
    torch_like_archive(path, payload)
    with pytest.raises(builder.UnsupportedModelError, match=r"(builtins?|__builtin__)\.(eval|exec)"):
        vs.read_state_dict(str(path), vs.Activation("relu"))


def test_a_state_dict_with_a_tensor_of_integers_is_refused_as_what_it_is(tmp_path):
    """A BatchNorm's num_batches_tracked is a torch.LongStorage: refused in words meant for a forged pickle."""
    path = tmp_path / "batchnorm.pt"
    torch_like_archive(path, b"\x80\x02}X\x16\x00\x00\x00bn.num_batches_trackedctorch\nLongStorage\ns.")
    with pytest.raises(builder.UnsupportedModelError, match=r"a tensor of torch\.LongStorage values \(a BatchNorm"):
        vs.read_state_dict(str(path), vs.Activation("relu"))


def test_tensor_reaching_past_its_storage_is_refused():
    storage = np.arange(6, dtype=np.float32)
    assert vs.rebuild_tensor(storage, 0, (2, 3), (3, 1)).tolist() == [[0, 1, 2], [3, 4, 5]]
    assert vs.rebuild_tensor(storage, 0, (3, 2), (1, 3)).tolist() == [[0, 3], [1, 4], [2, 5]]
    with pytest.raises(builder.UnsupportedModelError, match="past the end"):
        vs.rebuild_tensor(storage, 1, (2, 3), (3, 1))
    with pytest.raises(builder.UnsupportedModelError):
        vs.rebuild_tensor(storage, 0, (2, 3), (-3, 1))


def test_a_tensor_repeating_its_storage_is_refused_before_it_is_copied():
    """Stride 0 makes a few bytes of storage a tensor of any size: 644 bytes of file took 1.7 GB to refuse."""
    storage = np.ones(1, np.float32)
    with pytest.raises(builder.UnsupportedModelError, match="144000000 values repeats the 1 of its storage"):
        vs.rebuild_tensor(storage, 0, (12000, 12000), (0, 0))
    assert vs.rebuild_tensor(np.arange(8, dtype=np.float32), 2, (2, 3), (3, 1)).tolist() == [[2, 3, 4], [5, 6, 7]]


def shared_nesting_pickle(depth: int, builds: bytes, then: bytes) -> bytes:
    """PROTO 2, an empty dict, then x_0 = an empty container (`builds`: b")" a tuple, b"]" a list) and x_i = (x_{i-1},
    x_{i-1}) up to `depth`, each in the memo, as a few bytes each: x_depth reaches 2**depth items. Then `then`."""
    def memo(op: bytes, i: int) -> bytes:
        return op + i.to_bytes(4, "little")
    ops = b"\x80\x02}" + builds + memo(b"r", 0) + b"0"  # LONG_BINPUT, POP
    for i in range(1, depth + 1):
        pair = memo(b"j", i - 1) * 2  # LONG_BINGET twice
        ops += (pair + b"\x86" if builds == b")" else b"](" + pair + b"e") + memo(b"r", i) + b"0"  # TUPLE2 or APPENDS
    return ops + memo(b"j", depth) + then


@pytest.mark.parametrize("payload", [
    shared_nesting_pickle(60, b")", b"K\x01s."),  # SETITEM of x_60 as a key: hashed in 2**60 steps
    shared_nesting_pickle(60, b")", b"Q."),  # BINPERSID of x_60: an error message repeating it
    shared_nesting_pickle(40, b"]", b"Q."),  # the same of a list, which no tuple bound covers
    b"\x80\x02" + b"N0" * vs.MAX_PICKLE_OPS + b"}.",  # a bounded amount of work, but an unbounded one per byte
], ids=["a tuple key", "a tuple persistent id", "a list persistent id", "opcodes past the bound"])
def test_a_small_pickle_that_would_take_unbounded_work_to_read_is_refused_at_once(tmp_path, payload):
    """A few kilobytes of file hung the sidecar at start for ever, before any check of what the pickle built ran."""
    path = tmp_path / "small.pt"
    torch_like_archive(path, payload)
    started = time.monotonic()
    with pytest.raises(builder.UnsupportedModelError, match="over 4096 items|persistent id|over 1048576 opcodes"):
        vs.read_state_dict(str(path), vs.Activation("relu"))
    assert time.monotonic() - started < 30  # seconds, where it was years


def test_tensor_layouts_past_int64_are_refused_before_any_arithmetic():
    """A size and stride of 32-Mbit integers (4 MB of pickle): each product in the bounds check took ~16 s."""
    huge = 1 << 32_000_000
    with pytest.raises(builder.UnsupportedModelError, match="malformed tensor"):
        vs.rebuild_tensor(np.ones(4, np.float32), 0, (huge, huge), (huge, huge))


def build_on_a_storage_type_pickle() -> bytes:
    """A state-dict pickle of only the globals the unpickler allows, which also applies BUILD (__setstate__) to the
    object torch.BFloat16Storage gave it, after reading a 4-value storage with it: when that was the module's own
    dtype, its item size became 2**30 bytes, and the tensor's copy read far past its 8-byte buffer (SIGSEGV)."""
    def text(value: str) -> bytes:
        return pickle.BINUNICODE + len(value).to_bytes(4, "little") + value.encode()
    ops = b"\x80\x02}" + text("0.weight")  # PROTO 2, the state-dict, its key
    ops += b"(" + text("storage") + b"ctorch\nBFloat16Storage\nq\x01" + text("0") + text("cpu")
    ops += b"K\x04tQq\x020"  # numel 4, TUPLE, BINPERSID, BINPUT 2, POP
    # BUILD on memo 1, the storage type: numpy's dtype state (3, '|', None, names, fields, elsize, 1, 0)
    ops += b"h\x01(K\x03" + text("|") + b"N" + text("bfloat16") + b"\x85}" + text("bfloat16")
    ops += b"ctorch\nHalfStorage\nK\x00\x86sJ" + (1 << 30).to_bytes(4, "little") + b"K\x01K\x00tb0"
    # _rebuild_tensor_v2(storage, 0, (1, 4), (4, 1), False, OrderedDict())
    ops += b"ctorch._utils\n_rebuild_tensor_v2\n(h\x02K\x00K\x01K\x04\x86K\x04K\x01\x86\x89"
    return ops + b"ccollections\nOrderedDict\n)RtRs."


def test_a_pickle_that_changes_a_global_it_was_given_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch_like_archive(path, build_on_a_storage_type_pickle())
    with zipfile.ZipFile(path, "a") as archive:
        archive.writestr("model/data/0", b"\x80\x3f" * 4)  # four bfloat16 1.0
    config = vs.Config(base_model_path=str(path), n_features=4, checkpoint_dir=str(tmp_path / "ckpt"))
    done = subprocess.run([sys.executable, "-c", "import sys, vmafx_sidecar as vs; vs.load_base_model(vs.Config("
                           f"base_model_path={str(path)!r}, n_features=4, checkpoint_dir={config.checkpoint_dir!r}))"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)  # a crash must not take pytest down
    assert done.returncode == 1, (done.returncode, done.stderr)  # not -11, SIGSEGV
    assert "sets the state of a storage type" in done.stderr.splitlines()[-1]
    assert vs.STORAGE_DTYPES["BFloat16Storage"].itemsize == 2


def inflated(path: Path, source: Path, member_suffix: str, extra_zeros: int) -> None:
    """`source`'s archive, with `extra_zeros` zero bytes after the member ending in member_suffix: a few hundred
    kilobytes of file, as deflate takes them."""
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as out:
        for info in src.infolist():
            data = src.read(info.filename)
            if not info.filename.endswith(member_suffix):
                out.writestr(info.filename, data)
                continue
            padded = zipfile.ZipInfo(info.filename)
            padded.compress_type = zipfile.ZIP_DEFLATED
            with out.open(padded, "w", force_zip64=True) as member:
                member.write(data)
                for _ in range(extra_zeros >> 20):
                    member.write(bytes(1 << 20))


def peak_bytes(read: Callable[[], Any]) -> tuple[Any, int]:
    """read()'s result, and the most memory Python and numpy held at once meanwhile."""
    tracemalloc.start()
    try:
        return read(), tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_storage_member_inflating_past_its_tensors_is_read_only_as_far_as_they_need(tmp_path):
    """A 1 MB .pt whose first storage inflated to 1 GiB took 2.1 GB of memory to load."""
    source, path = FIXTURES / "sd_seq_relu_f32.pt", tmp_path / "padded.pt"
    inflated(path, source, "/data/0", 128 << 20)
    assert path.stat().st_size < 1 << 20
    weights, peak = peak_bytes(lambda: vs.read_state_dict(str(path), vs.Activation("relu")))
    assert peak < 16 << 20, peak  # what it holds is kilobytes; the member's 128 MiB never is
    for (w, b), (w0, b0) in zip(weights.layers, vs.read_state_dict(str(source), vs.Activation("relu")).layers):
        np.testing.assert_array_equal(w, w0)
        np.testing.assert_array_equal(b, b0)


def views_of_one_storage(path: Path, storage: np.ndarray, views: list[tuple[int, tuple, tuple]],
                         numel: int | None = None) -> None:
    """A torch.save archive of the state-dict {"0.weight": view 0, "1.weight": view 1, ...}, each view (offset,
    size, stride) of the one float32 storage (which claims `numel` values), its pickle written by hand."""
    def text(value: str) -> bytes:
        return pickle.BINUNICODE + len(value).to_bytes(4, "little") + value.encode()

    def ints(values: tuple) -> bytes:
        return b"(" + b"".join(b"J" + v.to_bytes(4, "little", signed=True) for v in values) + b"t"

    numel = len(storage) if numel is None else numel
    ops = b"\x80\x02}("
    for i, (offset, size, stride) in enumerate(views):
        ops += text(f"{i}.weight") + b"ctorch._utils\n_rebuild_tensor_v2\n("
        ops += (b"(" + text("storage") + b"ctorch\nFloatStorage\n" + text("0") + text("cpu") + ints((numel,))[1:-1]
                + b"tQq\x01") if i == 0 else b"h\x01"  # the storage, then its memo entry
        ops += ints((offset,))[1:-1] + ints(size) + ints(stride) + b"\x89ccollections\nOrderedDict\n)RtR"
    torch_like_archive(path, ops + b"u.")
    with zipfile.ZipFile(path, "a") as archive:
        archive.writestr("model/data/0", storage.tobytes())


def test_tensors_past_the_bytes_a_small_mlp_holds_are_refused_as_they_are_read(tmp_path, monkeypatch):
    """Tensors may share a storage, so each copy counts: 4 MB of file, 100 views of one 1M-value storage, took
    825 MB."""
    storage = np.random.default_rng(0).normal(size=400).astype(np.float32)
    path = tmp_path / "one.pt"
    views_of_one_storage(path, storage, [(0, (1, 400), (400, 1))])  # a 400-feature linear model
    weights = vs.read_state_dict(str(path), vs.Activation("relu"))
    np.testing.assert_array_equal(weights.layers[0][0].ravel(), storage)

    monkeypatch.setattr(vs, "MAX_BASE_MODEL_BYTES", 12_000)
    views_of_one_storage(path, storage, [(0, (1, 400), (400, 1))] * 10)  # 1 600 bytes read, 16 000 copied
    with pytest.raises(builder.UnsupportedModelError, match="more than 12000 bytes: not the weights of a small MLP"):
        vs.read_state_dict(str(path), vs.Activation("relu"))


def test_a_storage_claiming_more_bytes_than_a_small_mlp_holds_is_refused_unread(tmp_path):
    path = tmp_path / "claims.pt"
    views_of_one_storage(path, np.ones(4, np.float32), [(0, (1, 4), (4, 1))], numel=vs.MAX_BASE_MODEL_BYTES // 4 + 1)
    with pytest.raises(builder.UnsupportedModelError, match=f"more than {vs.MAX_BASE_MODEL_BYTES} bytes"):
        vs.read_state_dict(str(path), vs.Activation("relu"))


def npy(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.lib.format.write_array(out, array)
    return out.getvalue()


@pytest.mark.parametrize("members, message", [
    ({"W0.npy": np.ones((1, 4), np.float32), "W0": np.zeros((4096, 4096), np.float32)},
     "it holds both W0 and W0.npy"),  # numpy 2.4 loads W0, whose size no header of W0.npy tells
    ({"W0.npy": np.ones((1, 4), np.float32), "activation.npy": np.array(["relu" * 65536] * 64)},
     "more than 67108864 bytes"),  # 64 strings of a megabyte: few values, many bytes
], ids=["two-members-one-name", "wide-strings"])
def test_an_npz_whose_arrays_numpy_would_allocate_past_the_bound_is_refused_first(tmp_path, members, message):
    path = tmp_path / "crafted.npz"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, array in members.items():
            archive.writestr(name, npy(array))
    with pytest.raises(builder.UnsupportedModelError, match=message):
        vs.read_npz(str(path), vs.Activation("relu"))


def test_an_npz_header_with_a_negative_dimension_is_refused(tmp_path):
    """math.prod of (-2**26,) had credited the bound with 2**26 values, and a 16M-value b0 was allocated."""
    path = tmp_path / "negative.npz"
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (-(1 << 26),)})
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("W0.npy", npy(np.ones((1, 4), np.float32)))
        archive.writestr("b0.npy", header.getvalue())
    with pytest.raises(builder.UnsupportedModelError, match=r"b0 has the shape \(-67108864,\)"):
        vs.read_npz(str(path), vs.Activation("relu"))


def test_a_byteorder_member_that_inflates_is_refused_unread(tmp_path):
    path = tmp_path / "byteorder.pt"
    inflated(path, FIXTURES / "sd_seq_relu_f32.pt", "/byteorder", 64 << 20)
    tracemalloc.start()
    try:
        with pytest.raises(builder.UnsupportedModelError, match="byteorder is not 'little'"):
            vs.read_state_dict(str(path), vs.Activation("relu"))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, peak  # 64 MiB of zeros after "little" had been read whole


def test_an_npz_array_whose_header_claims_more_bytes_than_a_small_mlp_holds_is_refused_unallocated(tmp_path):
    """An .npz of 1 MB whose W0.npy header says (16384, 16384) took 3.1 GB before its refusal."""
    path = tmp_path / "claims.npz"
    np.savez(path, W0=np.ones((1, 4), np.float32))
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (16384, 16384)})
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("W0.npy", header.getvalue() + bytes(1 << 20))  # a megabyte of the gigabyte claimed
    tracemalloc.start()
    try:
        with pytest.raises(builder.UnsupportedModelError, match=f"more than {vs.MAX_BASE_MODEL_BYTES} bytes"):
            vs.read_npz(str(path), vs.Activation("relu"))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, peak


# ---- .npz: W0, b0, ... in torch layout ----

def test_npz_layers_and_activation(tmp_path):
    rng = np.random.default_rng(0)
    w0, b0, w1, b1 = rng.normal(size=(5, 4)), rng.normal(size=5), rng.normal(size=(1, 5)), rng.normal(size=1)
    path = tmp_path / "hand.npz"
    np.savez(path, W0=w0, b0=b0, W1=w1, b1=b1, activation="tanh")
    weights = vs.read_npz(str(path), vs.Activation("relu"))
    assert weights.activations == [vs.Activation("tanh")]
    x = rng.normal(size=(3, 4)).astype(np.float32)
    expected = np.tanh(x @ w0.T + b0) @ w1.T + b1
    np.testing.assert_allclose(vs.MLP.from_weights(weights).forward(x), expected, rtol=1e-5)


@pytest.mark.parametrize("named, configured, slope", [
    ("leaky_relu(0.2)", "relu", 0.2), (None, "leaky_relu(0.2)", 0.2), ("leaky_relu", "leaky_relu(0.3)", 0.01),
    ("leaky_relu", "relu", 0.01)], ids=["named in the npz", "configured", "a bare name: torch's, not the setting's",
                                        "torch's default"])
def test_a_leaky_relu_slope_is_taken_as_named_where_the_file_holds_none(tmp_path, named, configured, slope):
    """A state-dict holds no slope, and VMAFX_SIDECAR_ACTIVATION took none: a LeakyReLU(0.2) model was trained and
    published as LeakyReLU(0.01), nothing said. The setting, and an .npz, now take it as the status writes it."""
    rng = np.random.default_rng(6)
    w0, b0, w1, b1 = rng.normal(size=(5, 4)), rng.normal(size=5), rng.normal(size=(1, 5)), rng.normal(size=1)
    path = tmp_path / "leaky.npz"
    np.savez(path, W0=w0, b0=b0, W1=w1, b1=b1, **({"activation": named} if named else {}))
    config = vs.Config(activation=configured)
    weights = vs.read_npz(str(path), builder.parse_activation(config.activation))
    [activation] = weights.activations
    assert activation.kind == "leaky_relu" and activation.alpha == pytest.approx(slope, rel=1e-7)  # in float32
    x = rng.normal(size=(3, 4)).astype(np.float32)
    h = x @ w0.T + b0
    np.testing.assert_allclose(vs.MLP.from_weights(weights).forward(x), np.where(h > 0, h, slope * h) @ w1.T + b1,
                               rtol=1e-5)


def test_a_slope_is_taken_in_float32_as_a_checkpoint_holds_it():
    """Else a slope of more digits than float32 holds named itself otherwise than the published model read back."""
    activation = builder.parse_activation("leaky_relu(0.3333335)")
    assert activation.alpha == float(np.float32(0.3333335))
    layers = [(np.ones((2, 3), np.float32), np.zeros(3, np.float32)), (np.ones((3, 1), np.float32),
                                                                        np.zeros(1, np.float32))]
    exported = builder.build_mlp_model(builder.MLPWeights(layers, [activation]), {})
    assert str(builder.read_mlp_model(exported).activations[0]) == str(activation)


@pytest.mark.parametrize("text", ["leaky_relu()", "leaky_relu(x)", "leaky_relu(nan)", "leaky_relu(1e39)",
                                  "leaky_relu(0.2", "Relu", "relu(0.2)"])
def test_an_activation_setting_no_model_computes_is_refused(text):
    with pytest.raises(ValueError, match="leaky_relu\\(SLOPE\\)"):
        builder.parse_activation(text)
    with pytest.raises(vs.ConfigError, match="VMAFX_SIDECAR_ACTIVATION"):
        vs.Config.load({"VMAFX_SIDECAR_ACTIVATION": text}, {})


@pytest.mark.parametrize("arrays,message", [
    ({"W0": np.ones((1, 4)), "bias": np.ones(1)}, "expected arrays W0, b0"),
    ({"W0": np.ones((3, 4)), "b0": np.ones(3), "W1": np.ones((1, 2)), "b1": np.ones(1)}, "W1 takes 2 inputs"),
    ({"W0": np.ones((2, 4), np.int32)}, "W0 holds int32"),
    ({"W0": np.ones((1, 4)), "b0": np.ones(1, np.int64)}, "the bias of W0 holds int64"),
    ({"W0": np.ones((1, 4)), "b0": np.array([1 + 5j])}, "the bias of W0 holds complex128"),
    ({"W0": np.ones((2, 4)), "b0": np.ones(2)}, "2 units, expected 1"),
    ({"W0": np.ones((1, 4)), "activation": np.array("swish")}, "activation 'swish'"),
])
def test_npz_refusals_name_the_array(tmp_path, arrays, message):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(builder.UnsupportedModelError, match=message):
        vs.read_npz(str(path), vs.Activation("relu"))


@pytest.mark.parametrize("bad", [np.nan, np.inf, 1e39], ids=["NaN", "infinite", "beyond float32"])
@pytest.mark.parametrize("kind", ["npz", "onnx"])
def test_a_base_model_with_weights_not_finite_in_float32_is_refused(tmp_path, bad, kind):
    """Loaded, it would make every step overflow: the sidecar would run and never train."""
    w0, b0 = np.full((3, 4), 0.5), np.zeros(3)
    w0[1, 2] = bad
    path = tmp_path / f"base.{kind}"
    if kind == "npz":
        np.savez(path, W0=w0, b0=b0, W1=np.ones((1, 3)), b1=np.zeros(1))
    else:
        with np.errstate(over="ignore"):
            w0 = w0.astype(np.float32)
        weights = builder.MLPWeights([(w0.T, b0.astype(np.float32)),
                                      (np.ones((3, 1), np.float32), np.zeros(1, np.float32))], [vs.Activation("relu")])
        onnx.save(builder.build_mlp_model(weights, {}), path)
    config = vs.Config(base_model_path=str(path), n_features=4, checkpoint_dir=str(tmp_path / "ckpt"))
    with pytest.raises(vs.StartupError, match=f"base model {path}: layer 0 has weights that are not finite"):
        vs.load_base_model(config)


@pytest.mark.parametrize("alpha", [np.nan, np.inf, 1e39], ids=["NaN", "infinite", "beyond float32"])
def test_a_base_model_whose_activation_slope_is_not_finite_in_float32_is_refused(tmp_path, alpha):
    """onnx's checker takes a LeakyRelu of any alpha: loaded, it made every step overflow, as a NaN weight does."""
    weights = builder.MLPWeights([(np.full((4, 3), 0.5, np.float32), np.zeros(3, np.float32)),
                                  (np.ones((3, 1), np.float32), np.zeros(1, np.float32))],
                                 [vs.Activation("leaky_relu", alpha)])
    path = tmp_path / "base.onnx"
    onnx.save(builder.build_mlp_model(weights, {}), path)
    config = vs.Config(base_model_path=str(path), n_features=4, checkpoint_dir=str(tmp_path / "ckpt"))
    with pytest.raises(vs.StartupError, match=r"its activation leaky_relu\(\S+\) has a slope that is not finite"):
        vs.load_base_model(config)


def test_a_base_model_with_a_layer_of_no_units_is_refused(tmp_path):
    """Its output a constant, it could never learn, and the gate refused every checkpoint of it for ever."""
    path = tmp_path / "base.npz"
    np.savez(path, W0=np.zeros((0, 4)), b0=np.zeros(0), W1=np.zeros((1, 0)), b1=np.array([50.0]))
    config = vs.Config(base_model_path=str(path), n_features=4, checkpoint_dir=str(tmp_path / "ckpt"))
    with pytest.raises(vs.StartupError, match=r"a layer of no units \(4-0-1\)"):
        vs.load_base_model(config)


def test_a_base_model_this_process_may_not_read_is_refused_not_replaced_by_a_fresh_one(tmp_path, monkeypatch):
    path = tmp_path / "locked" / "base.onnx"
    real_stat = os.stat

    def stat(target, *args, **kwargs):  # as a directory without search permission answers (root is not refused)
        if str(target) == str(path):
            raise PermissionError(13, "Permission denied", str(target))
        return real_stat(target, *args, **kwargs)
    monkeypatch.setattr(vs.os, "stat", stat)
    config = vs.Config(base_model_path=str(path), n_features=4, checkpoint_dir=str(tmp_path / "ckpt"))
    with pytest.raises(vs.StartupError, match=f"cannot read base model {path}: Permission denied"):
        vs.load_base_model(config)


# ---- end to end: a state-dict base fine-tuned through the socket ----

def test_state_dict_base_is_fine_tuned_through_the_socket(sidecar_factory, tmp_path):
    fixture = next(f for f in LOADABLE if f["kind"] == "state_dict" and set(f["activations"]) == {"relu"})
    io_arrays = np.load(FIXTURES / f"{fixture['name']}.io.npz")
    n = fixture["n_features"]
    s = sidecar_factory(VMAFX_BASE_MODEL_PATH=str(FIXTURES / fixture["file"]), VMAFX_SIDECAR_N_FEATURES=str(n),
                        VMAFX_SIDECAR_CKPT_INTERVAL_S="0", VMAFX_SIDECAR_MIN_SAMPLES_CKPT="32",
                        VMAFX_SIDECAR_LR="0.01", VMAFX_SIDECAR_WARMUP_STEPS="0", VMAFX_SIDECAR_EMA_DECAY="0.5",
                        VMAFX_SIDECAR_GATE="off")  # the checkpoint shows the base was trained, whatever its quality
    assert fixture["file"] in s.stderr()  # the start-up line names the base it fine-tunes
    client = s.client()
    weights = vs.read_state_dict(str(FIXTURES / fixture["file"]), vs.Activation("relu"))
    assert client.request({"op": "status"})["model"] == "-".join(map(str, weights.sizes()))
    rng = np.random.default_rng(0)
    acks = [client.request(sample(rng, n, job_id=f"sd-{i}")) for i in range(32)]
    assert all(a["ok"] for a in acks) and acks[-1]["step"] == 2
    checkpoint = Path(acks[-1]["checkpoint"])
    scores = ort_scores(checkpoint, io_arrays["x"])
    assert np.all(np.isfinite(scores))
    moved = relative_change(scores, io_arrays["y"])
    assert moved > 1e-3, f"two steps at lr 0.01 moved the outputs by {moved:.2e} of their scale"
    assert s.stop() == 0
