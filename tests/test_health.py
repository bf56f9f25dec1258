"""Health metrics (entropies, prototype usage, feature spread) against numbers worked by hand, and the
collapse warnings."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dinov2_jax import health


def test_uniform_targets_have_entropy_ln_k():
  k = 64
  m = jax.jit(health.target_metrics)(jnp.full((10, k), 1.0 / k))
  assert float(m["teacher_entropy"]) == pytest.approx(math.log(k), rel=1e-5)  # float32 sums of 64 terms
  assert float(m["teacher_batch_entropy"]) == pytest.approx(math.log(k), rel=1e-5)
  assert float(m["prototypes_used"]) == 1  # every row's argmax is the first prototype


def test_one_hot_targets_by_hand_and_padding_ignored():
  # Rows 0..2 put all mass on prototypes 3, 3 and 5; row 3 is padding (any content).
  probs = np.zeros((4, 8), np.float32)
  probs[0, 3] = probs[1, 3] = probs[2, 5] = 1.0
  probs[3] = np.nan
  m = jax.jit(health.target_metrics)(jnp.asarray(probs), jnp.asarray([True, True, True, False]))
  assert float(m["teacher_entropy"]) == 0.0
  # Batch mean: 2/3 on prototype 3, 1/3 on prototype 5.
  want = -(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3))
  assert float(m["teacher_batch_entropy"]) == pytest.approx(want, rel=1e-6)
  assert float(m["prototypes_used"]) == 2


def test_softmax_entropy_and_pairwise_cosine_by_brute_force():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(5, 7)).astype(np.float32)
  p = np.exp(logits / 0.1 - (logits / 0.1).max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  want = np.mean(-np.sum(p * np.log(p), axis=1))
  assert float(health.softmax_entropy(logits, 0.1)) == pytest.approx(want, rel=1e-5)
  x = rng.normal(size=(6, 4)).astype(np.float32)
  unit = x / np.linalg.norm(x, axis=1, keepdims=True)
  cos = unit @ unit.T
  want = (cos.sum() - np.trace(cos)) / (6 * 5)
  assert float(health.mean_pairwise_cosine(x)) == pytest.approx(want, rel=1e-5, abs=1e-6)
  same = np.tile(x[:1], (6, 1))
  assert float(health.mean_pairwise_cosine(same)) == pytest.approx(1.0, rel=1e-6)


def _healthy(k):
  return {"dino_teacher_entropy": 0.5 * math.log(k), "dino_teacher_batch_entropy": 0.9 * math.log(k),
          "cls_mean_cosine": 0.3}


def test_collapse_monitor_warns_once_per_kind_after_warmup_and_patience():
  k, total = 1024, 1000
  monitor = health.CollapseMonitor(k, total)
  uniform = dict(_healthy(k), dino_teacher_entropy=math.log(k) - 0.01)
  # Before the warm-up fraction nothing is reported, however the metrics look; nor before the
  # learning-rate warm-up ends.
  assert monitor.check(50, uniform) == []
  late = health.CollapseMonitor(k, total, warmup_steps=400)
  assert [late.check(step, uniform) for step in range(300, 400, 10)] == [[]] * 10
  reports = [monitor.check(step, uniform) for step in range(300, 340, 10)]
  assert [len(r) for r in reports] == [0, 0, 1, 0]  # after `patience` checks in a row, then never again
  collapse = reports[2][0]
  assert collapse.kind == "uniform targets" and "collapse" in collapse.message
  assert "head_n_prototypes" in collapse.message  # says what to try
  # A healthy check resets the streak of another monitor; other kinds are independent.
  other = health.CollapseMonitor(k, total)
  assert other.check(300, uniform) == [] and other.check(310, _healthy(k)) == []
  assert other.check(320, uniform) == [] and other.check(330, uniform) == []
  one = dict(_healthy(k), dino_teacher_batch_entropy=0.1)
  kinds = [c.kind for step in range(300, 340, 10) for c in other.check(step, one)]
  assert kinds == ["one prototype"]
  same = dict(_healthy(k), cls_mean_cosine=0.99)
  kinds = [c.kind for step in range(400, 440, 10) for c in other.check(step, same)]
  assert kinds == ["CLS features"]
  assert [c.kind for c in other.check(500, _healthy(k))] == []
