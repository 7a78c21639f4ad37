"""The hand-written backprop and optimizer, checked against independent float64 references."""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import vmafx_sidecar as vs
from conftest import RELU, make_trainer


# ---- gradient check: backprop against central finite differences ----

ACTIVATIONS = [vs.Activation("relu"), vs.Activation("leaky_relu", 0.2), vs.Activation("tanh"),
               vs.Activation("sigmoid"), vs.Activation("gelu")]


MIXED = [[a, b] for a, b in zip(ACTIVATIONS, ACTIVATIONS[1:] + ACTIVATIONS[:1])]


@pytest.mark.parametrize("activations", [[a] for a in ACTIVATIONS] + MIXED, ids=lambda acts: "-".join(map(str, acts)))
def test_backprop_matches_finite_differences(activations):
    sizes = [6, 9, 5, 1][:len(activations) + 1] + [1]
    rng = np.random.default_rng(3)
    model = vs.MLP(sizes, activations, np.float64)
    model.flat[...] = rng.normal(0, 0.7, model.flat.shape)
    x = rng.normal(0, 1, (11, sizes[0]))
    y = rng.normal(0, 1, 11)
    grad = vs.MLP(sizes, activations, np.float64)
    loss = model.loss_and_grad(x, y, grad)

    def loss_at(flat: np.ndarray) -> float:
        probe = vs.MLP(sizes, activations, np.float64)
        probe.flat[...] = flat
        return float(np.mean((probe.forward(x)[:, 0] - y) ** 2))

    eps = 1e-6
    numeric = np.empty_like(model.flat)
    for i in range(len(model.flat)):
        up, down = model.flat.copy(), model.flat.copy()
        up[i] += eps
        down[i] -= eps
        numeric[i] = (loss_at(up) - loss_at(down)) / (2 * eps)
    assert np.count_nonzero(grad.flat) > 0.5 * len(grad.flat)
    # The central difference is exact to ~eps**2; what limits it is the rounding of the loss, one float64
    # step of which is ~1e-16 * loss / eps, and whose size depends on the summation order of the machine's
    # BLAS. So the tolerance has a relative part and an absolute one about 100 such steps wide.
    error = np.abs(grad.flat - numeric)
    tolerance = 1e-6 * np.abs(numeric) + 1e-8 * max(1.0, loss)
    i = int(np.argmax(error / tolerance))
    assert (error <= tolerance).all(), f"parameter {i}: backprop {grad.flat[i]!r}, numeric {numeric[i]!r}, loss {loss!r}"


@pytest.mark.parametrize("act", ACTIVATIONS, ids=str)
def test_activations_match_their_torch_definitions(act):
    z = np.linspace(-6, 6, 241)
    reference = {
        "relu": np.maximum(z, 0),
        "leaky_relu": np.where(z >= 0, z, 0.2 * z),
        "tanh": np.tanh(z),
        "sigmoid": 1 / (1 + np.exp(-z)),
        "gelu": np.array([v * 0.5 * (1 + math.erf(v / math.sqrt(2))) for v in z]),
    }[act.kind]
    np.testing.assert_allclose(vs.activate(act, z, vs.NUMPY), reference, rtol=1e-15, atol=1e-15)
    z32 = z.astype(np.float32)
    h32 = vs.activate(act, z32, vs.NUMPY)
    assert h32.dtype == np.float32 and vs.activation_slope(act, z32, h32, vs.NUMPY).dtype == np.float32


def test_forward_applies_each_layers_activation():
    rng = np.random.default_rng(0)
    model = vs.MLP([4, 3, 2, 1], [RELU, vs.Activation("tanh")])
    model.flat[...] = rng.normal(0, 1, model.flat.shape)
    x = rng.normal(0, 1, (5, 4)).astype(np.float32)
    (w0, b0), (w1, b1), (w2, b2) = model.layers
    expected = np.tanh(np.maximum(x @ w0 + b0, 0) @ w1 + b1) @ w2 + b2
    np.testing.assert_array_equal(model.forward(x), expected)
    assert model.forward(x).shape == (5, 1)


