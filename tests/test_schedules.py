"""Schedules against a restatement of Meta's CosineScheduler and numbers worked out by hand."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dinov2_jax import schedules


class _MetaCosineScheduler:
  """Meta's `dinov2/utils/utils.py:CosineScheduler`, restated from its description."""

  def __init__(self, base_value, final_value, total_iters, warmup_iters=0, start_warmup_value=0,
               freeze_iters=0):
    self.final_value = final_value
    self.total_iters = total_iters
    freeze_schedule = np.zeros((freeze_iters))
    warmup_schedule = np.linspace(start_warmup_value, base_value, warmup_iters)
    iters = np.arange(total_iters - warmup_iters - freeze_iters)
    schedule = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / len(iters)))
    self.schedule = np.concatenate((freeze_schedule, warmup_schedule, schedule))
    assert len(self.schedule) == self.total_iters

  def __getitem__(self, it):
    return self.final_value if it >= self.total_iters else self.schedule[it]


@pytest.mark.parametrize("args", [
    dict(base_value=0.9, final_value=0.1, total_iters=50, warmup_iters=10),
    dict(base_value=0.04, final_value=0.4, total_iters=37),
    dict(base_value=1e-3, final_value=1e-6, total_iters=40, warmup_iters=7, start_warmup_value=1e-4,
         freeze_iters=5),
    dict(base_value=2.0, final_value=2.0, total_iters=1, warmup_iters=0),
])
def test_cosine_values_equal_meta_restatement(args):
  ours = schedules.cosine_schedule(**args)
  meta = _MetaCosineScheduler(**args)
  np.testing.assert_array_equal(ours.values, meta.schedule)
  for it in range(args["total_iters"] + 3):
    assert ours[it] == meta[it]


def test_cosine_boundaries_by_hand():
  # base 0.9, final 0.1, 50 iterations, 10 of warmup, so n = 40 cosine steps.
  s = schedules.cosine_schedule(0.9, 0.1, total_iters=50, warmup_iters=10)
  assert s.total_iters == 50
  # Warmup linspace(0, 0.9, 10) moves 0.9 / 9 = 0.1 per step: 0, 0.1, ..., 0.9.
  np.testing.assert_allclose(s.values[:10], np.arange(10) * 0.1, rtol=0, atol=1e-15)
  assert s[0] == 0.0
  assert s[9] == 0.9  # last warmup value: linspace includes its end.
  assert s[10] == 0.9  # first cosine value, i = 0: 0.1 + 0.4 * (1 + cos 0) = 0.9 again.
  # i = 20 is halfway: cos(pi / 2) = 0, so 0.1 + 0.4 = 0.5.
  assert s[30] == pytest.approx(0.5, abs=1e-15)
  # Last entry, i = 39: 0.1 + 0.4 * (1 - cos(pi / 40)) = 0.1 + 0.4 * 0.0030826662 = 0.1012330665;
  # the cosine never reaches 0.1 inside the array.
  assert s[49] == pytest.approx(0.1 + 0.4 * (1 - math.cos(math.pi / 40)), abs=1e-15)
  assert s[49] == pytest.approx(0.10123307, abs=1e-8)
  assert s[49] > 0.1
  # At and past the end: the final value.
  assert s[50] == 0.1 and s[51] == 0.1 and s[10**9] == 0.1


def test_freeze_iters_prepends_zeros_and_delays_warmup():
  # freeze 3, warmup 4 (linspace(0, 0.3, 4) = 0, 0.1, 0.2, 0.3), 3 cosine steps from 0.3 to 0.0:
  # 0.15 * (1 + cos(pi * i / 3)) = 0.3, 0.225, 0.075.
  s = schedules.cosine_schedule(0.3, 0.0, total_iters=10, warmup_iters=4, freeze_iters=3)
  np.testing.assert_allclose(
      s.values, [0, 0, 0, 0, 0.1, 0.2, 0.3, 0.3, 0.225, 0.075], rtol=0, atol=1e-15)


def test_single_warmup_step_is_the_start_value():
  # np.linspace(start, base, 1) == [start], so Meta's one-iteration warmup never shows `base`.
  s = schedules.cosine_schedule(1.0, 0.0, total_iters=3, warmup_iters=1, start_warmup_value=0.25)
  np.testing.assert_allclose(s.values, [0.25, 1.0, 0.5 * (1 + math.cos(math.pi / 2))], atol=1e-15)


def test_bad_lengths_raise():
  with pytest.raises(ValueError):
    schedules.cosine_schedule(1.0, 0.0, total_iters=5, warmup_iters=4, freeze_iters=2)


