"""DINOv2 multi-crop augmentation: layout, determinism, op semantics and draw statistics.

References are written here from the documented definitions (torchvision's ColorJitter / PIL
ImageEnhance blends, ITU-R 601-2 luma, a Gaussian with reflect padding), not taken from the module.
"""

import colorsys

import grain
import numpy as np
import pytest
from PIL import Image

from dinov2_jax.data import augment as A

# Small crops keep the tests fast; 28 and 14 are multiples of the patch size 14.
SMALL = A.MultiCropConfig(global_size=28, local_size=14, n_local=3)


def _image(seed=0, h=60, w=80):
  """Smooth random RGB uint8 image (H, W, 3): smooth so that blur and crops change it measurably."""
  rng = np.random.default_rng(seed)
  coarse = rng.integers(0, 256, (h // 10 + 1, w // 10 + 1, 3), dtype=np.uint8)
  return np.asarray(Image.fromarray(coarse).resize((w, h), Image.Resampling.BILINEAR))


def _noise(seed=0, h=16, w=16):
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _luma(x):
  """ITU-R 601-2 luma, rounded to uint8 levels as PIL's "L" conversion does."""
  return np.floor(x.astype(np.float64) @ np.array([0.299, 0.587, 0.114]) + 0.5)


def _blend_ref(deg, x, f):
  """PIL blend deg + f (x - deg) in float32, clipped and truncated to uint8."""
  deg, x = np.float32(deg), x.astype(np.float32)
  return np.clip(deg + np.float32(f) * (x - deg), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# Shapes, dtypes, layout.


def test_default_recipe_shapes_and_dtypes():
  out = A.multi_crop(_image(h=375, w=500), A.image_rng(0, 0))
  assert out["global_crops"].shape == (2, 224, 224, 3)
  assert out["local_crops"].shape == (8, 98, 98, 3)
  assert out["global_crops"].dtype == out["local_crops"].dtype == np.uint8
  batch = A.collate_crops([out, out, out])
  assert batch["global_crops"].shape == (6, 224, 224, 3)
  assert batch["local_crops"].shape == (24, 98, 98, 3)
  assert batch["global_crops"].dtype == batch["local_crops"].dtype == np.float32
  # No local crops at all is a valid recipe too.
  none = A.multi_crop(_image(), A.image_rng(0, 0), A.MultiCropConfig(global_size=28, n_local=0))
  assert A.collate_crops([none, none])["local_crops"].shape == (0, 98, 98, 3)


def test_collate_is_crop_major():
  # Sample b's crop k holds the value 10 b + k, so every row names where it came from.
  n_img, n_local = 3, 4
  samples = [{"global_crops": np.stack([np.full((2, 2, 3), 10 * b + k, np.uint8)
                                        for k in range(2)]),
              "local_crops": np.stack([np.full((1, 1, 3), 10 * b + k, np.uint8)
                                       for k in range(n_local)]),
              "label": b} for b in range(n_img)]
  out = A.collate_crops(samples, normalize=False)
  assert out["global_crops"].dtype == np.uint8
  want_g = [10 * b + k for k in range(2) for b in range(n_img)]
  want_l = [10 * b + k for k in range(n_local) for b in range(n_img)]
  np.testing.assert_array_equal(out["global_crops"][:, 0, 0, 0], want_g)
  np.testing.assert_array_equal(out["local_crops"][:, 0, 0, 0], want_l)
  np.testing.assert_array_equal(out["label"], [0, 1, 2])
  # The same layout from a grain-style image-major (B, K, ...) batch.
  stacked = np.stack([s["local_crops"] for s in samples])
  np.testing.assert_array_equal(A.crop_major(stacked), out["local_crops"])
  normed = A.collate_crops(samples)
  np.testing.assert_allclose(normed["global_crops"], A.imagenet_normalize(out["global_crops"]))


def test_gray_and_pil_inputs_and_passthrough():
  gray = _image()[..., 0]
  out = A.DinoMultiCrop(SMALL).random_map({"image": gray, "label": 7}, A.image_rng(0, 0))
  assert out["label"] == 7
  assert out["global_crops"].shape == (2, 28, 28, 3)
  # A gray image stays gray through every op (jitter, grayscale, blur, solarise keep R = G = B).
  assert np.all(out["global_crops"][..., 0] == out["global_crops"][..., 2])
  pil = A.multi_crop(Image.fromarray(_image()), A.image_rng(0, 0), SMALL)
  arr = A.multi_crop(_image(), A.image_rng(0, 0), SMALL)
  np.testing.assert_array_equal(pil["local_crops"], arr["local_crops"])


# ---------------------------------------------------------------------------------------------
# Determinism.


def test_deterministic_for_seed_and_index():
  img = _image()
  run = lambda seed, index: A.SeededDinoMultiCrop(seed, SMALL).map_with_index(index, img)  # noqa
  a, b = run(0, 5), run(0, 5)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  # Equal to the plain function with the documented generator.
  c = A.multi_crop(img, A.image_rng(0, 5), SMALL)
  np.testing.assert_array_equal(a["local_crops"], c["local_crops"])
  for other in (run(1, 5), run(0, 6)):
    assert not np.array_equal(a["global_crops"], other["global_crops"])
    assert not np.array_equal(a["local_crops"], other["local_crops"])


def test_grain_random_map_is_deterministic():
  images = [_image(i) for i in range(4)]

  def batches(seed):
    ds = (grain.MapDataset.source(images).seed(seed).random_map(A.DinoMultiCrop(SMALL))
          .batch(2, batch_fn=A.collate_crops))
    return [ds[i] for i in range(len(ds))]

  first, again, other = batches(0), batches(0), batches(1)
  assert first[0]["global_crops"].shape == (4, 28, 28, 3)
  assert first[0]["local_crops"].shape == (6, 14, 14, 3)
  for x, y in zip(first, again):
    np.testing.assert_array_equal(x["local_crops"], y["local_crops"])
  assert not np.array_equal(first[0]["global_crops"], other[0]["global_crops"])
  # Iterating (the worker_count=0 path) gives the same crops as random access.
  ds = grain.MapDataset.source(images).seed(0).random_map(A.DinoMultiCrop(SMALL))
  for x, y in zip(ds.to_iter_dataset(), [ds[i] for i in range(len(ds))]):
    np.testing.assert_array_equal(x["global_crops"], y["global_crops"])


# ---------------------------------------------------------------------------------------------
# Colour ops against hand-computed references.


@pytest.mark.parametrize("factor", [0.6, 0.77, 1.0, 1.3, 1.4])
def test_brightness_contrast_saturation(factor):
  x = _noise()
  img = Image.fromarray(x)
  luma = _luma(x)
  np.testing.assert_array_equal(np.asarray(A.adjust_brightness(img, factor)),
                                _blend_ref(0, x, factor))
  mean = int(luma.mean() + 0.5)
  np.testing.assert_array_equal(np.asarray(A.adjust_contrast(img, factor)),
                                _blend_ref(mean, x, factor))
  np.testing.assert_array_equal(np.asarray(A.adjust_saturation(img, factor)),
                                _blend_ref(luma[..., None], x, factor))


def test_grayscale_uses_itu_601_luma():
  x = _noise()
  out = np.asarray(A.to_grayscale(Image.fromarray(x)))
  assert out.shape == x.shape
  for c in range(3):
    np.testing.assert_array_equal(out[..., c], _luma(x))


def test_hue_against_float_hsv():
  x = _noise(h=24, w=24)
  for factor in (-0.5, -0.1, 0.0, 0.05, 0.25, 0.5):
    ref = np.empty(x.shape)
    for i in np.ndindex(x.shape[:2]):
      h, s, v = colorsys.rgb_to_hsv(*(x[i] / 255.0))
      ref[i] = colorsys.hsv_to_rgb((h + factor) % 1.0, s, v)
    diff = np.abs(np.asarray(A.adjust_hue(Image.fromarray(x), factor)) - ref * 255.0)
    # PIL's HSV has 8 bits per channel; that quantisation alone gives these errors.
    assert diff.mean() < 2.5 and diff.max() <= 16, (factor, diff.mean(), diff.max())
  # Exact on primaries: a third of a turn maps red -> green -> blue.
  prim = np.array([[[255, 0, 0], [0, 255, 0]]], np.uint8)
  np.testing.assert_array_equal(np.asarray(A.adjust_hue(Image.fromarray(prim), 1 / 3)),
                                [[[0, 255, 0], [0, 0, 255]]])
  with pytest.raises(ValueError):
    A.adjust_hue(Image.fromarray(prim), 0.6)


def test_color_jitter_applies_ops_in_the_given_order():
  img = Image.fromarray(_noise())
  factors = (1.3, 0.7, 1.2, 0.08)
  ops = [A.adjust_brightness, A.adjust_contrast, A.adjust_saturation, A.adjust_hue]
  results = []
  for order in [(0, 1, 2, 3), (3, 2, 1, 0), (1, 3, 0, 2)]:
    want = img
    for op in order:
      want = ops[op](want, factors[op])
    got = np.asarray(A.color_jitter(img, order, factors))
    np.testing.assert_array_equal(got, np.asarray(want))
    results.append(got)
  assert not np.array_equal(results[0], results[1])


def test_solarize():
  x = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, -1)
  out = A.solarize(x)
  assert out.dtype == np.uint8
  np.testing.assert_array_equal(out, np.where(x >= 128, 255 - x.astype(int), x))
  assert out[7, 15, 0] == 127 and out[8, 0, 0] == 127  # 127 kept, 128 -> 127


# ---------------------------------------------------------------------------------------------
# Gaussian blur.


def _blur_ref(x, sigma, k=9):
  """2-D k x k Gaussian correlation in float64 with torch-style reflect padding, rounded."""
  t = np.arange(k) - (k - 1) / 2
  g = np.exp(-0.5 * (t / sigma) ** 2)
  g /= g.sum()
  kern = np.outer(g, g)
  r = (k - 1) // 2
  xp = np.pad(x.astype(np.float64), ((r, r), (r, r), (0, 0)), mode="reflect")
  out = np.zeros(x.shape)
  for i in range(k):
    for j in range(k):
      out += kern[i, j] * xp[i:i + x.shape[0], j:j + x.shape[1]]
  return np.rint(out)


@pytest.mark.parametrize("sigma", [0.1, 0.7, 2.0])
def test_gaussian_blur_matches_reference(sigma):
  x = _noise(h=20, w=23)
  got = A.gaussian_blur(x, sigma).astype(np.float64)
  ref = _blur_ref(x, sigma)
  diff = np.abs(got - ref)
  # Separable float32 vs 2-D float64 only moves values that sit on a .5 rounding boundary.
  assert diff.max() <= 1 and (diff > 0).mean() < 0.01
  kern = A.gaussian_kernel1d(sigma)
  assert kern.shape == (9,) and kern.dtype == np.float32
  np.testing.assert_allclose(kern.sum(), 1.0, rtol=1e-6)


def test_gaussian_blur_reflects_without_repeating_the_edge():
  # An impulse on the left edge: reflect padding mirrors it onto no extra pixel (torch "reflect"),
  # so the blurred row is the kernel's right half, not the half folded back onto itself.
  x = np.zeros((9, 9, 3), np.uint8)
  x[4, 0] = 255
  sigma = 1.5
  got = A.gaussian_blur(x, sigma)
  np.testing.assert_array_equal(got, _blur_ref(x, sigma))
  g = A.gaussian_kernel1d(sigma).astype(np.float64)
  np.testing.assert_array_equal(got[4, :5, 0], np.rint(255 * g[4] * g[4:]))


# ---------------------------------------------------------------------------------------------
# Random parameters.


def test_random_resized_crop_statistics():
  rng = np.random.default_rng(0)
  height, width = 375, 500
  for scale in [(0.32, 1.0), (0.05, 0.32)]:
    boxes = np.array([A.random_resized_crop_params(rng, height, width, scale)
                      for _ in range(4000)])
    top, left, h, w = boxes.T
    assert np.all((top >= 0) & (left >= 0) & (top + h <= height) & (left + w <= width))
    area = h * w / (height * width)
    aspect = w / h
    # Rounding h and w to integers moves area and aspect a little past the sampled bounds.
    assert area.min() >= scale[0] * 0.97 and area.max() <= scale[1] * 1.03
    assert aspect.min() >= 0.75 * 0.97 and aspect.max() <= 4 / 3 * 1.03
    assert area.min() < scale[0] * 1.05 and area.max() > scale[1] * 0.95  # range is covered
    # log aspect is uniform on [log 3/4, log 4/3] (for local crops nearly nothing is rejected).
    if scale[1] < 0.5:
      assert abs(np.log(aspect).mean()) < 0.01
      np.testing.assert_allclose(np.mean(area), np.mean(scale), rtol=0.03)
      assert abs(np.mean(top + h / 2) - height / 2) < 4
      assert abs(np.mean(left + w / 2) - width / 2) < 4


def test_random_resized_crop_fallback_is_central():
  # Too elongated for any 3/4..4/3 box of >= 90% area: 10 misses, then the central fallback.
  rng = np.random.default_rng(0)
  assert A.random_resized_crop_params(rng, 10, 1000, (0.9, 1.0)) == (0, (1000 - 13) // 2, 10, 13)
  assert A.random_resized_crop_params(rng, 1000, 10, (0.9, 1.0)) == ((1000 - 13) // 2, 0, 13, 10)


@pytest.mark.parametrize("mode,want", [("meta", (0.0, 0.9, 0.5)), ("paper", (1.0, 0.1, 0.5))])
def test_blur_probabilities(mode, want):
  cfg = A.MultiCropConfig(blur_mode=mode)
  assert cfg.blur_probs == want
  rng = np.random.default_rng(1)
  params = [A.sample_image_params(rng, (375, 500), cfg) for _ in range(3000)]
  blurred = np.array([[p.blur_sigma is not None for p in crops] for crops in params])
  g1, g2, local = blurred[:, 0].mean(), blurred[:, 1].mean(), blurred[:, 2:].mean()
  # 4 binomial standard deviations at n = 3000 (24000 for the locals).
  assert abs(g1 - want[0]) <= 4 * np.sqrt(want[0] * (1 - want[0]) / 3000)
  assert abs(g2 - want[1]) <= 0.022
  assert abs(local - want[2]) <= 0.013
  sigmas = np.array([p.blur_sigma for crops in params for p in crops if p.blur_sigma is not None])
  assert sigmas.min() >= 0.1 and sigmas.max() <= 2.0
  # The other draws: solarise on global crop 2 only, jitter 0.8, grayscale 0.2, flip 0.5.
  flat = [p for crops in params for p in crops]
  sol = np.array([[p.solarize for p in crops] for crops in params])
  assert not sol[:, 0].any() and not sol[:, 2:].any() and abs(sol[:, 1].mean() - 0.2) < 0.03
  assert abs(np.mean([p.jitter_order is not None for p in flat]) - 0.8) < 0.01
  assert abs(np.mean([p.grayscale for p in flat]) - 0.2) < 0.01
  assert abs(np.mean([p.flip for p in flat]) - 0.5) < 0.01
  factors = np.array([p.jitter_factors for p in flat])
  np.testing.assert_array_less([0.6 - 1e-9, 0.6 - 1e-9, 0.8 - 1e-9, -0.1 - 1e-9], factors.min(0))
  np.testing.assert_array_less(factors.max(0), [1.4, 1.4, 1.2, 0.1])
  orders = {p.jitter_order for p in flat if p.jitter_order is not None}
  assert len(orders) == 24  # every permutation of the four ops occurs


def test_blur_params_are_applied():
  img = A.to_pil_rgb(_image())
  base = A.CropParams(0, 0, 60, 80, False, None, (1.0, 1.0, 1.0, 0.0), False, None, False)
  plain = A.apply_crop_params(img, base, 28)
  np.testing.assert_array_equal(plain, np.asarray(img.resize((28, 28), Image.Resampling.BICUBIC)))
  blurred = A.apply_crop_params(img, base._replace(blur_sigma=2.0), 28)
  np.testing.assert_array_equal(blurred, A.gaussian_blur(plain, 2.0))
  flipped = A.apply_crop_params(img, base._replace(flip=True, solarize=True), 28)
  np.testing.assert_array_equal(flipped, A.solarize(plain[:, ::-1]))


# ---------------------------------------------------------------------------------------------
# Normalisation and configuration errors.


def test_imagenet_normalize():
  x = np.arange(256, dtype=np.uint8)[:, None].repeat(3, 1)
  want = (x / 255.0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
  got = A.imagenet_normalize(x)
  assert got.dtype == np.float32
  np.testing.assert_allclose(got, want, atol=2e-6)
  import jax
  import jax.numpy as jnp
  np.testing.assert_allclose(jax.jit(A.imagenet_normalize)(jnp.asarray(x)), got, atol=1e-6)


def test_invalid_crop_sizes():
  msg = r"local_size=96: image height 96 is not a multiple of the patch size 14; resize or crop to 84 or 98"
  with pytest.raises(ValueError, match=msg):
    A.MultiCropConfig(local_size=96)
  with pytest.raises(ValueError, match=r"global_size=230: .*224 or 238"):
    A.MultiCropConfig(global_size=230)
  with pytest.raises(ValueError, match=r"resize or crop to 14$"):
    A.check_crop_size(10, 14)
  # Any multiple of the patch size is accepted, also Meta's 96 with patch 16.
  for size in (14, 42, 98, 112, 518):
    assert A.check_crop_size(size, 14) == size
  A.MultiCropConfig(local_size=96, global_size=224, patch_size=16)
  out = A.multi_crop(_image(), A.image_rng(0, 0), A.MultiCropConfig(global_size=42, local_size=28,
                                                                     n_local=1))
  assert out["local_crops"].shape == (1, 28, 28, 3)
  with pytest.raises(ValueError, match="blur_mode"):
    A.MultiCropConfig(blur_mode="torch")