def test_initialisation_is_torch_linear_default():
    model = vs.MLP.initial([80, 64, 1], RELU, np.random.default_rng(0))
    for (w, b), fan_in in zip(model.layers, [80, 64]):
        bound = 1 / math.sqrt(fan_in)
        assert w.dtype == np.float32 and np.abs(w).max() <= bound and np.abs(b).max() <= bound
        assert np.abs(w).max() > 0.9 * bound  # uniform over the whole range, not a narrower one
    again = vs.MLP.initial([80, 64, 1], RELU, np.random.default_rng(0))
    np.testing.assert_array_equal(model.flat, again.flat)


# ---- optimizer: an independent float64 implementation of clip -> SGD(wd, momentum) -> EMA ----

def reference_grads(params, x, y):
    """Plain per-layer backprop of batch MSE for [(W (in, out), b), ...] with ReLU between layers."""
    acts = [x]
    for w, b in params[:-1]:
        acts.append(np.maximum(acts[-1] @ w + b, 0.0))
    out = acts[-1] @ params[-1][0] + params[-1][1]
    delta = 2.0 * (out - y[:, None]) / len(y)
    grads = [None] * len(params)
    for i in reversed(range(len(params))):
        grads[i] = (acts[i].T @ delta, delta.sum(axis=0))
        delta = (delta @ params[i][0].T) * (acts[i] > 0)
    return grads


def reference_run(params, batches, lr, momentum, weight_decay, max_norm, warmup, ema_decay):
    params = [(w.astype(np.float64), b.astype(np.float64)) for w, b in params]
    ema = [(w.copy(), b.copy()) for w, b in params]
    buffers = None
    for t, (x, y) in enumerate(batches):
        grads = reference_grads(params, x.astype(np.float64), y.astype(np.float64))
        total = math.sqrt(sum(float((g ** 2).sum()) for pair in grads for g in pair))
        coef = min(1.0, max_norm / (total + 1e-6))
        grads = [tuple(g * coef + weight_decay * p for g, p in zip(gp, pp)) for gp, pp in zip(grads, params)]
        buffers = grads if buffers is None else [
            tuple(momentum * bb + g for bb, g in zip(bp, gp)) for bp, gp in zip(buffers, grads)]
        rate = lr * min(1.0, (t + 1) / warmup)
        params = [tuple(p - rate * bb for p, bb in zip(pp, bp)) for pp, bp in zip(params, buffers)]
        ema = [tuple(ema_decay * e + (1 - ema_decay) * p for e, p in zip(ep, pp)) for ep, pp in zip(ema, params)]
    return params, ema


def flat(layers) -> np.ndarray:
    return np.concatenate([a.ravel() for pair in layers for a in pair])


# The reference's arithmetic: raw coordinates.
SETTINGS = dict(lr=0.05, momentum=0.9, weight_decay=0.01, warmup_steps=3, ema_decay=0.8, normalize="off")