@pytest.mark.parametrize("global_batch, expected", [
    (1024, 0.004),  # the reference batch: unchanged.
    (256, 0.002),  # sqrt(1/4) = 1/2.
    (4096, 0.008),  # sqrt(4) = 2.
    (2048, 0.004 * math.sqrt(2)),  # vitl16_short: 64 per GPU x 32 GPUs; 0.0056568542.
    (64, 0.001),  # one GPU of the default config: sqrt(1/16) = 1/4.
])
def test_sqrt_scaling_rule(global_batch, expected):
  assert schedules.scaled_lr(0.004, global_batch) == pytest.approx(expected, rel=1e-15)


def test_other_scaling_rules_raise():
  with pytest.raises(NotImplementedError, match="sqrt_wrt_1024"):
    schedules.scaled_lr(0.004, 1024, scaling_rule="linear_wrt_256")


@pytest.fixture(scope="module")
def default_schedules():
  # ssl_default_config.yaml with a global batch of 1024: lr = 0.004, 100 epochs of 1250 iterations.
  return schedules.build_schedules(lr=schedules.scaled_lr(0.004, 1024))


def test_build_schedules_lengths(default_schedules):
  s = default_schedules
  assert s.lr.total_iters == s.wd.total_iters == s.momentum.total_iters == 125_000
  assert s.last_layer_lr.total_iters == 125_000
  assert s.teacher_temp.total_iters == 30 * 1250  # only the warmup: 37_500.


def test_lr_schedule_boundaries(default_schedules):
  lr = default_schedules.lr
  # Warmup: linspace(0, 0.004, 12500), so step k holds 0.004 * k / 12499.
  assert lr[0] == 0.0
  assert lr[1] == pytest.approx(0.004 / 12499, rel=1e-12)
  assert lr[12499] == 0.004  # last warmup value.
  assert lr[12500] == pytest.approx(0.004, rel=1e-14)  # first cosine value, base again.
  # n = 125000 - 12500 = 112500 cosine steps; the last is i = 112499:
  # 1e-6 + 0.5 * 0.003999 * (1 - cos(pi / 112500)) = 1e-6 + 0.0019995 * 3.9e-10 ~ 1e-6 + 7.8e-13.
  expected_last = 1e-6 + 0.5 * (0.004 - 1e-6) * (1 + math.cos(math.pi * 112499 / 112500))
  assert lr[124999] == pytest.approx(expected_last, rel=1e-12)
  assert 1e-6 < lr[124999] < 1e-6 + 1e-12
  assert lr[125000] == 1e-6 and lr[200000] == 1e-6  # final value at and past the end.


def test_wd_and_momentum_boundaries(default_schedules):
  wd, momentum = default_schedules.wd, default_schedules.momentum
  # No warmup: the cosine starts at i = 0 with the base value, up to float64 rounding of
  # final + 0.5 * (base - final) * 2 (Meta's own array holds 0.03999999999999998 here).
  assert wd[0] == pytest.approx(0.04, rel=1e-14) and momentum[0] == pytest.approx(0.992, rel=1e-14)
  # Halfway (i = 62500 of 125000) cos = 0: final + 0.5 * (base - final).
  assert wd[62500] == pytest.approx(0.4 + 0.5 * (0.04 - 0.4), abs=1e-15)  # 0.22
  assert momentum[62500] == pytest.approx(1.0 + 0.5 * (0.992 - 1.0), abs=1e-15)  # 0.996
  # Last entry: within 0.36 * (1 - cos(pi / 125000)) / 2 ~ 1.1e-10 of the final value.
  assert 0.4 - 1e-9 < wd[124999] < 0.4
  assert 1.0 - 1e-11 < momentum[124999] < 1.0
  assert wd[125000] == 0.4 and momentum[125000] == 1.0


def test_teacher_temp_is_warmup_only(default_schedules):
  temp = default_schedules.teacher_temp
  # total = warmup = 37500: linspace(0.04, 0.07, 37500), step 0.03 / 37499.
  assert temp[0] == 0.04
  assert temp[1] == pytest.approx(0.04 + 0.03 / 37499, rel=1e-12)
  assert temp[37499] == 0.07  # last warmup value.
  assert temp[37500] == 0.07 and temp[124999] == 0.07  # then the final value, forever.
  assert np.all(np.diff(temp.values) > 0)


