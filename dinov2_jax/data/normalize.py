"""ImageNet normalisation of uint8 images, for the host pipelines and inside jitted steps alike.

Kept apart from the augmentation (which needs grain and PIL) so that the train step imports only this.
"""

from __future__ import annotations

import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Normalising from uint8 as (x - 255 mean) * 1 / (255 std) is one subtract and one multiply.
_MEAN_255 = np.asarray(IMAGENET_MEAN, np.float32) * 255.0
_INV_STD_255 = 1.0 / (np.asarray(IMAGENET_STD, np.float32) * 255.0)


def imagenet_normalize(x):
  """uint8 (..., 3) -> float32 (x / 255 - mean) / std, for numpy and jax arrays (in jit too)."""
  return (x.astype(np.float32) - _MEAN_255) * _INV_STD_255
