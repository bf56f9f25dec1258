"""Labelled image datasets for the evaluations: prepared TFDS datasets, class folders, the demo digits.

Every dataset gives random access to `(image, label)` pairs: `dataset.load(i)` returns an RGB uint8
array (H, W, 3), or None when the file cannot be decoded (the feature extractor skips and counts
those), and an int label. Images are decoded here, with Pillow, in the extractor's worker threads.

Nothing is ever downloaded. TFDS datasets must already be prepared in the array_record format,
which `tfds.data_source` reads without TensorFlow; a missing dataset raises `DatasetError` naming
how to prepare it.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from typing import Protocol

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
RANDOM_ACCESS_FORMATS = ("array_record", "parquet")


class DatasetError(ValueError):
  """A dataset is missing, unprepared or malformed; the message says how to fix it."""


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


def decode_image(data: bytes | str | os.PathLike) -> np.ndarray | None:
  """Encoded bytes or a file path -> RGB uint8 (H, W, 3), or None if Pillow cannot decode it."""
  try:
    with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as image:
      return np.asarray(image.convert("RGB"))
  except (OSError, ValueError, Image.DecompressionBombError, SyntaxError):
    # Truncated/corrupt files raise OSError (or SyntaxError for some broken PNG headers).
    return None


class DemoDataset:
  """The embedded demo dataset: scikit-learn's digits as RGB images (`dinov2_jax.data.demo_dataset`)."""

  def __init__(self, split: str = "train", image_size: int = 64):
    from dinov2_jax.data.demo_dataset import NUM_CLASSES, load_demo_dataset
    self.images, self.labels = load_demo_dataset(split, image_size)
    self.class_names = [str(c) for c in range(NUM_CLASSES)]
    self.name = f"demo:digits:{split}:{image_size}px"

  def __len__(self) -> int:
    return len(self.labels)

  def load(self, index: int) -> tuple[np.ndarray, int]:
    return self.images[index], int(self.labels[index])


class FolderDataset:
  """A folder with one sub-folder per class: `root/<class>/*.{jpg,jpeg,png,webp}`.

  Classes are the sorted sub-folder names unless `class_names` is given (e.g. the train split's, so
  that an evaluation split maps names to the same labels). Files are listed once, in sorted order;
  unreadable files are only detected when loaded (`load` returns None for them).
  """

  def __init__(self, root: str | os.PathLike, class_names: Sequence[str] | None = None):
    root = os.fspath(root)
    if not os.path.isdir(root):
      raise DatasetError(
          f"image folder {root!r} does not exist; expected {root}/<class name>/<image>.jpg "
          "(one sub-folder per class; jpg, png or webp)")
    found = sorted(d.name for d in os.scandir(root) if d.is_dir() and not d.name.startswith("."))
    if not found:
      raise DatasetError(f"image folder {root!r} has no class sub-folders; expected {root}/<class name>/<image>.jpg")
    if class_names is None:
      class_names = found
    unknown = sorted(set(found) - set(class_names))
    if unknown:
      raise DatasetError(f"image folder {root!r} has classes {unknown[:5]} that the training split does not have")
    self.class_names = list(class_names)
    label_of = {c: i for i, c in enumerate(self.class_names)}
    self.paths, labels = [], []
    for c in found:
      for dirpath, dirnames, filenames in os.walk(os.path.join(root, c)):
        dirnames.sort()
        for f in sorted(filenames):
          if f.lower().endswith(IMAGE_EXTENSIONS):
            self.paths.append(os.path.join(dirpath, f))
            labels.append(label_of[c])
    if not self.paths:
      raise DatasetError(f"image folder {root!r} holds no {'/'.join(IMAGE_EXTENSIONS)} files")
    self.labels = np.asarray(labels, np.int32)
    self.name = f"folder:{os.path.abspath(root)}:{len(self.paths)}files"

  def __len__(self) -> int:
    return len(self.paths)

  def load(self, index: int) -> tuple[np.ndarray | None, int]:
    return decode_image(self.paths[index]), int(self.labels[index])


