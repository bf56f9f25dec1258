"""Block masks against a plain-Python restatement of Meta's MaskingGenerator and collate.

Two kinds of reference runs:
* with Python's `random`, exactly as Meta calls it, compared with ours by statistics (the random
  streams differ, so individual masks cannot match);
* with a `random`-like shim that draws from a numpy Generator in the order our code does, compared
  draw for draw. This pins down the arithmetic (rounding, strict bounds, float32 bins) exactly.
"""

import math
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dinov2_jax import masking

torch = pytest.importorskip("torch")

GRID = (16, 16)  # 224 px, patch 14.
MAX_BLOCK = 0.5 * 224 // 14 * 224 // 14  # Meta's train.py expression: 128.0


class _MetaMaskingGenerator:
  """Meta's `dinov2/data/masking.py:MaskingGenerator`, restated; `rand` stands in for `random`."""

  def __init__(self, input_size, num_masking_patches=None, min_num_patches=4, max_num_patches=None,
               min_aspect=0.3, max_aspect=None, rand=random):
    if not isinstance(input_size, tuple):
      input_size = (input_size,) * 2
    self.height, self.width = input_size
    self.num_masking_patches = num_masking_patches
    self.min_num_patches = min_num_patches
    self.max_num_patches = num_masking_patches if max_num_patches is None else max_num_patches
    max_aspect = max_aspect or 1 / min_aspect
    self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))
    self.rand = rand
    self.blocks = []  # (top, left, h, w) of accepted blocks of the last call, for the tests.

  def _mask(self, mask, max_mask_patches):
    delta = 0
    for _ in range(10):
      target_area = self.rand.uniform(self.min_num_patches, max_mask_patches)
      aspect_ratio = math.exp(self.rand.uniform(*self.log_aspect_ratio))
      h = int(round(math.sqrt(target_area * aspect_ratio)))
      w = int(round(math.sqrt(target_area / aspect_ratio)))
      if w < self.width and h < self.height:
        top = self.rand.randint(0, self.height - h)
        left = self.rand.randint(0, self.width - w)
        num_masked = mask[top: top + h, left: left + w].sum()
        if 0 < h * w - num_masked <= max_mask_patches:
          for i in range(top, top + h):
            for j in range(left, left + w):
              if mask[i, j] == 0:
                mask[i, j] = 1
                delta += 1
          self.blocks.append((top, left, h, w))
        if delta > 0:
          break
    return delta

  def __call__(self, num_masking_patches=0):
    mask = np.zeros(shape=(self.height, self.width), dtype=bool)
    self.blocks = []
    mask_count = 0
    while mask_count < num_masking_patches:
      max_mask_patches = num_masking_patches - mask_count
      max_mask_patches = min(max_mask_patches, self.max_num_patches)
      delta = self._mask(mask, max_mask_patches)
      if delta == 0:
        break
      mask_count += delta
    return mask


