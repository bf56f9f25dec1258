"""Labelled image datasets for the evaluations: prepared TFDS datasets, class folders, the demo digits.

The datasets are the shared sources of `dinov2_jax/data/sources.py` (which decodes, lists folders
and opens TFDS for training too); this module names them for the evaluations and adds subsets and
`get_dataset`. Every dataset gives random access to `(image, label)` pairs: `dataset.load(i)`
returns an RGB uint8 array (H, W, 3), or None when the file cannot be decoded (the feature extractor
skips and counts those), and an int label. Images are decoded, with Pillow, in the extractor's
worker threads.

Every dataset also has `content_fingerprint()`, a hash of its content (for a folder: every file's
path, size, modification time and label) that keys the feature cache.

Nothing is ever downloaded. TFDS datasets must already be prepared in the array_record format,
which `tfds.data_source` reads without TensorFlow; a missing dataset raises `DatasetError` naming
how to prepare it.
"""

from __future__ import annotations

import hashlib
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

  def content_fingerprint(self) -> str: ...


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

  def content_fingerprint(self) -> str:
    h = hashlib.sha256(self.dataset.content_fingerprint().encode())
    h.update(self.indices.tobytes())
    return h.hexdigest()


def limit_examples(dataset: ImageDataset, limit: int, seed: int = 0) -> ImageDataset:
  """At most `limit` examples, drawn uniformly at random with a fixed seed (sorted); 0 = all."""
  if not limit or limit >= len(dataset):
    return dataset
  picked = np.sort(np.random.default_rng(seed).choice(len(dataset), limit, replace=False))
  return Subset(dataset, picked)


KINDS = ("demo", "folder", "tfds")
# Evaluation split names tried, in order, when none is given.
EVAL_SPLIT_NAMES = ("val", "validation", "test")


def folder_splits(path: str) -> list[str]:
  """The split folders of a dataset folder `path/<split>/<class>/...`: its visible sub-folders, sorted."""
  if not os.path.isdir(path):
    raise sources.DatasetNotFoundError(
        f"dataset folder {path!r} does not exist; expected {path}/<split>/<class>/<image>.jpg, e.g. "
        f"{path}/train/cat/1.jpg and {path}/val/cat/2.jpg")
  return sorted(d.name for d in os.scandir(path) if d.is_dir() and not d.name.startswith("."))


def check_folder_split(path: str, split: str) -> None:
  """Raises a `DatasetError` saying how to lay the folder out unless `path/split` is one of its splits."""
  splits = folder_splits(path)
  if split in splits:
    return
  hint = (f"; if {splits[:3]} are your classes, move them into {path}/train/ and hold some images of each "
          f"out in {path}/val/<class>/" if split == "train" and splits else "")
  raise DatasetError(f"dataset folder {path!r} has no split folder {split!r}; its sub-folders are {splits} "
                     f"(expected {path}/<split>/<class>/<image>.jpg; choose the splits with "
                     f"--config.dataset.train_split / eval_split){hint}")


def available_splits(kind: str, *, path: str | None = None, name: str | None = None,
                     data_dir: str | None = None) -> list[str]:
  """The split names a dataset has (folder: its sub-folders; TFDS: its prepared splits)."""
  if kind == "demo":
    return ["train", "test"]
  if kind == "folder":
    return folder_splits(path)
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (slow import)
  builder = tfds.builder(name, data_dir=data_dir or sources.default_tfds_data_dir())
  return sorted(builder.info.splits.keys()) if builder.is_prepared() else []


def default_eval_split(kind: str, **where) -> str:
  """The first of `EVAL_SPLIT_NAMES` the dataset has; a `DatasetError` listing its splits otherwise."""
  splits = available_splits(kind, **where)
  for split in EVAL_SPLIT_NAMES:
    if split in splits:
      return split
  raise DatasetError(f"found no evaluation split ({' / '.join(EVAL_SPLIT_NAMES)}) in the dataset; its splits are "
                     f"{splits}: name one with --config.dataset.eval_split=NAME")


def get_dataset(kind: str, split: str, *, path: str | None = None, name: str | None = None,
                data_dir: str | None = None, image_key: str = "image", label_key: str = "label",
                class_names: Sequence[str] | None = None, demo_image_size: int = 64) -> ImageDataset:
  """A labelled dataset, named with training's vocabulary (`config.dataset.kind`).

  Args:
    kind: "demo" (the embedded digits; splits train/test), "folder" (`path/<split>/<class>/*.jpg`)
      or "tfds" (a prepared TFDS dataset `name` in `data_dir`).
    split: the split ("train", "val", "test", a TFDS slice such as "train[:10%]", ...).
    path: the folder root, for "folder".
    name: the TFDS name ("imagenet2012", "cifar10:3.0.2"), for "tfds".
    data_dir: the TFDS data directory (default: $TFDS_DATA_DIR or ~/tensorflow_datasets).
    class_names: for folders, the training split's classes (so labels agree across splits).
  """
  if kind == "demo":
    return DemoDataset(split, demo_image_size)
  if kind == "folder":
    if not path:
      raise DatasetError("dataset.kind='folder' needs --config.dataset.path=DIR (DIR/<split>/<class>/<image>.jpg)")
    check_folder_split(path, split)
    return FolderDataset(os.path.join(path, split), class_names)
  if kind == "tfds":
    if not name:
      raise DatasetError("dataset.kind='tfds' needs --config.dataset.name, e.g. imagenet2012 or cifar10")
    return TfdsDataset(name, split, data_dir or None, image_key, label_key)
  raise DatasetError(f"dataset.kind={kind!r} is not one of {KINDS}")
