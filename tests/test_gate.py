"""The stability gate (issues #5 and #15): the metrics, the window's sums (progressive validation), the held-out
set and the history, the verdicts, and what the checkpoint writer does with them: published or quarantined
files, retention, recovery of latest.json; the trainer's window, references and champion; and the
`checkpoints`/`verify` tools."""
from __future__ import annotations

import dataclasses
import datetime
import errno
import hashlib
import json
import logging
import math
import os
import shutil
import time
import subprocess
import sys
import warnings
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import vmafx_onnx_builder as ob
import vmafx_sidecar as vs
from conftest import NO_EVIDENCE, REFUSED, RELU, UNGATED, NoState, make_trainer, run_cli

MODULE_DIR = str(Path(vs.__file__).parent)  # subprocesses run the module these tests imported
RECORD_KEYS = {"format", "version", "file", "sha256", "step", "samples_trained", "created", "created_unix",
               "metrics", "gate", "reason"}
N_FEATURES = 4  # small models keep the writer's read-back runs and the CLI fast
PROBE = np.random.default_rng(7).uniform(0, 1, (16, N_FEATURES)).astype(np.float32)


# ---- helpers ----

def mlp(layers: list[tuple]) -> vs.MLP:
    """An MLP (relu between layers) with exactly these float32 weights."""
    layers = [(np.asarray(w, np.float32), np.asarray(b, np.float32)) for w, b in layers]
    return vs.MLP.from_weights(ob.MLPWeights(layers, [RELU] * (len(layers) - 1)))


def passthrough(bias: float = 0.0) -> vs.MLP:
    """One input, one hidden unit, one output: predicts x + bias for every x > -100 (exactly, for integers)."""
    return mlp([([[1.0]], [100.0]), ([[1.0]], [bias - 100.0])])


def measure(model: vs.MLP, x: np.ndarray, y: np.ndarray) -> vs.Scores | None:
    """`model`'s scores on (x, y), as gather_evidence() takes them: predictions, then scored, in float64."""
    return vs.scored(vs.predictions(model, x.astype(np.float64)), y.astype(np.float64))


def column(values) -> np.ndarray:
    return np.asarray(values, np.float32)[:, None]


def config(**fields) -> vs.Config:
    return vs.Config(**{"n_features": N_FEATURES, **fields})


def random_weights(seed: int, sizes=(N_FEATURES, 6, 1)) -> ob.MLPWeights:
    rng = np.random.default_rng(seed)
    layers = []
    for fan_in, fan_out in zip(sizes, sizes[1:]):
        bound = 1 / math.sqrt(fan_in)
        layers.append((rng.uniform(-bound, bound, (fan_in, fan_out)).astype(np.float32),
                       rng.uniform(-bound, bound, fan_out).astype(np.float32)))
    return ob.MLPWeights(layers, [RELU] * (len(layers) - 1))


