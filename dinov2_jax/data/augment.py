"""DINOv2 multi-crop augmentation (Meta's `DataAugmentationDINO`), run on the host.

Per image, every crop drawing its own random parameters:

  global crop 1:  RandomResizedCrop(S, scale=(0.32, 1)) + hflip, colour, blur with p_blur[0]
  global crop 2:  RandomResizedCrop(S, scale=(0.32, 1)) + hflip, colour, blur with p_blur[1],
                  then solarise (threshold 128) with p = 0.2
  local crop i:   RandomResizedCrop(s, scale=(0.05, 0.32)) + hflip, colour, blur with p_blur[2]

  colour = ColorJitter(brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1) with p = 0.8, the four
           ops in a random order, then RandomGrayscale(p = 0.2)
  blur   = Gaussian, kernel 9, sigma ~ U(0.1, 2.0), reflect padding

Blur probabilities, `blur_mode`:

  "paper" (default): p_blur = (1.0, 0.1, 0.5). What the DINO/DINOv2 papers describe and what Meta's
      configs ask for (`GaussianBlur(p=1.0)`, `p=0.1`, `p=0.5`).
  "meta": p_blur = (0.0, 0.9, 0.5). What Meta's code actually does: its `GaussianBlur` wrapper is a
      `RandomApply(p=1 - p)`, so global crop 1 is never blurred and global crop 2 is blurred 90% of
      the time (dinov2 PR #411; the released checkpoints were trained this way). Use it to reproduce
      Meta's training exactly.

Where it runs (measured, see benchmarks/RESULTS.md): everything except the final ImageNet
normalisation runs per image on the host, in PIL (uint8) plus numpy/scipy for the blur. On the
2-core CPU container this does the full 10-crop recipe at ~75 images/s per core; the alternative
that keeps only crop/resize/flip on the host and runs colour/blur/solarise as one jitted JAX
function over the batch was ~2.5x slower end to end on CPU, and its float semantics differ from
Meta's. Crops leave the per-image transform as uint8 (4x less to pickle between grain workers) and
`collate_crops` normalises to float32 NHWC; `imagenet_normalize` also works on jax arrays, so a
caller may ship uint8 (`normalize=False`) and normalise inside the jitted step instead.

Meta's transforms receive PIL images, so torchvision takes its PIL code paths; we follow those
semantics (uint8 after every op):
  * brightness / contrast / saturation are PIL `ImageEnhance` blends `deg + f * (img - deg)`,
    clipped and truncated to uint8, with deg = 0, the rounded mean of the L (luma) image, and the L
    image respectively;
  * hue shifts the H channel of PIL's 8-bit HSV by `int(f * 255)` modulo 256;
  * grayscale is PIL's "L" (ITU-R 601-2: 0.299 R + 0.587 G + 0.114 B, rounded), repeated 3 times;
  * the blur is computed in float32 on the uint8 image and rounded half-to-even back to uint8
    (torchvision's tensor kernel, which it uses for PIL inputs too); we apply the 9x9 Gaussian as
    two separable 9-tap passes, which can differ from torch's single 2-D convolution by rounding;
  * solarise inverts pixels >= 128.

Randomness: every draw comes from one `np.random.Generator` per image. `DinoMultiCrop` is a grain
`RandomMapTransform` (grain hands it a generator derived from (seed, index)); `SeededDinoMultiCrop`
is a `MapWithIndexTransform` that derives its own from `np.random.SeedSequence((seed, index))`.
Either way the crops of an image depend only on the seed and the image's index.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, NamedTuple, Sequence

import grain
import numpy as np
from PIL import Image, ImageEnhance
from scipy import ndimage

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Normalising from uint8 as (x - 255 mean) * 1 / (255 std) is one subtract and one multiply.
_MEAN_255 = np.asarray(IMAGENET_MEAN, np.float32) * 255.0
_INV_STD_255 = 1.0 / (np.asarray(IMAGENET_STD, np.float32) * 255.0)

# (global crop 1, global crop 2, local crops); see the module docstring.
BLUR_PROBS = {"paper": (1.0, 0.1, 0.5), "meta": (0.0, 0.9, 0.5)}

# ColorJitter op indices, as in the order permutation.
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)


@dataclasses.dataclass(frozen=True)
class MultiCropConfig:
  """DINOv2 multi-crop recipe. Defaults are Meta's ViT-L/g 14 settings (98 px local crops)."""

  global_size: int = 224
  local_size: int = 98
  n_local: int = 8
  patch_size: int = 14
  global_scale: tuple[float, float] = (0.32, 1.0)
  local_scale: tuple[float, float] = (0.05, 0.32)
  ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
  blur_mode: str = "paper"
  brightness: float = 0.4
  contrast: float = 0.4
  saturation: float = 0.2
  hue: float = 0.1
  p_jitter: float = 0.8
  p_grayscale: float = 0.2
  p_solarize: float = 0.2
  blur_kernel_size: int = 9
  blur_sigma: tuple[float, float] = (0.1, 2.0)

  def __post_init__(self):
    check_crop_size(self.global_size, self.patch_size, "global_size")
    check_crop_size(self.local_size, self.patch_size, "local_size")
    if self.blur_mode not in BLUR_PROBS:
      raise ValueError(f"blur_mode={self.blur_mode!r}; expected one of {sorted(BLUR_PROBS)}.")
    if self.n_local < 0:
      raise ValueError(f"n_local={self.n_local} must be >= 0.")
    if not 0.0 <= self.hue <= 0.5:
      raise ValueError(f"hue={self.hue} must be in [0, 0.5].")

  @property
  def blur_probs(self) -> tuple[float, float, float]:
    """(p global crop 1, p global crop 2, p local crops)."""
    return BLUR_PROBS[self.blur_mode]


