"""Positional-embedding resampling against torch.nn.functional.interpolate, called exactly as Meta calls it."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dinov2_jax.models.posemb import bicubic_weights, resample_patch_pos_embed


def _torch_meta(pe: np.ndarray, h: int, w: int, offset: float, antialias: bool) -> np.ndarray:
  m = int(np.sqrt(pe.shape[0]))
  grid = torch.from_numpy(pe).reshape(1, m, m, -1).permute(0, 3, 1, 2)
  kwargs = dict(scale_factor=((h + offset) / m, (w + offset) / m)) if offset else dict(size=(h, w))
  out = F.interpolate(grid, mode="bicubic", antialias=antialias, align_corners=False, **kwargs)
  return out.permute(0, 2, 3, 1).reshape(h * w, -1).numpy()


@pytest.mark.parametrize("m,h,w", [
    (37, 16, 16),   # hub model at 224: down-sampling
    (37, 7, 7),     # hub model at 98
    (37, 20, 14),   # non-square
    (37, 74, 37),   # up-sampling in one axis
    (4, 7, 5),      # up-sampling a tiny grid
    (16, 37, 37),   # up-sampling
])
@pytest.mark.parametrize("offset,antialias", [(0.1, False), (0.0, True), (0.0, False), (0.1, True)])
def test_matches_torch(m, h, w, offset, antialias):
  pe = np.random.default_rng(m * 100 + h).normal(size=(m * m, 8)).astype(np.float32)
  ours = np.asarray(resample_patch_pos_embed(pe, h, w, offset=offset, antialias=antialias))
  np.testing.assert_allclose(ours, _torch_meta(pe, h, w, offset, antialias), atol=2e-5)


def test_offset_changes_the_sampling_scale_not_just_the_size():
  pe = np.random.default_rng(0).normal(size=(37 * 37, 4)).astype(np.float32)
  with_offset = np.asarray(resample_patch_pos_embed(pe, 16, 16, offset=0.1))
  by_size = np.asarray(resample_patch_pos_embed(pe, 16, 16, offset=0.0))
  assert np.abs(with_offset - by_size).max() > 0.05


def test_keys_kernel_by_hand():
  # 1 -> 2 grid points, scale 0.5: output pixel 0 samples x = (0 + .5) * .5 - .5 = -0.25, i.e.
  # floor -1, t = 0.75; Keys a=-0.75 weights for taps at distances 1.75, 0.75, 0.25, 1.25.
  a = -0.75
  near = lambda x: ((a + 2) * x - (a + 3)) * x * x + 1  # noqa: E731
  far = lambda x: ((a * x - 5 * a) * x + 8 * a) * x - 4 * a  # noqa: E731
  expected = [far(1.75), near(0.75), near(0.25), far(1.25)]  # taps -2, -1, 0, 1 clamp to 0, 0, 0, 1
  w = bicubic_weights(2, 4, 0.5, antialias=False)
  np.testing.assert_allclose(w[0], [expected[0] + expected[1] + expected[2], expected[3]], atol=1e-12)
  np.testing.assert_allclose(w.sum(1), 1.0, atol=1e-12)


def test_bad_offset_size_combination_is_reported():
  pe = np.zeros((4 * 4, 2), np.float32)
  with pytest.raises(ValueError, match="pos_embed holds 15"):
    resample_patch_pos_embed(np.zeros((15, 2), np.float32), 3, 3)
  resample_patch_pos_embed(pe, 3, 3, offset=0.1)  # floor(4 * 3.1 / 4) = 3: fine
