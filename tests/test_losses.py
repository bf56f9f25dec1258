"""Tests for dinov2_jax.losses against independent re-statements of Meta's `dinov2/loss/`.

Every reference here is written from Meta's formulas (shared/reference/dinov2_reference.md,
sections 3, 4 and 9), in float64 numpy with plain loops over crops and pairs, or as a small torch
re-statement of Meta's loss classes; none of them calls the code under test. Shapes are tiny so
the file runs in seconds.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dinov2_jax import losses

# The reference tests call the public functions through jax.jit (temperatures and counts are
# traced arguments), which both checks jit-compatibility and keeps the file fast: one XLA compile
# per function and shape instead of one per primitive in eager mode.
dino_loss = jax.jit(losses.dino_loss)
ibot_patch_loss = jax.jit(losses.ibot_patch_loss)
koleo_loss = jax.jit(losses.koleo_loss)
koleo_nearest_neighbour = jax.jit(losses.koleo_nearest_neighbour)
softmax_center_teacher = jax.jit(losses.softmax_center_teacher)
sinkhorn_knopp_teacher = jax.jit(losses.sinkhorn_knopp_teacher, static_argnames='n_iterations')

# ------------------------------------------------------------------------------------------------
# float64 numpy references, written directly from Meta's code.
# ------------------------------------------------------------------------------------------------


def np_log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def np_softmax(x):
  return np.exp(np_log_softmax(x))


def meta_dino_loss_forward(student_list, teacher_list, student_temp=0.1):
  """Meta's `DINOLoss.forward`: -sum_s sum_t mean_rows(sum_k t * log_softmax(s / temp))."""
  total = 0.0
  for s in student_list:
    lsm = np_log_softmax(s / student_temp)
    for t in teacher_list:
      total -= np.mean(np.sum(t * lsm, axis=-1))
  return total


def meta_dino_terms(student_global, student_local, teacher_probs, n_local):
  """Meta's `forward_backward` DINO terms. `teacher_probs` is in natural (unswapped) order.

  Meta swaps the teacher CLS chunks before the head, so its `t_dino` list is
  [teacher crop 1, teacher crop 0].
  """
  s_g = np.asarray(student_global, np.float64)
  t = np.asarray(teacher_probs, np.float64)
  b = s_g.shape[0] // 2
  t_dino = [t[b:], t[:b]]  # The swap.
  n_local_terms = max(n_local * 2, 1)
  n_global_terms = (2 - 1) * 2
  denom = n_local_terms + n_global_terms
  local = 0.0
  if n_local:
    s_l = np.asarray(student_local, np.float64)
    chunks = [s_l[i * b:(i + 1) * b] for i in range(n_local)]
    local = meta_dino_loss_forward(chunks, t_dino) / denom
  global_ = meta_dino_loss_forward([s_g], [np.concatenate(t_dino)]) * 2 / denom
  return local, global_


def meta_ibot_forward_masked(s_masked, t_masked, masks, student_temp=0.1):
  """Meta's `iBOTPatchLoss.forward_masked` with `masks_weight=None` (weights recomputed)."""
  masks = np.asarray(masks, bool)
  per_crop = masks.sum(-1)
  weights = np.broadcast_to((1.0 / np.maximum(per_crop, 1.0))[:, None], masks.shape)[masks]
  loss = np.sum(t_masked * np_log_softmax(s_masked / student_temp), axis=-1)
  return -np.sum(loss * weights) / masks.shape[0]


def meta_ibot_forward_dense(s, t, masks, student_temp=0.1):
  """Meta's (unused) dense `iBOTPatchLoss.forward`: -mean_crops(sum ell*m / clamp(sum m, 1))."""
  m = np.asarray(masks, np.float64)
  ell = np.sum(t * np_log_softmax(s / student_temp), axis=-1)  # (2B, N)
  return -np.mean(np.sum(ell * m, axis=-1) / np.maximum(m.sum(-1), 1.0))


def meta_koleo(x, eps=1e-8):
  x = np.asarray(x, np.float64)
  x = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)
  n = x.shape[0]
  dots = x @ x.T
  for i in range(n):
    dots[i, i] = -1.0
  total = 0.0
  for i in range(n):
    j = int(np.argmax(dots[i]))  # First index on ties, as torch.max.
    total += math.log(np.linalg.norm(x[i] - x[j] + eps) + eps)
  return -total / n


