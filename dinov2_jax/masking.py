"""iBOT block masks, sampled on the host in the data pipeline.

Behaviourally equal to Meta's `MaskingGenerator` and to the masking part of `collate_data_and_cast`
(facebookresearch/dinov2, `dinov2/data/masking.py` and `dinov2/data/collate.py`), with two changes
that matter for a JAX input pipeline:

* Randomness comes from an explicit `numpy.random.Generator` instead of Python's global `random`, so
  a pipeline worker can be seeded per step and replayed. The sequence of draws (uniform, uniform,
  then the two integers when a block fits; one uniform per masked crop, one permutation) follows
  Meta's call order, so a Meta-style loop fed the same numbers produces the same masks.
* Meta returns `mask_indices_list` / `masks_weight` whose length is the number of masked tokens of
  this batch, which would recompile a jitted step every iteration. We pad them to Meta's own static
  `upperbound` and add a validity mask; padding has weight 0, so sums over the padded arrays equal
  Meta's sums over the unpadded ones.

Everything here is numpy and Python scalars; nothing touches JAX.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

# (top, left, height, width) of one accepted rectangle, in patches.
Block = tuple[int, int, int, int]


def meta_max_num_patches(image_size: int, patch_size: int, fraction: float = 0.5) -> float:
  """Meta's per-block cap `0.5 * S // p * S // p`, evaluated left to right as Python does.

  The left-to-right floor divisions are not the same as `0.5 * (S // p) ** 2` in general:
  224/14 gives 128.0 (= 0.5 * 256) but 98/14 gives 21.0, not 24.5. Returns a float, like Meta.
  """
  return fraction * image_size // patch_size * image_size // patch_size


def _uniform(rng: np.random.Generator, low, high):
  # Python's `random.uniform(a, b)` is `a + (b - a) * random()`; it also accepts high < low (a
  # block cap below `min_num_patches`), which numpy's `uniform` documents as undefined. Keeping
  # the Python formula also keeps float32 operands in float32 (a Python float is a weak type).
  return low + (high - low) * rng.random()


def _sample_block(
    rng: np.random.Generator,
    mask: np.ndarray,
    max_new: float,
    min_num_patches: float,
    log_aspect_range: tuple[float, float],
) -> Block | None:
  """Meta's `MaskingGenerator._mask`: tries up to 10 rectangles, sets the first useful one in place.

  Args:
    rng: source of randomness.
    mask: (H, W) bool, modified in place.
    max_new: most cells the block may add (the remaining target, capped by the per-block maximum).
    min_num_patches: lower end of the sampled block area (4 in Meta).
    log_aspect_range: (log(min_aspect), log(max_aspect)).

  Returns:
    The accepted (top, left, h, w), or None when 10 attempts added nothing.
  """
  height, width = mask.shape
  for _ in range(10):
    area = _uniform(rng, min_num_patches, max_new)
    aspect = math.exp(_uniform(rng, *log_aspect_range))
    # Python's round (half to even), as Meta; then a strict bound, so no block spans a full side.
    h = int(round(math.sqrt(area * aspect)))
    w = int(round(math.sqrt(area / aspect)))
    if w < width and h < height:
      # `random.randint(0, n)` includes n.
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      window = mask[top:top + h, left:left + w]
      new = h * w - int(window.sum())
      # Overlapping an existing block is allowed as long as the block adds something and does
      # not overshoot the target.
      if 0 < new <= max_new:
        window[...] = True
        return top, left, h, w
  return None


def block_mask(
    rng: np.random.Generator,
    grid_size: tuple[int, int],
    num_masking_patches: int,
    *,
    max_num_patches: float | None = None,
    min_num_patches: float = 4,
    min_aspect: float = 0.3,
    max_aspect: float | None = None,
    return_blocks: bool = False,
) -> np.ndarray | tuple[np.ndarray, list[Block]]:
  """One crop's mask: rectangles added until `num_masking_patches` cells are set (Meta's `__call__`).

  Each block has a log-uniform aspect ratio in [min_aspect, max_aspect] and an area drawn
  uniformly from [min_num_patches, min(remaining, max_num_patches)]. The count never exceeds the
  target; sampling stops early when a block attempt adds nothing (at 16x16 with Meta's settings the
  target is hit exactly ~90% of the time, otherwise missed by a few cells).

  Args:
    rng: source of randomness.
    grid_size: (H, W) patch grid, e.g. (16, 16) for 224 px and patch 14.
    num_masking_patches: target number of masked cells; 0 gives an empty mask and draws nothing.
    max_num_patches: per-block cap on added cells. Meta's training uses
      `meta_max_num_patches(S, p)`; None means the target itself, like Meta's default.
    min_num_patches: smallest sampled block area (Meta: 4).
    min_aspect: smallest h/w ratio (Meta: 0.3).
    max_aspect: largest h/w ratio; None means 1 / min_aspect.
    return_blocks: also return the accepted rectangles, in order (for tests and debugging).

  Returns:
    mask: (H, W) bool. With return_blocks, also the list of (top, left, h, w).
  """
  height, width = grid_size
  if max_num_patches is None:
    max_num_patches = num_masking_patches
  max_aspect = max_aspect or 1.0 / min_aspect
  log_aspect_range = (math.log(min_aspect), math.log(max_aspect))
  mask = np.zeros((height, width), dtype=bool)
  blocks: list[Block] = []
  count = 0
  while count < num_masking_patches:
    max_new = min(num_masking_patches - count, max_num_patches)
    block = _sample_block(rng, mask, max_new, min_num_patches, log_aspect_range)
    if block is None:
      break
    blocks.append(block)
    count = int(mask.sum())
  return (mask, blocks) if return_blocks else mask


def mask_ratio_bins(num_masked_crops: int, mask_ratio_min_max=(0.1, 0.5)) -> np.ndarray:
  """Meta's `torch.linspace(lo, hi, n + 1)` in float32, reproduced bit for bit.

  The bins feed `int(N * p)` truncations, so one ulp matters (e.g. 0.3 * 100 lands on 29 or 30).
  numpy's linspace rounds a float64 result once; torch's CPU kernel instead computes, in float32,
  `start + step * i` for the first half and `end - step * (steps - 1 - i)` for the second half,
  with `step = (end - start) / (steps - 1)`, and its x86 builds contract each of those into one
  fused multiply-add. We evaluate the fused operations exactly in float64 (a float32 times an
  integer below 2**24 is exact there, and so is the sum for values in [0, 1]) and round once.

  Returns:
    (num_masked_crops + 1,) float32.
  """
  steps = num_masked_crops + 1
  start = np.float32(mask_ratio_min_max[0])
  end = np.float32(mask_ratio_min_max[1])
  if steps == 1:
    return np.array([start], np.float32)
  step = np.float32((end - start) / np.float32(steps - 1))
  i = np.arange(steps, dtype=np.float64)
  first_half = np.float64(start) + np.float64(step) * i
  second_half = np.float64(end) - np.float64(step) * (steps - 1 - i)
  return np.where(i < steps // 2, first_half, second_half).astype(np.float32)


def num_masked_crops(num_global_crops: int, mask_probability: float = 0.5) -> int:
  """How many of the global crops get a non-zero mask target: Meta's `int(B * p)`."""
  return int(num_global_crops * mask_probability)