def check_crop_size(size: int, patch_size: int, name: str = "crop size") -> int:
  """Returns `size` if it is a positive multiple of `patch_size`, else raises a ValueError.

  Meta's default local size 96 is not a multiple of 14: its patch embedding silently drops the
  12 leftover pixels. We refuse such sizes and name the nearest valid ones instead (the check is
  the backbone's own, `models.vit.check_image_shape`).
  """
  from dinov2_jax.models.vit import check_image_shape
  try:
    check_image_shape((1, size, size, 3), patch_size)
  except ValueError as e:
    raise ValueError(f"{name}={size}: {e}") from None
  return size


# ----------------------------------------------------------------------------------------------
# Random parameters. Kept apart from the image ops so that tests can check the statistics of many
# draws cheaply, and so that one draw order defines the stream for a given generator.


def random_resized_crop_params(
    rng: np.random.Generator, height: int, width: int, scale: tuple[float, float],
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)) -> tuple[int, int, int, int]:
  """Crop box of torchvision's RandomResizedCrop: (top, left, h, w), all ints.

  Area fraction ~ U(scale), aspect ratio w/h log-uniform in `ratio`; up to 10 attempts whose box
  fits in the image, else a central crop of the whole image with its aspect clamped into `ratio`.
  """
  area = height * width
  log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
  for _ in range(10):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(log_lo, log_hi))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  in_ratio = width / height
  if in_ratio < ratio[0]:
    w, h = width, int(round(width / ratio[0]))
  elif in_ratio > ratio[1]:
    w, h = int(round(height * ratio[1])), height
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


class CropParams(NamedTuple):
  """Everything random about one crop. `None` marks an op that is not applied."""

  top: int
  left: int
  height: int
  width: int
  flip: bool
  jitter_order: tuple[int, int, int, int] | None  # permutation of BRIGHTNESS..HUE
  jitter_factors: tuple[float, float, float, float]  # brightness, contrast, saturation, hue
  grayscale: bool
  blur_sigma: float | None
  solarize: bool


