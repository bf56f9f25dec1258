"""Meta's evaluation preprocessing: Resize(256, bicubic) -> CenterCrop(224) -> ImageNet normalisation."""

from __future__ import annotations

import numpy as np
from PIL import Image

from dinov2_jax.data.augment import imagenet_normalize


def eval_transform(image: np.ndarray | Image.Image, crop_size: int = 224, resize_size: int | None = None) -> np.ndarray:
  """One RGB image (H, W, 3) uint8 or PIL -> (crop_size, crop_size, 3) float32, normalised.

  The shorter side is resized to `resize_size` (default `crop_size * 256 / 224`, Meta's 256 for 224)
  with bicubic resampling, then the centre is cropped, as torchvision's Resize + CenterCrop on PIL.
  """
  if not isinstance(image, Image.Image):
    image = Image.fromarray(np.asarray(image, np.uint8))
  image = image.convert("RGB")
  resize_size = resize_size or round(crop_size * 256 / 224)
  w, h = image.size
  if w <= h:
    new_w, new_h = resize_size, int(resize_size * h / w)
  else:
    new_w, new_h = int(resize_size * w / h), resize_size
  image = image.resize((new_w, new_h), Image.BICUBIC)
  top, left = int(round((new_h - crop_size) / 2.0)), int(round((new_w - crop_size) / 2.0))
  image = image.crop((left, top, left + crop_size, top + crop_size))
  return imagenet_normalize(np.asarray(image))