def mask_upperbound(
    num_global_crops: int,
    num_tokens: int,
    mask_ratio_min_max=(0.1, 0.5),
    mask_probability: float = 0.5,
) -> int:
  """Meta's static `upperbound`: sum over masked crops of `int(N * probs[i + 1])`.

  Each masked crop's target is `int(N * u)` with u <= probs[i + 1], and a mask never exceeds its
  target, so this bounds the number of masked tokens of every batch with these (B, N). It depends
  only on the arguments, so it is a safe static padding length.

  Args:
    num_global_crops: 2 * batch (all global crops of the batch).
    num_tokens: N = H * W patches per global crop.
  """
  probs = mask_ratio_bins(num_masked_crops(num_global_crops, mask_probability), mask_ratio_min_max)
  n = np.float32(num_tokens)
  return sum(int(n * p) for p in probs[1:])


class MaskBatch(NamedTuple):
  """Masks of one batch of global crops; every array shape depends only on (2B, N).

  Attributes:
    masks: (2B, N) bool, crop-major like the collated crops; True = replace with the mask token.
    weights: (2B, N) float32, 1 / (masked count of that crop) on masked tokens, else 0.
    mask_indices: (upperbound,) int32 indices into the flattened (2B * N) token axis, in
      `masks.flatten().nonzero()` order; padded with 0.
    mask_weights: (upperbound,) float32, Meta's `masks_weight` followed by zeros.
    mask_valid: (upperbound,) bool, True for the first `n_masked` entries.
    n_masked: number of masked tokens in the batch (Meta's `n_masked_patches`).
    upperbound: the static padding length (`mask_upperbound`).
  """

  masks: np.ndarray
  weights: np.ndarray
  mask_indices: np.ndarray
  mask_weights: np.ndarray
  mask_valid: np.ndarray
  n_masked: int
  upperbound: int


