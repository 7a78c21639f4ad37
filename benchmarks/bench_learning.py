"""Learning benchmark of vmafx-sidecar: how well the trainer learns a VMAF-like stream in one pass,
with VMAFX_SIDECAR_NORMALIZE on (standardized coordinates) and off (raw ones, the PyTorch reference's).

    .venv/bin/python benchmarks/bench_learning.py [--samples 100000] [--quick]

The teacher is Netflix's VMAF v0.6.1 (libsvm nu-SVR with an RBF kernel over adm2, motion2 and four VIF
scales, ../shared/data/vmaf_v0.6.1.json), evaluated here in numpy. Content is synthetic: each encode has a
latent quality q, and the features follow it as they do for live action (adm2 and VIF in [0, 1], VIF
falling faster at finer scales, motion2 in [0, 20] independent of q); "shifted" content is sports-like
(fast motion, fine detail that holds up better, a wider adm2 range). Scores are 0 to 100 with a spread of
about 20.

Printed, with the machine:
1. A fresh 6-64-1 model trained by vs.Trainer exactly as `serve` builds it, on the defaults and a small
   lr/EMA grid, normalization on and off: test RMSE (VMAF points) of the raw EMA model, the one a checkpoint
   holds, after 10k, 40k and 100k samples; beside it a linear least-squares fit and the same network
   trained offline to convergence (Adam, z-scored), each on the same samples.
2. A base model (the network fitted offline on live action, saved as ONNX with its input normalisation as
   Sub and Div nodes) fine-tuned on shifted (sports-like) content with the defaults, on and off: test RMSE on shifted
   content as samples arrive, and how many samples normalization needs to reach the raw trainer's error
   at the end.
3. The per-sample cost: in-process ingest time of the same stream on and off, alternated, every round.
4. Training less often: a fresh model trained with larger batches, the learning rate scaled by the batch and
   the EMA's decay by the number of steps (the same horizon in samples), five streams and seeds each: what a
   default that costs fewer steps per sample would do to learning (BENCHMARKS.md, issue 19).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import vmafx_onnx_builder as ob  # noqa: E402
import vmafx_sidecar as vs  # noqa: E402  before numpy: it pins BLAS to one thread, as in the server

import numpy as np  # noqa: E402
import onnx  # noqa: E402
from onnx import helper, numpy_helper  # noqa: E402
from bench_ingest import machine  # noqa: E402
from vmaf_teacher import N_FEATURES, VMAF_MODEL, VmafTeacher, live_action, sports  # noqa: E402

TEST_SAMPLES = 5000
DEFAULTS = (vs.Config.lr, vs.Config.ema_decay)
GRID = [(lr, ema) for lr in (3e-3, 1e-2, 3e-2) for ema in (0.99, 0.999)]
BATCHES = (32, 64, 128)  # section 4
SEEDS = 5


# ---- the teacher and the content ----

def content(rng: np.random.Generator, n: int, kind: str) -> np.ndarray:
    """Feature vectors of n encodes of live action or, shifted, sports."""
    return (live_action if kind == "live" else sports)(rng, rng.beta(2.0, 1.6, n))


# ---- the trainer, as serve builds it ----

def trainer_for(directory: str, lr: float, ema: float, normalize: str, base: str = "",
                batch_size: int = vs.Config.batch_size, seed: int = vs.Config.seed) -> vs.Trainer:
    config = vs.Config(n_features=N_FEATURES, checkpoint_dir=directory, base_model_path=base, lr=lr, ema_decay=ema,
                       normalize=normalize, holdout_fraction=0.0, min_samples_ckpt=10**12, batch_size=batch_size,
                       seed=seed)
    trainer, _ = vs.build_trainer(config)
    return trainer


def rmse_of(weights: ob.MLPWeights, x: np.ndarray, y: np.ndarray) -> float:
    predicted = vs.MLP.from_weights(weights, np.float64).forward(x.astype(np.float64))[:, 0]
    return float(np.sqrt(np.mean((predicted - y) ** 2)))


def learning_curve(trainer: vs.Trainer, x: np.ndarray, y: np.ndarray, marks: list[int],
                   test: tuple[np.ndarray, np.ndarray]) -> dict[int, float]:
    """Stream (x, y) through the trainer once; the raw EMA model's test RMSE at each mark."""
    curve, y32 = {}, y.astype(np.float32)
    for i in range(len(y)):
        trainer.ingest(x[i], y32[i], False, True)
        if i + 1 in marks:
            curve[i + 1] = rmse_of(trainer.raw_weights(trainer.ema), *test)
    return curve


