"""Positional-embedding resampling, numerically equal to Meta's `interpolate_pos_encoding`.

Meta resizes the (M, M) grid of patch position embeddings with `torch.nn.functional.interpolate`
(bicubic, align_corners=False). Two details matter and are easy to get wrong:

* With `interpolate_offset` > 0 Meta passes `scale_factor=(h + offset) / M` instead of `size=h`.
  torch then maps output pixel `i` to source coordinate `(i + 0.5) * M / (h + offset) - 0.5`, so the
  offset changes the sampling grid, not only the output size.
* Without antialiasing torch uses the Keys cubic kernel with a = -0.75 and clamps taps at the border;
  with antialiasing (register models) it uses a = -0.5, widens the support by the downscale factor
  and renormalises the weights (PIL style).

Both operations are separable, so we build one (out, in) weight matrix per axis in float64 numpy
(shapes are static, so this happens once at trace time) and apply them with two matmuls.
"""

from __future__ import annotations

import functools
import math

import jax.numpy as jnp
import numpy as np


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
  x = np.abs(x)
  near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
  far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
  return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


@functools.lru_cache(maxsize=256)
def bicubic_weights(in_size: int, out_size: int, scale: float, antialias: bool) -> np.ndarray:
  """(out_size, in_size) float64 matrix reproducing torch's 1-D bicubic resampling.

  Args:
    in_size: source length M.
    out_size: target length.
    scale: source pixels per target pixel, as torch uses it: `1 / scale_factor` when a scale factor
      was given, else `in_size / out_size`.
    antialias: torch's `antialias=True` path (a = -0.5, widened, normalised support).
  """
  weights = np.zeros((out_size, in_size), np.float64)
  if antialias and in_size == out_size:
    # torch's separable antialiased kernel skips an axis whose size does not change, even when a
    # scale factor (Meta's offset) would otherwise shift the samples.
    return np.eye(in_size)
  if antialias:
    support = 2.0 * scale if scale >= 1.0 else 2.0
    inv = 1.0 / scale if scale >= 1.0 else 1.0
    for i in range(out_size):
      center = scale * (i + 0.5)
      lo = max(int(center - support + 0.5), 0)
      hi = min(int(center + support + 0.5), in_size)
      taps = np.arange(lo, hi)
      w = _cubic((taps - center + 0.5) * inv, -0.5)
      total = w.sum()
      weights[i, taps] = w / total if total != 0 else w
    return weights
  for i in range(out_size):
    src = (i + 0.5) * scale - 0.5
    x0 = math.floor(src)
    t = src - x0
    for k in range(-1, 3):
      weights[i, min(max(x0 + k, 0), in_size - 1)] += _cubic(np.array(t - k), -0.75)
  return weights


def resample_patch_pos_embed(
    pos_embed: jnp.ndarray,
    h: int,
    w: int,
    *,
    offset: float = 0.1,
    antialias: bool = False,
) -> jnp.ndarray:
  """Resamples a square grid of patch position embeddings to (h, w), as Meta does.

  Args:
    pos_embed: (M*M, D) patch position embeddings (no class token), any float dtype.
    h, w: target grid in patches.
    offset: Meta's `interpolate_offset`; 0 means `size=(h, w)`.
    antialias: Meta's `interpolate_antialias`.

  Returns:
    (h*w, D) array in the input dtype; the arithmetic is float32 as in Meta.
  """
  m = math.isqrt(pos_embed.shape[0])
  if m * m != pos_embed.shape[0]:
    raise ValueError(f"pos_embed holds {pos_embed.shape[0]} patch positions, not a square grid")
  if offset:
    # Meta passes scale_factor=(h + offset) / M; torch sizes the output as floor(M * factor) and
    # samples with the reciprocal of the factor.
    factor_h, factor_w = (h + offset) / m, (w + offset) / m
    out_h, out_w = math.floor(m * factor_h), math.floor(m * factor_w)
    if (out_h, out_w) != (h, w):  # Meta asserts the same thing.
      raise ValueError(f"offset {offset} resamples {m}x{m} to {out_h}x{out_w}, not {h}x{w}")
    scale_h, scale_w = 1.0 / factor_h, 1.0 / factor_w
  else:
    scale_h, scale_w = m / h, m / w
  wh = jnp.asarray(bicubic_weights(m, h, scale_h, antialias), jnp.float32)
  ww = jnp.asarray(bicubic_weights(m, w, scale_w, antialias), jnp.float32)
  grid = pos_embed.astype(jnp.float32).reshape(m, m, -1)
  hp = jnp.einsum("im,mnd->ind", wh, grid, precision="highest")
  out = jnp.einsum("jn,ind->ijd", ww, hp, precision="highest")
  return out.reshape(h * w, -1).astype(pos_embed.dtype)