def sample_crop_params(
    rng: np.random.Generator, image_hw: tuple[int, int], scale: tuple[float, float],
    p_blur: float, p_solarize: float, config: MultiCropConfig) -> CropParams:
  """Draws one crop's parameters. Every draw is made whether or not its op applies."""
  top, left, h, w = random_resized_crop_params(rng, *image_hw, scale, config.ratio)
  flip = bool(rng.random() < 0.5)
  apply_jitter = bool(rng.random() < config.p_jitter)
  order = tuple(int(i) for i in rng.permutation(4))
  factors = (
      float(rng.uniform(max(0.0, 1.0 - config.brightness), 1.0 + config.brightness)),
      float(rng.uniform(max(0.0, 1.0 - config.contrast), 1.0 + config.contrast)),
      float(rng.uniform(max(0.0, 1.0 - config.saturation), 1.0 + config.saturation)),
      float(rng.uniform(-config.hue, config.hue)),
  )
  grayscale = bool(rng.random() < config.p_grayscale)
  blur = bool(rng.random() < p_blur)
  sigma = float(rng.uniform(*config.blur_sigma))
  solarize = bool(rng.random() < p_solarize)
  return CropParams(top, left, h, w, flip, order if apply_jitter else None, factors, grayscale,
                    sigma if blur else None, solarize)


def sample_image_params(
    rng: np.random.Generator, image_hw: tuple[int, int],
    config: MultiCropConfig) -> list[CropParams]:
  """Parameters of the 2 global then `n_local` local crops of one image, in that order."""
  p_g1, p_g2, p_local = config.blur_probs
  params = [
      sample_crop_params(rng, image_hw, config.global_scale, p_g1, 0.0, config),
      sample_crop_params(rng, image_hw, config.global_scale, p_g2, config.p_solarize, config),
  ]
  params += [sample_crop_params(rng, image_hw, config.local_scale, p_local, 0.0, config)
             for _ in range(config.n_local)]
  return params


def image_rng(seed: int, index: int) -> np.random.Generator:
  """Generator for image `index` of a run seeded with `seed` (SeedSequence of the pair)."""
  return np.random.default_rng(np.random.SeedSequence((seed, index)))


# ----------------------------------------------------------------------------------------------
# Image ops. PIL images are RGB uint8; numpy arrays are (H, W, 3) uint8.


def adjust_brightness(img: Image.Image, factor: float) -> Image.Image:
  """trunc(clip(f * img)): a blend with black."""
  return ImageEnhance.Brightness(img).enhance(factor)


def adjust_contrast(img: Image.Image, factor: float) -> Image.Image:
  """trunc(clip(m + f * (img - m))), m = mean of the luma image rounded to an integer."""
  return ImageEnhance.Contrast(img).enhance(factor)


def adjust_saturation(img: Image.Image, factor: float) -> Image.Image:
  """trunc(clip(L + f * (img - L))), L = the luma image."""
  return ImageEnhance.Color(img).enhance(factor)


def adjust_hue(img: Image.Image, factor: float) -> Image.Image:
  """Rotates the hue by `factor` turns (in [-0.5, 0.5]) in PIL's 8-bit HSV.

  The H byte wraps around, and the shift is `int(factor * 255)` truncated towards zero, which is
  what torchvision's uint8 cast of `factor * 255` gives.
  """
  if not -0.5 <= factor <= 0.5:
    raise ValueError(f"hue factor {factor} is not in [-0.5, 0.5].")
  h, s, v = img.convert("HSV").split()
  # uint8 addition wraps around, which is the rotation we want.
  h = Image.fromarray(np.asarray(h) + np.uint8(int(factor * 255) % 256))
  return Image.merge("HSV", (h, s, v)).convert("RGB")


_ADJUST = {BRIGHTNESS: adjust_brightness, CONTRAST: adjust_contrast,
           SATURATION: adjust_saturation, HUE: adjust_hue}


