"""Image data sources shared by training (`data/pipeline.py`) and the evaluations (`eval/`).

The one place for image decoding, folder listing, TFDS access and the embedded demo dataset:

  to_rgb_uint8 / decode_image   any image (encoded bytes, a file path, PIL, an array) -> (H, W, 3)
                                uint8 RGB; `decode_image` returns None where Pillow cannot decode.
  list_image_files              the image files under a folder, at any depth, sorted.
  TfdsImageSource               a prepared TFDS dataset (array_record), labels optional. Never
                                downloads or prepares; a missing dataset raises with the command
                                that prepares it.
  FolderImageSource             every image under a folder, at any depth (unlabelled).
  ClassFolderSource             `root/<class>/...` image folders (labelled), same listing.
  DemoImageSource               scikit-learn's digits as RGB images, in memory (labelled).

Every source gives random access in two protocols:

  training (grain):  `source[i]` -> {"image": (H, W, 3) uint8, "label": int32 when labelled}.
                     An unreadable image is replaced by the next readable one (see below).
  evaluation:        `source.load(i)` -> (image (H, W, 3) uint8 or None when it cannot be
                     decoded, int label), plus `name` (describes the data), `class_names`
                     (index = label) and `content_fingerprint()` (a hash of the data's content:
                     what cached features are keyed by). Labelled sources only.

The file- and record-backed sources (`SkippingSource`) never fail on an unreadable image:
`source[i]` replaces it by the next readable index (i + 1, i + 2, ... modulo the length, so the
replacement is deterministic), `load(i)` returns None for it. Either way the image is counted
(`num_skipped`, `skipped`), the first failure is logged as a warning and a summary is logged each
time the count doubles. The counters live in the process that decodes: with grain
`worker_count > 0` that is each worker, and the warnings come from there.

Errors about the data itself (missing, unprepared, malformed) are `DatasetError`s (a ValueError)
whose message says how to fix them; those about a missing dataset or folder are also
FileNotFoundErrors, a missing feature also a KeyError.
"""

from __future__ import annotations

import hashlib
import io
import os
import threading
from typing import Any, Sequence

import numpy as np
from absl import logging
from PIL import Image

from dinov2_jax.data.demo_dataset import NUM_CLASSES, load_demo_dataset

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
# TFDS file formats that `tfds.data_source` reads by random access, without TensorFlow.
RANDOM_ACCESS_FORMATS = ("array_record", "parquet")
# What Pillow raises on a corrupt, truncated or hostile file: OSError (UnidentifiedImageError
# included), SyntaxError for some broken PNG headers, ValueError, DecompressionBombError.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


# ----------------------------------------------------------------------------------------------
# Errors.


class DatasetError(ValueError):
  """A dataset is missing, unprepared or malformed; the message says how to fix it."""


# The subclasses below are also the built-in errors that training raised for the same problems
# before the sources were shared, so `except FileNotFoundError` / `KeyError` code keeps working.


class DatasetNotFoundError(DatasetError, FileNotFoundError):
  """A dataset or image folder that does not exist, or a TFDS dataset that is not prepared."""


class NotAFolderError(DatasetError, NotADirectoryError):
  """An image folder path that names something else than a folder."""


class MissingFeatureError(DatasetError, KeyError):
  """A TFDS dataset without the image or label feature asked for."""

  # KeyError's own str() quotes the message (it expects a key): show it as written.
  __str__ = Exception.__str__


# ----------------------------------------------------------------------------------------------
# Decoding.