def _meta_collate_masks(num_global_crops, n_tokens, mask_generator, rand,
                        mask_ratio_tuple=(0.1, 0.5), mask_probability=0.5):
  """The masking part of Meta's `dinov2/data/collate.py:collate_data_and_cast`, restated."""
  B = num_global_crops
  N = n_tokens
  n_samples_masked = int(B * mask_probability)
  probs = torch.linspace(*mask_ratio_tuple, n_samples_masked + 1)
  upperbound = 0
  masks_list = []
  for i in range(0, n_samples_masked):
    prob_min = probs[i]
    prob_max = probs[i + 1]
    masks_list.append(torch.BoolTensor(mask_generator(int(N * rand.uniform(prob_min, prob_max)))))
    upperbound += int(N * prob_max)
  for i in range(n_samples_masked, B):
    masks_list.append(torch.BoolTensor(mask_generator(0)))
  rand.shuffle(masks_list)
  collated_masks = torch.stack(masks_list).flatten(1)
  mask_indices_list = collated_masks.flatten().nonzero().flatten()
  masks_weight = (1 / collated_masks.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(
      collated_masks)[collated_masks]
  return {
      "collated_masks": collated_masks,
      "mask_indices_list": mask_indices_list,
      "masks_weight": masks_weight,
      "upperbound": upperbound,
      "n_masked_patches": torch.full((1,), fill_value=mask_indices_list.shape[0], dtype=torch.long),
  }


class _NumpyBackedRandom:
  """The parts of `random` that Meta uses, drawing from a numpy Generator like our code does."""

  def __init__(self, rng):
    self.rng = rng

  def uniform(self, a, b):
    return a + (b - a) * self.rng.random()

  def randint(self, a, b):
    return int(self.rng.integers(a, b + 1))

  def shuffle(self, x):
    perm = self.rng.permutation(len(x))
    x[:] = [x[i] for i in perm]


# ----------------------------------------------------------------------------- small pure pieces


def test_meta_max_num_patches_left_to_right():
  assert masking.meta_max_num_patches(224, 14) == 128.0  # 112.0 // 14 = 8; 8 * 224 // 14 = 128
  assert masking.meta_max_num_patches(224, 16) == 98.0  # 112 // 16 = 7; 7 * 224 // 16 = 98
  # Not 0.5 * 7 * 7 = 24.5: 49.0 // 14 = 3; 3 * 98 = 294; 294 // 14 = 21.
  assert masking.meta_max_num_patches(98, 14) == 21.0
  # 259.0 // 14 = 18; 18 * 518 // 14 = 666 (vs 0.5 * 37 ** 2 = 684.5).
  assert masking.meta_max_num_patches(518, 14) == 666.0


def test_mask_ratio_bins_equal_torch_linspace_bitwise():
  # torch's CPU linspace (two halves, fused multiply-adds) differs from numpy's by one ulp in many
  # entries; those ulps move int(N * p) (see the (12, 100) upperbound below).
  for lo, hi in [(0.1, 0.5), (0.0, 1.0), (0.2, 0.7)]:
    for n in range(0, 700):
      ours = masking.mask_ratio_bins(n, (lo, hi))
      ref = torch.linspace(lo, hi, n + 1).numpy()
      assert ours.dtype == np.float32
      np.testing.assert_array_equal(ours, ref, err_msg=f"{lo}, {hi}, {n}")


def test_upperbound_by_hand():
  # B = 2 images, 4 global crops, N = 256: n = int(4 * 0.5) = 2 masked crops,
  # probs = linspace(.1, .5, 3) = [.1, .3, .5] -> int(256 * .3) + int(256 * .5) = 76 + 128 = 204.
  assert masking.mask_upperbound(4, 256) == 204
  # 2 crops, N = 196 (224 / 16): one masked crop, probs = [.1, .5] -> int(98.0) = 98.
  assert masking.mask_upperbound(2, 196) == 98
  # 3 crops: int(1.5) = 1 masked crop -> 128.
  assert masking.mask_upperbound(3, 256) == 128
  # 6 crops, N = 256: probs = [.1, .2333, .3667, .5] -> int(59.73) + int(93.87) + 128 = 59 + 93 +
  # 128 = 280.
  assert masking.mask_upperbound(6, 256) == 280
  # 12 crops, N = 100: probs = [.1, .1667, .2333, .3, .3667, .4333, .5]. In exact arithmetic
  # 16 + 23 + 30 + 36 + 43 + 50 = 198, but torch's float32 bin for 0.3 is 0.29999998
  # (0.5 - 3 * step), so int(29.999998) = 29 and Meta's upperbound is 197.
  assert masking.mask_upperbound(12, 100) == 197
  assert masking.mask_upperbound(0, 256) == 0
  # mask_probability and the ratio range are configurable: 4 crops, p = 1 -> 4 bins over
  # [0, 0.4] = [0, .1, .2, .3, .4] -> 25 + 51 + 76 + 102 = 254.
  assert masking.mask_upperbound(4, 256, (0.0, 0.4), mask_probability=1.0) == 254


def test_upperbound_equals_meta_collate_expression():
  for crops in list(range(0, 40)) + [64, 128, 256, 512]:
    for n_tokens in [4, 9, 49, 100, 196, 256, 400, 1369]:
      probs = torch.linspace(0.1, 0.5, int(crops * 0.5) + 1)
      meta = sum(int(n_tokens * probs[i + 1]) for i in range(int(crops * 0.5)))
      assert masking.mask_upperbound(crops, n_tokens) == meta, (crops, n_tokens)


# ----------------------------------------------------------------------------- one crop


def test_block_mask_draw_for_draw_equals_meta_restatement():
  cases = [
      dict(grid=(16, 16), max_block=MAX_BLOCK, targets=[0, 1, 2, 3, 5, 25, 77, 127, 128, 200]),
      dict(grid=(14, 14), max_block=98.0, targets=[19, 50, 97]),
      dict(grid=(7, 7), max_block=21.0, targets=[4, 24, 40]),
      # Non-square, and no cap: ours then caps each block at the call's target, like a Meta
      # generator constructed with num_masking_patches=target (Meta's own None would fail).
      dict(grid=(6, 11), max_block=None, targets=[10, 30]),
  ]
  for case in cases:
    for seed in range(40):
      for target in case["targets"]:
        rng = np.random.default_rng(seed)
        ours, blocks = masking.block_mask(rng, case["grid"], target,
                                          max_num_patches=case["max_block"], return_blocks=True)
        meta_gen = _MetaMaskingGenerator(case["grid"], num_masking_patches=target,
                                         max_num_patches=case["max_block"],
                                         rand=_NumpyBackedRandom(np.random.default_rng(seed)))
        np.testing.assert_array_equal(ours, meta_gen(target))
        assert blocks == meta_gen.blocks


def test_zero_target_draws_nothing():
  rng = np.random.default_rng(0)
  state = rng.bit_generator.state
  assert not masking.block_mask(rng, GRID, 0, max_num_patches=MAX_BLOCK).any()
  assert rng.bit_generator.state == state


def _collect(sample, targets, draws):
  """{target: (counts (draws,), blocks list)} from `sample(target) -> (mask, blocks)`."""
  out = {}
  for target in targets:
    counts, blocks, rows = [], [], []
    for _ in range(draws):
      mask, bl = sample(target)
      counts.append(int(mask.sum()))
      blocks.append(bl)
      rows.append(mask.sum(axis=1))
    out[target] = (np.array(counts), blocks, np.mean(rows, axis=0))
  return out


def test_block_mask_statistics_match_meta():
  # Targets spanning what training produces at 16 x 16: int(256 * U(0.1, 0.5)) in 25..127.
  targets = [25, 64, 100, 127]
  draws = 2000
  meta_gen = _MetaMaskingGenerator(GRID, max_num_patches=MAX_BLOCK, rand=random.Random(1234))

  def meta_sample(target):
    mask = meta_gen(target)
    return mask, list(meta_gen.blocks)

  rng = np.random.default_rng(1234)
  ours = _collect(
      lambda t: masking.block_mask(rng, GRID, t, max_num_patches=MAX_BLOCK, return_blocks=True),
      targets, draws)
  meta = _collect(meta_sample, targets, draws)

  hit_ours, hit_meta = [], []
  for target in targets:
    (c_o, b_o, rows_o), (c_m, b_m, rows_m) = ours[target], meta[target]
    # Never above the target, and short by only a few cells when short.
    assert c_o.max() <= target and c_m.max() <= target
    assert c_o.min() >= target - 20
    # Mean count: within 4 standard errors of the difference (+ a tiny floor).
    se = math.sqrt(c_o.var() / draws + c_m.var() / draws)
    assert abs(c_o.mean() - c_m.mean()) <= 4 * se + 0.05, (target, c_o.mean(), c_m.mean())
    # Fraction hitting the target exactly: ~0.9 for both; binomial sd of the difference ~0.0095.
    f_o, f_m = np.mean(c_o == target), np.mean(c_m == target)
    assert abs(f_o - f_m) < 0.045, (target, f_o, f_m)
    hit_ours.append(f_o)
    hit_meta.append(f_m)
    # Same number of blocks per mask, and the same block shapes on average.
    n_o = np.array([len(b) for b in b_o])
    n_m = np.array([len(b) for b in b_m])
    se = math.sqrt(n_o.var() / draws + n_m.var() / draws)
    assert abs(n_o.mean() - n_m.mean()) <= 4 * se + 0.02, (target, n_o.mean(), n_m.mean())
    for k in (2, 3):  # block heights, widths
      v_o = np.array([blk[k] for bl in b_o for blk in bl], float)
      v_m = np.array([blk[k] for bl in b_m for blk in bl], float)
      se = math.sqrt(v_o.var() / v_o.size + v_m.var() / v_m.size)
      assert abs(v_o.mean() - v_m.mean()) <= 4 * se + 0.02, (target, k, v_o.mean(), v_m.mean())
    # Where the blocks land: masked cells per row (the border rows are hit less often).
    np.testing.assert_allclose(rows_o, rows_m, atol=0.06 * target / 16 + 0.15)
  # Meta: at 16 x 16 the target is hit ~90% of the time.
  assert 0.86 <= np.mean(hit_ours) <= 0.94 and 0.86 <= np.mean(hit_meta) <= 0.94


def test_every_block_obeys_the_shape_constraints():
  rng = np.random.default_rng(7)
  lo_aspect, hi_aspect = 0.3, 1 / 0.3
  for _ in range(300):
    target = int(256 * rng.uniform(0.1, 0.5))
    mask, blocks = masking.block_mask(rng, GRID, target, max_num_patches=MAX_BLOCK,
                                      return_blocks=True)
    rebuilt = np.zeros(GRID, bool)
    count = 0
    for top, left, h, w in blocks:
      # Strictly smaller than the grid on both sides, and inside it.
      assert 1 <= h < 16 and 1 <= w < 16
      assert 0 <= top <= 16 - h and 0 <= left <= 16 - w
      # h = round(sqrt(area * aspect)), w = round(sqrt(area / aspect)) for some area in
      # [min(4, cap), cap] and aspect in [0.3, 1 / 0.3]: invert the rounding intervals.
      cap = min(target - count, MAX_BLOCK)
      area_lo, area_hi = (h - 0.5) * (w - 0.5), (h + 0.5) * (w + 0.5)
      assert area_hi >= min(4, cap) and area_lo <= max(4, cap)
      aspect_lo, aspect_hi = (h - 0.5) / (w + 0.5), (h + 0.5) / (w - 0.5) if w > 0.5 else math.inf
      assert aspect_hi >= lo_aspect and aspect_lo <= hi_aspect
      # Each block adds at least one cell and never overshoots the remaining target.
      new = h * w - rebuilt[top:top + h, left:left + w].sum()
      assert 0 < new <= cap
      rebuilt[top:top + h, left:left + w] = True
      count += new
    np.testing.assert_array_equal(rebuilt, mask)
    assert count == mask.sum() <= target


# ----------------------------------------------------------------------------- one batch


@pytest.mark.parametrize("crops, grid, max_block", [
    (4, (16, 16), MAX_BLOCK),
    (16, (16, 16), MAX_BLOCK),
    (7, (14, 14), 98.0),
    (12, (10, 6), 20.0),
])
def test_batch_masks_equal_meta_collate_draw_for_draw(crops, grid, max_block):
  n_tokens = grid[0] * grid[1]
  for seed in range(15):
    ours = masking.sample_batch_masks(np.random.default_rng(seed), crops, grid,
                                      max_num_patches=max_block)
    rand = _NumpyBackedRandom(np.random.default_rng(seed))
    gen = _MetaMaskingGenerator(grid, max_num_patches=max_block, rand=rand)
    meta = _meta_collate_masks(crops, n_tokens, gen, rand)
    n = int(meta["n_masked_patches"][0])
    assert ours.upperbound == meta["upperbound"]
    assert ours.n_masked == n
    np.testing.assert_array_equal(ours.masks, meta["collated_masks"].numpy())
    np.testing.assert_array_equal(ours.mask_indices[:n], meta["mask_indices_list"].numpy())
    np.testing.assert_array_equal(ours.mask_weights[:n], meta["masks_weight"].numpy())


def test_batch_masks_structure():
  crops, n_tokens = 16, 256  # 8 images.
  n_masked_crops = int(crops * 0.5)
  upperbound = masking.mask_upperbound(crops, n_tokens)
  bins = masking.mask_ratio_bins(n_masked_crops)
  caps = np.array([int(np.float32(n_tokens) * p) for p in bins[1:]])
  seen_n = set()
  for seed in range(100):
    mb = masking.sample_batch_masks(np.random.default_rng(seed), crops, GRID,
                                    max_num_patches=MAX_BLOCK)
    # Static shapes and dtypes: they depend only on (crops, N).
    assert mb.masks.shape == (crops, n_tokens) and mb.masks.dtype == np.bool_
    assert mb.weights.shape == (crops, n_tokens) and mb.weights.dtype == np.float32
    for arr, dtype in [(mb.mask_indices, np.int32), (mb.mask_weights, np.float32),
                       (mb.mask_valid, np.bool_)]:
      assert arr.shape == (upperbound,) and arr.dtype == dtype
    assert mb.upperbound == upperbound
    counts = mb.masks.sum(axis=1)
    # Exactly int(2B * 0.5) crops are masked (every target here is >= 25, and a first block always
    # lands on an empty grid in practice); the others are empty.
    assert np.count_nonzero(counts) == n_masked_crops
    # Stratified ratios: the k-th smallest count is at most the k-th bin's cap.
    assert np.all(np.sort(counts[counts > 0]) <= caps)
    assert np.sort(counts[counts > 0])[0] >= int(n_tokens * 0.1) - 20
    # Weights: 1 / count on the masked tokens of each masked crop, so they sum to 1 per crop.
    np.testing.assert_allclose(mb.weights.sum(axis=1)[counts > 0], 1.0, rtol=1e-6)
    assert np.all(mb.weights[~mb.masks] == 0)
    # Flat arrays: Meta's flatten().nonzero() order, then padding with weight 0.
    n = mb.n_masked
    assert n == mb.masks.sum() <= upperbound
    np.testing.assert_array_equal(mb.mask_indices[:n], np.flatnonzero(mb.masks))
    np.testing.assert_array_equal(mb.mask_valid, np.arange(upperbound) < n)
    np.testing.assert_array_equal(mb.mask_weights[:n], mb.weights.reshape(-1)[mb.mask_indices[:n]])
    assert np.all(mb.mask_weights[n:] == 0) and np.all(mb.mask_indices[n:] == 0)
    assert mb.mask_weights.sum() == pytest.approx(n_masked_crops, rel=1e-5)
    seen_n.add(n)
  assert len(seen_n) > 10  # the count varies from batch to batch, the shapes do not.


def test_masked_crops_are_shuffled():
  # Which crops are masked is random: over many batches every crop position gets masked.
  masked_positions = np.zeros(8)
  for seed in range(200):
    mb = masking.sample_batch_masks(np.random.default_rng(seed), 8, (8, 8), max_num_patches=32.0)
    masked_positions += mb.masks.any(axis=1)
  assert masked_positions.sum() == 200 * 4
  assert masked_positions.min() > 60  # ~100 expected per position.


def test_static_shapes_do_not_recompile_under_jit():
  traces = []

  @jax.jit
  def masked_mean(tokens, mb_arrays):
    # What an iBOT loss does with the padded arrays: gather, weight, sum.
    traces.append(None)
    idx, weights = mb_arrays
    flat = tokens.reshape(-1, tokens.shape[-1])
    return jnp.sum(flat[idx] * weights[:, None], axis=0)

  tokens = jnp.asarray(np.random.default_rng(0).normal(size=(8, 64, 3)), jnp.float32)
  for seed in range(5):
    mb = masking.sample_batch_masks(np.random.default_rng(seed), 8, (8, 8), max_num_patches=32.0)
    got = masked_mean(tokens, (mb.mask_indices, mb.mask_weights))
    # Same as the unpadded weighted sum (Meta's form).
    flat = np.asarray(tokens).reshape(-1, 3)
    nz = np.flatnonzero(mb.masks)
    want = (flat[nz] * mb.weights.reshape(-1)[nz][:, None]).sum(0)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
  assert len(traces) == 1
