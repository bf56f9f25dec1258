"""The embedded demo dataset: scikit-learn's handwritten digits (1797 real scans, 10 classes).

It ships inside scikit-learn, so the demo, the tests and the notebooks run with no download. The
8x8 scans are upsampled (bicubic) to RGB uint8 images of a chosen size; a fixed, class-stratified
split holds out a quarter of each class for evaluation.
"""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image

NUM_CLASSES = 10
SPLITS = ("train", "test", "all")


@functools.lru_cache(maxsize=8)
def _digits(image_size: int) -> tuple[np.ndarray, np.ndarray]:
  from sklearn.datasets import load_digits
  raw = load_digits()
  scans = (raw.images * (255.0 / 16.0)).round().astype(np.uint8)
  images = np.stack([np.asarray(Image.fromarray(s).resize((image_size, image_size), Image.BICUBIC)) for s in scans])
  return np.repeat(images[..., None], 3, axis=-1), raw.target.astype(np.int32)


def _split_indices(labels: np.ndarray, split: str) -> np.ndarray:
  rng = np.random.default_rng(0)
  test = np.zeros(len(labels), bool)
  for c in range(NUM_CLASSES):
    members = np.flatnonzero(labels == c)
    test[rng.choice(members, len(members) // 4, replace=False)] = True
  return {"train": np.flatnonzero(~test), "test": np.flatnonzero(test), "all": np.arange(len(labels))}[split]


def load_demo_dataset(split: str = "train", image_size: int = 28) -> tuple[np.ndarray, np.ndarray]:
  """Returns `(images, labels)`: (N, S, S, 3) uint8 RGB and (N,) int32 class ids 0-9.

  Args:
    split: "train" (1352 images), "test" (445: a quarter of each class, fixed) or "all" (1797).
    image_size: side S of the returned images.
  """
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
  images, labels = _digits(int(image_size))
  idx = _split_indices(labels, split)
  return images[idx], labels[idx]