def sample_batch_masks(
    rng: np.random.Generator,
    num_global_crops: int,
    grid_size: tuple[int, int],
    *,
    max_num_patches: float | None,
    mask_ratio_min_max=(0.1, 0.5),
    mask_probability: float = 0.5,
    min_num_patches: float = 4,
    min_aspect: float = 0.3,
    max_aspect: float | None = None,
) -> MaskBatch:
  """The masking part of Meta's `collate_data_and_cast`, with statically shaped outputs.

  `n = int(2B * mask_probability)` crops get target `int(N * U(probs[i], probs[i + 1]))`, with
  probs the float32 bins of `mask_ratio_bins`, so mask ratios are stratified over the batch; the
  other crops stay empty; then the crops are shuffled. Arithmetic on the bins is float32 as in
  Meta, where the bins are torch tensors.

  Args:
    rng: source of randomness.
    num_global_crops: 2B, the number of global crops in the batch.
    grid_size: (H, W) patch grid of a global crop; N = H * W.
    max_num_patches: per-block cap (Meta: `meta_max_num_patches(S, p)`, 128.0 for 224/14); None
      caps each block at its crop's target.
    mask_ratio_min_max: range of the mask ratio over the masked crops (Meta: (0.1, 0.5)).
    mask_probability: fraction of crops that are masked (Meta: 0.5).
    min_num_patches, min_aspect, max_aspect: block shape parameters, see `block_mask`.

  Returns:
    A MaskBatch.
  """
  height, width = grid_size
  num_tokens = height * width
  n = num_masked_crops(num_global_crops, mask_probability)
  probs = mask_ratio_bins(n, mask_ratio_min_max)
  upperbound = mask_upperbound(num_global_crops, num_tokens, mask_ratio_min_max, mask_probability)

  masks = np.zeros((num_global_crops, num_tokens), dtype=bool)
  for i in range(n):
    # float32 like Meta's tensor bins; `rng.random()` is a Python float, so it stays float32.
    target = int(np.float32(num_tokens) * _uniform(rng, probs[i], probs[i + 1]))
    masks[i] = block_mask(
        rng, grid_size, target, max_num_patches=max_num_patches,
        min_num_patches=min_num_patches, min_aspect=min_aspect, max_aspect=max_aspect,
    ).reshape(-1)
  masks = masks[rng.permutation(num_global_crops)]

  counts = masks.sum(axis=1).astype(np.float32)
  # Meta: 1 / counts.clamp(min=1.0), in float32.
  per_crop = np.float32(1.0) / np.maximum(counts, np.float32(1.0))
  weights = np.where(masks, per_crop[:, None], np.float32(0.0)).astype(np.float32)

  flat_indices = np.flatnonzero(masks)
  n_masked = int(flat_indices.size)
  # Holds because each target is at most int(N * probs[i + 1]) and a mask never overshoots.
  assert n_masked <= upperbound, (n_masked, upperbound)
  mask_indices = np.zeros((upperbound,), np.int32)
  mask_indices[:n_masked] = flat_indices
  mask_weights = np.zeros((upperbound,), np.float32)
  mask_weights[:n_masked] = weights.reshape(-1)[flat_indices]
  mask_valid = np.arange(upperbound) < n_masked
  return MaskBatch(
      masks=masks,
      weights=weights,
      mask_indices=mask_indices,
      mask_weights=mask_weights,
      mask_valid=mask_valid,
      n_masked=n_masked,
      upperbound=upperbound,
  )