def _tfds_prepare_hint(name: str, data_dir: str) -> str:
  base = name.split(":")[0].split("/")[0]
  if base.startswith("imagenet2012"):
    return (f"To prepare ImageNet-1k: put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar (from "
            f"image-net.org) in {data_dir}/downloads/manual/ and run `tfds build imagenet2012 "
            f"--data_dir={data_dir} --file_format=array_record` (the `tfds` command needs TensorFlow, "
            "`pip install tensorflow-cpu`, for this step only; reading needs none). Alternatively use an image folder: "
            "--config.dataset.name=folder --config.dataset.data_dir=DIR with DIR/train/<class>/*.JPEG "
            "and DIR/val/<class>/*.JPEG.")
  return (f"Prepare it with `tfds build {base} --data_dir={data_dir} --file_format=array_record` "
          "(the `tfds` command needs `pip install tensorflow-cpu`; nothing is downloaded here), or use "
          "--config.dataset.name=folder / demo.")


class TfdsDataset:
  """A prepared TFDS image-classification dataset, read by random access without TensorFlow.

  Args:
    name: TFDS name, optionally with config/version ("imagenet2012", "cifar10:3.0.2").
    split: split name, or a TFDS slice ("train[:10%]").
    data_dir: the TFDS data directory (default: TFDS's, i.e. $TFDS_DATA_DIR or ~/tensorflow_datasets).
    image_key, label_key: feature names of the image and the class label.
  """

  def __init__(self, name: str, split: str, data_dir: str | None = None, image_key: str = "image",
               label_key: str = "label"):
    import tensorflow_datasets as tfds
    data_dir = data_dir or os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")
    try:
      builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
      raise DatasetError(f"TFDS dataset {name!r} is unknown and not found in {data_dir}. "
                         + _tfds_prepare_hint(name, data_dir)) from None
    # Checked first: tfds.data_source would otherwise try to download and prepare the dataset.
    if not builder.is_prepared():
      raise DatasetError(f"TFDS dataset {name!r} is not prepared in {data_dir}. "
                         + _tfds_prepare_hint(name, data_dir))
    file_format = str(getattr(builder.info.file_format, "value", builder.info.file_format))
    if file_format not in RANDOM_ACCESS_FORMATS:
      raise DatasetError(
          f"TFDS dataset {name!r} in {data_dir} is stored as {file_format}, which needs TensorFlow to read. "
          f"Rebuild it with --file_format=array_record, or convert it: `tfds convert_format "
          f"--dataset_version_dir={builder.data_dir} --out_file_format=array_record --out_dir=NEW_DIR` "
          "(the `tfds` command needs TensorFlow for this step only).")
    features = builder.info.features
    for key in (image_key, label_key):
      if key not in features:
        raise DatasetError(f"TFDS dataset {name!r} has no feature {key!r}; its features are {list(features)} "
                           "(set --config.dataset.image_key / label_key)")
    if split.split("[")[0] not in builder.info.splits:
      raise DatasetError(f"TFDS dataset {name!r} has no split {split!r}; splits: {list(builder.info.splits)}")
    label = features[label_key]
    if not hasattr(label, "names"):
      raise DatasetError(f"feature {label_key!r} of {name!r} is not a ClassLabel")
    self.class_names = list(label.names)
    self.image_key, self.label_key = image_key, label_key
    # Images come as encoded bytes and are decoded by `decode_image`, so corrupt ones are skipped
    # and counted instead of failing the whole run.
    self.source = builder.as_data_source(split, decoders={image_key: tfds.decode.SkipDecoding()})
    self.name = f"tfds:{name}:{split}:{builder.data_dir}"

  def __len__(self) -> int:
    return len(self.source)

  def load(self, index: int) -> tuple[np.ndarray | None, int]:
    record = self.source[int(index)]
    return decode_image(record[self.image_key]), int(record[self.label_key])


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