@pytest.mark.parametrize("max_norm,scale", [(0.5, 50.0), (1e6, 1.0)], ids=["clipping", "no-clipping"])
@pytest.mark.parametrize("steps", [1, 6])
def test_steps_match_reference(tmp_path, max_norm, scale, steps):
    sizes = [5, 8, 1]
    trainer = make_trainer(tmp_path, sizes=sizes, batch_size=4, replay_mix=0.0, replay_capacity=100,
                           max_grad_norm=max_norm, **SETTINGS)
    initial = [(w.copy(), b.copy()) for w, b in trainer.model.layers]
    rng = np.random.default_rng(7)
    x = rng.uniform(-1, 1, (4 * steps, 5)).astype(np.float32)
    y = (scale * rng.uniform(-1, 1, 4 * steps)).astype(np.float32)
    for i in range(len(y)):
        result = trainer.add(x[i].tolist(), float(y[i]))
        assert (result is not None) == (i % 4 == 3)
    assert trainer.steps == steps
    batches = [(x[s * 4:(s + 1) * 4], y[s * 4:(s + 1) * 4]) for s in range(steps)]
    expected, expected_ema = reference_run(initial, batches, max_norm=max_norm,
                                           momentum=SETTINGS["momentum"], lr=SETTINGS["lr"],
                                           weight_decay=SETTINGS["weight_decay"],
                                           warmup=SETTINGS["warmup_steps"], ema_decay=SETTINGS["ema_decay"])
    np.testing.assert_allclose(trainer.model.flat, flat(expected), rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(trainer.ema.flat, flat(expected_ema), rtol=2e-5, atol=2e-6)
    assert not np.allclose(trainer.model.flat, flat(initial), atol=1e-4)


def test_clipping_is_active_in_the_clipping_case(tmp_path):
    """Guards the parametrisation above: the big targets really produce a norm above the limit."""
    trainer = make_trainer(tmp_path, sizes=[5, 8, 1], batch_size=4, replay_mix=0.0, replay_capacity=100, normalize="off")
    rng = np.random.default_rng(7)
    x = rng.uniform(-1, 1, (4, 5)).astype(np.float32)
    y = (50.0 * rng.uniform(-1, 1, 4)).astype(np.float32)
    norm = math.sqrt(sum(float((g ** 2).sum()) for pair in reference_grads(trainer.model.layers, x, y) for g in pair))
    assert norm > 0.5 * 10


def test_one_step_by_hand(tmp_path):
    """The first step, spelled out: b1 = clip(g) + wd * theta0, theta1 = theta0 - lr/warmup * b1."""
    trainer = make_trainer(tmp_path, sizes=[3, 4, 1], batch_size=2, replay_mix=0.0, replay_capacity=10,
                           lr=0.1, warmup_steps=10, weight_decay=1e-3, max_grad_norm=0.05, ema_decay=0.25, normalize="off")
    theta0 = trainer.model.flat.astype(np.float64)
    layers0 = [(w.astype(np.float64), b.astype(np.float64)) for w, b in trainer.model.layers]
    x = np.array([[0.1, 0.2, 0.3], [0.4, -0.5, 0.6]], np.float32)
    y = np.array([3.0, -2.0], np.float32)
    g = flat(reference_grads(layers0, x.astype(np.float64), y.astype(np.float64)))
    trainer.add(x[0].tolist(), 3.0)
    result = trainer.add(x[1].tolist(), -2.0)
    norm = np.linalg.norm(g)
    assert norm > 1.0  # so clipping is active
    momentum = g * (0.05 / (norm + 1e-6)) + 1e-3 * theta0
    theta1 = theta0 - 0.1 * (1 / 10) * momentum
    np.testing.assert_allclose(trainer.momentum, momentum, rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(trainer.model.flat, theta1, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(trainer.ema.flat, 0.25 * theta0 + 0.75 * theta1, rtol=1e-5, atol=1e-7)
    hidden = np.maximum(x.astype(np.float64) @ layers0[0][0] + layers0[0][1], 0)
    loss = np.mean((hidden @ layers0[1][0] + layers0[1][1] - y[:, None]) ** 2)
    assert result is not None and result.loss == pytest.approx(loss, rel=1e-5)


def test_overflowing_batch_is_skipped_and_weights_kept(tmp_path):
    trainer = make_trainer(tmp_path, sizes=[3, 4, 1], batch_size=1, replay_mix=0.0, replay_capacity=10, normalize="off")
    trainer.model.flat[...] = 0.5  # every unit active, so huge inputs reach the output
    before = trainer.model.flat.copy(), trainer.ema.flat.copy()
    assert trainer.add([3e38, 3e38, 3e38], 1.0) is None  # float32-valid inputs whose activations overflow
    assert trainer.steps == 0 and trainer.steps_skipped == 1
    np.testing.assert_array_equal(trainer.model.flat, before[0])
    np.testing.assert_array_equal(trainer.ema.flat, before[1])
    assert trainer.add([0.1, 0.2, 0.3], 1.0) is not None and trainer.steps == 1


# ---- batches: new samples first, then replay draws from the host RNG ----

class LargestDraws:
    """A generator whose random() always returns the largest value numpy's can: 1 - 2**-53."""
    def random(self, n: int) -> np.ndarray:
        return np.full(n, np.nextafter(1.0, 0.0))


@settings(max_examples=200, deadline=None)
@given(size=st.integers(1, 5000) | st.sampled_from([2**k for k in range(13)]))
def test_a_replay_draw_never_falls_past_the_ring(size):
    ring = vs.Ring(size, 1, vs.NUMPY)
    ring.extend(np.arange(size, dtype=np.float32)[:, None], np.arange(size, dtype=np.float32))
    x, y = np.zeros((3, 1), np.float32), np.zeros(3, np.float32)
    ring.sample_into(LargestDraws(), x, y)
    assert y.tolist() == [size - 1] * 3  # the last slot's sample


@pytest.mark.parametrize("batch_size, replay_mix, n_replay", [(100, 0.29, 29), (100, 0.57, 57), (50, 0.58, 29),
                                                             (8, 0.75, 6), (7, 0.5, 3)])
def test_a_batch_replays_the_floor_of_batch_size_times_replay_mix(tmp_path, batch_size, replay_mix, n_replay):
    """As README says, floor(batch_size × replay_mix) of the settings as written: in float64, 100 × 0.29 is
    28.999999999999996, and batches had 28 replayed samples."""
    trainer = make_trainer(tmp_path, batch_size=batch_size, replay_mix=replay_mix)
    assert (trainer.n_replay, trainer.n_new) == (n_replay, batch_size - n_replay)


def test_replay_batches_match_reference(tmp_path):
    sizes = [4, 6, 1]
    trainer = make_trainer(tmp_path, sizes=sizes, seed=5, batch_size=8, replay_mix=0.75, replay_capacity=6,
                           max_grad_norm=1e6, **SETTINGS)
    initial = [(w.copy(), b.copy()) for w, b in trainer.model.layers]
    data_rng = np.random.default_rng(1)
    x = data_rng.uniform(-1, 1, (10, 4)).astype(np.float32)
    y = data_rng.uniform(-1, 1, 10).astype(np.float32)
    for i in range(10):
        assert (trainer.add(x[i].tolist(), float(y[i])) is not None) == (i % 2 == 1)  # 2 new + up to 6 replay
    # Rebuild the batches by hand: a FIFO ring of 6 slots and the same draws from a twin of the
    # trainer's RNG (past the initialisation), never more draws than samples held.
    draws = np.random.default_rng(5)
    vs.MLP.initial(sizes, RELU, draws)
    ring_x, ring_y = np.zeros((6, 4), np.float32), np.zeros(6, np.float32)
    batches = []
    for i in range(10):
        ring_x[i % 6], ring_y[i % 6] = x[i], y[i]
        if i % 2 == 0:
            continue
        held = min(i + 1, 6)
        index = (draws.random(min(6, held)) * held).astype(int)
        batches.append((np.concatenate([x[i - 1:i + 1], ring_x[index]]),
                        np.concatenate([y[i - 1:i + 1], ring_y[index]])))
    expected, _ = reference_run(initial, batches, max_norm=1e6, momentum=SETTINGS["momentum"], lr=SETTINGS["lr"],
                                weight_decay=SETTINGS["weight_decay"], warmup=SETTINGS["warmup_steps"],
                                ema_decay=SETTINGS["ema_decay"])
    assert trainer.steps == 5 and trainer.replay.size == 6
    np.testing.assert_allclose(trainer.model.flat, flat(expected), rtol=2e-5, atol=2e-6)