class MetaCenter:
  """Meta's lazy centring (`softmax_center_teacher` / `update_center`), one process."""

  def __init__(self, k, momentum=0.9, patch=False):
    self.center = np.zeros((k,))
    self.momentum = momentum
    self.patch = patch
    self.updated = True
    self.batch_center = None
    self.len = None

  def softmax_center_teacher(self, t, temp):
    self.apply_center_update()
    return np_softmax((t - self.center) / temp)

  def update_center(self, t):
    self.updated = False
    if self.patch:  # iBOT: t is (1, n_masked, K); sum over dim 0 of the token mean.
      t = t[None]
      self.batch_center = np.sum(t.mean(1), axis=0)
    else:
      self.batch_center = np.sum(t, axis=0)
    self.len = len(t)

  def apply_center_update(self):
    if self.updated is False:
      new = self.batch_center / self.len
      self.center = self.center * self.momentum + new * (1 - self.momentum)
      self.updated = True


def meta_sinkhorn(t, temp, n_iterations=3, dtype=np.float64):
  """Line-by-line port of Meta's `sinkhorn_knopp_teacher` (no max-subtraction)."""
  with np.errstate(over='ignore', invalid='ignore'):
    q = np.exp(np.asarray(t, dtype) / dtype(temp)).T
    k, b = q.shape
    q = q / np.sum(q)
    for _ in range(n_iterations):
      q = q / np.sum(q, axis=1, keepdims=True)
      q = q / dtype(k)
      q = q / np.sum(q, axis=0, keepdims=True)
      q = q / dtype(b)
    q = q * dtype(b)
  return q.T


def _f32(x):
  return np.asarray(x, np.float32)


# ------------------------------------------------------------------------------------------------
# DINO.
# ------------------------------------------------------------------------------------------------


def _dino_inputs(rng, b, n_local, k):
  sg = _f32(rng.normal(size=(2 * b, k)))
  sl = _f32(rng.normal(size=(n_local * b, k))) if n_local else None
  tp = _f32(np_softmax(rng.normal(size=(2 * b, k)) / 0.5))
  return sg, sl, tp


@pytest.mark.parametrize('n_local', [8, 2, 0])
def test_dino_loss_matches_meta(n_local):
  sg, sl, tp = _dino_inputs(np.random.default_rng(n_local), 3, n_local, 16)
  ours = dino_loss(sg, sl, tp)
  ref_local, ref_global = meta_dino_terms(sg, sl, tp, n_local)
  np.testing.assert_allclose(float(ours.local_crops), ref_local, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(float(ours.global_crops), ref_global, rtol=1e-5)
  assert ours.local_crops.dtype == jnp.float32 and ours.global_crops.dtype == jnp.float32


def test_dino_loss_weighting_by_hand():
  # Uniform student logits: every CE is log K. 8 local crops x 2 teachers = 16 pairs and 2
  # global pairs, over 18; with no local crops the global pairs are over 3.
  k, b = 16, 2
  sg = np.zeros((2 * b, k), np.float32)
  sl = np.zeros((8 * b, k), np.float32)
  tp = _f32(np_softmax(np.random.default_rng(0).normal(size=(2 * b, k))))
  out = dino_loss(sg, sl, tp)
  np.testing.assert_allclose(float(out.local_crops), 16 * math.log(k) / 18, rtol=1e-6)
  np.testing.assert_allclose(float(out.global_crops), 2 * math.log(k) / 18, rtol=1e-6)
  out0 = dino_loss(sg, None, tp)
  assert float(out0.local_crops) == 0.0
  np.testing.assert_allclose(float(out0.global_crops), 2 * math.log(k) / 3, rtol=1e-6)
  # Zero local rows is the same as None.
  out0b = dino_loss(sg, np.zeros((0, k), np.float32), tp)
  assert float(out0b.local_crops) == 0.0
  assert float(out0b.global_crops) == pytest.approx(float(out0.global_crops))


def test_dino_global_pairs_student_crop_with_other_teacher_crop():
  # One image (B=1): teacher crop 0 is one-hot on prototype 0, crop 1 one-hot on prototype 1.
  # Student crop 0 must be scored against prototype 1 and crop 1 against prototype 0.
  k = 4
  tp = np.zeros((2, k), np.float32)
  tp[0, 0] = 1.0
  tp[1, 1] = 1.0
  # Each student crop agrees with its OWN teacher crop, so the correct (swapped) pairing is
  # expensive (~20/3) and the unswapped one nearly free.
  sg = _f32([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]])
  lsm = np_log_softmax(sg.astype(np.float64) / 0.1)
  expected = -(lsm[0, 1] + lsm[1, 0]) / 3.0
  wrong = -(lsm[0, 0] + lsm[1, 1]) / 3.0
  got = float(dino_loss(sg, None, tp).global_crops)
  np.testing.assert_allclose(got, expected, rtol=1e-6)
  assert got > 6.0 and wrong < 0.01