def color_jitter(img: Image.Image, order: Sequence[int],
                 factors: Sequence[float]) -> Image.Image:
  """Applies the four ColorJitter ops in `order`; `factors` is indexed by op, not by position."""
  for op in order:
    img = _ADJUST[op](img, factors[op])
  return img


def to_grayscale(img: Image.Image) -> Image.Image:
  """RGB image whose three channels all hold round(0.299 R + 0.587 G + 0.114 B)."""
  return img.convert("L").convert("RGB")


def gaussian_kernel1d(sigma: float, kernel_size: int = 9) -> np.ndarray:
  """(kernel_size,) float32 normalised Gaussian taps at integer offsets from the centre."""
  x = np.linspace(-(kernel_size - 1) / 2, (kernel_size - 1) / 2, kernel_size, dtype=np.float32)
  pdf = np.exp(-0.5 * np.square(x / np.float32(sigma)))
  return (pdf / pdf.sum()).astype(np.float32)


def gaussian_blur(x: np.ndarray, sigma: float, kernel_size: int = 9) -> np.ndarray:
  """(H, W, C) uint8 -> (H, W, C) uint8 Gaussian blur with reflect padding.

  scipy's "mirror" mode is torch's "reflect" (the edge pixel is not repeated). The result is
  rounded half-to-even, as torch.round does.
  """
  k = gaussian_kernel1d(sigma, kernel_size)
  y = ndimage.correlate1d(x.astype(np.float32), k, axis=0, mode="mirror")
  y = ndimage.correlate1d(y, k, axis=1, mode="mirror")
  return np.clip(np.rint(y), 0, 255).astype(np.uint8)


def solarize(x: np.ndarray, threshold: int = 128) -> np.ndarray:
  """uint8 -> uint8: pixels >= threshold become 255 - pixel."""
  return np.where(x >= threshold, 255 - x, x)


def imagenet_normalize(x):
  """uint8 (..., 3) -> float32 (x / 255 - mean) / std, for numpy and jax arrays (in jit too)."""
  return (x.astype(np.float32) - _MEAN_255) * _INV_STD_255


def to_pil_rgb(image: np.ndarray | Image.Image) -> Image.Image:
  """(H, W, 3) uint8 array, (H, W) gray array or any PIL image -> RGB PIL image."""
  if isinstance(image, Image.Image):
    return image if image.mode == "RGB" else image.convert("RGB")
  image = np.asarray(image)
  if image.dtype != np.uint8:
    raise ValueError(f"expected a uint8 image, got {image.dtype}.")
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]
  return Image.fromarray(image).convert("RGB")


def apply_crop_params(image: Image.Image, params: CropParams, size: int,
                      blur_kernel_size: int = 9) -> np.ndarray:
  """One augmented crop: RGB PIL image -> (size, size, 3) uint8, in Meta's op order."""
  p = params
  # Crop, then resize: resizing with a `box` would let the bicubic taps read pixels outside it.
  crop = image.crop((p.left, p.top, p.left + p.width, p.top + p.height))
  crop = crop.resize((size, size), Image.Resampling.BICUBIC)
  if p.flip:
    crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
  if p.jitter_order is not None:
    crop = color_jitter(crop, p.jitter_order, p.jitter_factors)
  if p.grayscale:
    crop = to_grayscale(crop)
  x = np.asarray(crop)
  if p.blur_sigma is not None:
    x = gaussian_blur(x, p.blur_sigma, blur_kernel_size)
  if p.solarize:
    x = solarize(x)
  return x