def linear_data(n: int = 300, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inputs >= 0 and noisy scores that depend linearly on them; also the true coefficients."""
    rng = np.random.default_rng(seed)
    coef = np.array([3.0, 1.0, -2.0, 0.5])
    x = rng.uniform(0, 1, (n, N_FEATURES)).astype(np.float32)
    y = (x.astype(np.float64) @ coef + rng.normal(0, 0.3, n) + 50).astype(np.float32)
    return x, y, coef


def fitted(coef: np.ndarray, sign: float = 1.0) -> vs.MLP:
    """x >= 0 passes the identity hidden layer unchanged, so this predicts 50 + sign * x @ coef."""
    return mlp([(np.eye(N_FEATURES), np.zeros(N_FEATURES)), (sign * coef[:, None], [50.0 * sign])])


def float64_predictions(model: vs.MLP, x: np.ndarray) -> np.ndarray:
    """The forward pass, written out again in float64: relu between the dense layers."""
    h = x.astype(np.float64)
    for i, (w, b) in enumerate(model.layers):
        h = h @ w.astype(np.float64) + b.astype(np.float64)
        if i < len(model.layers) - 1:
            h = np.maximum(h, 0)
    return h[:, 0]


def brute_ranks(values) -> list[Fraction]:
    """Average 1-based ranks by counting: a value's ties span ranks less+1 .. less+equal."""
    values = list(values)
    return [Fraction(sum(v < x for v in values)) + Fraction(sum(v == x for v in values) + 1, 2) for x in values]


def plain_pearson(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.corrcoef(a, b)[0, 1])


# make_trainer settings, as test_faults.STEPPING: a small model stepping every 4 samples, a checkpoint due each step,
# in raw coordinates, so that the EMA's weights are the candidate's (test_normalize covers the standardized ones).
STEPPING = dict(n_features=8, hidden=8, batch_size=4, replay_mix=0.0, replay_capacity=64, min_samples_ckpt=4,
                ckpt_interval_s=0.0, lr=0.01, normalize="off")


def stem(version: int) -> str:
    return f"model_v{version:06d}"


def files_of(version: int) -> set[str]:
    return {f"{stem(version)}.onnx", f"{stem(version)}.onnx.sha256", f"{stem(version)}.json"}


def model_files(directory: Path) -> set[str]:
    return {n for n in os.listdir(directory) if n.startswith("model_v")}


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write(writer: vs.CheckpointWriter, verdict: vs.Verdict, seed: int = 0, step: int = 1) -> vs.Checkpoint:
    return vs.write_checkpoint(writer, random_weights(seed), step, step * 4, verdict, PROBE)


# ---- 1. metrics ----

def test_metrics_of_a_small_case_computed_by_hand():
    # predictions [1, 2, 3] against truth [1, 3, 2]: centred [-1, 0, 1] and [-1, 1, 0], so
    # PLCC = (1 + 0 + 0) / sqrt(2 * 2) = 1/2; the ranks are the values themselves, so SRCC = 1/2 too;
    # errors 0, -1, 1 give RMSE = sqrt(2/3); their squares sum to 2, as the truth's squared deviations from
    # its mean 2 do: R² = 1 - 2/2 = 0.
    m = measure(passthrough(), column([1, 2, 3]), np.array([1, 3, 2], np.float32))
    assert m.plcc == pytest.approx(0.5, abs=1e-12)
    assert m.srcc == pytest.approx(0.5, abs=1e-12)
    assert m.rmse == pytest.approx(math.sqrt(2 / 3), abs=1e-12)
    assert m.r2 == pytest.approx(0.0, abs=1e-12)
    # with a bias of 2: predictions [3, 4, 5], errors 2, 1, 3: RMSE = sqrt(14/3), R² = 1 - 14/2;
    # correlations unchanged
    m = measure(passthrough(2.0), column([1, 2, 3]), np.array([1, 3, 2], np.float32))
    assert (m.plcc, m.srcc) == (pytest.approx(0.5, abs=1e-12), pytest.approx(0.5, abs=1e-12))
    assert m.rmse == pytest.approx(math.sqrt(14 / 3), abs=1e-12)
    assert m.r2 == pytest.approx(-6.0, abs=1e-12)


def test_linear_and_anti_linear_data_give_plus_and_minus_one():
    x = column([1, 2, 3, 4])
    m = measure(passthrough(), x, np.array([10, 13, 16, 19], np.float32))  # 3p + 7
    assert m.plcc == pytest.approx(1.0, abs=1e-12) and m.srcc == pytest.approx(1.0, abs=1e-12)
    # errors 9, 11, 13, 15: mean square (81 + 121 + 169 + 225) / 4 = 149
    assert m.rmse == pytest.approx(math.sqrt(149), abs=1e-12)
    m = measure(passthrough(), x, np.array([8, 6, 4, 2], np.float32))  # -2p + 10
    assert m.plcc == pytest.approx(-1.0, abs=1e-12) and m.srcc == pytest.approx(-1.0, abs=1e-12)
    assert -1.0 <= m.plcc <= 1.0 and -1.0 <= m.srcc <= 1.0


def test_outputs_whose_squared_errors_overflow_float64_are_not_measured():
    """Four layers of float32-limit weights on float32-limit features give outputs of ~1e191, finite in float64,
    whose squares are not: an RMSE of inf went into records and status lines, JSON no strict reader takes."""
    limit = [[3e38]]
    huge = mlp([(limit, [0.0])] * 4 + [([[1.0]], [0.0])])
    x = column([1e38, 2e38])
    with np.errstate(all="raise"):  # measured quietly, as every other overflow is
        assert measure(huge, x, np.array([1, 2], np.float32)) is None
    assert measure(passthrough(), x, np.array([1, 2], np.float32)) is not None  # 1e38 squared: still finite


def test_srcc_with_ties_uses_average_ranks():
    # predictions [1, 2, 2, 3] rank [1, 2.5, 2.5, 4]; truth [1, 3, 2, 4] ranks [1, 3, 2, 4]; both mean 2.5.
    # centred: [-1.5, 0, 0, 1.5] and [-1.5, 0.5, -0.5, 1.5]
    # sum of products 2.25 + 2.25 = 4.5; squares 4.5 and 2.25 + 0.25 + 0.25 + 2.25 = 5
    # SRCC = 4.5 / sqrt(4.5 * 5) = sqrt(0.9)
    m = measure(passthrough(), column([1, 2, 2, 3]), np.array([1, 3, 2, 4], np.float32))
    assert m.srcc == pytest.approx(math.sqrt(0.9), abs=1e-12)
    # PLCC of the raw values is the same here: they equal their ranks up to the shift by the tie
    # predictions centred [-1, 0, 0, 1]: products 1.5 + 1.5 = 3, squares 2 and 5: 3 / sqrt(10)
    assert m.plcc == pytest.approx(3 / math.sqrt(10), abs=1e-12)


def test_average_ranks_gives_ties_their_average_rank():
    assert vs.average_ranks(np.array([10.0, 20, 20, 30, 20])).tolist() == [1, 3, 3, 5, 3]
    assert vs.average_ranks(np.array([5.0, 5, 5, 5])).tolist() == [2.5] * 4
    assert vs.average_ranks(np.array([3.0, 1, 2])).tolist() == [3, 1, 2]
    assert vs.average_ranks(np.array([2.0, 1, 2, 1])).tolist() == [3.5, 1.5, 3.5, 1.5]
    assert vs.average_ranks(np.array([-0.0, 0.0, -1.0])).tolist() == [2.5, 2.5, 1]


def test_constant_predictions_or_truth_give_zero_correlation_without_warnings():
    flat = mlp([([[1.0]], [0.0]), ([[0.0]], [42.0])])  # predicts 42 whatever the input
    x, y = column([1, 2, 3, 4]), np.array([40, 41, 43, 44], np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = measure(flat, x, y)
        assert (m.plcc, m.srcc) == (0.0, 0.0)
        assert m.rmse == pytest.approx(math.sqrt((4 + 1 + 1 + 4) / 4), abs=1e-12)
        m = measure(passthrough(), x, np.full(4, 7, np.float32))  # every true score equal
        assert (m.plcc, m.srcc, m.r2) == (0.0, 0.0, 0.0)
        assert m.rmse == pytest.approx(math.sqrt((36 + 25 + 16 + 9) / 4), abs=1e-12)
        m = measure(passthrough(), column([5]), np.array([5], np.float32))  # a single sample
        assert (m.plcc, m.srcc, m.rmse, m.r2) == (0.0, 0.0, 0.0, 0.0)
        assert vs.pearson(np.array([3.0, 3.0, 3.0]), np.array([1.0, 2.0, 3.0])) == 0.0
        assert vs.pearson(np.array([1.0, 2.0, 3.0]), np.array([-2.0, -2.0, -2.0])) == 0.0


def test_pearson_of_huge_or_tiny_values_neither_overflows_nor_underflows():
    # A deep base model can score far outside float32's comfortable range once computed in float64.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert vs.pearson(np.array([1e200, 2e200, 3e200]), np.array([1.0, 2.0, 3.0])) == pytest.approx(1.0)
        assert vs.pearson(np.array([1e-200, 3e-200, 2e-200]), np.array([1.0, 2.0, 3.0])) == pytest.approx(0.5)


def test_measure_is_none_for_no_samples_or_non_finite_predictions():
    x, y = column([1, 2, 3]), np.array([1, 2, 3], np.float32)
    assert measure(passthrough(), x[:0], y[:0]) is None
    assert measure(mlp([([[1.0]], [0.0]), ([[1.0]], [np.inf])]), x, y) is None
    assert measure(mlp([([[1.0]], [0.0]), ([[np.nan]], [0.0])]), x, y) is None
    # float32 weights whose float64 product is still finite are measured
    assert measure(mlp([([[3e38]], [0.0]), ([[3e38]], [0.0])]), x, y) is not None


def test_measure_runs_in_float64():
    # predictions 1e8 + [0, 1, 2, 3] would all be 1e8 in float32 (its spacing there is 8)
    shifted = mlp([([[1.0]], [0.0]), ([[1.0]], [1e8])])  # x + 1e8 for x >= 0; 1e8 is exact in float32
    m = measure(shifted, column([0, 1, 2, 3]), np.array([0, 1, 2, 3], np.float32))
    assert m.plcc == pytest.approx(1.0, abs=1e-12) and m.srcc == pytest.approx(1.0, abs=1e-12)
    assert m.rmse == 1e8


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(-4, 4), st.integers(-4, 4)), min_size=2, max_size=30))
def test_pearson_and_ranks_match_straightforward_implementations(pairs):
    a = np.array([p for p, _ in pairs], np.float64) / 2  # small integers and halves: plenty of ties
    b = np.array([t for _, t in pairs], np.float64)
    assert vs.average_ranks(a).tolist() == [float(r) for r in brute_ranks(a)]
    assume(np.ptp(a) > 0 and np.ptp(b) > 0)
    assert vs.pearson(a, b) == pytest.approx(plain_pearson(a, b), abs=1e-12)
    srcc = plain_pearson([float(r) for r in brute_ranks(a)], [float(r) for r in brute_ranks(b)])
    assert vs.pearson(vs.average_ranks(a), vs.average_ranks(b)) == pytest.approx(srcc, abs=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_measure_matches_an_independent_computation_on_random_models(seed):
    rng = np.random.default_rng(seed)
    model = vs.MLP.from_weights(random_weights(seed, (N_FEATURES, 5, 1)))
    x = rng.uniform(0, 1, (200, N_FEATURES)).astype(np.float32)
    x[100:] = x[:100]  # repeated inputs: tied predictions
    y = rng.integers(20, 30, 200).astype(np.float32)  # few distinct scores: tied truth
    predicted = float64_predictions(model, x)
    m = measure(model, x, y)
    assert m.plcc == pytest.approx(plain_pearson(predicted, y), abs=1e-9)
    srcc = plain_pearson([float(r) for r in brute_ranks(predicted)], [float(r) for r in brute_ranks(y)])
    assert m.srcc == pytest.approx(srcc, abs=1e-9)
    assert m.rmse == pytest.approx(math.sqrt(np.mean((predicted - y) ** 2)), rel=1e-9)
    truth = y.astype(np.float64)
    assert m.r2 == pytest.approx(1 - np.sum((predicted - truth) ** 2) / np.sum((truth - truth.mean()) ** 2), rel=1e-9)


MODELS = ("candidate", *vs.REFERENCES)  # as many models as a window holds rows for: the candidate first


IDENTITY = ob.Activation("leaky_relu", 1.0)


def pickers(names) -> dict[str, vs.MLP]:
    """References by these names, the i-th predicting feature i of as many, exactly."""
    models = {}
    for i, name in enumerate(names):
        w = np.zeros((len(names), 1), np.float32)
        w[i] = 1
        layers = [(w, np.zeros(1, np.float32)), (np.ones((1, 1), np.float32), np.zeros(1, np.float32))]
        models[name] = vs.MLP.from_weights(ob.MLPWeights(layers, [IDENTITY]))
    return models


REFERENCE_MODELS = pickers(vs.REFERENCES)
BASE = pickers(["base"])


def window_of(predictions: np.ndarray, truth: np.ndarray, steps: list[int], capacity: int | None = None,
              asked_at: set[int] = frozenset(), references: dict[str, vs.MLP] = REFERENCE_MODELS) -> vs.Window:
    """A window that took the candidate's predictions (row 0) of `truth` in steps of these sizes, each reference
    predicting its row (1, 2...) from the features; a block of `capacity` (the largest step by default), its
    evidence asked after the steps `asked_at`."""
    window = vs.Window(vs.NUMPY, len(references), capacity or max(steps))
    features = predictions[1:1 + len(references)].T.copy()
    start = 0
    for step, size in enumerate(steps):
        end = start + size
        window.take(predictions[0, start:end], features[start:end], truth[start:end], references)
        if step in asked_at:
            window.evidence(references)
        start = end
    assert start == len(truth) and window.n == len(truth)
    return window


def direct_scores(predicted: np.ndarray, truth: np.ndarray) -> tuple[float, float, float]:
    """PLCC, R² and RMSE of one model, straight from all its predictions in float64."""
    p, t = predicted.astype(np.float64), truth.astype(np.float64)
    sse, sst = float(np.sum((p - t) ** 2)), float(np.sum((t - t.mean()) ** 2))
    plcc = 0.0 if np.ptp(p) == 0 or np.ptp(t) == 0 else float(np.corrcoef(p, t)[0, 1])
    return plcc, 0.0 if np.ptp(t) == 0 else 1 - sse / sst, math.sqrt(sse / len(t))


def assert_window_scores_match(window: vs.Window, predictions: np.ndarray, truth: np.ndarray) -> None:
    found = window.evidence(REFERENCE_MODELS)
    assert found.n == len(truth) and set(found.scores) == set(MODELS)
    for row, name in enumerate(MODELS):
        plcc, r2, rmse = direct_scores(predictions[row], truth)
        ours = found.scores[name]
        assert ours.srcc is None  # ranks would need every prediction kept
        assert ours.plcc == pytest.approx(plcc, abs=1e-9), name
        assert ours.r2 == pytest.approx(r2, rel=1e-9, abs=1e-9), name
        assert ours.rmse == pytest.approx(rmse, rel=1e-9), name


def predictions_of(rng: np.random.Generator, truth: np.ndarray, spread: float) -> np.ndarray:
    """For each model, a noisy, scaled and shifted copy of the truth (one of them anti-correlated), in float32
    as the models predict."""
    n, rows = len(truth), len(MODELS)
    slopes = rng.uniform(0.2, 2.0, rows)
    slopes[-1] *= -1
    biases, noise = rng.uniform(-3, 3, rows) * spread, rng.uniform(0.05, 1.0, rows) * spread
    centred = truth.astype(np.float64) - truth.mean()
    predicted = truth.mean() + slopes[:, None] * centred + biases[:, None] + noise[:, None] * rng.normal(size=(rows, n))
    return predicted.astype(np.float32)


@pytest.mark.parametrize("seed", range(3))
def test_window_sums_give_the_scores_of_all_predictions_at_once(seed):
    rng = np.random.default_rng(seed)
    steps = rng.integers(1, 33, 60).tolist()  # steps of any size, as batches and replay mixes make them
    truth = rng.uniform(20, 100, sum(steps)).astype(np.float32)
    predictions = predictions_of(rng, truth, spread=10.0)
    for capacity in (32, 100, 2000):  # blocks scored often, now and then, never
        assert_window_scores_match(window_of(predictions, truth, steps, capacity), predictions, truth)


def test_asking_a_window_for_its_evidence_leaves_it_as_it_was():
    rng = np.random.default_rng(4)
    steps = [16] * 40
    truth = rng.uniform(20, 100, sum(steps)).astype(np.float32)
    predictions = predictions_of(rng, truth, spread=10.0)
    quiet = window_of(predictions, truth, steps, capacity=160)
    asked = window_of(predictions, truth, steps, capacity=160, asked_at={0, 3, 9, 10, 17, 39})
    assert asked.evidence(REFERENCE_MODELS) == quiet.evidence(REFERENCE_MODELS)  # bit for bit
    assert (asked.sums.tobytes(), asked.truth.tobytes(), asked.n, asked.unscored) == (
        quiet.sums.tobytes(), quiet.truth.tobytes(), quiet.n, quiet.unscored)


@settings(max_examples=100, deadline=None)
@given(offset=st.sampled_from([0.0, 50.0, 1e3, -1e3]) | st.floats(-1e3, 1e3),
       spread=st.floats(1e-2, 1e2), steps=st.lists(st.integers(1, 16), min_size=1, max_size=8),
       seed=st.integers(0, 2**32 - 1))
def test_window_sums_match_a_float64_computation_even_far_from_zero(offset, spread, steps, seed):
    # Scores of ~1e3 that vary by 1e-2: plain sums of squares would lose that variance to cancellation.
    rng = np.random.default_rng(seed)
    truth = (offset + spread * rng.normal(size=sum(steps))).astype(np.float32)
    predictions = predictions_of(rng, truth, spread)
    assert_window_scores_match(window_of(predictions, truth, steps, capacity=20), predictions, truth)


def test_window_of_constant_predictions_or_truth_correlates_zero():
    rng = np.random.default_rng(3)
    truth = (1e3 + rng.normal(0, 0.5, 48)).astype(np.float32)
    predictions = predictions_of(rng, truth, spread=0.5)
    predictions[0] = np.float32(1234.5)  # a model that predicts one score for everything
    predictions[1] = truth[0]  # the same, at the score the window's sums are shifted by
    constant_truth = np.full(48, 987.25, np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no division by a zero variance
        found = window_of(predictions, truth, [16, 16, 16]).evidence(REFERENCE_MODELS)
        assert found.scores["candidate"].plcc == found.scores[vs.REFERENCES[0]].plcc == 0.0
        assert_window_scores_match(window_of(predictions, truth, [16, 16, 16]), predictions, truth)
        flat = window_of(predictions, constant_truth, [5, 43]).evidence(REFERENCE_MODELS)
        assert all((s.plcc, s.r2) == (0.0, 0.0) for s in flat.scores.values())
        assert_window_scores_match(window_of(predictions, constant_truth, [5, 43]), predictions, constant_truth)


def test_window_scores_are_none_without_samples_or_with_outputs_that_are_not_finite():
    empty = vs.Window(vs.NUMPY, 1, 8).evidence(BASE)
    assert empty == vs.Evidence(0, {"candidate": None, "base": None})
    truth = np.arange(8, dtype=np.float32)
    predictions = np.tile(truth, (len(MODELS), 1))
    predictions[0, 3] = np.inf  # the candidate's outputs overflowed
    with np.errstate(invalid="ignore", over="ignore"):
        found = window_of(predictions, truth, [4, 4], references=BASE).evidence(BASE)
    assert found.scores["candidate"] is None
    assert found.scores["base"] == vs.Scores(plcc=1.0, srcc=None, rmse=0.0, r2=1.0)


# ---- 2. the held-out set and the history ----

def test_holdout_by_job_id_is_stable_across_calls_and_trainers(tmp_path):
    a = make_trainer(tmp_path / "a", **STEPPING, holdout_fraction=0.3)
    b = make_trainer(tmp_path / "b", **STEPPING, holdout_fraction=0.3, seed=5)
    ids = [f"job-{i}" for i in range(500)]
    first = [a.is_held_out(j) for j in ids]
    assert [a.is_held_out(j) for j in ids] == first
    assert [b.is_held_out(j) for j in reversed(ids)] == first[::-1]
    assert 0 < sum(first) < len(ids)
    assert a.unnamed_samples == b.unnamed_samples == 0  # named samples do not advance the count


def test_holdout_by_job_id_is_the_same_in_another_process(tmp_path):
    # A restart must put a job on the side it was on: no per-process salt (like hash()'s)
    ids = [f"enc-{i}" for i in range(300)]
    here = [make_trainer(tmp_path / "a", **STEPPING, holdout_fraction=0.5).is_held_out(j) for j in ids]
    code = ("import json, sys, vmafx_sidecar as vs\n"
            "t = vs.Trainer.__new__(vs.Trainer); t.config = vs.Config(holdout_fraction=0.5)\n"
            f"print(json.dumps([t.is_held_out(j) for j in {ids!r}]))\n")
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": MODULE_DIR, "PYTHONHASHSEED": "12345"}
    done = subprocess.run([sys.executable, "-c", code], cwd=MODULE_DIR, env=env, capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == here


@pytest.mark.parametrize("fraction", [0.05, 0.3])
def test_holdout_fraction_of_distinct_job_ids_is_within_a_binomial_bound(tmp_path, fraction):
    trainer = make_trainer(tmp_path, **STEPPING, holdout_fraction=fraction)
    n = 20000
    held = sum(trainer.is_held_out(f"job-{i:05d}") for i in range(n))
    sd = math.sqrt(n * fraction * (1 - fraction))
    assert abs(held - n * fraction) < 5 * sd, (held, n * fraction, sd)


# STEPPING without its checkpoints: the tests below take thousands of samples and look only at where they
# go; a checkpoint at every step would write thousands of files.
COUNTING = STEPPING | {"min_samples_ckpt": 10**9}


def ingest_unnamed(trainer: vs.Trainer) -> bool:
    """Take a sample without a job_id as the server does; whether it was held out."""
    held_out = trainer.is_held_out(None)
    trainer.ingest(np.zeros(trainer.config.n_features, np.float32), np.float32(50), held_out, unnamed=True)
    return held_out


def test_holdout_without_job_ids_takes_every_twentieth_at_five_percent(tmp_path):
    trainer = make_trainer(tmp_path, **COUNTING, holdout_fraction=0.05)
    positions = [i for i in range(1, 10001) if ingest_unnamed(trainer)]
    assert positions == list(range(20, 10001, 20))
    assert trainer.unnamed_samples == 10000


@pytest.mark.parametrize("meant", [Fraction(1, 20), Fraction(1, 10), Fraction(3, 10), Fraction(1, 3),
                                   Fraction(7, 100), Fraction(1, 7), Fraction(1, 2), Fraction(1)], ids=str)
def test_holdout_without_job_ids_holds_out_floor_of_n_times_fraction(tmp_path, meant):
    # the setting is a float; the count must be that of the fraction it spells, not of its binary rounding
    trainer = make_trainer(tmp_path, **COUNTING, holdout_fraction=float(meant))
    held = 0
    for n in range(1, 3001):
        held += ingest_unnamed(trainer)
        assert held == math.floor(n * meant), (n, held)


@pytest.mark.parametrize("job_id", [None, ""], ids=["no job_id", "an empty one"])
def test_a_sample_without_a_job_id_or_with_an_empty_one_is_held_out_by_the_count(tmp_path, job_id):
    """Go writes "" for a string field never set: hashed as one job, every such sample had gone to one side (at
    5 %, none was held out, and the history was never held-out samples). The journal replays the same count."""
    trainer = make_trainer(tmp_path, **COUNTING, holdout_fraction=0.05)
    server = vs.Server(trainer.config, trainer, NoState())
    rng = np.random.default_rng(0)
    for _ in range(100):
        message = {"features": rng.uniform(0, 1, trainer.config.n_features).tolist(), "true_score": 50.0}
        ack = json.loads(server.answer(json.dumps({**message, **({} if job_id is None else {"job_id": job_id})})
                                       .encode()))
        assert ack["ok"] and ack.get("job_id") == job_id, ack
    assert (trainer.samples_held_out, trainer.unnamed_samples) == (5, 100)


def test_holdout_fraction_zero_never_holds_out_and_one_always_does(tmp_path):
    never = make_trainer(tmp_path / "a", **COUNTING, holdout_fraction=0.0)
    assert not any(never.is_held_out(f"job-{i}") for i in range(2000))
    assert not any(ingest_unnamed(never) for _ in range(2000))
    always = make_trainer(tmp_path / "b", **COUNTING, holdout_fraction=1.0)
    assert all(always.is_held_out(f"job-{i}") for i in range(2000))
    assert all(ingest_unnamed(always) for _ in range(2000))


def test_holdout_accepts_a_job_id_with_a_lone_surrogate(tmp_path):
    job_id = json.loads('"enc-\\ud800"')  # valid JSON, not encodable as UTF-8
    assert job_id == "enc-\ud800"
    trainer = make_trainer(tmp_path, **STEPPING, holdout_fraction=0.5)
    decisions = {trainer.is_held_out(job_id) for _ in range(5)}
    assert len(decisions) == 1
    decisions = {trainer.is_held_out(s) for s in ("\ud800", "\udfff", "\ud800\ud800", "a\udc00b")}
    assert decisions <= {True, False}


def test_held_out_samples_go_to_the_eval_ring_and_are_never_trained_on(tmp_path):
    trainer = make_trainer(tmp_path, **STEPPING, eval_capacity=6)
    rng = np.random.default_rng(0)
    x, y = rng.uniform(0, 1, (10, 8)).astype(np.float32), np.arange(10, dtype=np.float32)
    flat = trainer.model.flat.copy()
    for row, score in zip(x, y):
        assert trainer.add(row, score, held_out=True) is None
    assert (trainer.steps, trainer.samples_trained, trainer.samples_held_out, trainer.eval_size) == (0, 0, 10, 6)
    trainer.flush_held_out()  # held-out samples reach the ring in stages; the gate flushes them first
    assert (trainer.replay.size, trainer.n_pending, trainer.eval.size) == (0, 0, 6)
    assert sorted(trainer.eval.y.tolist()) == [4, 5, 6, 7, 8, 9]  # a ring: the newest 6
    np.testing.assert_array_equal(trainer.model.flat, flat)
    # 4 samples that are trained on make one step of 4, whatever was held out between them
    for i in range(4):
        trainer.add(x[i], y[i])
        trainer.add(x[i], 99.0, held_out=True)
    assert (trainer.steps, trainer.samples_trained, trainer.samples_held_out, trainer.replay.size) == (1, 4, 14, 4)
    assert 99.0 not in trainer.replay.y[:trainer.replay.size].tolist()


@settings(max_examples=100, deadline=None)
@given(chunks=st.integers(1, 12).flatmap(lambda capacity: st.tuples(
    st.just(capacity), st.lists(st.integers(1, capacity), min_size=1, max_size=10))), data=st.data())
def test_ring_older_gives_the_samples_before_the_newest_newest_first_across_the_wrap(chunks, data):
    capacity, sizes = chunks
    ring, total = vs.Ring(capacity, 2, vs.NUMPY), 0
    for size in sizes:
        numbers = np.arange(total, total + size, dtype=np.float32)
        ring.extend(np.stack([numbers, -numbers], axis=1), numbers)
        total += size
    skip = data.draw(st.integers(0, ring.size), label="skip")
    count = data.draw(st.integers(0, ring.size - skip), label="count")
    x, y = ring.older(skip, count)
    expected = [total - 1 - skip - k for k in range(count)]
    assert y.tolist() == expected and x[:, 0].tolist() == expected and (x[:, 1] == -y).all()
    x[:], y[:] = 1e6, 1e6  # copies: the ring is not changed through them
    assert 1e6 not in ring.y


# make_trainer settings for the history: a replay ring of 16, steps of 4 new samples, a checkpoint (a new
# window) after 20 trained ones, and GATE_MIN_EVAL 6, in raw coordinates.
HISTORY = dict(n_features=8, hidden=8, batch_size=4, replay_mix=0.0, replay_capacity=16, gate_min_eval=6,
               min_samples_ckpt=20, ckpt_interval_s=0.0, lr=1e-4, normalize="off")


def numbered(i: int) -> np.ndarray:
    """The features of sample i (whose score is i): they name it."""
    return np.full(8, i / 64, np.float32)


def add_numbered(trainer: vs.Trainer, numbers, held_out: bool = False) -> None:
    for i in numbers:
        trainer.add(numbered(i), np.float32(i), held_out=held_out)


def assert_history(trainer: vs.Trainer, numbers: list[int], held_out: int) -> None:
    x, y, n_held_out = trainer.history()
    assert (y.tolist(), n_held_out) == (numbers, held_out)
    np.testing.assert_array_equal(x, np.stack([numbered(i) for i in numbers]))


@pytest.mark.parametrize("eval_capacity, replayed", [(16, list(range(19, 11, -1))), (8, [19, 18, 17, 16, 15])],
                         ids=["all-older-replayed", "capped-at-eval-capacity"])
def test_history_tops_a_small_held_out_ring_up_with_replay_older_than_the_window(tmp_path, eval_capacity, replayed):
    trainer = make_trainer(tmp_path, **HISTORY, eval_capacity=eval_capacity)
    add_numbered(trainer, [1000, 1001, 1002], held_out=True)
    add_numbered(trainer, range(12))
    assert_history(trainer, [1000, 1001, 1002], 3)  # every replayed sample is in the window: none older
    add_numbered(trainer, range(12, 28))
    assert trainer.checkpoints.version == 1 and trainer.window.n == 8  # a new window after sample 19
    # The replay ring holds 12..27, wrapped round its end; 20..27 are the window's. Held-out first, then the
    # newest older ones, up to EVAL_CAPACITY in all.
    assert_history(trainer, [1000, 1001, 1002, *replayed], 3)
    add_numbered(trainer, [1003, 1004, 1005], held_out=True)
    assert_history(trainer, list(range(1000, 1006)), 6)  # GATE_MIN_EVAL held out: those alone


def test_history_once_published_tops_up_only_with_what_the_incumbent_trained_on(tmp_path, monkeypatch):
    """Samples of windows quarantined since the last publish trained the candidate, never the incumbent: topped up
    with them, the history favoured a candidate that had learned a burst, and after a few quarantined windows of
    inverted scores one was published."""
    verdicts = [UNGATED, REFUSED, REFUSED]  # published, then two windows quarantined
    monkeypatch.setattr(vs, "judge", lambda config, window, history, finite_weights=True: verdicts.pop(0))
    trainer = make_trainer(tmp_path, **{**HISTORY, "replay_capacity": 64}, eval_capacity=16)
    add_numbered(trainer, [1000, 1001, 1002], held_out=True)
    add_numbered(trainer, range(20))  # published after sample 19: the incumbent trained on 0..19
    assert trainer.checkpoints.latest["version"] == 1 and trainer.has_champion
    add_numbered(trainer, range(20, 44))  # quarantined after 39; 40..43 in the window
    assert trainer.checkpoints.version == 2 and trainer.checkpoints.latest["version"] == 1
    assert_history(trainer, [1000, 1001, 1002, *range(19, 6, -1)], 3)  # not 20..39, the quarantined window
    add_numbered(trainer, range(44, 64))  # quarantined after 59
    assert_history(trainer, [1000, 1001, 1002, *range(19, 6, -1)], 3)
    assert trainer.state_dict()["samples_since_publish"] == 44


@pytest.mark.parametrize("since", ["rolled back", "unchanged"])
def test_a_window_scored_against_an_incumbent_rolled_back_since_starts_again(tmp_path, monkeypatch, since):
    """The README's rollback (stop, move the latest checkpoint into quarantine/, start) changes the incumbent; its
    row of the restored window held the rolled-back model's errors, and the next record blended the two."""
    worse = vs.Scores(0.5, None, 1.0, 0.1)  # the second candidate does not displace the first, the champion
    keeps = vs.Verdict("passed", NO_EVIDENCE, vs.Evidence(300, {"candidate": worse, "champion": dataclasses.replace(
        worse, plcc=0.9)}), "passed by the test")
    verdicts = [UNGATED, keeps]
    monkeypatch.setattr(vs, "judge", lambda config, window, history, finite_weights=True: verdicts.pop(0))
    config = vs.Config(checkpoint_dir=str(tmp_path), base_model_path="", **HISTORY, eval_capacity=16)
    trainer, _ = vs.build_trainer(config)
    add_numbered(trainer, range(48))  # v1 published after 19, the champion; v2 after 39, the incumbent
    assert (trainer.checkpoints.latest["version"], trainer.checkpoints.champion_version) == (2, 1)
    assert trainer.window.n == 8
    state = {name: value.copy() if isinstance(value, np.ndarray) else value
             for name, value in trainer.state_dict().items()}
    if since == "rolled back":
        for suffix in (".onnx.sha256", ".json", ".onnx"):
            shutil.move(tmp_path / f"model_v000002{suffix}", tmp_path / "quarantine" / f"model_v000002{suffix}")
    again, _ = vs.build_trainer(config)
    again.load_state_dict(state)
    assert again.checkpoints.latest["version"] == (1 if since == "rolled back" else 2)
    assert (again.window.n, again.window.unscored) == ((0, 0) if since == "rolled back" else (8, 8))
    # The next checkpoint comes once its window holds MIN_SAMPLES_CKPT samples, not the 12 the count lacked.
    assert again.samples_since_checkpoint == (0 if since == "rolled back" else 8)


# ---- 3. the gate's verdicts ----

def scores(plcc: float, r2: float = 0.5) -> vs.Scores:
    """A model's scores on a set, as the gate reads them: only PLCC and R² decide."""
    return vs.Scores(plcc=plcc, srcc=None, rmse=1.0, r2=r2)


def evidence(n: int, candidate: vs.Scores | None, **references: vs.Scores | None) -> vs.Evidence:
    return vs.Evidence(n, {"candidate": candidate, **references})


def measured(models: dict[str, vs.MLP], x: np.ndarray, y: np.ndarray) -> vs.Evidence:
    """Each model's scores on (x, y), all of them held out: a history as gather_evidence measures one."""
    return vs.Evidence(len(y), {name: measure(model, x, y) for name, model in models.items()}, len(y))


ENOUGH = 300  # samples in a set: the GATE_MIN_EVAL the tests below judge with
GOOD = evidence(ENOUGH, scores(0.9, r2=0.8), incumbent=scores(0.9), champion=scores(0.9))


def verdict_on(name: str, judged: vs.Evidence, **fields) -> vs.Verdict:
    """The verdict with `judged` as the set `name` ("window" or "history") and GOOD as the other one."""
    window, history = (judged, GOOD) if name == "window" else (GOOD, judged)
    return vs.judge(config(gate_min_eval=ENOUGH, **fields), window, history)


def test_judge_with_the_gate_off_publishes_any_finite_candidate_unjudged():
    worse = evidence(ENOUGH, scores(-0.9, r2=-3.0), base=scores(0.9))
    verdict = vs.judge(config(gate="off"), worse, worse)
    assert verdict.published and verdict.gate == "off"
    assert verdict.reason == "published unjudged: VMAFX_SIDECAR_GATE=off"
    assert verdict.record()["metrics"]["window"] == worse.record()  # measured and recorded all the same
    assert vs.judge(config(gate="off"), NO_EVIDENCE, NO_EVIDENCE).gate == "off"  # with no evidence either


def test_judge_quarantines_non_finite_candidates_even_with_the_gate_off():
    unmeasurable = evidence(ENOUGH, None, base=scores(0.9))  # outputs that are not finite
    for cfg in (config(gate="off"), config(), config(gate_min_eval=ENOUGH)):
        for window, history, finite in ((GOOD, GOOD, False), (unmeasurable, GOOD, True), (GOOD, unmeasurable, True),
                                        (NO_EVIDENCE, NO_EVIDENCE, False)):
            verdict = vs.judge(cfg, window, history, finite)
            assert verdict.gate == "quarantined" and verdict.reason == "non-finite weights or outputs", cfg.gate
    # measured on real samples: a weight that is not finite leaves the candidate unmeasurable
    x, y, coef = linear_data()
    for value in (np.nan, np.inf):
        broken = fitted(coef)
        broken.flat[3] = value
        history = measured({"candidate": broken, "base": fitted(coef)}, x, y)
        assert history.scores["candidate"] is None
        assert vs.judge(config(gate="off"), NO_EVIDENCE, history).gate == "quarantined"


@pytest.mark.parametrize("gate_min_eval", [2, 4, 5])
def test_a_set_too_small_for_any_r2_to_clear_its_floor_is_not_judged(gate_min_eval):
    """R² never exceeds 1, and 2/√n is 1 or more up to n = 4: with VMAFX_SIDECAR_GATE_MIN_EVAL below 5, a window of
    4 samples refused every candidate, a perfect one too, whatever the history said."""
    perfect = evidence(4, scores(1.0, r2=1.0), base=scores(0.1, r2=0.01))
    verdict = vs.judge(config(gate_min_eval=gate_min_eval), perfect, dataclasses.replace(perfect, n=ENOUGH))
    assert verdict.gate == "passed" and verdict.reason.startswith(f"history: R² 1.0000, PLCC 1.000000"), verdict
    alone = vs.judge(config(gate_min_eval=gate_min_eval), perfect, NO_EVIDENCE)
    assert alone.gate == "quarantined" and alone.reason.startswith("too little evidence: 4 window and 0 history")
    assert alone.reason.endswith("fewer than 5 (on fewer, no R² clears its floor) in each" if gate_min_eval < 5
                                 else "fewer than VMAFX_SIDECAR_GATE_MIN_EVAL (5) in each")


def test_judge_publishes_nothing_on_too_little_evidence():
    cfg = config(gate_min_eval=ENOUGH)
    short = evidence(ENOUGH - 1, scores(0.99, r2=0.98), base=scores(0.1, r2=0.01))  # a far better candidate
    verdict = vs.judge(cfg, short, dataclasses.replace(short, n=ENOUGH - 2))
    assert verdict.gate == "quarantined"
    assert verdict.reason == (f"too little evidence: {ENOUGH - 1} window and {ENOUGH - 2} history samples, fewer "
                              f"than VMAFX_SIDECAR_GATE_MIN_EVAL ({ENOUGH}) in each")
    assert vs.judge(cfg, NO_EVIDENCE, NO_EVIDENCE).reason.startswith("too little evidence: 0 window and 0 history")
    assert vs.judge(cfg, dataclasses.replace(short, n=ENOUGH), short).gate == "passed"  # GATE_MIN_EVAL is enough


@pytest.mark.parametrize("name", ["window", "history"])
@pytest.mark.parametrize("r2", [2 / math.sqrt(ENOUGH), 0.05, 0.0, -0.5, -1e6])
def test_judge_refuses_an_r2_within_its_noise_of_zero_on_either_set(name, r2):
    floor = 2 / math.sqrt(ENOUGH)  # 0.1155 on 300 samples
    # a PLCC that passes, against an incumbent no better than the mean: R² alone refuses
    poor = evidence(ENOUGH, scores(0.95, r2=r2), incumbent=scores(0.9, r2=0.0))
    verdict = verdict_on(name, poor)
    assert verdict.gate == "quarantined"
    assert verdict.reason == (f"{name}: R² {r2:.4f} on {ENOUGH} samples: not clearly better than predicting their "
                              f"mean (needs more than 2/√n = {floor:.4f})")
    barely = evidence(ENOUGH, scores(0.95, r2=math.nextafter(floor, 1.0)), incumbent=scores(0.9, r2=0.0))
    assert verdict_on(name, barely).gate == "passed"


def held_out_trainer(tmp_path, x: np.ndarray, y: np.ndarray, coef: np.ndarray) -> vs.Trainer:
    """A trainer whose evaluation ring holds (x, y), every sample held out, with fitted(coef) its incumbent."""
    trainer = make_trainer(tmp_path, n_features=N_FEATURES, holdout_fraction=1.0, eval_capacity=len(y))
    for row, score in zip(x, y):
        trainer.ingest(row, np.float32(score), held_out=True, unnamed=False)
    trainer.incumbent = fitted(coef)
    return trainer


def test_a_wild_held_out_score_is_left_out_of_the_history_for_every_model(tmp_path):
    """One score of 1e4 among the held-out ones decided every model's PLCC and R² on the history: no candidate
    cleared the floor there, the champion's equal neither, for as long as it stayed in the ring (41 000 samples at
    the defaults). Left out for every model alike, it costs nothing, and the history still tells models apart."""
    x, y, coef = linear_data()
    y = y.copy()
    y[7] = 1e4
    trainer = held_out_trainer(tmp_path, x, y, coef)
    cfg = config(gate_min_eval=200)
    _, history, _ = vs.gather_evidence(trainer, fitted(coef))
    assert (history.n, history.held_out) == (len(y) - 1, len(y) - 1)
    assert vs.judge(cfg, NO_EVIDENCE, history).published
    shifted = fitted(coef)
    shifted.layers[-1][1][...] += 0.5  # a third of the scores' spread high
    verdict = vs.judge(cfg, NO_EVIDENCE, vs.gather_evidence(trainer, shifted)[1])
    assert not verdict.published and "VMAFX_SIDECAR_GATE_MAX_R2_DROP" in verdict.reason, verdict.reason


@pytest.mark.parametrize("wild", [1e3, 1e37], ids=["far", "past what float32 outputs hold"])
def test_a_held_out_sample_with_a_wild_feature_is_left_out_of_the_history_for_every_model(tmp_path, wild):
    """One feature of 1 000 where they lie in [0, 1] (another unit on one node) made every model's prediction of it
    absurd: no candidate's R² on the history cleared the floor, the champion's neither, and nothing was published for
    as long as the sample stayed in the ring (40 000 samples at the defaults); of 1e37, the read-back's float32
    outputs overflowed and every candidate was refused as non-finite."""
    x, y, coef = linear_data()
    x = x.copy()
    x[7, 0] = wild
    trainer = held_out_trainer(tmp_path, x, y, coef)
    cfg = config(gate_min_eval=200)
    _, history, probe = vs.gather_evidence(trainer, fitted(coef))
    assert (history.n, history.held_out) == (len(y) - 1, len(y) - 1) and np.float32(wild) not in probe
    assert vs.judge(cfg, NO_EVIDENCE, history).published
    shifted = fitted(coef)
    shifted.layers[-1][1][...] += 0.5  # a third of the scores' spread high
    verdict = vs.judge(cfg, NO_EVIDENCE, vs.gather_evidence(trainer, shifted)[1])
    assert not verdict.published and "VMAFX_SIDECAR_GATE_MAX_R2_DROP" in verdict.reason, verdict.reason


def test_an_input_is_wild_only_where_every_reference_finds_it_so():
    y = np.linspace(40, 60, 300)
    absurd = y.copy()
    absurd[5] = 1e6  # ten spans of the middle 98 % is about 200
    assert vs.plausible_scores(y, [absurd]).tolist() == [i != 5 for i in range(300)]
    unknown = np.where(np.arange(300) == 5, np.nan, y)  # outputs that overflowed there: far as well
    assert vs.plausible_scores(y, [absurd, unknown]).tolist() == [i != 5 for i in range(300)]
    assert vs.plausible_scores(y, [absurd, y]).all()  # one reference predicts it: its input is one models know
    assert vs.plausible_scores(y, [np.full(300, np.nan)]).all()  # a reference that predicts nothing tells nothing


def test_a_history_keeps_its_vote_when_the_screen_leaves_out_some_of_its_samples(tmp_path):
    """With GATE_MIN_EVAL at the evaluation ring's capacity, one wild score left out put the history one sample
    short of it: it was no longer judged, and a candidate that had learned an inverted burst passed on the window
    alone and was published."""
    x, y, coef = linear_data()
    y = y.copy()
    y[7] = 1e4
    trainer = held_out_trainer(tmp_path, x, y, coef)
    cfg = config(gate_min_eval=len(y), eval_capacity=len(y))
    _, history, _ = vs.gather_evidence(trainer, fitted(coef, sign=-1.0))  # it learned the burst
    assert (history.n, history.left_out) == (len(y) - 1, 1) and history.record()["left_out"] == 1
    window = evidence(len(y), scores(0.9, r2=0.8), incumbent=scores(-0.9, r2=-1.0))  # the burst's own samples
    verdict = vs.judge(cfg, window, history)
    assert not verdict.published and verdict.reason.startswith("history: R² "), verdict.reason
    _, good, _ = vs.gather_evidence(trainer, fitted(coef))
    assert vs.judge(cfg, window, good).published


@pytest.mark.parametrize("scores, kept", [
    ([50.0] * 150 + [1e4] + [60.0] * 149, [True] * 150 + [False] + [True] * 149),
    ([100.0] * 295 + [0.0] * 5, [True] * 300),  # a middle 98 % of one value: no span to measure by, all kept
    (list(np.linspace(90, 100, 294)) + [3.0] * 6, [True] * 300),  # a real low tail, in the middle 98 %
    (list(np.linspace(40, 60, 298)) + [-500.0, 200.0], [True] * 298 + [False, True]),  # 10 spans: about 200
    ([100.0] * 1980 + list(np.linspace(60, 80, 20)), [True] * 2000),  # else only one value would be left
], ids=["one of 1e4", "mostly one score", "a low tail", "within ten spans and beyond", "one value left"])
def test_plausible_scores_leave_out_only_scores_far_outside_the_middle_98_percent(scores, kept):
    y = np.array(scores, np.float64)
    assert vs.plausible_scores(y, []).tolist() == kept
    assert vs.plausible_scores(y, [np.full(len(y), np.median(y))]).tolist() == kept  # references near the median


def test_a_rare_real_score_a_reference_predicts_is_kept():
    """Target-quality encodes at 93 ± 0.7 and a few failed ones at 40: ten spans of the middle 98 % is under
    their distance from the median. A reference that predicts them shows they are real, and they stay, or a
    candidate that forgot them would be judged as if they had never happened."""
    rng = np.random.default_rng(0)
    y = np.r_[rng.normal(93, 0.7, 1984), rng.normal(40, 2, 16)]
    assert not vs.plausible_scores(y, [np.full(len(y), 93.0)])[-16:].any()  # no reference sees them: left out
    knows = np.r_[np.full(1984, 93.0), y[-16:] + 1.0]
    assert vs.plausible_scores(y, [np.full(len(y), 93.0), knows]).all()  # one reference predicts them: kept


def test_the_r2_floor_shrinks_with_the_evidence():
    assert [round(vs.r2_floor(n), 4) for n in (100, 400, 2000)] == [0.2, 0.1, 0.0447]


@pytest.mark.parametrize("name", ["window", "history"])
@pytest.mark.parametrize("drop", [0.0, 0.005, 0.1])
def test_judge_plcc_boundary_exactly_the_allowed_drop_passes_and_just_below_fails(name, drop):
    theirs = 0.8765432101
    at_boundary = theirs - drop  # the float the rule compares with
    judged = evidence(ENOUGH, scores(at_boundary), incumbent=scores(theirs), champion=scores(theirs - 0.1))
    verdict = verdict_on(name, judged, gate_max_plcc_drop=drop)
    assert verdict.gate == "passed", verdict.reason
    assert f"{name}: R² 0.5000, PLCC {at_boundary:.6f}, incumbent {theirs:.6f} on {ENOUGH} samples" in verdict.reason
    below = evidence(ENOUGH, scores(math.nextafter(at_boundary, -1.0)), incumbent=scores(theirs),
                     champion=scores(theirs - 0.1))
    verdict = verdict_on(name, below, gate_max_plcc_drop=drop)
    assert verdict.gate == "quarantined"
    assert verdict.reason == (f"{name}: PLCC {math.nextafter(at_boundary, -1.0):.6f} on {ENOUGH} samples, below the "
                              f"incumbent's {theirs:.6f} by more than VMAFX_SIDECAR_GATE_MAX_PLCC_DROP ({drop})")


@pytest.mark.parametrize("name", ["window", "history"])
@pytest.mark.parametrize("drop", [0.0, 0.01, 0.2])
def test_judge_r2_boundary_exactly_the_allowed_drop_passes_and_just_below_fails(name, drop):
    theirs = 0.8765432101
    at_boundary = theirs - drop  # the float the rule compares with
    # The champion has the better PLCC, the incumbent the better R²: each rule compares with its own best.
    references = {"incumbent": scores(0.9, r2=theirs), "champion": scores(0.95, r2=theirs - 0.1)}
    verdict = verdict_on(name, evidence(ENOUGH, scores(0.95, r2=at_boundary), **references), gate_max_r2_drop=drop)
    assert verdict.gate == "passed", verdict.reason
    below = math.nextafter(at_boundary, -1.0)
    verdict = verdict_on(name, evidence(ENOUGH, scores(0.95, r2=below), **references), gate_max_r2_drop=drop)
    assert verdict.gate == "quarantined"
    assert verdict.reason == (f"{name}: R² {below:.4f} on {ENOUGH} samples, below the incumbent's {theirs:.4f} by "
                              f"more than VMAFX_SIDECAR_GATE_MAX_R2_DROP ({drop})")


def test_judge_refuses_a_candidate_on_another_scale_though_its_plcc_is_the_incumbents():
    """A model whose predictions are the incumbent's plus a constant has the incumbent's PLCC to the last digit,
    and predicts every score worse: R² sees it (SSE grows by n × shift²), PLCC cannot."""
    x, y, coef = linear_data()
    for shift, published in ((0.5, False), (0.05, True)):  # half a point: 0.44 of the scores' spread
        shifted = fitted(coef)
        shifted.layers[-1][1][...] += shift
        history = measured({"candidate": shifted, "incumbent": fitted(coef)}, x, y)
        ours, theirs = history.scores["candidate"], history.scores["incumbent"]
        assert ours.plcc == pytest.approx(theirs.plcc, abs=1e-12) and ours.r2 < theirs.r2
        verdict = vs.judge(config(gate_min_eval=ENOUGH), GOOD, history)
        assert verdict.published is published, verdict.reason
        if not published:
            assert verdict.reason.startswith("history: R²") and "VMAFX_SIDECAR_GATE_MAX_R2_DROP" in verdict.reason


@pytest.mark.parametrize("best", ["incumbent", "champion"])
def test_judge_compares_with_the_best_reference(best):
    other = "champion" if best == "incumbent" else "incumbent"
    references = {best: scores(0.95), other: scores(0.80)}
    between = evidence(ENOUGH, scores(0.90), **references)  # beats one reference, not the best one
    verdict = vs.judge(config(gate_min_eval=ENOUGH), between, GOOD)
    assert verdict.gate == "quarantined" and f"below the {best}'s 0.950000" in verdict.reason
    close = evidence(ENOUGH, scores(0.946), **references)  # within GATE_MAX_PLCC_DROP of the best
    verdict = vs.judge(config(gate_min_eval=ENOUGH), close, GOOD)
    assert verdict.gate == "passed" and f"PLCC 0.946000, {best} 0.950000 on" in verdict.reason


def test_judge_ignores_an_unmeasurable_reference():
    cfg = config(gate_min_eval=ENOUGH)
    verdict = vs.judge(cfg, evidence(ENOUGH, scores(0.80), incumbent=scores(0.802), champion=None), GOOD)
    assert verdict.gate == "passed" and "incumbent 0.802000" in verdict.reason
    verdict = vs.judge(cfg, evidence(ENOUGH, scores(0.70), incumbent=None, champion=scores(0.9)), GOOD)
    assert verdict.gate == "quarantined" and "below the champion's" in verdict.reason
    # with no reference measurable, R² alone decides (it must exceed 2/√300 = 0.115)
    assert vs.judge(cfg, evidence(ENOUGH, scores(0.1, r2=0.12), base=None), GOOD).gate == "passed"
    assert vs.judge(cfg, evidence(ENOUGH, scores(0.9, r2=0.11), base=None), GOOD).gate == "quarantined"
    # a base model whose outputs overflow, measured on real samples
    x, y, coef = linear_data()
    broken = fitted(coef)
    broken.flat[-1] = np.inf
    history = measured({"candidate": fitted(coef), "base": broken}, x, y)
    assert history.scores["base"] is None
    assert vs.judge(cfg, NO_EVIDENCE, history).gate == "passed"


def test_judge_judges_only_the_sets_with_enough_samples():
    cfg = config(gate_min_eval=ENOUGH)
    terrible = evidence(ENOUGH - 1, scores(-0.9, r2=-4.0), incumbent=scores(0.9))
    verdict = vs.judge(cfg, terrible, GOOD)
    assert verdict.gate == "passed" and verdict.reason.startswith("history: ") and "window" not in verdict.reason
    verdict = vs.judge(cfg, GOOD, terrible)
    assert verdict.gate == "passed" and verdict.reason.startswith("window: ") and "history" not in verdict.reason
    both = vs.judge(cfg, GOOD, GOOD)
    assert both.gate == "passed" and both.reason.startswith("window: ") and "; history: " in both.reason
    assert vs.judge(cfg, GOOD, dataclasses.replace(terrible, n=ENOUGH)).gate == "quarantined"
    assert vs.judge(cfg, dataclasses.replace(terrible, n=ENOUGH), GOOD).gate == "quarantined"


def test_judge_refuses_a_worse_model_measured_on_real_samples_and_names_both_plccs():
    x, y, coef = linear_data()
    incumbent = fitted(coef)
    candidate = fitted(coef * np.array([1.0, 0.0, 1.0, 1.0]))  # drops a feature: a lower PLCC, R² still > 0
    history = measured({"candidate": candidate, "incumbent": incumbent, "champion": incumbent}, x, y)
    ours, theirs = history.scores["candidate"], history.scores["incumbent"]
    assert ours.r2 > 0 and 0 < ours.plcc < theirs.plcc - 0.01
    verdict = vs.judge(config(gate_min_eval=ENOUGH), NO_EVIDENCE, history)
    assert verdict.gate == "quarantined"
    assert f"{ours.plcc:.6f}" in verdict.reason and f"{theirs.plcc:.6f}" in verdict.reason
    assert verdict.reason.startswith("history: PLCC") and f"on {ENOUGH} samples" in verdict.reason
    json.dumps(verdict.record(), allow_nan=False)  # what goes into the record is plain JSON
    inverted = measured({"candidate": fitted(coef, -1.0), "base": incumbent}, x, y)
    assert vs.judge(config(gate_min_eval=ENOUGH), NO_EVIDENCE, inverted).reason.startswith("history: R² -")


def test_record_keeps_the_history_under_the_keys_records_had_before_the_window():
    window = evidence(40, scores(0.7), base=scores(0.6))
    before = vs.Evidence(ENOUGH, {"candidate": scores(0.9, r2=0.8), "base": scores(0.85, r2=0.7)}, held_out=120)
    record = vs.judge(config(), window, before).record()
    assert set(record) == {"metrics", "gate", "reason"}
    metrics = record["metrics"]
    assert metrics["candidate"] == dataclasses.asdict(before.scores["candidate"])
    assert metrics["incumbent"] == dataclasses.asdict(before.scores["base"])  # before a publish: the base
    assert metrics["eval_n"] == ENOUGH
    assert metrics["window"] == {"n": 40, "candidate": dataclasses.asdict(scores(0.7)),
                                 "base": dataclasses.asdict(scores(0.6))}
    assert metrics["history"] == {"n": ENOUGH, "held_out": 120, "candidate": dataclasses.asdict(scores(0.9, r2=0.8)),
                                  "base": dataclasses.asdict(scores(0.85, r2=0.7))}
    after = evidence(ENOUGH, scores(0.9), incumbent=scores(0.8), champion=scores(0.85))
    assert vs.judge(config(), window, after).record()["metrics"]["incumbent"] == dataclasses.asdict(scores(0.8))
    empty = vs.judge(config(), NO_EVIDENCE, NO_EVIDENCE).record()["metrics"]
    assert (empty["candidate"], empty["incumbent"], empty["eval_n"]) == (None, None, 0)


def test_a_published_candidate_displaces_the_champion_when_its_history_plcc_and_r2_are_at_least_the_champions():
    def displaces(window: vs.Evidence, history: vs.Evidence) -> bool:
        return vs.Verdict("passed", window, history, "").displaces_champion(ENOUGH)

    champion = {"incumbent": scores(0.5), "champion": scores(0.8)}
    assert displaces(GOOD, evidence(ENOUGH, scores(0.8), **champion))  # a tie: the newer one
    assert not displaces(GOOD, evidence(ENOUGH, scores(math.nextafter(0.8, 0.0)), **champion))
    # a better PLCC and a worse R²: replaced on PLCC alone, each champion could be GATE_MAX_R2_DROP worse
    assert not displaces(GOOD, evidence(ENOUGH, scores(0.9, r2=math.nextafter(0.5, 0.0)), **champion))
    assert displaces(GOOD, evidence(ENOUGH, scores(0.9, r2=0.5), **champion))
    # with no history measured, the window decides; with neither, the first published one is the champion
    assert not displaces(evidence(ENOUGH, scores(0.7), **champion), NO_EVIDENCE)
    assert displaces(evidence(ENOUGH, scores(0.9), **champion), NO_EVIDENCE)
    assert displaces(NO_EVIDENCE, NO_EVIDENCE)
    # a history too small to judge on, the window judged: a PLCC on three samples displaced the champion
    assert not displaces(evidence(ENOUGH, scores(0.7), **champion), evidence(3, scores(0.99), **champion))
    # a history the gate judged on, gathered whole with some wild samples left out: it decides, as in the gate
    gathered = dataclasses.replace(evidence(ENOUGH - 10, scores(0.9), **champion), left_out=10)
    assert displaces(evidence(ENOUGH, scores(0.7), **champion), gathered)
    assert vs.judge(config(), NO_EVIDENCE, gathered).gate == "passed"


# ---- 4. the writer ----

def test_records_carry_their_format_and_one_from_a_newer_sidecar_is_not_trusted(tmp_path, caplog):
    writer = vs.CheckpointWriter(str(tmp_path))
    record = write(writer, UNGATED).record
    assert record["format"] == vs.RECORD_FORMAT == read_json(tmp_path / "latest.json")["format"]
    older = {k: v for k, v in record.items() if k != "format"}  # as 974ac50 wrote them
    (tmp_path / "model_v000001.json").write_text(json.dumps(older))
    assert vs.read_record(tmp_path / "model_v000001.json") == record
    (tmp_path / "latest.json").write_text(json.dumps({**record, "format": vs.RECORD_FORMAT + 1}))
    caplog.clear()
    assert vs.read_record(tmp_path / "latest.json") is None
    assert "newer than this sidecar reads" in caplog.text


def test_pointers_a_newer_sidecar_wrote_are_left_as_they_are(tmp_path, caplog):
    """After an image rollback: nodes keep the model latest.onnx holds, and latest.json is not moved back to the
    newest checkpoint this version can read."""
    writer = vs.CheckpointWriter(str(tmp_path))
    write(writer, UNGATED, seed=1)
    record = write(writer, UNGATED, seed=2).record
    for name in ("latest.json", "model_v000002.json"):
        (tmp_path / name).write_text(json.dumps({**record, "format": vs.RECORD_FORMAT + 1}))
    pointers = {name: (tmp_path / name).read_bytes() for name in ("latest.json", "latest.onnx", "latest.onnx.sha256")}
    again = vs.CheckpointWriter(str(tmp_path))
    assert again.latest is None and again.latest_model() is None  # candidates face the base model
    assert {name: (tmp_path / name).read_bytes() for name in pointers} == pointers
    assert "written by a newer sidecar: left as it is" in caplog.text
    assert write(again, UNGATED, seed=3).record == read_json(tmp_path / "latest.json")  # until it publishes


def newer(path: Path) -> None:
    path.write_text(json.dumps({**read_json(path), "format": vs.RECORD_FORMAT + 1}))


def test_a_newer_latest_json_naming_a_rolled_back_checkpoint_is_repaired_still(tmp_path):
    writer = vs.CheckpointWriter(str(tmp_path))
    v1 = write(writer, UNGATED, seed=1).record
    write(writer, UNGATED, seed=2)
    for name in ("latest.json", "model_v000002.json"):
        newer(tmp_path / name)
    for name in files_of(2):  # the README's rollback recipe
        (tmp_path / name).rename(tmp_path / "quarantine" / name)
    again = vs.CheckpointWriter(str(tmp_path))
    assert again.latest == v1 == read_json(tmp_path / "latest.json")
    assert (tmp_path / "latest.onnx").read_bytes() == (tmp_path / "model_v000001.onnx").read_bytes()


def test_a_newer_latest_json_behind_a_checkpoint_this_version_published_is_repaired_still(tmp_path):
    """A crash after this version replaced latest.onnx, before it replaced a newer sidecar's latest.json."""
    writer = vs.CheckpointWriter(str(tmp_path))
    write(writer, UNGATED, seed=1)
    newer(tmp_path / "latest.json")
    stale = (tmp_path / "latest.json").read_bytes()
    v2 = write(writer, UNGATED, seed=2).record
    (tmp_path / "latest.json").write_bytes(stale)
    again = vs.CheckpointWriter(str(tmp_path))
    assert again.latest == v2 == read_json(tmp_path / "latest.json")


def test_a_newer_latest_json_naming_the_only_checkpoint_rolled_back_goes_with_latest_onnx(tmp_path):
    writer = vs.CheckpointWriter(str(tmp_path))
    write(writer, UNGATED, seed=1)
    for name in ("latest.json", "model_v000001.json"):
        newer(tmp_path / name)
    for name in files_of(1):  # the README's rollback recipe: nothing is published now
        (tmp_path / name).rename(tmp_path / "quarantine" / name)
    assert vs.CheckpointWriter(str(tmp_path)).latest is None
    assert not [n for n in ("latest.json", "latest.onnx", "latest.onnx.sha256") if (tmp_path / n).exists()]


def test_latest_onnx_goes_when_nothing_is_published_even_beside_a_corrupt_latest_json(tmp_path):
    writer = vs.CheckpointWriter(str(tmp_path))
    write(writer, UNGATED, seed=1)
    for name in files_of(1):
        (tmp_path / name).rename(tmp_path / "quarantine" / name)
    (tmp_path / "latest.json").write_bytes((tmp_path / "latest.json").read_bytes()[:20])
    assert vs.CheckpointWriter(str(tmp_path)).latest is None
    assert not [n for n in ("latest.json", "latest.onnx", "latest.onnx.sha256") if (tmp_path / n).exists()]


def test_published_write_produces_the_files_and_latest_json(tmp_path):
    x, y, coef = linear_data()
    verdict = vs.judge(config(gate_min_eval=2), NO_EVIDENCE, measured({"candidate": fitted(coef), "base": fitted(coef)},
                                                                       x, y))
    writer = vs.CheckpointWriter(str(tmp_path))
    before = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    checkpoint = vs.write_checkpoint(writer, random_weights(1), 7, 28, verdict, PROBE)
    after = datetime.datetime.now(datetime.timezone.utc)
    assert checkpoint.published and checkpoint.path == tmp_path / "model_v000001.onnx"
    assert model_files(tmp_path) == files_of(1)
    assert os.listdir(tmp_path / "quarantine") == []
    latest = read_json(tmp_path / "latest.json")
    assert set(latest) == RECORD_KEYS
    assert latest == checkpoint.record == read_json(tmp_path / "model_v000001.json")
    assert (tmp_path / "latest.json").read_bytes() == (tmp_path / "model_v000001.json").read_bytes()
    assert (latest["version"], latest["file"], latest["step"], latest["samples_trained"]) == \
        (1, "model_v000001.onnx", 7, 28)
    assert latest["sha256"] == sha256_of(checkpoint.path)
    assert (tmp_path / "model_v000001.onnx.sha256").read_text() == f"{latest['sha256']}  model_v000001.onnx\n"
    assert latest["gate"] == "passed" and latest["metrics"] == verdict.record()["metrics"]
    created = datetime.datetime.fromisoformat(latest["created"])
    assert created.utcoffset() == datetime.timedelta(0)
    slack = datetime.timedelta(seconds=60)
    assert before - slack <= created <= after + slack
    # the same instant, to the second: created is cut to it, created_unix rounded to the ms (x.9996 -> x + 1)
    assert abs(created.timestamp() - latest["created_unix"]) <= 1
    # the file computes what the weights do
    loaded = writer.latest_model()
    np.testing.assert_array_equal(loaded.flat, vs.MLP.from_weights(random_weights(1)).flat)


def test_quarantined_write_goes_to_quarantine_and_leaves_latest_alone(tmp_path):
    writer = vs.CheckpointWriter(str(tmp_path))
    write(writer, UNGATED, seed=1)
    latest_before = (tmp_path / "latest.json").read_bytes()
    checkpoint = write(writer, REFUSED, seed=2, step=2)
    assert not checkpoint.published
    assert checkpoint.path == tmp_path / "quarantine" / "model_v000002.onnx"
    assert model_files(tmp_path) == files_of(1)
    assert model_files(tmp_path / "quarantine") == files_of(2)
    assert (tmp_path / "latest.json").read_bytes() == latest_before
    assert writer.latest["version"] == 1
    record = read_json(tmp_path / "quarantine" / "model_v000002.json")
    assert record == checkpoint.record
    assert set(record) == RECORD_KEYS
    assert record["gate"] == "quarantined" and record["reason"] == "refused by the test"
    assert record["sha256"] == sha256_of(checkpoint.path)
    assert (tmp_path / "quarantine" / "model_v000002.onnx.sha256").read_text() == \
        f"{record['sha256']}  model_v000002.onnx\n"


def test_versions_are_one_sequence_across_published_and_quarantined(tmp_path):
    writer = vs.CheckpointWriter(str(tmp_path))
    kinds = [write(writer, verdict, seed=i).published for i, verdict in enumerate((UNGATED, REFUSED, UNGATED))]
    assert kinds == [True, False, True]
    assert model_files(tmp_path) == files_of(1) | files_of(3)
    assert model_files(tmp_path / "quarantine") == files_of(2)
    assert read_json(tmp_path / "latest.json")["version"] == 3
    write(writer, REFUSED, seed=4)
    # a restart continues after the highest version, quarantined ones included
    again = vs.CheckpointWriter(str(tmp_path))
    assert again.latest["version"] == 3
    assert write(again, UNGATED, seed=5).path.name == "model_v000005.onnx"


def test_readback_mismatch_quarantines(tmp_path, monkeypatch):
    real = ob.build_mlp_model

    def off_by_one(weights: ob.MLPWeights, metadata: dict) -> object:
        layers = [(w, b) for w, b in weights.layers]
        w, b = layers[-1]
        layers[-1] = (w, np.asarray(b) + 1.0)  # the file predicts 1 more than the weights do
        return real(ob.MLPWeights(layers, weights.activations), metadata)

    writer = vs.CheckpointWriter(str(tmp_path))
    write(writer, UNGATED, seed=1)
    monkeypatch.setattr(vs.onnx_builder, "build_mlp_model", off_by_one)
    checkpoint = write(writer, UNGATED, seed=2)
    assert not checkpoint.published
    assert checkpoint.path == tmp_path / "quarantine" / "model_v000002.onnx"
    assert checkpoint.record["reason"].startswith("read-back check failed: ")
    assert checkpoint.record["gate"] == "quarantined"
    assert read_json(tmp_path / "latest.json")["version"] == 1
    assert model_files(tmp_path / "quarantine") == files_of(2)
    monkeypatch.setattr(vs.onnx_builder, "build_mlp_model", real)
    assert write(writer, UNGATED, seed=3).published


def test_readback_tolerates_float_rounding_but_not_a_small_real_difference(tmp_path):
    weights = random_weights(3)
    writer = vs.CheckpointWriter(str(tmp_path))
    path = write(writer, UNGATED, seed=3).path
    assert vs.readback_problem(path, weights, PROBE) is None
    w, b = weights.layers[-1]
    shifted = ob.MLPWeights([*weights.layers[:-1], (w, b + np.float32(1e-3))], weights.activations)
    assert "differ" in vs.readback_problem(path, shifted, PROBE)


def test_a_memory_error_in_the_readback_is_no_fault_of_the_file(tmp_path, monkeypatch):
    """It quarantined a good checkpoint as "read-back check failed: MemoryError", a model fault to whoever looks,
    its version spent (the scarce hunt); a MemoryError elsewhere ends the process, and a restart recovers."""
    path = write(vs.CheckpointWriter(str(tmp_path)), UNGATED, seed=3).path

    def out_of_memory(*args):
        raise MemoryError

    monkeypatch.setattr(vs, "ReferenceEvaluator", out_of_memory)
    with pytest.raises(MemoryError):
        vs.readback_problem(path, random_weights(3), PROBE)


# ---- 5. retention ----

def test_retention_keeps_the_newest_published(tmp_path):
    writer = vs.CheckpointWriter(str(tmp_path), keep=3)
    for i in range(10):
        write(writer, UNGATED, seed=i)
    assert model_files(tmp_path) == files_of(8) | files_of(9) | files_of(10)
    assert read_json(tmp_path / "latest.json")["version"] == 10


def test_retention_keeps_ten_quarantined(tmp_path):
    writer = vs.CheckpointWriter(str(tmp_path), keep=3)
    write(writer, UNGATED, seed=0)
    for i in range(12):
        write(writer, REFUSED, seed=i + 1)
    assert model_files(tmp_path / "quarantine") == set().union(*(files_of(v) for v in range(4, 14)))
    assert model_files(tmp_path) == files_of(1)
    assert read_json(tmp_path / "latest.json")["version"] == 1


def test_retention_never_deletes_the_checkpoint_latest_names(tmp_path):
    writer = vs.CheckpointWriter(str(tmp_path), keep=0)
    records = [write(writer, UNGATED, seed=i).record for i in range(4)]
    writer.point_latest(records[0], (tmp_path / records[0]["file"]).read_bytes())  # an older one is the latest
    writer.keep = 2
    write(writer, REFUSED, seed=9)  # v5, quarantined; pruning runs
    assert model_files(tmp_path) == files_of(1) | files_of(3) | files_of(4)
    assert read_json(tmp_path / "latest.json") == records[0]
    # with keep=1 a newest published one that latest does not name still goes
    writer.keep = 1
    write(writer, REFUSED, seed=10)
    assert model_files(tmp_path) == files_of(1) | files_of(4)


def test_retention_keep_zero_keeps_all(tmp_path):
    writer = vs.CheckpointWriter(str(tmp_path), keep=0)
    for i in range(12):
        write(writer, UNGATED, seed=i)
    assert model_files(tmp_path) == set().union(*(files_of(v) for v in range(1, 13)))


# ---- 6. recovery of latest.json ----

def test_recovery_after_a_crash_between_publishing_and_pointing(tmp_path, caplog):
    writer = vs.CheckpointWriter(str(tmp_path))
    v1, v2 = write(writer, UNGATED, seed=1).record, write(writer, UNGATED, seed=2).record
    (tmp_path / "latest.json").write_text(vs.json_text(v1))  # v2 was published, latest.json not yet pointed
    with caplog.at_level(logging.WARNING, logger=vs.log.name):
        again = vs.CheckpointWriter(str(tmp_path))
    assert again.latest == v2 == read_json(tmp_path / "latest.json")
    assert "model_v000002.onnx" in caplog.text
    assert write(again, UNGATED, seed=3).path.name == "model_v000003.onnx"


def test_recovery_when_the_newest_published_checkpoint_is_deleted(tmp_path):
    writer = vs.CheckpointWriter(str(tmp_path))
    v1 = write(writer, UNGATED, seed=1).record
    write(writer, UNGATED, seed=2)
    for name in files_of(2):
        (tmp_path / name).unlink()
    again = vs.CheckpointWriter(str(tmp_path))
    assert again.latest == v1 == read_json(tmp_path / "latest.json")
    np.testing.assert_array_equal(again.latest_model().flat, vs.MLP.from_weights(random_weights(1)).flat)
    for name in files_of(1):
        (tmp_path / name).unlink()
    third = vs.CheckpointWriter(str(tmp_path))
    assert third.latest is None and not (tmp_path / "latest.json").exists()
    assert third.latest_model() is None


def test_recovery_when_only_the_model_file_latest_names_is_deleted(tmp_path):
    # README: "latest.json only ever names a published, verified file". Deleting only model_v000002.onnx
    # leaves its .json and .sha256 in place; they must not keep latest.json pointing at a file that is gone.
    writer = vs.CheckpointWriter(str(tmp_path))
    v1 = write(writer, UNGATED, seed=1).record
    write(writer, UNGATED, seed=2)
    (tmp_path / "model_v000002.onnx").unlink()
    again = vs.CheckpointWriter(str(tmp_path))
    assert again.latest == v1 == read_json(tmp_path / "latest.json")


def test_recovery_ignores_a_checkpoint_whose_sha256_was_never_written(tmp_path):
    # a crash after the .onnx and .json renames but before the .sha256 one: that version is not published
    writer = vs.CheckpointWriter(str(tmp_path))
    v1 = write(writer, UNGATED, seed=1).record
    write(writer, UNGATED, seed=2)
    (tmp_path / "model_v000002.onnx.sha256").unlink()
    (tmp_path / "latest.json").write_text(vs.json_text(v1))
    again = vs.CheckpointWriter(str(tmp_path))
    assert again.latest == v1 == read_json(tmp_path / "latest.json")
    assert write(again, UNGATED, seed=3).path.name == "model_v000003.onnx"  # v2 is never written over


def test_latest_model_refuses_a_file_whose_sha256_differs_and_takes_latest_onnx_then(tmp_path, caplog):
    writer = vs.CheckpointWriter(str(tmp_path))
    checkpoint = write(writer, UNGATED, seed=1)
    published = writer.latest_model()
    for path in (checkpoint.path, tmp_path / "latest.onnx"):
        data = bytearray(path.read_bytes())
        data[-1] ^= 0x01
        path.write_bytes(bytes(data))
        caplog.clear()
        with caplog.at_level(logging.ERROR, logger=vs.log.name):
            model = writer.latest_model()
        assert f"{path.name} does not have the sha256" in caplog.text
        if path == checkpoint.path:  # the copy nodes load is intact: the incumbent is still the published model
            np.testing.assert_array_equal(model.flat, published.flat)
    assert model is None  # neither holds it: the gate takes the base model


# ---- 7. the trainer ----

def gate_trainer(directory: Path, **settings) -> vs.Trainer:
    """A trainer with 40 held-out samples whose scores are the initial model's own predictions (PLCC 1)."""
    values = dict(ema_decay=0.0, momentum=0.0, warmup_steps=0, weight_decay=0.0, max_grad_norm=1e6,
                  gate_min_eval=20, eval_capacity=64, holdout_fraction=0.0)
    trainer = make_trainer(directory, **(STEPPING | values | settings))
    x = np.random.default_rng(1).uniform(0, 1, (40, 8)).astype(np.float32)
    for row, score in zip(x, trainer.model.forward(x)[:, 0]):
        trainer.add(row, score, held_out=True)
    return trainer


def test_trainer_quarantines_a_worse_ema_and_keeps_its_incumbent(tmp_path):
    trainer = gate_trainer(tmp_path, lr=0.5)
    incumbent = trainer.incumbent
    before = incumbent.flat.copy()
    rng = np.random.default_rng(2)
    x = rng.uniform(0, 1, (4, 8)).astype(np.float32)
    labels = -50 * trainer.model.forward(x)[:, 0]  # inverted scores
    result = None
    for row, score in zip(x, labels):
        result = trainer.add(row, score)
    assert result is not None and result.checkpoint is not None
    assert not result.checkpoint.published, result.checkpoint.record
    assert trainer.last_gate == result.checkpoint.record and trainer.last_gate["gate"] == "quarantined"
    metrics = trainer.last_gate["metrics"]
    assert metrics["eval_n"] == 40 and metrics["incumbent"]["plcc"] == pytest.approx(1.0, abs=1e-6)
    assert metrics["candidate"]["plcc"] < 1.0 - 0.005
    assert trainer.incumbent is incumbent
    np.testing.assert_array_equal(trainer.incumbent.flat, before)
    assert not np.array_equal(trainer.ema.flat, before)
    assert not (tmp_path / "latest.json").exists()
    assert model_files(tmp_path / "quarantine") == files_of(1)


def test_trainer_publishes_a_passing_ema_as_the_new_incumbent(tmp_path):
    trainer = gate_trainer(tmp_path, lr=0.001)
    initial = trainer.incumbent.flat.copy()
    rng = np.random.default_rng(2)
    x = rng.uniform(0, 1, (4, 8)).astype(np.float32)
    labels = trainer.model.forward(x)[:, 0] + rng.normal(0, 0.5, 4).astype(np.float32)
    for row, score in zip(x, labels):
        result = trainer.add(row, score)
    assert result.checkpoint is not None and result.checkpoint.published, result.checkpoint.record
    assert result.checkpoint.record["gate"] == "passed"
    assert not np.array_equal(trainer.ema.flat, initial)
    np.testing.assert_array_equal(trainer.incumbent.flat, trainer.ema.flat)
    assert trainer.incumbent is not trainer.ema
    np.testing.assert_array_equal(trainer.checkpoints.latest_model().flat, trainer.incumbent.flat)
    published = trainer.incumbent.flat.copy()
    # the next step changes the EMA, not the incumbent, until it is published in turn
    trainer.config = dataclasses.replace(trainer.config, min_samples_ckpt=10**6)
    for row, score in zip(x, labels):
        trainer.add(row, score)
    assert trainer.steps == 2 and not np.array_equal(trainer.ema.flat, published)
    np.testing.assert_array_equal(trainer.incumbent.flat, published)


def test_trainer_keeps_the_last_published_incumbent_when_a_later_checkpoint_is_quarantined(tmp_path):
    trainer = gate_trainer(tmp_path, lr=0.001)
    rng = np.random.default_rng(3)
    x = rng.uniform(0, 1, (4, 8)).astype(np.float32)
    for row, score in zip(x, trainer.model.forward(x)[:, 0] + 0.5):
        result = trainer.add(row, score)
    assert result.checkpoint.published and result.checkpoint.record["version"] == 1
    published = trainer.incumbent.flat.copy()
    latest = (tmp_path / "latest.json").read_bytes()
    trainer.config = dataclasses.replace(trainer.config, lr=0.5)
    for row, score in zip(x, -50 * trainer.model.forward(x)[:, 0]):
        result = trainer.add(row, score)
    assert not result.checkpoint.published and result.checkpoint.record["version"] == 2
    assert trainer.last_gate["metrics"]["incumbent"] == dataclasses.asdict(
        measure(trainer.incumbent, trainer.eval.x[:40], trainer.eval.y[:40]))
    np.testing.assert_array_equal(trainer.incumbent.flat, published)
    np.testing.assert_array_equal(trainer.checkpoints.latest_model().flat, published)
    assert (tmp_path / "latest.json").read_bytes() == latest


def step_on_random_samples(trainer: vs.Trainer, rng: np.random.Generator) -> vs.StepResult | None:
    """One step's worth of new samples (STEPPING's 4); what the last one's add returned."""
    x, y = rng.uniform(0, 1, (4, 8)).astype(np.float32), rng.uniform(20, 100, 4).astype(np.float32)
    return [trainer.add(row, score) for row, score in zip(x, y)][-1]


def test_progressive_validation_predicts_each_sample_before_the_step_that_trains_on_it(tmp_path):
    # EMA decay 0 makes the EMA the new weights, and an unclipped step moves them far: the candidate's
    # predictions before the step and after it are easy to tell apart.
    trainer = make_trainer(tmp_path, **(STEPPING | dict(min_samples_ckpt=10**9, ema_decay=0.0, warmup_steps=0,
                                                        max_grad_norm=1e6)))
    rng = np.random.default_rng(8)
    trainer.ema.flat[...] = trainer.model.flat + rng.normal(0, 0.1, trainer.model.flat.shape).astype(np.float32)
    before = trainer.ema.copy()  # the candidate, unlike the base
    x, y = rng.uniform(0, 1, (4, 8)).astype(np.float32), rng.uniform(20, 100, 4).astype(np.float32)
    for row, score in zip(x, y):
        trainer.add(row, score)
    assert trainer.steps == 1 and trainer.window.n == 4

    def on_these_samples(candidate: vs.MLP) -> vs.Evidence:
        predictions = np.stack([candidate.forward(x)[:, 0], trainer.incumbent.forward(x)[:, 0]])
        return window_of(predictions, y, [4], references=BASE).evidence(BASE)

    live = trainer.window.evidence(trainer.references())
    expected, after = on_these_samples(before).scores, on_these_samples(trainer.ema).scores
    for name in ("candidate", "base"):
        ours, theirs = live.scores[name], expected[name]
        assert (ours.plcc, ours.r2, ours.rmse) == pytest.approx((theirs.plcc, theirs.r2, theirs.rmse), rel=1e-6)
    # the step moved the EMA far: what the window holds are the predictions of the one before it
    assert abs(after["candidate"].rmse - expected["candidate"].rmse) > 1e-2 * expected["candidate"].rmse


@pytest.mark.parametrize("gate", ["on", "off"])  # on: each checkpoint is quarantined (too little evidence)
def test_each_checkpoint_starts_a_new_window_but_a_failed_write_does_not(tmp_path, monkeypatch, gate):
    trainer = make_trainer(tmp_path, **STEPPING, gate=gate)  # a checkpoint due at every step of 4 samples
    rng = np.random.default_rng(4)
    first = step_on_random_samples(trainer, rng).checkpoint
    assert first.published is (gate == "off")
    assert first.record["metrics"]["window"]["n"] == 4 and trainer.window.n == 0

    def disk_full(path, chunks, mode=0o644):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(vs, "write_synced", disk_full)
    assert step_on_random_samples(trainer, rng).checkpoint is None
    assert trainer.window.n == 4  # the window goes on to the next try
    monkeypatch.undo()
    third = step_on_random_samples(trainer, rng).checkpoint
    assert third.record["version"] == 2 and third.record["metrics"]["window"]["n"] == 8 and trainer.window.n == 0


def test_references_are_the_base_until_a_checkpoint_is_published_then_the_incumbent_and_the_champion(tmp_path):
    trainer = gate_trainer(tmp_path, lr=0.001, gate_min_eval=64)  # 40 held out: too little evidence
    rng = np.random.default_rng(5)
    assert trainer.references() == {"base": trainer.incumbent} and not trainer.has_champion
    assert not step_on_random_samples(trainer, rng).checkpoint.published
    assert trainer.references() == {"base": trainer.incumbent} and not trainer.has_champion
    trainer.config = dataclasses.replace(trainer.config, gate="off")
    assert step_on_random_samples(trainer, rng).checkpoint.published
    assert trainer.references() == {"incumbent": trainer.incumbent, "champion": trainer.champion}
    assert trainer.has_champion and trainer.champion is not trainer.incumbent
    np.testing.assert_array_equal(trainer.champion.flat, trainer.incumbent.flat)  # the first published one
    np.testing.assert_array_equal(trainer.incumbent.flat, trainer.ema.flat)


@pytest.mark.parametrize("activation", ["tanh", "relu"])
def test_a_published_model_is_the_champion_at_a_start_only_if_the_trainers_model_can_compute_it(tmp_path, activation):
    """With the activation changed (the state then set aside as incompatible), the published tanh weights in a relu
    model were a 'champion' that computed what nobody published: the incumbent alone is the reference then."""
    published = vs.MLP.initial([6, 16, 1], vs.Activation("tanh"), np.random.default_rng(0))
    gate_off = vs.Verdict("off", vs.Evidence(0, {"candidate": None}), vs.Evidence(0, {"candidate": None}), "gate off")
    vs.write_checkpoint(vs.CheckpointWriter(str(tmp_path)), published.weights(), 10, 100, gate_off,
                        np.zeros((0, 6), np.float32))
    config = vs.Config(checkpoint_dir=str(tmp_path), n_features=6, hidden=16, activation=activation)
    trainer, _ = vs.build_trainer(config)
    x = np.random.default_rng(1).normal(size=(20, 6)).astype(np.float32)
    np.testing.assert_array_equal(trainer.incumbent.forward(x), published.forward(x))
    if activation == "tanh":
        assert trainer.references() == {"incumbent": trainer.incumbent, "champion": trainer.champion}
        np.testing.assert_array_equal(trainer.champion.forward(x), published.forward(x))
    else:
        assert trainer.references() == {"base": trainer.incumbent} and not trainer.has_champion


def published_as_ema(trainer: vs.Trainer, weights: np.ndarray) -> vs.Checkpoint:
    """A checkpoint of these weights as the EMA, published (the trainer's gate is off)."""
    trainer.ema.flat[...] = weights
    checkpoint = trainer.take_checkpoint()
    assert checkpoint.published, checkpoint.record
    return checkpoint


def candidates(trainer: vs.Trainer) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weights for gate_trainer's history: the exact model, one near it and one far from it, which score
    history PLCCs of 1, less and less again."""
    exact = trainer.model.flat.copy()
    noise = np.random.default_rng(6).normal(0, 1, exact.shape).astype(np.float32)
    near, far = exact + np.float32(0.05) * noise, exact + np.float32(0.5) * noise
    x, y, _ = trainer.history()
    plcc = [measure(vs.MLP.from_weights(weights_like(trainer.model, w)), x, y).plcc for w in (exact, near, far)]
    assert plcc[0] > plcc[1] > plcc[2], plcc  # the tests' premise
    return exact, near, far


def weights_like(model: vs.MLP, flat: np.ndarray):
    other = model.copy()
    other.flat[...] = flat
    return other.weights()


def test_the_champion_is_replaced_only_by_a_candidate_whose_history_plcc_is_at_least_its_own(tmp_path):
    trainer = gate_trainer(tmp_path, gate="off")
    exact, near, far = candidates(trainer)
    published_as_ema(trainer, near)
    np.testing.assert_array_equal(trainer.champion.flat, near)  # the first one published
    worse = published_as_ema(trainer, far).record["metrics"]["history"]
    assert worse["candidate"]["plcc"] < worse["champion"]["plcc"]
    np.testing.assert_array_equal(trainer.incumbent.flat, far)  # published, the model nodes serve...
    np.testing.assert_array_equal(trainer.champion.flat, near)  # ...but not the champion
    better = published_as_ema(trainer, exact).record["metrics"]["history"]
    assert better["candidate"]["plcc"] > better["champion"]["plcc"]
    np.testing.assert_array_equal(trainer.champion.flat, exact)


def test_records_keep_the_history_scores_under_their_old_keys_the_base_as_incumbent_until_a_publish(tmp_path):
    trainer = gate_trainer(tmp_path, gate="off")
    exact, near, far = candidates(trainer)
    records = [published_as_ema(trainer, weights).record["metrics"] for weights in (near, far, exact)]
    for metrics, reference in zip(records, ("base", "incumbent", "incumbent")):
        history = metrics["history"]
        assert (metrics["candidate"], metrics["incumbent"], metrics["eval_n"]) == \
            (history["candidate"], history[reference], history["n"])
        assert history["n"] == history["held_out"] == 40
    assert set(records[0]["history"]) == {"n", "held_out", "candidate", "base"}
    assert records[2]["incumbent"] != records[2]["history"]["champion"]  # far's scores, not near's


# ---- 8. the command-line tools ----

def failed_paths(output: str) -> set[str]:
    return {line.split(None, 1)[1] for line in output.splitlines() if line.startswith("FAILED")}


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory) -> Path:
    """v1 published (passed), v2 quarantined (worse), v3 quarantined (non-finite weights), v4 published."""
    directory = tmp_path_factory.mktemp("cli") / "ckpt"
    x, y, coef = linear_data()
    probe = x[:32]
    writer = vs.CheckpointWriter(str(directory))

    def judged(cfg: vs.Config, candidate: vs.MLP, finite: bool = True) -> vs.Verdict:
        """Against the good model as the base, on a history of the 300 samples and no window."""
        return vs.judge(cfg, NO_EVIDENCE, measured({"candidate": candidate, "base": good}, x, y), finite)

    good = fitted(coef)
    vs.write_checkpoint(writer, good.weights(), 10, 40, judged(config(gate_min_eval=2), good), probe)
    worse = fitted(coef, -1.0)
    vs.write_checkpoint(writer, worse.weights(), 20, 80, judged(config(gate_min_eval=2), worse), probe)
    broken = good.copy()
    broken.flat[:] = np.inf
    vs.write_checkpoint(writer, broken.weights(), 30, 120, judged(config(), broken, finite=False), probe)
    vs.write_checkpoint(writer, good.weights(), 40, 160, judged(config(gate="off"), good), probe)
    assert model_files(directory) == files_of(1) | files_of(4)
    assert model_files(directory / "quarantine") == files_of(2) | files_of(3)
    return directory


@pytest.fixture
def copied(checkpoint_dir, tmp_path) -> Path:
    target = tmp_path / "ckpt"
    shutil.copytree(checkpoint_dir, target)
    return target


def test_verify_passes_a_good_directory(checkpoint_dir):
    done = run_cli("verify", str(checkpoint_dir))
    assert done.returncode == 0, done.stdout + done.stderr
    assert failed_paths(done.stdout) == set()
    ok = {line.split(None, 1)[1] for line in done.stdout.splitlines() if line.startswith("ok")}
    # every model, quarantined ones with non-finite outputs included, latest.json and latest.onnx were checked
    assert ok == {str(checkpoint_dir / "model_v000001.onnx"), str(checkpoint_dir / "model_v000004.onnx"),
                  str(checkpoint_dir / "quarantine" / "model_v000002.onnx"),
                  str(checkpoint_dir / "quarantine" / "model_v000003.onnx"), str(checkpoint_dir / "latest.json"),
                  str(checkpoint_dir / "latest.onnx")}


def test_verify_fails_on_a_flipped_byte(copied):
    path = copied / "model_v000001.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))
    done = run_cli("verify", str(copied))
    assert done.returncode == 1, done.stdout + done.stderr
    assert failed_paths(done.stdout) == {str(path)}
    assert "model_v000001.onnx.sha256 does not match" in done.stdout


def test_verify_fails_on_a_missing_sha256(copied):
    (copied / "quarantine" / "model_v000002.onnx.sha256").unlink()
    done = run_cli("verify", str(copied))
    assert done.returncode == 1, done.stdout + done.stderr
    assert failed_paths(done.stdout) == {str(copied / "quarantine" / "model_v000002.onnx")}
    assert "model_v000002.onnx.sha256" in done.stdout


def test_verify_fails_on_latest_json_with_another_sha256(copied):
    latest = read_json(copied / "latest.json")
    latest["sha256"] = "0" * 64
    (copied / "latest.json").write_text(json.dumps(latest))
    done = run_cli("verify", str(copied))
    assert done.returncode == 1, done.stdout + done.stderr
    # latest.onnx, the model the record names, is not one with that sha256 either
    assert failed_paths(done.stdout) == {str(copied / "latest.json"), str(copied / "latest.onnx")}
    assert "model_v000004.onnx" in done.stdout


def test_verify_fails_on_latest_json_naming_a_missing_file(copied):
    for name in files_of(4):
        (copied / name).unlink()
    done = run_cli("verify", str(copied))
    assert done.returncode == 1, done.stdout + done.stderr
    assert failed_paths(done.stdout) == {str(copied / "latest.json")}


def test_verify_fails_on_latest_json_naming_an_older_checkpoint_than_the_newest_published(copied):
    """Nodes would load v1 while v4 is published, until the sidecar's next start points both files at v4."""
    (copied / "latest.json").write_bytes((copied / f"{stem(1)}.json").read_bytes())
    shutil.copy(copied / f"{stem(1)}.onnx", copied / "latest.onnx")
    (copied / "latest.onnx.sha256").write_text(f"{read_json(copied / 'latest.json')['sha256']}  latest.onnx\n")
    done = run_cli("verify", str(copied))
    assert done.returncode == 1, done.stdout + done.stderr
    assert failed_paths(done.stdout) == {str(copied / "latest.json")}
    assert f"names {stem(1)}.onnx, not {stem(4)}.onnx, the newest published checkpoint" in done.stdout
    assert vs.CheckpointWriter(str(copied)).latest["version"] == 4  # what the sidecar does when it starts
    assert run_cli("verify", str(copied)).returncode == 0


@pytest.mark.parametrize("damage", ["truncated", "not JSON", "a record without its fields"])
def test_verify_fails_on_a_quarantined_checkpoint_whose_record_is_corrupt(copied, damage):
    record = copied / "quarantine" / f"{stem(2)}.json"
    record.write_bytes({"truncated": record.read_bytes()[:40], "not JSON": b"\x00" * 64,
                        "a record without its fields": b'{"version": 2}'}[damage])
    done = run_cli("verify", str(copied))
    assert done.returncode == 1, done.stdout + done.stderr
    assert failed_paths(done.stdout) == {str(copied / "quarantine" / f"{stem(2)}.onnx")}
    assert f"{stem(2)}.json is not a valid checkpoint record" in done.stdout
    listed = run_cli("checkpoints", str(copied))
    assert listed.returncode == 0 and "Traceback" not in listed.stderr, listed.stdout + listed.stderr


def test_verify_passes_a_quarantined_checkpoint_moved_there_without_its_record_or_of_a_newer_format(copied):
    (copied / "quarantine" / f"{stem(2)}.json").unlink()
    record = copied / "quarantine" / f"{stem(3)}.json"
    record.write_text(json.dumps({**read_json(record), "format": vs.RECORD_FORMAT + 1}))
    done = run_cli("verify", str(copied))
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("damage", ["truncated", "missing", "newer format"])
def test_verify_fails_on_a_published_checkpoint_whose_record_the_sidecar_cannot_read(copied, damage):
    """The sidecar counts a checkpoint without a record it reads as unpublished, unless latest.json holds that record
    whole: without it, its next start points latest.json back at an older one. verify says so."""
    record = copied / f"{stem(4)}.json"
    if damage == "truncated":
        record.write_bytes(record.read_bytes()[:40])
    elif damage == "missing":
        record.unlink()
    else:
        record.write_text(json.dumps({**read_json(record), "format": vs.RECORD_FORMAT + 1}))
    done = run_cli("verify", str(copied))
    assert done.returncode == 1, done.stdout + done.stderr
    assert failed_paths(done.stdout) == {str(copied / f"{stem(4)}.onnx")}
    said = {"truncated": "is not a valid checkpoint record", "missing": "is missing",
            "newer format": "is of a newer format than this version reads"}[damage]
    assert f"{stem(4)}.json {said}: the sidecar counts this checkpoint as published only while latest.json holds " \
           "its record" in done.stdout
    assert vs.CheckpointWriter(str(copied)).latest["version"] == 4  # what the sidecar would do
    (copied / "latest.json").unlink()
    assert vs.CheckpointWriter(str(copied)).latest["version"] == 1


def test_verify_fails_on_latest_json_that_is_not_the_record_of_the_checkpoint_it_names(copied, caplog):
    """A latest.json that names the newest checkpoint, with its sha256, but tells another verdict (its gate, step
    or metrics edited, a bit flipped in them) passed verify, which checked only its file, version and sha256; the
    sidecar's start writes it from the record again, and said so as "now names model_v000004.onnx (it named
    model_v000004.onnx)" (the consumer hunt)."""
    latest = read_json(copied / "latest.json")
    assert latest["gate"] == "off"  # the premise: v4 was published unjudged
    (copied / "latest.json").write_text(json.dumps({**latest, "gate": "passed", "step": latest["step"] + 1}))
    done = run_cli("verify", str(copied))
    assert done.returncode == 1, done.stdout + done.stderr
    assert failed_paths(done.stdout) == {str(copied / "latest.json")}
    assert f"holds another gate, step than {stem(4)}.json, the record of the checkpoint it names" in done.stdout
    caplog.set_level(logging.WARNING, logger="vmafx_sidecar")
    assert vs.CheckpointWriter(str(copied)).latest == read_json(copied / f"{stem(4)}.json")
    assert f"now names {stem(4)}.onnx, the newest published checkpoint, as its record says (it held another gate, " \
           "step)" in caplog.text
    assert read_json(copied / "latest.json") == read_json(copied / f"{stem(4)}.json")
    assert run_cli("verify", str(copied)).returncode == 0


@pytest.mark.parametrize("damage", ["missing", "not JSON"])
def test_a_start_says_what_latest_json_was_before_it_writes_it_again(copied, caplog, damage):
    """It said "(it named None)"."""
    if damage == "missing":
        (copied / "latest.json").unlink()
    else:
        (copied / "latest.json").write_text("{broken")
    caplog.set_level(logging.WARNING, logger="vmafx_sidecar")
    assert vs.CheckpointWriter(str(copied)).latest["version"] == 4
    said = "it was missing" if damage == "missing" else "it was not a valid checkpoint record"
    assert f"now names {stem(4)}.onnx, the newest published checkpoint, as its record says ({said})" in caplog.text


@pytest.mark.parametrize("latest", ["missing", "a dangling link"])
def test_verify_fails_without_latest_json_once_a_checkpoint_is_published(copied, latest):
    (copied / "latest.json").unlink()
    if latest == "a dangling link":
        (copied / "latest.json").symlink_to(copied / "gone.json")
    (copied / "latest.onnx").write_bytes(b"not a model")  # unchecked without the record naming it: not the point
    done = run_cli("verify", str(copied))
    assert done.returncode == 1, done.stdout + done.stderr
    assert failed_paths(done.stdout) == {str(copied / "latest.json")}
    assert "with checkpoints published" in done.stdout


def test_verify_beside_a_sidecar_passes_what_its_retention_deletes_and_what_it_publishes_meanwhile(
        copied, monkeypatch, capsys):
    """verify lists the directory once and reads latest.json and latest.onnx one after the other: a checkpoint
    deleted whole since the listing is no failure, and latest.json and latest.onnx are checked as a pair."""
    check, pair = vs.checkpoint_problems, vs.latest_model_problems

    def pruned_first(directory: Path, version: int, published: bool) -> list[str]:
        if version == 1 and directory == copied:  # in retention's order
            for suffix in (".onnx.sha256", ".json", ".onnx"):
                (copied / f"{stem(1)}{suffix}").unlink(missing_ok=True)
        return check(directory, version, published)

    def published_first(directory: Path, record: dict) -> list[str]:
        if record["version"] == 4:  # v5 (a copy of v4's model) is published between the two reads
            for suffix in (".onnx", ".onnx.sha256"):
                shutil.copy(copied / f"{stem(4)}{suffix}", copied / f"{stem(5)}{suffix}")
            newer = {**record, "version": 5, "file": f"{stem(5)}.onnx"}
            (copied / f"{stem(5)}.json").write_text(json.dumps(newer))
            (copied / "latest.onnx.sha256").write_text(f"{newer['sha256']}  latest.onnx\n")
            (copied / "latest.json").write_text(json.dumps(newer))
            (copied / "latest.onnx").write_bytes(b"not yet the model")  # caught mid-way: v4's test fails
        elif record["version"] == 5:
            shutil.copy(copied / f"{stem(5)}.onnx", copied / "latest.onnx")
        return pair(directory, record)

    monkeypatch.setattr(vs, "checkpoint_problems", pruned_first)
    monkeypatch.setattr(vs, "latest_model_problems", published_first)
    assert vs.verify_checkpoints(copied) == 0, capsys.readouterr().out
    checked = capsys.readouterr().out
    assert str(copied / f"{stem(1)}.onnx") not in checked and "FAILED" not in checked


@pytest.mark.parametrize("caught", ["a checkpoint before its .sha256", "the first before latest.json"])
def test_verify_beside_a_sidecar_passes_a_checkpoint_it_was_placing(copied, monkeypatch, capsys, caught):
    """place() renames the model, its record, then its .sha256; the first publish writes latest.json after them: a
    listing in between saw a checkpoint without its .sha256, or published ones without latest.json."""
    gone = copied / (f"{stem(4)}.onnx.sha256" if caught.startswith("a checkpoint") else "latest.json")
    held = gone.read_bytes()
    gone.unlink()
    sleep = time.sleep

    def placed_meanwhile(seconds: float) -> None:
        assert seconds > 0
        gone.write_bytes(held)
        sleep(seconds)

    monkeypatch.setattr(vs.time, "sleep", placed_meanwhile)
    assert vs.verify_checkpoints(copied) == 0, capsys.readouterr().out
    assert "FAILED" not in capsys.readouterr().out


def test_verify_beside_a_sidecar_passes_a_checkpoint_placed_before_latest_names_it(copied, monkeypatch, capsys):
    """A publish places its checkpoint, .sha256 last, then points latest.onnx and latest.json at it."""
    shutil.copy(copied / f"{stem(4)}.onnx", copied / f"{stem(5)}.onnx")  # v4's model, so latest.onnx holds it too
    newer = {**read_json(copied / f"{stem(4)}.json"), "version": 5, "file": f"{stem(5)}.onnx"}
    (copied / f"{stem(5)}.json").write_text(json.dumps(newer))
    (copied / f"{stem(5)}.onnx.sha256").write_text(f"{newer['sha256']}  {stem(5)}.onnx\n")
    sleep = time.sleep

    def pointed_meanwhile(seconds: float) -> None:
        (copied / "latest.json").write_text(json.dumps(newer))
        sleep(seconds)

    monkeypatch.setattr(vs.time, "sleep", pointed_meanwhile)
    assert vs.verify_checkpoints(copied) == 0, capsys.readouterr().out
    assert "FAILED" not in capsys.readouterr().out


def test_checkpoints_lists_every_version(checkpoint_dir):
    done = run_cli("checkpoints", str(checkpoint_dir))
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split() == ["version", "created", "step", "plcc", "srcc", "rmse", "r2", "eval_n", "gate", "state"]
    rows = {int(line.split()[0]): line for line in lines[1:5]}
    assert sorted(rows) == [1, 2, 3, 4]
    assert rows[1].split()[-2:] == ["passed", "published"]
    assert rows[2].split()[-2:] == ["quarantined", "quarantined"]
    assert rows[3].split()[-2:] == ["quarantined", "quarantined"]
    assert rows[4].split()[-3:] == ["off", "published,", "latest"]
    assert "latest" not in rows[1] + rows[2] + rows[3]
    for version in (1, 2, 4):
        record = read_json(checkpoint_dir / ("" if version in (1, 4) else "quarantine") / f"{stem(version)}.json")
        cells = rows[version].split()
        assert cells[2] == str(record["step"])
        shown = [f"{record['metrics']['candidate'][score]:.4f}" for score in ("plcc", "srcc", "rmse", "r2")]
        assert cells[3:8] == [*shown, "300"]
    assert float(rows[2].split()[3]) < 0 < float(rows[1].split()[3])
    assert rows[3].split()[3:7] == ["-", "-", "-", "-"]  # non-finite: nothing measured
    reasons = lines[5:]  # why each quarantined one was refused
    assert len(reasons) == 2 and reasons[0].startswith("v000002: history: R² -")
    assert reasons[1] == "v000003: non-finite weights or outputs"


def test_checkpoints_says_a_checkpoint_rolled_back_by_hand_was_not_refused(copied, capsys):
    """README's rollback moves a published checkpoint into quarantine/: its reason for passing was listed as the
    reason it was refused."""
    for path in copied.glob(f"{stem(1)}.*"):
        path.rename(copied / "quarantine" / path.name)
    assert vs.list_checkpoints(copied) == 0
    listed = capsys.readouterr().out.splitlines()
    assert "v000001: passed, then moved to quarantine/ (rolled back)" in listed
    assert [line for line in listed if line.startswith("v000002: history: R² -")]  # refused ones: why


def test_checkpoints_says_a_checkpoint_a_crash_left_unplaced_was_never_published(copied, capsys):
    """A kill while v4 was placed (.sha256 last): the next start moves it into quarantine/, which `checkpoints` had
    listed as a rollback by hand."""
    (copied / f"{stem(4)}.onnx.sha256").unlink()
    vs.CheckpointWriter(str(copied))
    vs.CheckpointWriter(str(copied))  # a second start leaves it as the first did
    assert vs.list_checkpoints(copied) == 0
    listed = capsys.readouterr().out.splitlines()
    assert "v000004: never published whole: the process stopped while it was placed (off: published unjudged: " \
           "VMAFX_SIDECAR_GATE=off)" in listed
    assert vs.verify_checkpoints(copied) == 0, capsys.readouterr().out


def test_checkpoints_lists_a_checkpoint_without_its_sha256_as_unplaced_not_published(copied, capsys):
    """Before the next start moves it into quarantine/, `checkpoints` listed a model a kill left without its .sha256
    as published, one `verify` reports no .sha256 for and no node trusts (the words hunt)."""
    (copied / f"{stem(4)}.onnx.sha256").unlink()
    assert vs.list_checkpoints(copied) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("4 "))
    assert "unplaced (no .sha256)" in row and "published" not in row


@pytest.mark.parametrize("tool", [vs.list_checkpoints, vs.verify_checkpoints])
def test_checkpoint_tools_call_a_file_not_a_directory_what_it_is(tmp_path, capsys, tool):
    (tmp_path / "ckpt").write_text("a file where the directory was expected")
    assert tool(tmp_path / "ckpt") == 1
    assert capsys.readouterr().err.endswith(f"{tmp_path / 'ckpt'}: not a directory\n")
    assert tool(tmp_path / "missing") == 1
    assert capsys.readouterr().err.endswith(f"{tmp_path / 'missing'}: no such directory\n")


@pytest.mark.parametrize("reason", [None, 7, ["a", "list"], {"an": "object"}])
def test_checkpoints_lists_a_quarantined_record_whose_reason_is_not_text(copied, reason):
    record = read_json(copied / "quarantine" / f"{stem(2)}.json")
    (copied / "quarantine" / f"{stem(2)}.json").write_text(json.dumps({**record, "reason": reason}))
    done = run_cli("checkpoints", str(copied))
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    assert f"v000002: {reason}" in done.stdout.splitlines()


def test_checkpoints_shows_a_dash_for_scores_a_record_holds_in_another_shape(copied):
    for version, metrics in ((1, "not an object"), (4, {"candidate": {"plcc": None, "srcc": "0.9"}, "eval_n": 7})):
        record = read_json(copied / f"{stem(version)}.json")
        (copied / f"{stem(version)}.json").write_text(json.dumps({**record, "metrics": metrics}))
    done = run_cli("checkpoints", str(copied))
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    rows = {int(line.split()[0]): line.split() for line in done.stdout.splitlines()[1:5]}
    assert rows[1][3:8] == ["-", "-", "-", "-", "-"] and rows[4][3:8] == ["-", "-", "-", "-", "7"]


@pytest.mark.parametrize("tool, quarantine, why", [
    ("checkpoints", "a file", "Not a directory"), ("verify", "a file", "Not a directory"),
    ("verify", "a dangling link", "No such file or directory")])  # a listing shows what there is
def test_the_tools_say_in_one_line_why_they_cannot_read_a_directory(copied, tool, quarantine, why):
    shutil.rmtree(copied / "quarantine")
    if quarantine == "a file":
        (copied / "quarantine").write_text("a file where the sidecar keeps its quarantine/")
    else:
        (copied / "quarantine").symlink_to(copied / "gone")
    done = run_cli(tool, str(copied))
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr == f"vmafx-sidecar {tool}: {copied / 'quarantine'}: {why}\n"
