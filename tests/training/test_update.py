"""The update rule: schedules, SGD with (Nesterov) momentum, decoupled weight decay and
parameter groups in the fused reduce, against plain NumPy references."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.errors import TrainingError
from pipeline.training import TrainConfig
from pipeline.training.reduce import tree_update
from pipeline.training.update import UpdateRule


def test_schedules_pass_through_their_corners():
    tri = UpdateRule(
        schedule="triangular", warmup=0.25, start_factor=0.2, end_factor=0.1, total=100
    )
    assert tri.factor(0) == pytest.approx(0.2)
    assert tri.factor(25) == pytest.approx(1.0)
    assert tri.factor(12) == pytest.approx(0.2 + 0.8 * 0.12 / 0.25)
    assert tri.factor(100) == pytest.approx(0.1) and tri.factor(99) > 0.1
    cos = UpdateRule(schedule="cosine", end_factor=0.0, total=10)
    assert cos.factor(0) == 1.0 and cos.factor(5) == pytest.approx(0.5)
    assert cos.factor(10) == pytest.approx(0.0, abs=1e-12)
    step = UpdateRule(schedule="step", total=8)
    assert [step.factor(t) for t in range(8)] == [1, 1, 1, 1, 0.1, 0.1, 0.01, 0.01]
    assert UpdateRule(lr=0.3, total=5).lr_at(4) == 0.3


def _one_node_update(w, m, v, g_sum, batch, segments, scalars):
    out = tuple(np.full_like(w, np.nan) for _ in range(3))
    nodes = g_sum[None, :]
    tree_update(nodes, [0], [], 0, 0, (w, m, v), out, 0, 0, len(w), segments, 64, batch, scalars)
    return out


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("nesterov", [True, False])
def test_sgd_is_pytorchs_arithmetic_with_groups_and_decoupled_decay(dtype, nesterov):
    rng = np.random.default_rng(0)
    n = 300
    w, m, v, s = (rng.standard_normal(n).astype(dtype) for _ in range(4))
    segments = [(0, 100, 0.01, 1.0), (100, 300, 0.0, 4.0)]  # weights with L2; a group at 4x lr
    rule = UpdateRule("sgd", lr=0.05, momentum=0.9, nesterov=nesterov, weight_decay=5e-3,
                      schedule="triangular", warmup=0.5, start_factor=0.2, total=10)  # fmt: skip
    t = 3
    w2, m2, v2 = _one_node_update(w, m, v, s, 8, segments, rule.scalars(t, dtype))
    f = dtype
    lr, lrwd = f(rule.lr_at(t)), f(rule.lr_at(t) * 5e-3)
    for a, b, reg, factor in segments:
        g = s[a:b] / f(8) + f(reg) * w[a:b]
        buf = f(0.9) * m[a:b] + g
        d = g + f(0.9) * buf if nesterov else buf
        want = w[a:b] - (lr * f(factor)) * d - lrwd * w[a:b]
        assert np.array_equal(w2[a:b], want) and np.array_equal(m2[a:b], buf)
    assert np.array_equal(v2, v)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sgd_keeps_the_weights_moving_average_where_adam_keeps_v(dtype):
    rng = np.random.default_rng(2)
    w, m, v, s = (rng.standard_normal(120).astype(dtype) for _ in range(4))
    segments = [(0, 80, 0.0, 1.0), (80, 120, 0.0, 0.0)]  # the last 40 frozen (whitening)
    rule = UpdateRule("sgd", lr=0.1, momentum=0.9, ema=0.95)
    w2, m2, v2 = _one_node_update(w, m, v, s, 4, segments, rule.scalars(0, dtype))
    f = dtype
    assert np.array_equal(v2[:80], f(0.95) * v[:80] + f(1.0 - 0.95) * w2[:80])
    assert np.array_equal(v2[80:], v[80:]) and np.array_equal(w2[80:], w[80:])
    plain = _one_node_update(w, m, v, s, 4, segments, UpdateRule("sgd", lr=0.1).scalars(0, dtype))
    assert np.array_equal(plain[0], w2) and np.array_equal(plain[2], v)  # ema 0: v carried


def test_lookahead_pulls_the_weights_to_their_slow_copy_every_k_steps_and_ends_on_it():
    # airbench94's: after every 5th step (counting from 1) slow = a * slow + (1 - a) * w with
    # a = 0.95**5 * (t / total)**3, then w = slow; after the last step w = slow
    rule = UpdateRule("sgd", lr=0.1, momentum=0.9, lookahead=5, total=12)
    decay = {t: rule.average(t - 1) for t in range(1, 13)}
    assert decay[5] == (0.95**5 * (5 / 12) ** 3, True) and decay[10][1]
    assert decay[12] == (1.0, True)  # the last step (not a 5th): the weights become the copy
    assert all(decay[t] == (0.0, False) for t in (1, 2, 3, 4, 6, 9, 11))
    assert UpdateRule("sgd", lookahead=4, total=12).average(11) == (0.95**4, True)
    assert UpdateRule("sgd", ema=0.9).average(3) == (0.9, False)

    rng = np.random.default_rng(3)
    f = np.float32
    w, m, s = (rng.standard_normal(90).astype(f) for _ in range(3))
    slow = rng.standard_normal(90).astype(f)
    segments = [(0, 60, 0.0, 1.0), (60, 90, 0.0, 0.0)]  # the last 30 frozen
    alone = _one_node_update(w, m, slow, s, 4, segments, UpdateRule("sgd", lr=0.1).scalars(4, f))
    for t, want_pull in ((3, False), (4, True), (11, True)):
        a, pull = rule.average(t)
        w2, m2, v2 = _one_node_update(w, m, slow, s, 4, segments, rule.scalars(t, f))
        assert np.array_equal(m2, alone[1])  # the momentum step is SGD's as ever
        avg = f(a) * slow[:60] + f(1.0 - a) * alone[0][:60] if a else slow[:60]
        assert pull == want_pull and np.array_equal(v2[:60], avg)
        assert np.array_equal(w2[:60], avg if pull else alone[0][:60])
        assert np.array_equal(w2[60:], w[60:]) and np.array_equal(v2[60:], slow[60:])


def test_adam_takes_decoupled_decay_and_group_factors():
    rng = np.random.default_rng(1)
    w, m, v = (np.abs(rng.standard_normal(50)) for _ in range(3))
    s = rng.standard_normal(50)
    plain = _one_node_update(
        w, m, v, s, 1, [(0, 50, 0.0)], UpdateRule(lr=0.1).scalars(0, np.float64)
    )
    decay = UpdateRule(lr=0.1, weight_decay=0.5).scalars(0, np.float64)
    decayed = _one_node_update(w, m, v, s, 1, [(0, 50, 0.0)], decay)
    np.testing.assert_allclose(decayed[0], plain[0] - 0.05 * w, rtol=1e-14)
    doubled = _one_node_update(
        w, m, v, s, 1, [(0, 50, 0.0, 2.0)], UpdateRule(lr=0.1).scalars(0, np.float64)
    )
    np.testing.assert_allclose(w - doubled[0], 2 * (w - plain[0]), rtol=1e-12)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(optimizer="lion"), r"unknown optimizer 'lion': expected one of adam, sgd"),
        (dict(schedule="linear"), r"unknown schedule 'linear': expected one of constant,"),
        (dict(momentum=1.5), r"momentum must be in \[0, 1\], got 1.5"),
        (dict(schedule="cosine", warmup=1.0), r"warmup must be < 1"),
        (dict(weight_decay=-1.0), r"weight_decay must be >= 0"),
        (dict(norm_lr_factor=0.0), r"norm_lr_factor must be > 0"),
        (dict(optimizer="sgd", ema=1.0), r"ema must be in \[0, 1\), got 1.0"),
        (dict(ema=0.9), r"ema works with optimizer sgd"),
        (dict(lookahead=5), r"lookahead works with optimizer sgd"),
        (dict(optimizer="sgd", lookahead=-1), r"lookahead must be a whole number of steps >= 0"),
        (dict(optimizer="sgd", lookahead=2.5), r"setting lookahead: expected int, got 2.5"),
        (dict(optimizer="sgd", lookahead=5, ema=0.9), r"lookahead and ema .* choose one"),
        (dict(muon_lr=0.2), r"muon_lr works with optimizer sgd"),
        (dict(optimizer="sgd", muon_lr=-0.1), r"muon_lr must be >= 0, got -0.1"),
        (dict(optimizer="sgd", muon_lr=0.2, muon_momentum=1.2), r"muon_momentum must be in"),
        (
            dict(optimizer="sgd", muon_lr=0.2, model="gap, affine"),
            r"muon_lr: the model has no conv filters that train",
        ),
        (
            dict(optimizer="sgd", muon_lr=0.2, model="conv 24 2 pad=0 init=whiten, gap, affine"),
            r"muon_lr: the model has no conv filters that train",
        ),
    ],
)
def test_bad_update_settings_are_one_line(change, message):
    with pytest.raises(TrainingError, match=message):
        TrainConfig(**change).validate()


def test_the_default_rule_is_cs231n_adam_at_a_constant_rate():
    rule = UpdateRule.of(TrainConfig().validate(), 100)
    assert (rule.optimizer, rule.schedule, rule.weight_decay) == ("adam", "constant", 0.0)
    assert all(rule.lr_at(t) == 1e-3 for t in (0, 50, 99))
    assert math.isclose(UpdateRule(schedule="cosine", total=100).factor(50), 0.5)