def test_dino_loss_bf16_inputs_computed_in_float32():
  sg, sl, tp = _dino_inputs(np.random.default_rng(7), 2, 2, 16)
  bf = lambda x: jnp.asarray(x, jnp.bfloat16)
  out = dino_loss(bf(sg), bf(sl), bf(tp))
  # Reference on the bf16-rounded values, in float64.
  ref = meta_dino_terms(*(np.asarray(bf(x), np.float64) for x in (sg, sl, tp)), n_local=2)
  assert out.local_crops.dtype == jnp.float32
  np.testing.assert_allclose([float(out.local_crops), float(out.global_crops)], ref, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# iBOT.
# ------------------------------------------------------------------------------------------------


def _ibot_case(rng, b=3, n=8, k=16, upperbound=24):
  """Crop-major masks for 2B crops with some crops unmasked, Meta-style flattening and padding."""
  masks = np.zeros((2 * b, n), bool)
  masks[0, [1, 2, 5]] = True
  masks[2, :7] = True
  masks[5, [0]] = True  # crops 1, 3 and 4 have no mask but still count in the 2B divisor.
  s = rng.normal(size=(2 * b, n, k))
  t = np_softmax(rng.normal(size=(2 * b, n, k)) / 0.3)
  idx = np.flatnonzero(masks.reshape(-1))  # Meta: masks.flatten().nonzero().flatten()
  n_masked = len(idx)
  weights = (1.0 / np.maximum(masks.sum(-1), 1.0))[:, None].repeat(n, 1)[masks]
  s_pad = np.full((upperbound, k), np.nan)  # Garbage in the padded rows.
  s_pad[n_masked:n_masked + 2] = np.inf
  t_pad = np.full((upperbound, k), np.nan)
  s_pad[:n_masked] = s.reshape(-1, k)[idx]
  t_pad[:n_masked] = t.reshape(-1, k)[idx]
  w_pad = np.zeros((upperbound,))
  w_pad[:n_masked] = weights
  return masks, s, t, idx, _f32(s_pad), _f32(t_pad), _f32(w_pad)


def test_ibot_patch_loss_matches_meta_with_padding():
  masks, s, t, idx, s_pad, t_pad, w_pad = _ibot_case(np.random.default_rng(1))
  k = s.shape[-1]
  s32 = s_pad[:len(idx)].astype(np.float64)
  t32 = t_pad[:len(idx)].astype(np.float64)
  ref_masked = meta_ibot_forward_masked(s32, t32, masks)
  got = ibot_patch_loss(s_pad, t_pad, w_pad, n_global_crops=masks.shape[0])
  assert np.isfinite(float(got))
  np.testing.assert_allclose(float(got), ref_masked, rtol=1e-5)
  # Meta's dense formulation gives the same number (unmasked crops contribute 0 to the mean).
  s_dense = np.zeros_like(s).reshape(-1, k)
  t_dense = np.zeros_like(t).reshape(-1, k)
  s_dense[idx], t_dense[idx] = s32, t32
  ref_dense = meta_ibot_forward_dense(s_dense.reshape(s.shape), t_dense.reshape(t.shape), masks)
  np.testing.assert_allclose(float(got), ref_dense, rtol=1e-5)


def test_ibot_patch_loss_divides_by_all_global_crops_by_hand():
  # Uniform student logits: each masked crop contributes its mean CE = log K. 3 of the 6 crops
  # are masked, so the loss is 3 log K / 6 (unmasked crops count in the divisor).
  masks, _, _, idx, s_pad, t_pad, w_pad = _ibot_case(np.random.default_rng(2))
  s_pad[:len(idx)] = 0.0
  k = s_pad.shape[-1]
  got = float(ibot_patch_loss(s_pad, t_pad, w_pad, n_global_crops=6))
  np.testing.assert_allclose(got, 3 * math.log(k) / 6, rtol=1e-6)


def test_ibot_padded_rows_contribute_exactly_zero_and_no_nan_gradient():
  masks, _, _, idx, s_pad, t_pad, w_pad = _ibot_case(np.random.default_rng(3))
  n_masked = len(idx)
  loss_fn = lambda s: ibot_patch_loss(s, t_pad, w_pad, 6)
  val, grad = jax.jit(jax.value_and_grad(loss_fn))(jnp.asarray(s_pad))
  grad = np.asarray(grad)
  assert np.all(np.isfinite(grad))
  assert np.all(grad[n_masked:] == 0.0)
  # Same value with clean zeros in the padding, and with no padding at all.
  clean = s_pad.copy()
  clean[n_masked:] = 0.0
  t_clean = t_pad.copy()
  t_clean[n_masked:] = 0.0
  assert float(val) == float(ibot_patch_loss(clean, t_clean, w_pad, 6))
  np.testing.assert_allclose(
      float(val),
      float(ibot_patch_loss(s_pad[:n_masked], t_pad[:n_masked], w_pad[:n_masked], 6)),
      rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# KoLeo.
# ------------------------------------------------------------------------------------------------


def test_koleo_orthogonal_pair_by_hand():
  # x0=(1,0), x1=(0,1): each is the other's neighbour; the diff is (1,-1) + 1e-8, so
  # d = sqrt((1+1e-8)^2 + (1-1e-8)^2) and loss = -log(d + 1e-8) ~ -log(sqrt 2).
  x = _f32([[1.0, 0.0], [0.0, 1.0]])
  d = math.sqrt((1 + 1e-8)**2 + (1 - 1e-8)**2)
  np.testing.assert_allclose(float(koleo_loss(x)), -math.log(d + 1e-8), rtol=1e-6)
  # Scaling the inputs changes nothing (they are normalised first).
  np.testing.assert_allclose(float(koleo_loss(x * 5.0)), -math.log(d + 1e-8), rtol=1e-6)


def test_koleo_antipodal_pair_picks_itself_and_hits_eps_by_hand():
  # x0=(1,0), x1=(-1,0): the off-diagonal dot is -1, equal to the -1 Meta writes on the diagonal.
  # argmax takes the first index, so row 0 picks ITSELF: d0 = ||0 + 1e-8||_2 = sqrt(2)*1e-8.
  # Row 1 picks index 0: d1 = ||(-2, 0) + 1e-8|| = sqrt((2-1e-8)^2 + 1e-16).
  x = _f32([[3.0, 0.0], [-0.5, 0.0]])
  d0 = math.sqrt(2) * 1e-8
  d1 = math.sqrt((2 - 1e-8)**2 + 1e-16)
  expected = -(math.log(d0 + 1e-8) + math.log(d1 + 1e-8)) / 2
  np.testing.assert_allclose(float(koleo_loss(x)), expected, rtol=1e-5)
  np.testing.assert_array_equal(
      np.asarray(koleo_nearest_neighbour(jnp.asarray([[1.0, 0.0], [-1.0, 0.0]]))), [0, 0])


def test_koleo_tie_takes_first_index():
  # x0 is equally close to x1 and x2 (dot 0 with both): Meta takes x1.
  x = _f32([[1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
  np.testing.assert_array_equal(np.asarray(koleo_nearest_neighbour(x)), [1, 0, 0])


def test_koleo_matches_meta_random_and_zero_row():
  rng = np.random.default_rng(4)
  x = _f32(rng.normal(size=(9, 12)))
  np.testing.assert_allclose(float(koleo_loss(x)), meta_koleo(x), rtol=1e-5)
  x[3] = 0.0  # normalize(0) = 0 with Meta's clamp; must stay finite.
  got = float(koleo_loss(x))
  assert np.isfinite(got)
  np.testing.assert_allclose(got, meta_koleo(x), rtol=1e-5, atol=1e-6)
  assert np.all(np.isfinite(np.asarray(jax.jit(jax.grad(losses.koleo_loss))(jnp.asarray(x)))))


def test_koleo_duplicated_rows_are_exactly_zero_apart_when_jitted():
  # Meta normalises once and subtracts copies, so equal rows (also a row and a positive multiple of
  # it, which normalise to the same floats) are exactly eps apart. A fused, FMA-contracted
  # subtraction inside jit used to leave ~1 ulp there (3.9270 instead of 3.9360 in one case).
  torch = pytest.importorskip('torch')
  F = torch.nn.functional
  rng = np.random.default_rng(11)
  x = _f32(rng.normal(size=(6, 16)))
  x[3] = x[1]
  x[5] = 2.0 * x[0]
  xt = F.normalize(torch.tensor(x), eps=1e-8, p=2, dim=-1)
  dots = xt @ xt.t()
  dots.view(-1)[::7].fill_(-1)
  nn_idx = torch.max(dots, dim=1).indices
  assert nn_idx[1] == 3 and nn_idx[0] == 5  # the duplicates are each other's neighbours
  d = torch.nn.PairwiseDistance(2, eps=1e-8)(xt, xt[nn_idx])
  assert float(d[1]) == pytest.approx(4 * 1e-8, rel=1e-6)  # sqrt(16) * eps: a difference of 0
  meta = float(-torch.log(d + 1e-8).mean())
  np.testing.assert_allclose(float(koleo_loss(x)), meta, rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# Torch re-statement of Meta's loss classes: values and gradients.
# ------------------------------------------------------------------------------------------------


def test_gradients_match_torch_restatement_of_meta():
  torch = pytest.importorskip('torch')
  F = torch.nn.functional

  def t_dino(student_list, teacher_list, temp=0.1):  # DINOLoss.forward
    total = 0
    for s in student_list:
      lsm = F.log_softmax(s / temp, dim=-1)
      for t in teacher_list:
        total -= torch.sum(t * lsm, dim=-1).mean()
    return total

  def t_koleo(x, eps=1e-8):  # KoLeoLoss.forward
    x = F.normalize(x, eps=eps, p=2, dim=-1)
    dots = torch.mm(x, x.t())
    n = x.shape[0]
    dots.view(-1)[::(n + 1)].fill_(-1)
    _, nn_idx = torch.max(dots, dim=1)
    d = torch.nn.PairwiseDistance(2, eps=eps)(x, x[nn_idx])
    return -torch.log(d + eps).mean()

  def t_ibot(s, t, masks, temp=0.1):  # iBOTPatchLoss.forward_masked
    w = (1 / masks.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(masks)[masks]
    loss = torch.sum(t * F.log_softmax(s / temp, dim=-1), dim=-1)
    return -(loss * w).sum() / masks.shape[0]

  rng = np.random.default_rng(5)
  b, n_local = 2, 3
  sg, sl, tp = _dino_inputs(rng, b, n_local, 16)
  sg_t = torch.tensor(sg, dtype=torch.float64, requires_grad=True)
  sl_t = torch.tensor(sl, dtype=torch.float64, requires_grad=True)
  tp_t = torch.tensor(tp, dtype=torch.float64)
  t_dino_list = list(torch.cat([tp_t[b:], tp_t[:b]]).view(2, b, -1))  # The swap.
  denom = 2 * n_local + 2
  total = (t_dino(list(sl_t.chunk(n_local)), t_dino_list) / denom
           + t_dino([sg_t], [torch.cat(t_dino_list)]) * 2 / denom)
  total.backward()
  g_sg, g_sl = jax.jit(jax.grad(lambda a, c: sum(dino_loss(a, c, tp)), argnums=(0, 1)))(sg, sl)
  np.testing.assert_allclose(np.asarray(g_sg), sg_t.grad.numpy(), rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(np.asarray(g_sl), sl_t.grad.numpy(), rtol=1e-4, atol=1e-7)

  # KoLeo, including the tie (x0 equidistant from x1 and x2) that decides where gradient goes.
  tie = _f32([[1.0, 0.0, 0.1], [0.0, 1.0, 0.1], [0.0, -1.0, 0.1], [-0.5, -0.5, -2.0]])
  assert int(koleo_nearest_neighbour(tie)[0]) == 1
  antipodal = _f32([[3.0, 0.0], [-0.5, 0.0]])  # Row 0 is its own neighbour.
  for x in (tie, antipodal, _f32(rng.normal(size=(7, 5)))):
    x_t = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    ref = t_koleo(x_t)
    ref.backward()
    val, g = jax.jit(jax.value_and_grad(losses.koleo_loss))(x)
    np.testing.assert_allclose(float(val), ref.item(), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(g), x_t.grad.numpy(), rtol=1e-4, atol=1e-6)

  # iBOT.
  masks, _, _, idx, s_pad, t_pad, w_pad = _ibot_case(rng)
  s_t = torch.tensor(s_pad[:len(idx)], dtype=torch.float64, requires_grad=True)
  ref = t_ibot(s_t, torch.tensor(t_pad[:len(idx)], dtype=torch.float64), torch.tensor(masks))
  ref.backward()
  val, g = jax.jit(jax.value_and_grad(lambda s: ibot_patch_loss(s, t_pad, w_pad, 6)))(s_pad)
  np.testing.assert_allclose(float(val), ref.item(), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(g)[:len(idx)], s_t.grad.numpy(), rtol=1e-4, atol=1e-7)


# ------------------------------------------------------------------------------------------------
# Lazy centring.
# ------------------------------------------------------------------------------------------------


def test_dino_center_is_lazy_over_three_steps():
  rng = np.random.default_rng(6)
  k, temp = 16, 0.07
  steps = [_f32(rng.normal(size=(6, k)) * 2 + 3 * i) for i in range(3)]
  meta = MetaCenter(k)
  state = losses.init_center_state(k)
  expected_centers = [
      np.zeros(k),
      0.1 * steps[0].astype(np.float64).mean(0),
      0.9 * 0.1 * steps[0].astype(np.float64).mean(0) + 0.1 * steps[1].astype(np.float64).mean(0),
  ]
  for i, t in enumerate(steps):
    t64 = t.astype(np.float64)
    ref = meta.softmax_center_teacher(t64, temp)
    meta.update_center(t64)
    np.testing.assert_allclose(meta.center, expected_centers[i], rtol=1e-12, atol=1e-12)
    probs, state = softmax_center_teacher(state, t, temp)
    np.testing.assert_allclose(np.asarray(state.center), expected_centers[i], rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(np.asarray(probs), ref, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(state.pending), t64.mean(0), rtol=1e-5, atol=1e-6)
  # Step 0 used no centre at all.
  probs0, _ = softmax_center_teacher(losses.init_center_state(k), steps[0], temp)
  np.testing.assert_allclose(np.asarray(probs0), np_softmax(steps[0] / temp), rtol=1e-4,
                             atol=1e-6)


def test_ibot_center_uses_valid_tokens_only_over_three_steps():
  rng = np.random.default_rng(8)
  k, temp, m = 16, 0.07, 20
  meta = MetaCenter(k, patch=True)
  state = losses.init_center_state(k)
  for i, n_valid in enumerate([13, 7, 20]):
    t = _f32(rng.normal(size=(m, k)) + i)
    valid = np.arange(m) < n_valid
    t_garbage = t.copy()
    t_garbage[~valid] = np.nan
    t64 = t[valid].astype(np.float64)
    ref = meta.softmax_center_teacher(t64[None], temp)[0]  # Meta passes (1, n_masked, K).
    meta.update_center(t64)
    # Pass per-token weights (nonzero = valid), as the train step may.
    weights = np.where(valid, 1.0 / (i + 2), 0.0).astype(np.float32)
    probs, state = softmax_center_teacher(state, t_garbage, temp, valid=weights)
    probs = np.asarray(probs)
    np.testing.assert_allclose(np.asarray(state.center), meta.center, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(probs[valid], ref, rtol=1e-4, atol=1e-6)
    assert np.all(probs[~valid] == 0.0)
    np.testing.assert_allclose(np.asarray(state.pending), t64.mean(0), rtol=1e-5, atol=1e-6)


def test_center_no_valid_rows_keeps_center_and_resume_option():
  k = 8
  state = losses.CenterState(center=jnp.full((k,), 2.0), pending=jnp.full((k,), 4.0))
  probs, new = softmax_center_teacher(state, jnp.ones((5, k)), 0.1, valid=jnp.zeros((5,)))
  assert np.all(np.asarray(probs) == 0.0)
  np.testing.assert_allclose(np.asarray(new.center), 0.9 * 2 + 0.1 * 4, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(new.pending), np.asarray(new.center))
  # Meta's resume: the pending update is dropped, the next step uses the stored centre.
  resumed = losses.discard_pending_center_update(state)
  _, after = softmax_center_teacher(resumed, jnp.ones((5, k)), 0.1)
  np.testing.assert_allclose(np.asarray(after.center), 2.0, rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# Sinkhorn-Knopp.
# ------------------------------------------------------------------------------------------------


def test_sinkhorn_matches_meta_and_marginals():
  rng = np.random.default_rng(9)
  b2, k, temp = 16, 32, 0.1
  t = _f32(rng.normal(size=(b2, k)))
  ref64 = meta_sinkhorn(t, temp)
  ref32 = meta_sinkhorn(t, temp, dtype=np.float32)  # Meta's own float32 arithmetic.
  got = np.asarray(sinkhorn_knopp_teacher(t, temp))
  assert got.dtype == np.float32
  np.testing.assert_allclose(got, ref64, rtol=2e-5, atol=1e-9)
  np.testing.assert_allclose(got, ref32, rtol=1e-4, atol=1e-8)
  # Each sample's row sums to 1; prototype marginals as Meta's after 3 iterations, i.e. nearer
  # to uniform (B/K) than the plain softmax's (3 iterations do not fully converge).
  np.testing.assert_allclose(got.sum(1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(got.sum(0), ref64.sum(0), rtol=1e-4)
  sk_dev = np.abs(got.sum(0) * k / b2 - 1).max()
  softmax_dev = np.abs(np_softmax(t / temp).sum(0) * k / b2 - 1).max()
  assert sk_dev < 0.5 * softmax_dev, (sk_dev, softmax_dev)
  # n_iterations is honoured.
  np.testing.assert_allclose(
      np.asarray(sinkhorn_knopp_teacher(t, temp, n_iterations=1)),
      meta_sinkhorn(t, temp, n_iterations=1), rtol=2e-5, atol=1e-9)


def test_sinkhorn_finite_where_meta_overflows():
  rng = np.random.default_rng(10)
  t = _f32(50.0 + rng.normal(size=(16, 32)))  # 50 / 0.04 = 1250 >> 88.
  temp = 0.04
  assert not np.all(np.isfinite(meta_sinkhorn(t, temp, dtype=np.float32)))
  got = np.asarray(sinkhorn_knopp_teacher(t, temp))
  assert np.all(np.isfinite(got))
  np.testing.assert_allclose(got.sum(1), 1.0, rtol=1e-5)
  # A global shift of the logits cancels exactly in Meta's algorithm; the shifted float64 port
  # is finite and is the exact answer.
  t64 = t.astype(np.float64)
  ref = meta_sinkhorn(t64 - t64.max(), temp)
  np.testing.assert_allclose(got, ref, rtol=1e-3, atol=1e-9)


def test_sinkhorn_ibot_padding_ignored():
  rng = np.random.default_rng(11)
  m, k, temp = 24, 32, 0.07
  t = _f32(rng.normal(size=(m, k)))
  valid = np.zeros(m, bool)
  valid[rng.permutation(m)[:17]] = True
  garbage = t.copy()
  garbage[~valid] = np.nan
  garbage[np.flatnonzero(~valid)[0]] = np.inf
  got = np.asarray(sinkhorn_knopp_teacher(garbage, temp, valid=valid))
  ref = meta_sinkhorn(t[valid], temp)  # Meta's B is the number of masked tokens: 17.
  np.testing.assert_allclose(got[valid], ref, rtol=2e-5, atol=1e-9)
  assert np.all(got[~valid] == 0.0)
  # No valid row at all: all zeros, no NaN.
  empty = np.asarray(sinkhorn_knopp_teacher(garbage, temp, valid=np.zeros(m, bool)))
  assert np.all(empty == 0.0)


# ------------------------------------------------------------------------------------------------
# jit and sharding.
# ------------------------------------------------------------------------------------------------


def _all_losses(sg, sl, t_cls, s_patch, t_patch, w_patch, x_cls, center_dino, center_ibot,
                teacher_temp):
  """Everything a train step computes from the loss module, in one function."""
  b = sg.shape[0] // 2
  t_dino, center_dino = losses.softmax_center_teacher(center_dino, t_cls, teacher_temp)
  t_ibot, center_ibot = losses.softmax_center_teacher(
      center_ibot, t_patch, teacher_temp, valid=w_patch)
  sk_dino = losses.sinkhorn_knopp_teacher(t_cls, teacher_temp)
  sk_ibot = losses.sinkhorn_knopp_teacher(t_patch, teacher_temp, valid=w_patch)
  dino = losses.dino_loss(sg, sl, t_dino)
  dino_sk = losses.dino_loss(sg, sl, sk_dino)
  return dict(
      dino_local=dino.local_crops, dino_global=dino.global_crops,
      dino_sk_local=dino_sk.local_crops, dino_sk_global=dino_sk.global_crops,
      ibot=losses.ibot_patch_loss(s_patch, t_ibot, w_patch, sg.shape[0]),
      ibot_sk=losses.ibot_patch_loss(s_patch, sk_ibot, w_patch, sg.shape[0]),
      koleo=0.1 * (losses.koleo_loss(x_cls[:b]) + losses.koleo_loss(x_cls[b:])),
      sk_dino=sk_dino, sk_ibot=sk_ibot, t_dino=t_dino,
      center_dino=center_dino, center_ibot=center_ibot)


def _all_inputs(seed=12, b=8, n_local=2, k=16, m=32, d=24):
  rng = np.random.default_rng(seed)
  w = np.zeros((m,), np.float32)
  w[:21] = 1.0 / rng.integers(1, 8, size=21)
  ones = lambda: losses.CenterState(_f32(rng.normal(size=k)), _f32(rng.normal(size=k)))
  return (_f32(rng.normal(size=(2 * b, k))), _f32(rng.normal(size=(n_local * b, k))),
          _f32(rng.normal(size=(2 * b, k))), _f32(rng.normal(size=(m, k))),
          _f32(rng.normal(size=(m, k))), w, _f32(rng.normal(size=(2 * b, d))), ones(), ones(),
          np.float32(0.07))


def _assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol,
                                                       atol=atol), a, b)


@functools.lru_cache(maxsize=None)
def _unsharded_jit_result():
  return jax.jit(_all_losses)(*_all_inputs())


def test_jit_and_eager_agree():
  # The whole train-step loss pipeline traces and runs under one jax.jit (traced teacher temp),
  # and agrees with the same code run eagerly (op by op). Eager is slow to warm up (one compile
  # per primitive), so only the DINO part is recomputed eagerly; every other test already
  # compares the jitted functions with the references.
  sg, sl, t_cls, s_patch, t_patch, w_patch, x_cls, center_dino, center_ibot, temp = _all_inputs()
  jitted = _unsharded_jit_result()
  for v in jax.tree.leaves(jitted):
    assert np.all(np.isfinite(np.asarray(v)))
  eager = losses.dino_loss(sg, sl, jitted['sk_dino'])
  _assert_trees_close((jitted['dino_sk_local'], jitted['dino_sk_global']), tuple(eager))


def test_sharded_over_8_devices_matches_unsharded():
  if len(jax.devices()) < 8:
    pytest.skip('needs 8 devices: run with XLA_FLAGS=--xla_force_host_platform_device_count=8 '
                '(tests/conftest.py sets it)')
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  args = _all_inputs()
  expected = _unsharded_jit_result()
  fn = jax.jit(_all_losses)
  devices = np.array(jax.devices()[:8])
  # Rows over 8 devices; then rows over 4 and prototypes/features over 2.
  for mesh, spec in [(Mesh(devices, ('data',)), P('data')),
                     (Mesh(devices.reshape(4, 2), ('data', 'model')), P('data', 'model'))]:

    def put(x, mesh=mesh, spec=spec):
      x = np.asarray(x)  # Matrices get `spec`, vectors (centres, weights) the first axis of it.
      return jax.device_put(x, NamedSharding(mesh, P(*spec[:x.ndim])))

    sharded = jax.tree.map(put, args)
    assert len(sharded[0].sharding.device_set) == 8
    rows_per_shard = sharded[0].addressable_shards[0].data.shape[0]
    assert rows_per_shard == sharded[0].shape[0] // mesh.shape['data']
    got = fn(*sharded)
    _assert_trees_close(got, expected)