def multi_crop(image: np.ndarray | Image.Image, rng: np.random.Generator,
               config: MultiCropConfig = MultiCropConfig()) -> dict[str, np.ndarray]:
  """All crops of one image.

  Args:
    image: (H, W, 3) uint8 RGB array (or gray / PIL image).
    rng: the image's generator; all randomness comes from it.
    config: the recipe.

  Returns:
    {"global_crops": (2, S, S, 3) uint8, "local_crops": (n_local, s, s, 3) uint8}, not normalised
    (see `collate_crops`).
  """
  pil = to_pil_rgb(image)
  params = sample_image_params(rng, (pil.height, pil.width), config)
  sizes = [config.global_size] * 2 + [config.local_size] * config.n_local
  crops = [apply_crop_params(pil, p, s, config.blur_kernel_size) for p, s in zip(params, sizes)]
  local = (np.stack(crops[2:]) if config.n_local else
           np.zeros((0, config.local_size, config.local_size, 3), np.uint8))
  return {"global_crops": np.stack(crops[:2]), "local_crops": local}


# ----------------------------------------------------------------------------------------------
# grain transforms and batching.


def _split_element(element: Any, image_key: str) -> tuple[Any, dict[str, Any]]:
  if isinstance(element, Mapping):
    extras = {k: v for k, v in element.items() if k != image_key}
    return element[image_key], extras
  return element, {}


class DinoMultiCrop(grain.transforms.RandomMap):
  """grain RandomMapTransform: element -> crops, with grain's per-(seed, index) generator.

  An element is an image (array or PIL) or a mapping holding one under `image_key`; a mapping's
  other entries (e.g. "label") are passed through.

    ds = grain.MapDataset.source(images).seed(0).random_map(DinoMultiCrop())
    ds = ds.batch(64, batch_fn=collate_crops)
  """

  def __init__(self, config: MultiCropConfig | None = None, *, image_key: str = "image",
               **overrides):
    config = config or MultiCropConfig()
    self.config = dataclasses.replace(config, **overrides) if overrides else config
    self.image_key = image_key

  def random_map(self, element, rng: np.random.Generator) -> dict[str, Any]:
    image, extras = _split_element(element, self.image_key)
    return {**extras, **multi_crop(image, rng, self.config)}


class SeededDinoMultiCrop(grain.transforms.MapWithIndex):
  """grain MapWithIndexTransform: like `DinoMultiCrop`, with `image_rng(seed, index)`.

  Reproducible from (seed, index) alone, independently of grain's generator scheme:

    ds = grain.MapDataset.source(images).map_with_index(SeededDinoMultiCrop(seed=0))
  """

  def __init__(self, seed: int, config: MultiCropConfig | None = None, *,
               image_key: str = "image", **overrides):
    self.seed = seed
    self._inner = DinoMultiCrop(config, image_key=image_key, **overrides)
    self.config = self._inner.config

  def map_with_index(self, index: int, element) -> dict[str, Any]:
    return self._inner.random_map(element, image_rng(self.seed, index))


def crop_major(x: np.ndarray) -> np.ndarray:
  """(B, K, ...) image-major -> (K * B, ...) crop-major: [crop 0 of all images; crop 1; ...]."""
  return np.swapaxes(x, 0, 1).reshape(-1, *x.shape[2:])


def collate_crops(samples: Sequence[Mapping[str, Any]],
                  normalize: bool = True) -> dict[str, np.ndarray]:
  """Batches `multi_crop` outputs crop-major, as Meta's `collate_data_and_cast`.

  Args:
    samples: B dicts with "global_crops" (2, S, S, 3) uint8 and "local_crops" (n, s, s, 3) uint8;
      other entries are stacked along a new leading axis.
    normalize: ImageNet-normalise to float32 here; False keeps uint8 (normalise on device with
      `imagenet_normalize`).

  Returns:
    "global_crops" (2B, S, S, 3) and "local_crops" (nB, s, s, 3), float32 (or uint8), where row
    k * B + b is crop k of image b.
  """
  out = {}
  for key in samples[0]:
    if key in ("global_crops", "local_crops"):
      x = np.stack([s[key] for s in samples], axis=1)  # (K, B, ...): crop-major in one copy
      x = x.reshape(-1, *x.shape[2:])
      out[key] = imagenet_normalize(x) if normalize else x
    else:
      out[key] = np.stack([np.asarray(s[key]) for s in samples])
  return out