def to_rgb_uint8(image: Any) -> np.ndarray:
  """Any image -> (H, W, 3) uint8 RGB. Raises when it cannot be decoded (see `DECODE_ERRORS`).

  Accepts encoded bytes, a file path (str or PathLike), a PIL image, or a uint8 array (H, W),
  (H, W, 1), (H, W, 3), (H, W, 4). Alpha is dropped and palette / CMYK / grey images are converted,
  as PIL's `convert("RGB")` does in Meta's loader.
  """
  if isinstance(image, (bytes, bytearray, memoryview, str, os.PathLike)):
    source = image if isinstance(image, (str, os.PathLike)) else io.BytesIO(image)
    # `convert` forces the full decode inside the `with`: truncated files fail here, not later.
    with Image.open(source) as pil:
      return np.asarray(pil.convert("RGB"))
  if isinstance(image, Image.Image):
    return np.asarray(image.convert("RGB"))
  image = np.asarray(image)
  if image.dtype != np.uint8:
    raise ValueError(f"expected a uint8 image, got {image.dtype}.")
  if image.ndim == 2:
    image = image[..., None]
  if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
    raise ValueError(f"expected an (H, W[, 1|3|4]) image, got shape {image.shape}.")
  if image.shape[-1] == 1:
    return np.repeat(image, 3, axis=-1)
  return image[..., :3]


def decode_image(data: Any) -> np.ndarray | None:
  """`to_rgb_uint8(data)`, or None when Pillow cannot decode it (a corrupt or truncated file)."""
  try:
    return to_rgb_uint8(data)
  except DECODE_ERRORS:
    return None


# ----------------------------------------------------------------------------------------------
# The skip logic.


class SkippingSource:
  """Base of sources whose elements can fail to read or decode: replaced, counted and logged.

  Subclasses implement `__len__`, `_read(index) -> (image, label)` (image: anything
  `to_rgb_uint8` takes, e.g. a path or encoded bytes, decoded later; label: an int, or None when
  unlabelled; may raise) and `_name(index) -> str` (what to report: a relative path, a record id).
  """

  def __init__(self):
    self._lock = threading.Lock()
    self._bad: dict[int, str] = {}  # index -> "name: error"
    self.num_replaced = 0  # elements served by a replacement (counts repeats)

  def __getstate__(self):
    state = dict(self.__dict__)
    del state["_lock"]  # locks do not pickle; grain workers get a fresh one.
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def __len__(self) -> int:
    raise NotImplementedError

  def _read(self, index: int) -> tuple[Any, int | None]:
    raise NotImplementedError

  def _name(self, index: int) -> str:
    raise NotImplementedError

  def _load(self, index: int) -> dict[str, Any]:
    """Element `index` decoded: {"image": (H, W, 3) uint8[, "label": int32]}; may raise."""
    image, label = self._read(index)
    element = {"image": to_rgb_uint8(image)}
    if label is not None:
      element["label"] = np.int32(label)
    return element

  @property
  def num_skipped(self) -> int:
    """Distinct unreadable elements met so far (in this process)."""
    return len(self._bad)

  @property
  def skipped(self) -> list[str]:
    """Names of the unreadable elements met so far, sorted by index."""
    with self._lock:
      return [self._name(i) for i in sorted(self._bad)]

  def summary(self) -> str:
    with self._lock:
      bad = dict(self._bad)
    if not bad:
      return f"{type(self).__name__}: all images read so far were readable."
    listed = "; ".join(bad[i] for i in sorted(bad)[:10])
    more = f" (and {len(bad) - 10} more)" if len(bad) > 10 else ""
    return (f"{type(self).__name__}: skipped {len(bad)} unreadable of {len(self)} images: "
            f"{listed}{more}")

  def _record_failure(self, index: int, error: Exception, fate: str):
    """Counts and logs unreadable element `index`; `fate` says what replaces it (for the log)."""
    with self._lock:
      if index in self._bad:
        return
      self._bad[index] = f"{self._name(index)}: {type(error).__name__}: {error}"
      count = len(self._bad)
    if count == 1:
      logging.warning("Skipping unreadable image %s (%s: %s); %s. Further skips are summarised.",
                      self._name(index), type(error).__name__, error, fate)
    else:
      logging.info("Skipping unreadable image %s (%s: %s).", self._name(index),
                   type(error).__name__, error)
    if count & (count - 1) == 0:  # 1, 2, 4, 8, ...: a summary that never floods the log.
      logging.warning("%s", self.summary())

  def __getitem__(self, index: int) -> dict[str, Any]:
    """Training protocol: element `index`, or the next readable one when it cannot be read."""
    n = len(self)
    index = int(index) % n
    for offset in range(n):
      i = (index + offset) % n
      if i in self._bad:
        continue
      try:
        element = self._load(i)
      except Exception as e:  # pylint: disable=broad-except
        # Decoders raise many types (OSError, UnidentifiedImageError, SyntaxError, ValueError,
        # DecompressionBombError); none of them may stop a long run.
        self._record_failure(i, e, "it is replaced by the next readable one")
        continue
      if offset:
        with self._lock:
          self.num_replaced += 1
      return element
    raise RuntimeError(f"None of the {n} images can be read. {self.summary()}")

  def load(self, index: int) -> tuple[np.ndarray | None, int]:
    """Evaluation protocol: (image (H, W, 3) uint8, or None if it cannot be decoded; label).

    Only decoding failures (`DECODE_ERRORS`, which include a file that cannot be opened) give
    None, counted like `__getitem__`'s; anything else, e.g. a TFDS record that cannot be read,
    raises: an evaluation must not silently lose part of its data.
    """
    index = int(index)
    image, label = self._read(index)
    if label is None:
      raise TypeError(f"{self!r} is unlabelled; `load` (the evaluation protocol) needs labels.")
    try:
      decoded = to_rgb_uint8(image)
    except DECODE_ERRORS as e:
      self._record_failure(index, e, "it is left out (load returns None)")
      decoded = None
    return decoded, int(label)


