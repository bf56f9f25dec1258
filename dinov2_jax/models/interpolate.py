"""Bilinear resizing numerically equal to `torch.nn.functional.interpolate(mode="bilinear")`.

Meta's dense heads resize feature maps with torch's bilinear mode in both of its conventions, and the
result depends on them: with `align_corners=False` output pixel `i` samples source coordinate
`(i + 0.5) * scale - 0.5` (clamped at 0), with `align_corners=True` it samples `i * (in - 1) / (out - 1)`,
and a given `scale_factor` replaces `in / out` as the scale in the first convention. Torch does not
antialias bilinear downsampling unless asked to, and neither do we. (`jax.image.resize` antialiases
when downsampling and has no align_corners mode.)

As in `posemb.py`, each axis is a static (out, in) weight matrix built in float64 numpy at trace time
and applied with a matmul.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


@functools.lru_cache(maxsize=512)
def bilinear_weights(in_size: int, out_size: int, align_corners: bool, scale_factor: float | None = None) -> np.ndarray:
  """(out_size, in_size) matrix reproducing torch's 1-D bilinear (linear) resampling.

  Args:
    in_size, out_size: source and target lengths.
    align_corners: torch's `align_corners`.
    scale_factor: the scale factor given to `F.interpolate`, if any; with `align_corners=False`
      torch samples with its reciprocal instead of `in_size / out_size`.
  """
  # Float32 arithmetic, as torch's CPU kernel computes the sampling positions of float32 maps.
  f32 = np.float32
  if align_corners:
    scale = f32(in_size - 1) / f32(out_size - 1) if out_size > 1 else f32(0.0)
  else:
    scale = f32(1.0) / f32(scale_factor) if scale_factor else f32(in_size) / f32(out_size)
  weights = np.zeros((out_size, in_size), np.float64)
  for i in range(out_size):
    src = scale * f32(i) if align_corners else max(scale * (f32(i) + f32(0.5)) - f32(0.5), f32(0.0))
    i0 = min(int(src), in_size - 1)
    i1 = min(i0 + 1, in_size - 1)
    frac = src - f32(i0)
    weights[i, i0] += f32(1.0) - frac
    weights[i, i1] += frac
  return weights


def resize_bilinear(x: jax.Array, size: Sequence[int] | None = None, *, scale_factor: float | None = None,
                    align_corners: bool = False) -> jax.Array:
  """Resizes NHWC maps like `F.interpolate(x_nchw, size, scale_factor, mode="bilinear", align_corners)`.

  Args:
    x: (B, H, W, C) float array.
    size: (out_h, out_w); or None with `scale_factor`, which gives `floor(H * scale_factor)` as torch does.
    scale_factor: torch's scale factor (the same for both axes).
    align_corners: torch's `align_corners`.

  Returns:
    (B, out_h, out_w, C) in x's dtype (arithmetic in float32).
  """
  _, h, w, _ = x.shape
  if size is None:
    if not scale_factor:
      raise ValueError("resize_bilinear needs a size or a scale_factor")
    size = (math.floor(h * scale_factor), math.floor(w * scale_factor))
  else:
    scale_factor = None  # given a size, torch derives the scale from the two sizes
  out_h, out_w = int(size[0]), int(size[1])
  if (out_h, out_w) == (h, w) and scale_factor in (None, 1.0):
    return x
  wh = jnp.asarray(bilinear_weights(h, out_h, align_corners, scale_factor), jnp.float32)
  ww = jnp.asarray(bilinear_weights(w, out_w, align_corners, scale_factor), jnp.float32)
  y = jnp.einsum("ih,bhwc->biwc", wh, x.astype(jnp.float32), precision="highest")
  y = jnp.einsum("jw,biwc->bijc", ww, y, precision="highest")
  return y.astype(x.dtype)