def test_last_layer_lr_freeze(default_schedules):
  lr, last = default_schedules.lr, default_schedules.last_layer_lr
  # freeze_last_layer_epochs = 1: the first 1250 entries are 0 ...
  assert np.all(last.values[:1250] == 0.0)
  # ... and the rest is the unshifted lr schedule: step 1250 is 0.004 * 1250 / 12499 = 4.0003e-4,
  # not the start of the warmup (which `freeze_iters=1250` would give).
  assert last[1250] == lr[1250] == pytest.approx(0.004 * 1250 / 12499, rel=1e-12)
  np.testing.assert_array_equal(last.values[1250:], lr.values[1250:])
  assert last[125000] == 1e-6
  shifted = schedules.cosine_schedule(0.004, 1e-6, 125_000, warmup_iters=12_500, freeze_iters=1250)
  assert shifted[1250] == 0.0 and last[1250] > 0.0


def test_freeze_longer_than_schedule_zeroes_everything():
  s = schedules.build_schedules(lr=1.0, epochs=2, warmup_epochs=1, warmup_teacher_temp_epochs=1,
                                freeze_last_layer_epochs=3, epoch_length=4)
  assert np.all(s.last_layer_lr.values == 0.0) and s.last_layer_lr[8] == 1e-6


def test_fractional_epochs_must_be_whole_iterations():
  s = schedules.build_schedules(lr=1.0, epochs=2.5, warmup_epochs=0.5, warmup_teacher_temp_epochs=1,
                                epoch_length=4)
  assert s.lr.total_iters == 10
  with pytest.raises(ValueError, match="whole number"):
    schedules.build_schedules(lr=1.0, epochs=2.3, epoch_length=4)


def test_meta_config_builder():
  cfg = {
      "optim": dict(base_lr=0.004, min_lr=1e-6, epochs=4, warmup_epochs=1, weight_decay=0.04,
                    weight_decay_end=0.4, freeze_last_layer_epochs=1, scaling_rule="sqrt_wrt_1024"),
      "teacher": dict(momentum_teacher=0.992, final_momentum_teacher=1.0, teacher_temp=0.07,
                      warmup_teacher_temp=0.04, warmup_teacher_temp_epochs=2),
      "train": dict(batch_size_per_gpu=64, OFFICIAL_EPOCH_LENGTH=10),
  }
  # 64 per GPU x 4 GPUs = 256: lr = 0.004 * sqrt(256 / 1024) = 0.002.
  s = schedules.build_schedules_from_meta_config(cfg, world_size=4)
  assert s.lr[9] == pytest.approx(0.002, rel=1e-15) and s.lr.total_iters == 40
  assert s.teacher_temp.total_iters == 20
  cfg["optim"]["scaling_rule"] = "linear"
  with pytest.raises(NotImplementedError):
    schedules.build_schedules_from_meta_config(cfg)


def test_traced_lookup_equals_numpy_semantics():
  s = schedules.build_schedules(lr=0.004, epochs=6, warmup_epochs=2, warmup_teacher_temp_epochs=3,
                                freeze_last_layer_epochs=1, epoch_length=10)
  tables = s.tables()
  traces = []

  @jax.jit
  def read(tables, step):
    traces.append(None)
    return schedules.values_at(tables, step)

  steps = list(range(-2, 70)) + [10**6]
  for step in steps:
    got = read(tables, jnp.int32(step))
    for name in tables:
      schedule = getattr(s, name)
      want = np.float32(schedule[max(step, 0)])  # negative steps clamp to the first value.
      assert got[name].dtype == jnp.float32
      assert float(got[name]) == want, (name, step)
  assert len(traces) == 1  # a traced step never recompiles.

  # Vectorised read of a whole table, and the closed-over form `Schedule.at`.
  all_steps = jnp.arange(s.lr.total_iters + 5)
  want = np.array([s.lr[i] for i in range(s.lr.total_iters + 5)], np.float32)
  np.testing.assert_array_equal(np.asarray(jax.jit(s.lr.at)(all_steps)), want)
  np.testing.assert_array_equal(np.asarray(schedules.lookup(tables["teacher_temp"], all_steps)),
                                [np.float32(s.teacher_temp[i]) for i in range(65)])


def test_table_layout_and_dtype():
  s = schedules.cosine_schedule(0.9, 0.1, total_iters=50, warmup_iters=10)
  table = s.table()
  assert table.shape == (51,) and table.dtype == np.float32
  np.testing.assert_array_equal(table[:50], s.values.astype(np.float32))
  assert table[50] == np.float32(0.1)
  assert s.table(np.float64)[50] == 0.1