# ----------------------------------------------------------------------------------------------
# Folders.


def list_image_files(root: str, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> list[str]:
  """Relative paths of the image files under `root`, at any depth, sorted (bytewise).

  Suffixes match case-insensitively. Hidden files and folders (name starting with ".", e.g.
  macOS "._x.jpg" resource forks, ".ipynb_checkpoints") are left out. Symlinked folders are
  followed once (a cycle is not re-entered).
  """
  extensions = tuple(e.lower() for e in extensions)
  found = []
  seen_dirs = set()
  for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
    real = os.path.realpath(dirpath)
    if real in seen_dirs:
      dirnames[:] = []
      continue
    seen_dirs.add(real)
    dirnames[:] = [d for d in dirnames if not d.startswith(".")]
    rel = os.path.relpath(dirpath, root)
    for f in filenames:
      if not f.startswith(".") and f.lower().endswith(extensions):
        found.append(os.path.normpath(os.path.join(rel, f)))
  return sorted(found)


def _check_folder(root: str, expected: str):
  """Raises a `DatasetError` naming the expected layout unless `root` is an existing folder."""
  if not os.path.exists(root):
    raise DatasetNotFoundError(f"image folder {root!r} does not exist; expected {expected}.")
  if not os.path.isdir(root):
    raise NotAFolderError(f"{root!r} is not a folder; expected {expected}.")


class _FileSource(SkippingSource):
  """Image files listed once under `root`, decoded with Pillow when read; labels optional.

  Attributes: `root`; `files`, the paths relative to `root` in index order; `labels`, (N,) int32
  or None; `name`, "folder:<absolute root>:<N>files" (stored with cached evaluation features).
  """

  def __init__(self, root: str, files: list[str], labels: np.ndarray | None,
               extensions: Sequence[str]):
    super().__init__()
    if not files:
      raise DatasetError(f"no images found under {root!r} (searched all subfolders for "
                         f"{', '.join(extensions)}, any letter case).")
    self.root, self.files, self.labels = root, files, labels
    self.name = f"folder:{os.path.abspath(root)}:{len(files)}files"

  @property
  def paths(self) -> list[str]:
    """The image files joined to `root`, in index order (a new list each call)."""
    return [os.path.join(self.root, f) for f in self.files]

  def __len__(self) -> int:
    return len(self.files)

  def _name(self, index: int) -> str:
    return self.files[index]

  def _read(self, index: int) -> tuple[str, int | None]:
    label = None if self.labels is None else int(self.labels[index])
    return os.path.join(self.root, self.files[index]), label

  def content_fingerprint(self) -> str:
    """SHA-256 over every file's relative path, size, modification time and label (and the class names).

    Changes when an image is replaced, edited, added, removed or moved to another class; one
    `stat` per file, no image is read.
    """
    h = hashlib.sha256(repr(list(self.class_names or [])).encode())
    for i, f in enumerate(self.files):
      st = os.stat(os.path.join(self.root, f))
      label = -1 if self.labels is None else int(self.labels[i])
      h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\0{label}\n".encode())
    return h.hexdigest()


class FolderImageSource(_FileSource):
  """Every image under a folder, at any depth, decoded with Pillow when read. Unlabelled.

  Elements: {"image": (H, W, 3) uint8}. The file list (`files`, relative to `root`) is made once,
  sorted, so indices are stable for a given tree. Unreadable files are skipped (`SkippingSource`).
  """

  def __init__(self, path: str | os.PathLike, extensions: Sequence[str] = IMAGE_EXTENSIONS):
    root = os.fspath(path)
    _check_folder(root, "a folder of images, at any depth (config.dataset.path)")
    super().__init__(root, list_image_files(root, extensions), None, extensions)
    self.class_names = None

  def __repr__(self) -> str:
    return f"FolderImageSource({self.root!r}, {len(self)} images)"


class ClassFolderSource(_FileSource):
  """A folder with one sub-folder per class, `root/<class>/**/*.{jpg,jpeg,png,webp}`. Labelled.

  Classes are the sorted sub-folder names unless `class_names` is given (e.g. the train split's, so
  that an evaluation split maps names to the same labels). Each class folder is listed like
  `FolderImageSource` (any depth, sorted, hidden files left out); `files` are relative to `root`,
  `paths` joined to it, `labels` (N,) int32. Elements: {"image": (H, W, 3) uint8, "label": int32}.
  Unreadable files are only detected when read (`SkippingSource`: replaced by `source[i]`, None
  from `load`).
  """

  def __init__(self, root: str | os.PathLike, class_names: Sequence[str] | None = None,
               extensions: Sequence[str] = IMAGE_EXTENSIONS):
    root = os.fspath(root)
    layout = f"{root}/<class name>/<image>.jpg (one sub-folder per class; jpg, png or webp)"
    _check_folder(root, layout)
    found = sorted(d.name for d in os.scandir(root) if d.is_dir() and not d.name.startswith("."))
    if not found:
      raise DatasetError(f"image folder {root!r} has no class sub-folders; expected {layout}")
    if class_names is None:
      class_names = found
    unknown = sorted(set(found) - set(class_names))
    if unknown:
      raise DatasetError(f"image folder {root!r} has classes {unknown[:5]} that the training "
                         "split does not have")
    self.class_names = list(class_names)
    label_of = {c: i for i, c in enumerate(self.class_names)}
    files, labels = [], []
    for c in found:
      in_class = list_image_files(os.path.join(root, c), extensions)
      if not in_class:
        # As torchvision's ImageFolder: a class without images is a mistake in the data, not a
        # class to silently drop (its label would still count in every accuracy).
        raise DatasetError(
            f"class folder {os.path.join(root, c)!r} has no images (searched all its subfolders for "
            f"{', '.join(extensions)}, any letter case); add images to it or remove the folder")
      files += [os.path.join(c, f) for f in in_class]
      labels += [label_of[c]] * len(in_class)
    super().__init__(root, files, np.asarray(labels, np.int32), extensions)

  def __repr__(self) -> str:
    return f"ClassFolderSource({self.root!r}, {len(self.class_names)} classes, {len(self)} images)"


# ----------------------------------------------------------------------------------------------
# TFDS.


def default_tfds_data_dir() -> str:
  """TFDS's default data directory: $TFDS_DATA_DIR, else ~/tensorflow_datasets."""
  return os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")


def tfds_prepare_hint(name: str, data_dir: str) -> str:
  """How to prepare TFDS dataset `name` in `data_dir` for random access (the `tfds build` line)."""
  base = name.split(":")[0].split("/")[0]
  if base.startswith("imagenet2012"):  # imagenet2012, _subset, _real, ...: manual download only.
    manual = os.path.join(data_dir, "downloads", "manual")
    first = (f"ImageNet cannot be downloaded: put ILSVRC2012_img_train.tar and "
             f"ILSVRC2012_img_val.tar (from image-net.org) in {manual}, then prepare it once")
    command = (f"  tfds build {base} --data_dir {data_dir} --file_format array_record "
               f"--manual_dir {manual}")
  else:
    first = "Prepare it once"
    command = f"  tfds build {base} --data_dir {data_dir} --file_format array_record"
  # The command stays on its own line so that it can be copied as is.
  return (f"{first}, in the array_record format that random access needs (the `tfds` command "
          f"needs `pip install importlib_resources`, and TensorFlow for some datasets, e.g. "
          f"`pip install tensorflow-cpu`, for that step only; reading needs neither):\n"
          f"{command}\n"
          f"then pass config.dataset.data_dir={data_dir!r}. Or use an image folder instead "
          f"(config.dataset.kind='folder' with config.dataset.path).")


class TfdsImageSource(SkippingSource):
  """A prepared TFDS dataset, read by random access with `tfds.data_source` (no TensorFlow).

  Elements: {"image": (H, W, 3) uint8, "label": int32 when the dataset has `label_key`}; other
  features are dropped. `tfds.features.Image` features are read as encoded bytes and decoded here
  with Pillow (so a corrupt record is skipped like a corrupt file); other image features are
  decoded by TFDS. Never downloads or prepares: a dataset that is not prepared raises
  `DatasetNotFoundError` with the command that prepares it.

  Args:
    name: TFDS name, optionally with config/version ("imagenet2012", "cifar10:3.0.2").
    split: split name, or a TFDS slice ("train[:10%]").
    data_dir: the TFDS data directory (default: $TFDS_DATA_DIR or ~/tensorflow_datasets).
    image_key: feature name of the image.
    label_key: feature name of the label; None, or a feature the dataset lacks, gives an
      unlabelled source unless `require_label`.
    require_label: raise unless `label_key` is a ClassLabel feature (the evaluations need one).

  Attributes: `tfds_name`, `split`, `data_dir`, `records` (the TFDS data source), `label_key`
  (None when unlabelled), `class_names` (the ClassLabel's names, or None), `name` (a description
  "tfds:<name>:<split>:<versioned dir>", stored with cached evaluation features).
  """

  def __init__(self, name: str, split: str = "train", data_dir: str | os.PathLike | None = None, *,
               image_key: str = "image", label_key: str | None = "label",
               require_label: bool = False):
    super().__init__()
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (slow import)
    self.tfds_name, self.split = name, split
    self.data_dir = data_dir = os.fspath(data_dir) if data_dir else default_tfds_data_dir()
    self.image_key = image_key
    try:
      builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
      raise DatasetNotFoundError(
          f"TFDS dataset {name!r} is unknown and not found: neither prepared in {data_dir!r} nor a "
          f"known TFDS dataset. {tfds_prepare_hint(name, data_dir)}") from None
    # Checked before anything reads: `tfds.data_source` would try to download and prepare it, and
    # with `download=False` reports a misleading file-format error instead.
    if not builder.is_prepared():
      raise DatasetNotFoundError(
          f"TFDS dataset {name!r} is not prepared in {data_dir!r} (and it is never downloaded "
          f"here). {tfds_prepare_hint(name, data_dir)}")
    file_format = str(getattr(builder.info.file_format, "value", builder.info.file_format))
    if file_format not in RANDOM_ACCESS_FORMATS:
      raise DatasetError(
          f"TFDS dataset {name!r} is prepared in {data_dir!r} as {file_format}, which needs "
          f"TensorFlow to read; random access needs array_record. Convert it: `tfds convert_format "
          f"--dataset_version_dir={builder.data_dir} --out_file_format=array_record "
          f"--out_dir=NEW_DIR` (the `tfds` command needs TensorFlow for this step only), or "
          f"rebuild it. {tfds_prepare_hint(name, data_dir)}")
    features = builder.info.features
    wanted = (image_key, label_key) if require_label else (image_key,)
    for key in wanted:
      if key not in features:
        raise MissingFeatureError(
            f"TFDS dataset {name!r} has no feature {key!r}; its features are "
            f"{sorted(features.keys())} (set config.dataset.image_key / label_key).")
    self.label_key = label_key if label_key and label_key in features else None
    label = features[self.label_key] if self.label_key else None
    if require_label and not hasattr(label, "names"):
      raise DatasetError(f"feature {label_key!r} of TFDS dataset {name!r} is not a ClassLabel.")
    self.class_names = list(label.names) if hasattr(label, "names") else None
    decoders = None
    if isinstance(features[image_key], tfds.features.Image):
      decoders = {image_key: tfds.decode.SkipDecoding()}
    try:
      self.records = builder.as_data_source(split, decoders=decoders)
    except (ValueError, KeyError) as e:
      splits = sorted(builder.info.splits.keys())
      # A slice of an existing split ("train[:5%]") can only be malformed, not missing.
      problem = "cannot read split" if split.split("[")[0] in splits else "has no split"
      raise DatasetError(
          f"TFDS dataset {name!r} {problem} {split!r} (config.dataset.split={split!r} in "
          f"training, train_split / eval_split in the evaluations); its splits are {splits}. "
          f"TFDS: {e}") from e
    self.version_dir = builder.data_dir
    self.name = f"tfds:{name}:{split}:{builder.data_dir}"

  def __len__(self) -> int:
    return len(self.records)

  def _name(self, index: int) -> str:
    return f"{self.tfds_name}[{self.split}][{index}]"

  def _read(self, index: int) -> tuple[Any, int | None]:
    record = self.records[index]
    return record[self.image_key], (record[self.label_key] if self.label_key else None)

  def content_fingerprint(self) -> str:
    """SHA-256 over the prepared dataset's files (names, sizes, modification times), split and keys."""
    h = hashlib.sha256(f"{self.tfds_name}\0{self.split}\0{self.image_key}\0{self.label_key}\n".encode())
    for entry in sorted(os.scandir(self.version_dir), key=lambda e: e.name):
      if entry.is_file():
        st = entry.stat()
        h.update(f"{entry.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()

  def __repr__(self) -> str:
    return f"TfdsImageSource({self.tfds_name!r}, split={self.split!r}, {len(self)} images)"


# ----------------------------------------------------------------------------------------------
# The embedded demo dataset.


class DemoImageSource:
  """The embedded demo dataset (scikit-learn digits as RGB, `data/demo_dataset.py`), in memory.

  Elements: {"image": (image_size, image_size, 3) uint8, "label": int32 in 0..9}. `images`
  (N, S, S, 3) uint8 and `labels` (N,) int32 hold the whole split.
  """

  def __init__(self, split: str = "train", image_size: int = 28):
    self.images, self.labels = load_demo_dataset(split, image_size)
    self.class_names = [str(c) for c in range(NUM_CLASSES)]
    self.name = f"demo:digits:{split}:{image_size}px"

  def __len__(self) -> int:
    return len(self.images)

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index) % len(self)
    return {"image": self.images[index], "label": np.int32(self.labels[index])}

  def load(self, index: int) -> tuple[np.ndarray, int]:
    """Evaluation protocol: (image (S, S, 3) uint8, label); never None (nothing to decode)."""
    return self.images[index], int(self.labels[index])

  def content_fingerprint(self) -> str:
    """SHA-256 of the images and labels."""
    h = hashlib.sha256(self.name.encode())
    h.update(np.ascontiguousarray(self.images).tobytes())
    h.update(np.ascontiguousarray(self.labels, np.int64).tobytes())
    return h.hexdigest()

  def __repr__(self) -> str:
    return f"DemoImageSource({len(self)} images of {self.images.shape[1]} px)"