# ---- references: a linear fit and the same network trained offline ----

def linear_rmse(x: np.ndarray, y: np.ndarray, test: tuple[np.ndarray, np.ndarray]) -> float:
    design = np.c_[x.astype(np.float64), np.ones(len(x))]
    coef = np.linalg.lstsq(design, y, rcond=None)[0]
    tx, ty = test
    return float(np.sqrt(np.mean((np.c_[tx, np.ones(len(tx))] @ coef - ty) ** 2)))


def offline_fit(x: np.ndarray, y: np.ndarray, seed: int = 0, epochs: int = 60) -> tuple[vs.MLP, np.ndarray, np.ndarray,
                                                                                        float, float]:
    """The 6-64-1 ReLU network fitted with Adam on z-scored features and scores: the model and the maps."""
    mean, std = x.mean(0).astype(np.float64), x.std(0).astype(np.float64)
    y_mean, y_std = float(y.mean()), float(y.std())
    xz = ((x - mean) / std).astype(np.float32)
    yz = ((y - y_mean) / y_std).astype(np.float32)
    rng = np.random.default_rng(seed)
    model = vs.MLP.initial([N_FEATURES, 64, 1], vs.Activation("relu"), rng)
    grad = vs.MLP(model.sizes, model.activations)
    m1, m2 = np.zeros_like(model.flat), np.zeros_like(model.flat)
    step, rate = 0, 3e-3
    for epoch in range(epochs):
        if epoch == epochs * 2 // 3:
            rate /= 10
        for batch in np.array_split(rng.permutation(len(y)), max(1, len(y) // 256)):
            model.loss_and_grad(xz[batch], yz[batch], grad)
            step += 1
            m1 = 0.9 * m1 + 0.1 * grad.flat
            m2 = 0.999 * m2 + 0.001 * grad.flat ** 2
            update = rate * (m1 / (1 - 0.9 ** step)) / (np.sqrt(m2 / (1 - 0.999 ** step)) + 1e-8)
            model.flat -= update.astype(np.float32)
    return model, mean, std, y_mean, y_std


def raw_fit(fit: tuple) -> ob.MLPWeights:
    """An offline fit as a model of raw features and scores."""
    model, mean, std, y_mean, y_std = fit
    coords = vs.Coordinates(mean, std, y_mean, y_std, "final")
    layers = [(w.astype(np.float64), b.astype(np.float64)) for w, b in model.weights().layers]
    raw = vs.remap(layers, coords, vs.Coordinates.identity(N_FEATURES))
    return ob.MLPWeights([(w.astype(np.float32), b.astype(np.float32)) for w, b in raw], model.activations)


def save_base(fit: tuple, path: Path) -> None:
    """The fit as torch.onnx.export writes a model with its normalisation in the graph: Sub and Div on the
    features, then the layers (scores raw)."""
    model, mean, std, y_mean, y_std = fit
    layers = [(w.astype(np.float64), b.astype(np.float64)) for w, b in model.weights().layers]
    scores_raw = vs.remap(layers, vs.Coordinates(mean, std, y_mean, y_std, "final"),
                          vs.Coordinates(mean, std, 0.0, 1.0, "features"))
    graph = ob.build_mlp_model(ob.MLPWeights([(w.astype(np.float32), b.astype(np.float32)) for w, b in scores_raw],
                                             model.activations), {}).graph
    for node in graph.node:
        node.input[:] = ["normalized" if name == ob.INPUT_NAME else name for name in node.input]
    graph.initializer.extend([numpy_helper.from_array(mean.astype(np.float32), "mean"),
                              numpy_helper.from_array(std.astype(np.float32), "std")])
    nodes = [helper.make_node("Sub", [ob.INPUT_NAME, "mean"], ["centred"], name="sub_mean"),
             helper.make_node("Div", ["centred", "std"], ["normalized"], name="div_std"), *graph.node]
    del graph.node[:]
    graph.node.extend(nodes)
    model_proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", ob.OPSET)])
    model_proto.ir_version = ob.IR_VERSION
    onnx.checker.check_model(model_proto)
    onnx.save(model_proto, path)


# ---- the three measurements ----

def fresh_model(teacher: VmafTeacher, samples: int, rng: np.random.Generator) -> None:
    marks = sorted({m for m in (10_000, 40_000, 100_000) if m <= samples} | {samples})
    x = content(rng, samples, "live")
    y = teacher(x.astype(np.float64))
    test_x = content(rng, TEST_SAMPLES, "live")
    test = (test_x, teacher(test_x.astype(np.float64)))
    print(f"\n1. Fresh 6-64-1 model, live-action stream (score spread {y.std():.1f}, predicting the mean: "
          f"{test[1].std():.2f})\n")
    print("| model | " + " | ".join(f"{m // 1000}k" for m in marks) + " |")
    print("|---|" + "---|" * len(marks))
    print("| linear least squares | " + " | ".join(f"{linear_rmse(x[:m], y[:m], test):.3f}" for m in marks) + " |")
    fits = {m: rmse_of(raw_fit(offline_fit(x[:m], y[:m])), *test) for m in marks}
    print("| same network offline (Adam, z-scored) | " + " | ".join(f"{fits[m]:.3f}" for m in marks) + " |")
    for lr, ema in [DEFAULTS, *GRID]:
        for normalize in ("off", "on"):
            with tempfile.TemporaryDirectory() as directory:
                curve = learning_curve(trainer_for(directory, lr, ema, normalize), x, y, marks, test)
            label = f"lr {lr:g}, EMA {ema:g}{' (defaults)' if (lr, ema) == DEFAULTS else ''}, normalize {normalize}"
            print(f"| {label} | " + " | ".join(f"{curve[m]:.3f}" for m in marks) + " |", flush=True)


def fine_tuned_base(teacher: VmafTeacher, samples: int, rng: np.random.Generator) -> None:
    live = content(rng, 50_000, "live")
    fit = offline_fit(live, teacher(live.astype(np.float64)))
    x = content(rng, samples, "shifted")
    y = teacher(x.astype(np.float64))
    test_x = content(rng, TEST_SAMPLES, "shifted")
    test = (test_x, teacher(test_x.astype(np.float64)))
    shown = sorted({m for m in (1_000, 2_000, 5_000, 10_000, 20_000, 33_000, 50_000, 100_000) if m <= samples}
                   | {samples})
    marks = sorted(set(shown) | set(range(1_000, samples + 1, 1_000)))  # where "reaches" is looked for
    print(f"\n2. Base model (fitted offline on live action; RMSE {rmse_of(raw_fit(fit), *test):.2f} on shifted "
          "content) fine-tuned on sports-like content, defaults\n")
    print("| normalize | " + " | ".join(f"{m / 1000:g}k" for m in shown) + " |")
    print("|---|" + "---|" * len(shown))
    curves = {}
    with tempfile.TemporaryDirectory() as directory:
        base = Path(directory) / "base.onnx"
        save_base(fit, base)
        for normalize in ("off", "on"):
            os.makedirs(Path(directory) / normalize)
            trainer = trainer_for(str(Path(directory) / normalize), *DEFAULTS, normalize, str(base))
            curves[normalize] = learning_curve(trainer, x, y, marks, test)
            print(f"| {normalize} | " + " | ".join(f"{curves[normalize][m]:.3f}" for m in shown) + " |", flush=True)
    target = curves["off"][samples]
    reached = next((m for m in marks if curves["on"][m] <= target), None)
    print(f"\nnormalize off reaches RMSE {target:.3f} after {samples} samples; normalize on reaches it after "
          f"{reached if reached else 'more than ' + str(samples)} samples"
          + (f" ({reached / samples:.2f} of them)" if reached else ""))


def per_sample_cost(teacher: VmafTeacher, rng: np.random.Generator, rounds: int, samples: int = 20_000) -> None:
    x = content(rng, samples + vs.STATISTICS_SAMPLES, "live")
    y = teacher(x.astype(np.float64)).astype(np.float32)
    print(f"\n3. In-process ingest, µs per sample over {samples} samples after the statistics are taken "
          "(alternated, every round)\n")
    print("| round | normalize off | normalize on | on / off |")
    print("|---|---|---|---|")
    for r in range(1, rounds + 1):
        seconds = {}
        for normalize in ("off", "on"):
            with tempfile.TemporaryDirectory() as directory:
                trainer = trainer_for(directory, *DEFAULTS, normalize)
                for i in range(vs.STATISTICS_SAMPLES):
                    trainer.ingest(x[i], y[i], False, True)
                started = time.perf_counter()
                for i in range(vs.STATISTICS_SAMPLES, len(y)):
                    trainer.ingest(x[i], y[i], False, True)
                seconds[normalize] = (time.perf_counter() - started) / samples
        print(f"| {r} | {seconds['off'] * 1e6:.2f} | {seconds['on'] * 1e6:.2f} | "
              f"{seconds['on'] / seconds['off']:.3f} |", flush=True)


def fewer_steps(teacher: VmafTeacher, samples: int) -> None:
    marks = sorted({m for m in (10_000, 40_000, 100_000) if m <= samples} | {samples})
    print(f"\n4. Fresh 6-64-1 model, larger batches (half of each replayed), lr x batch / {vs.Config.batch_size} and "
          f"EMA decay ^ (batch / {vs.Config.batch_size}), normalize on: test RMSE on streams (and model seeds) "
          f"0..{SEEDS - 1}\n")
    print("| batch, lr, EMA | " + " | ".join(f"{m // 1000}k" for m in marks) + " |")
    print("|---|" + "---|" * len(marks))
    for batch in BATCHES:
        scale = batch / vs.Config.batch_size
        lr, ema = vs.Config.lr * scale, vs.Config.ema_decay ** scale
        curves = []
        for seed in range(SEEDS):
            rng = np.random.default_rng(seed)
            x = content(rng, samples, "live")
            test_x = content(rng, TEST_SAMPLES, "live")
            with tempfile.TemporaryDirectory() as directory:
                trainer = trainer_for(directory, lr, ema, "on", batch_size=batch, seed=seed)
                curves.append(learning_curve(trainer, x, teacher(x.astype(np.float64)), marks,
                                             (test_x, teacher(test_x.astype(np.float64)))))
        label = f"{batch}, {lr:g}, {ema:.6g}{' (defaults)' if batch == vs.Config.batch_size else ''}"
        print(f"| {label} | " + " | ".join(", ".join(f"{c[m]:.2f}" for c in curves) for m in marks) + " |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=100_000, help="stream length (default 100000)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the cost measurement (default 3)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 12000 samples, one round")
    args = parser.parse_args()
    samples, rounds = (12_000, 1) if args.quick else (args.samples, args.rounds)
    vs.log.setLevel("WARNING")
    teacher = VmafTeacher.load()
    print(f"bench_learning on {machine()}; teacher {VMAF_MODEL.name}")
    rng = np.random.default_rng(2026)
    fresh_model(teacher, samples, rng)
    fine_tuned_base(teacher, samples, rng)
    per_sample_cost(teacher, rng, rounds)
    fewer_steps(teacher, samples)


if __name__ == "__main__":
    main()
