"""Labelled image datasets for the evaluations: prepared TFDS datasets, class folders, the demo digits.

The datasets are the shared sources of `dinov2_jax/data/sources.py` (which decodes, lists folders
and opens TFDS for training too); this module names them for the evaluations and adds subsets and
`get_dataset`. Every dataset gives random access to `(image, label)` pairs: `dataset.load(i)`
returns an RGB uint8 array (H, W, 3), or None when the file cannot be decoded (the feature extractor
skips and counts those), and an int label. Images are decoded, with Pillow, in the extractor's
worker threads.

Nothing is ever downloaded. TFDS datasets must already be prepared in the array_record format,
which `tfds.data_source` reads without TensorFlow; a missing dataset raises `DatasetError` naming
how to prepare it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from dinov2_jax.data import sources
# Re-exported under the names the evaluations have always used.
from dinov2_jax.data.sources import (  # noqa: F401  (re-exports)
    IMAGE_EXTENSIONS,
    RANDOM_ACCESS_FORMATS,
    DatasetError,
    decode_image,
)

# `root/<class>/*` folders: the shared labelled folder source.
FolderDataset = sources.ClassFolderSource


class ImageDataset(Protocol):
  """What the evaluations need from a dataset.

  Attributes:
    name: a description that identifies the data (name, split, location); stored with features.
    class_names: the class names, index = label.
  """

  name: str
  class_names: Sequence[str]

  def __len__(self) -> int: ...

  def load(self, index: int) -> tuple[np.ndarray | None, int]: ...


class DemoDataset(sources.DemoImageSource):
  """The embedded demo digits (`sources.DemoImageSource`), 64 px unless told."""

  def __init__(self, split: str = "train", image_size: int = 64):
    super().__init__(split, image_size)


class TfdsDataset(sources.TfdsImageSource):
  """A prepared TFDS image-classification dataset (`sources.TfdsImageSource` with a ClassLabel).

  Args:
    name: TFDS name, optionally with config/version ("imagenet2012", "cifar10:3.0.2").
    split: split name, or a TFDS slice ("train[:10%]").
    data_dir: the TFDS data directory (default: TFDS's, i.e. $TFDS_DATA_DIR or ~/tensorflow_datasets).
    image_key, label_key: feature names of the image and the class label.
  """

  def __init__(self, name: str, split: str, data_dir: str | None = None, image_key: str = "image",
               label_key: str = "label"):
    super().__init__(name, split, data_dir, image_key=image_key, label_key=label_key,
                     require_label=True)


class Subset:
  """A fixed subset of another dataset (e.g. a quick run on a few images)."""

  def __init__(self, dataset: ImageDataset, indices: np.ndarray):
    self.dataset, self.indices = dataset, np.asarray(indices, np.int64)
    self.class_names = dataset.class_names
    self.name = f"{dataset.name}:subset{len(self.indices)}"

  def __len__(self) -> int:
    return len(self.indices)

  def load(self, index: int):
    return self.dataset.load(int(self.indices[index]))


def limit_examples(dataset: ImageDataset, limit: int, seed: int = 0) -> ImageDataset:
  """At most `limit` examples, drawn uniformly at random with a fixed seed (sorted); 0 = all."""
  if not limit or limit >= len(dataset):
    return dataset
  picked = np.sort(np.random.default_rng(seed).choice(len(dataset), limit, replace=False))
  return Subset(dataset, picked)


def get_dataset(name: str, split: str, data_dir: str | None = None, *, image_key: str = "image",
                label_key: str = "label", class_names: Sequence[str] | None = None,
                demo_image_size: int = 64) -> ImageDataset:
  """A dataset by name.

  Args:
    name: "demo" (embedded digits; splits train/test), "folder" (`data_dir/<split>/<class>/*.jpg`),
      or a TFDS name, optionally prefixed "tfds:" ("imagenet2012", "tfds:cifar10").
    split: the split ("train", "test", "validation", ...).
    data_dir: the folder root or the TFDS data directory.
    class_names: for folders, the training split's classes (so labels agree across splits).
  """
  if name == "demo":
    return DemoDataset(split, demo_image_size)
  if name == "folder":
    if not data_dir:
      raise DatasetError("dataset 'folder' needs --config.dataset.data_dir=DIR with DIR/<split>/<class>/*.jpg")
    return FolderDataset(os.path.join(data_dir, split), class_names)
  return TfdsDataset(name.removeprefix("tfds:"), split, data_dir, image_key, label_key)
