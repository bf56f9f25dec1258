"""DINOv2 training input: image sources, per-host multi-crop batches with iBOT masks, grain state.

Sources (grain random-access data sources: `__len__`, `__getitem__(i) -> {"image", ["label"]}` with
"image" an (H, W, 3) RGB uint8 array, decoded when the element is read):

  TfdsImageSource    a TFDS dataset prepared in the array_record format, read with
                     `tfds.data_source` (no TensorFlow needed); never downloads or prepares.
  FolderImageSource  every jpg/jpeg/png/webp under a folder, at any depth (unlabelled).
  DemoImageSource    the embedded scikit-learn digits (labelled, in memory).

The two file-backed sources skip unreadable images instead of failing: element i is then replaced by
the next readable index (i + 1, i + 2, ... modulo the length, so the replacement is deterministic),
the file is counted (`num_skipped`, `skipped`), the first failure is logged as a warning and a
summary is logged each time the count doubles. The counters live in the process that decodes: with
`worker_count > 0` that is each grain worker, and the warnings come from there.

Batches (`make_train_iterator`). With G the global batch size, P hosts and b = G / P:

  examples:  source -> seed(seed) -> shuffle -> repeat (reshuffled every epoch) -> DinoMultiCrop.
             Example j of this infinite stream and its crops are a function of (seed, j) only.
  global batch k = examples [k G, (k + 1) G). Host p loads only rows [p b, (p + 1) b) of it.
  masks:     drawn per host from `mask_rng(seed, k, p)`, for the host's 2b global crops.

Each step yields a dict of numpy arrays whose shapes never change:

  global_crops  (2b, S, S, 3) float32, ImageNet-normalised, crop-major: row c b + i is crop c of
                the host's image i (Meta's `collate_data_and_cast` layout).
  local_crops   (n_local b, s, s, 3) float32, crop-major likewise.
  masks         (2b, N) bool, N = (S / patch) ** 2; row r belongs to global_crops row r.
  mask_indices  (M,) int32, `flatnonzero(masks)` padded with 0, indexing the host's flattened
                (2b N) patch tokens.
  mask_weights  (M,) float32, 1 / (masked tokens of that crop), 0 on padding.
  mask_valid    (M,) bool, True on the first `masks.sum()` entries.
  labels        (b,) int32, only when the source has labels (demo, most TFDS datasets).

M = `masking.mask_upperbound(2b, N, ...)`, Meta's static bound for a batch of 2b crops.

Multi-host layout contract. Every array above is host-local. If the train step builds global arrays
with `jax.make_array_from_process_local_data` (hosts stacked in process order along axis 0), then
  * global_crops is host-major, [h0: crop0, crop1; h1: crop0, crop1; ...], not globally crop-major;
    `host_major_to_crop_major(x, P, 2)` reorders it (or its features) into exactly the single-host
    batch of the same seed and step (tested); local_crops likewise with n_local crops.
  * mask_indices index the host's own (2b N) tokens. Either gather per host shard (shard_map over
    the data axis, as Meta gathers per GPU), or offset them by p 2b N to index the host-major
    flattened global (P 2b N) tokens. Masks, and M, are per host, like Meta's per-GPU collate: a
    P-host run draws different masks than a 1-host run of the same seed.

Checkpointing. The batches are a pure function of (seed, G, step, host), so the iterator state is
{"step": k, "seed": ..., "global_batch_size": ...}, the same on every host and independent of
`worker_count`. `TrainIterator` is a `grain.DatasetIterator`; save and restore it with orbax through
grain's own handler (`checkpoint_save_args` / `checkpoint_restore_args`, usable inside
`ocp.args.Composite` with orbax 0.12.8's CheckpointManager), or store `get_state()` yourself
(e.g. `ocp.args.JsonSave`, which only the primary host writes: enough, as every host has the same
state).

Workers. `worker_count > 0` builds the batches in spawned grain processes (scripts need an
`if __name__ == "__main__":` guard); their arrays arrive as grain `SharedMemoryArray`s (numpy
subclasses). grain reads absl flags there, so if nothing parsed them yet (no `absl.app.run`, e.g.
pytest) the iterator marks them parsed, keeping their defaults.

Config fields read by `make_source` / `make_train_iterator_from_config` (ml_collections; Meta's
YAML names as in `dinov2_jax/train/default_config.py`, the short names after "|" are accepted too;
fields marked optional may be absent, None or "" and then take the default shown):

  config.seed                          int >= 0
  config.batch_size                    global batch size G, over all hosts
  config.data_workers                  grain worker processes per host (optional, 0)
  config.dataset.kind                  "demo" | "tfds" | "folder"
  config.dataset.name                  tfds: dataset name, e.g. "imagenet2012"
  config.dataset.split                 tfds and demo (optional, "train")
  config.dataset.data_dir              tfds (optional: $TFDS_DATA_DIR or ~/tensorflow_datasets)
  config.dataset.path                  folder: root of the image tree
  config.dataset.image_size            demo: side of the digit images (optional, global crop size)
  config.crops.global_crops_size | global_size, local_crops_size | local_size,
    local_crops_number | n_local, global_crops_scale | global_scale,
    local_crops_scale | local_scale, blur_mode     (each optional, `MultiCropConfig` defaults)
  config.ibot.mask_ratio_min_max       (optional, (0.1, 0.5))
  config.ibot.mask_sample_probability | mask_probability   (optional, 0.5)

The patch size comes from the model (`make_train_iterator_from_config(config, patch_size)`).
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import os
import threading
from typing import Any, Mapping, Sequence

import grain
import numpy as np
from absl import flags, logging
from PIL import Image

from dinov2_jax import masking
from dinov2_jax.data import augment
from dinov2_jax.data.demo_dataset import load_demo_dataset

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
SOURCE_KINDS = ("demo", "tfds", "folder")
# Appended to the mask generator's seed entropy so that it never coincides with the per-image
# streams `augment.image_rng(seed, index)` (SeedSequence of two words) or any other pair/triple.
_MASK_STREAM = 0x6D61736B  # "mask"


# ----------------------------------------------------------------------------------------------
# Decoding.


def to_rgb_uint8(image: Any) -> np.ndarray:
  """Any image -> (H, W, 3) uint8 RGB.

  Accepts encoded bytes, a PIL image, or a uint8 array (H, W), (H, W, 1), (H, W, 3), (H, W, 4).
  Alpha is dropped and palette / CMYK / grey images are converted, as PIL's `convert("RGB")`
  does in Meta's loader.
  """
  if isinstance(image, (bytes, bytearray, memoryview)):
    with Image.open(io.BytesIO(image)) as pil:
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


def _load_image_file(path: str) -> np.ndarray:
  # `convert` forces the full decode inside the `with`, so truncated files fail here, not later.
  with Image.open(path) as pil:
    return np.asarray(pil.convert("RGB"))


# ----------------------------------------------------------------------------------------------
# Sources.


class SkippingSource:
  """Base of sources whose elements can fail to decode: failures are replaced, counted, logged.

  Subclasses implement `__len__`, `_load(index) -> dict` (may raise anything) and
  `_name(index) -> str` (what to report: a relative path, a record id).
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

  def _load(self, index: int) -> dict[str, Any]:
    raise NotImplementedError

  def _name(self, index: int) -> str:
    raise NotImplementedError

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
    return (f"{type(self).__name__}: skipped {len(bad)} unreadable of {len(self)} images, each "
            f"replaced by the next readable one: {listed}{more}")

  def _record_failure(self, index: int, error: Exception):
    with self._lock:
      if index in self._bad:
        return
      self._bad[index] = f"{self._name(index)}: {type(error).__name__}: {error}"
      count = len(self._bad)
    if count == 1:
      logging.warning("Skipping unreadable image %s (%s: %s); it is replaced by the next readable "
                      "one. Further skips are summarised.", self._name(index),
                      type(error).__name__, error)
    else:
      logging.info("Skipping unreadable image %s (%s: %s).", self._name(index),
                   type(error).__name__, error)
    if count & (count - 1) == 0:  # 1, 2, 4, 8, ...: a summary that never floods the log.
      logging.warning("%s", self.summary())

  def __getitem__(self, index: int) -> dict[str, Any]:
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
        self._record_failure(i, e)
        continue
      if offset:
        with self._lock:
          self.num_replaced += 1
      return element
    raise RuntimeError(f"None of the {n} images can be read. {self.summary()}")


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


class FolderImageSource(SkippingSource):
  """Every image under a folder, at any depth, decoded with Pillow when read. Unlabelled.

  Elements: {"image": (H, W, 3) uint8}. The file list is made once, sorted, so indices are stable
  for a given tree. Unreadable files are skipped (see `SkippingSource`).
  """

  def __init__(self, path: str, extensions: Sequence[str] = IMAGE_EXTENSIONS):
    super().__init__()
    self.root = os.fspath(path)
    if not os.path.exists(self.root):
      raise FileNotFoundError(f"image folder {self.root!r} does not exist (config.dataset.path).")
    if not os.path.isdir(self.root):
      raise NotADirectoryError(f"config.dataset.path={self.root!r} is not a folder.")
    self.files = list_image_files(self.root, extensions)
    if not self.files:
      raise ValueError(
          f"no images found under {self.root!r} (searched all subfolders for "
          f"{', '.join(extensions)}, any letter case).")

  def __len__(self) -> int:
    return len(self.files)

  def _name(self, index: int) -> str:
    return self.files[index]

  def _load(self, index: int) -> dict[str, Any]:
    return {"image": _load_image_file(os.path.join(self.root, self.files[index]))}

  def __repr__(self) -> str:
    return f"FolderImageSource({self.root!r}, {len(self)} images)"


def _default_tfds_data_dir() -> str:
  return os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")


def _tfds_fix(name: str, data_dir: str) -> str:
  base = name.split(":")[0].split("/")[0]
  manual = (" ImageNet cannot be downloaded: put ILSVRC2012_img_train.tar and "
            "ILSVRC2012_img_val.tar in MANUAL_DIR first." if base.startswith("imagenet") else "")
  return (f"Prepare it once, in the array_record format that random access needs (building "
          f"needs `pip install importlib_resources`, and TensorFlow for some datasets):\n"
          f"  tfds build {base} --data_dir {data_dir} --file_format array_record "
          f"[--manual_dir MANUAL_DIR]\n"
          f"then pass config.dataset.data_dir={data_dir!r}.{manual}")


class TfdsImageSource(SkippingSource):
  """A prepared TFDS dataset, read by random access with `tfds.data_source` (no TensorFlow).

  Elements: {"image": (H, W, 3) uint8, "label": int32 when the dataset has `label_key`}; other
  features are dropped. `tfds.features.Image` features are read as encoded bytes and decoded here
  with Pillow (so a corrupt record is skipped like a corrupt file); other image features are
  decoded by TFDS. Never downloads or prepares: a missing dataset raises with the command to
  prepare it.
  """

  def __init__(self, name: str, split: str = "train", data_dir: str | None = None, *,
               image_key: str = "image", label_key: str | None = "label"):
    super().__init__()
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (slow import)
    self.name, self.split = name, split
    self.data_dir = os.fspath(data_dir) if data_dir else _default_tfds_data_dir()
    self.image_key = image_key
    # Probe with the default decoders first: `features` tells whether the image is an Image
    # feature we can skip-decode. `download=False` alone is not enough: for a registered dataset
    # that is not prepared, TFDS reports a misleading file-format error, hence the checks below.
    try:
      probe = tfds.data_source(name, split=split, data_dir=self.data_dir, download=False)
    except tfds.core.registered.DatasetNotFoundError:
      raise FileNotFoundError(
          f"TFDS dataset {name!r} is neither prepared in {self.data_dir!r} nor a known TFDS "
          f"dataset. {_tfds_fix(name, self.data_dir)}") from None
    except NotImplementedError as e:
      prepared = _tfds_prepared_formats(name, self.data_dir)
      if prepared:
        raise ValueError(
            f"TFDS dataset {name!r} is prepared in {self.data_dir!r} as {sorted(prepared)}, but "
            f"random access needs array_record. Rebuild it: {_tfds_fix(name, self.data_dir)}"
        ) from e
      raise FileNotFoundError(
          f"TFDS dataset {name!r} is not prepared in {self.data_dir!r} (and it is never "
          f"downloaded here). {_tfds_fix(name, self.data_dir)}") from e
    except ValueError as e:
      raise ValueError(f"TFDS dataset {name!r}: {e} (config.dataset.split={split!r}).") from e
    features = probe.dataset_info.features
    if image_key not in features:
      raise KeyError(f"TFDS dataset {name!r} has no feature {image_key!r}; features: "
                     f"{sorted(features.keys())}.")
    self.label_key = label_key if label_key and label_key in features else None
    if isinstance(features[image_key], tfds.features.Image):
      self._records = tfds.data_source(
          name, split=split, data_dir=self.data_dir, download=False,
          decoders={image_key: tfds.decode.SkipDecoding()})
    else:
      self._records = probe

  def __len__(self) -> int:
    return len(self._records)

  def _name(self, index: int) -> str:
    return f"{self.name}[{self.split}][{index}]"

  def _load(self, index: int) -> dict[str, Any]:
    record = self._records[index]
    out = {"image": to_rgb_uint8(record[self.image_key])}
    if self.label_key:
      out["label"] = np.int32(record[self.label_key])
    return out

  def __repr__(self) -> str:
    return f"TfdsImageSource({self.name!r}, split={self.split!r}, {len(self)} images)"


def _tfds_prepared_formats(name: str, data_dir: str) -> set[str]:
  """File formats of the prepared versions of `name` ("name", "name/config", "name:1.2.3")."""
  base = name.split(":")[0]
  formats = set()
  root = os.path.join(data_dir, base)
  for dirpath, _, filenames in os.walk(root):
    if "dataset_info.json" in filenames:
      try:
        with open(os.path.join(dirpath, "dataset_info.json")) as f:
          formats.add(json.load(f).get("fileFormat", "tfrecord"))
      except (OSError, ValueError):
        pass
  return formats


class DemoImageSource:
  """The embedded demo dataset (scikit-learn digits as RGB), in memory. Labelled.

  Elements: {"image": (image_size, image_size, 3) uint8, "label": int32 in 0..9}.
  """

  def __init__(self, split: str = "train", image_size: int = 28):
    self.images, self.labels = load_demo_dataset(split, image_size)

  def __len__(self) -> int:
    return len(self.images)

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index) % len(self)
    return {"image": self.images[index], "label": np.int32(self.labels[index])}

  def __repr__(self) -> str:
    return f"DemoImageSource({len(self)} images of {self.images.shape[1]} px)"


def _get(cfg: Any, name: str, default: Any = None) -> Any:
  """`cfg.name` for a ConfigDict, dict or None; `default` when absent or None."""
  if cfg is None:
    return default
  value = cfg.get(name, None) if hasattr(cfg, "get") else getattr(cfg, name, None)
  return default if value is None else value


def _get_any(cfg: Any, names: Sequence[str], default: Any = None) -> Any:
  """The first of `names` that `cfg` sets (Meta's name first, then our short alias)."""
  for name in names:
    value = _get(cfg, name)
    if value is not None and value != "":
      return value
  return default


# MultiCropConfig field -> config.crops names, Meta's YAML name first.
_CROP_FIELDS = {
    "global_size": ("global_crops_size", "global_size"),
    "local_size": ("local_crops_size", "local_size"),
    "n_local": ("local_crops_number", "n_local"),
    "global_scale": ("global_crops_scale", "global_scale"),
    "local_scale": ("local_crops_scale", "local_scale"),
    "blur_mode": ("blur_mode",),
}


def make_source(config: Any):
  """The image source named by `config.dataset.kind`; see the module docstring for the fields."""
  dataset = _get(config, "dataset")
  kind = _get(dataset, "kind")
  if kind == "demo":
    size = _get_any(dataset, ("image_size",),
                    _get_any(_get(config, "crops"), _CROP_FIELDS["global_size"], 28))
    return DemoImageSource(_get_any(dataset, ("split",), "train"), int(size))
  if kind == "tfds":
    name = _get_any(dataset, ("name",))
    if not name:
      raise ValueError("config.dataset.kind='tfds' needs config.dataset.name, e.g. 'imagenet2012'.")
    return TfdsImageSource(name, _get_any(dataset, ("split",), "train"),
                           _get_any(dataset, ("data_dir",)))
  if kind == "folder":
    path = _get_any(dataset, ("path",))
    if not path:
      raise ValueError("config.dataset.kind='folder' needs config.dataset.path, the image folder.")
    return FolderImageSource(path)
  raise ValueError(f"config.dataset.kind={kind!r} is not one of {SOURCE_KINDS}.")


# ----------------------------------------------------------------------------------------------
# Batches.


def mask_rng(seed: int, step: int, process_index: int) -> np.random.Generator:
  """The iBOT mask generator of host `process_index` at `step`: a pure function of the three."""
  return np.random.default_rng(np.random.SeedSequence((seed, step, process_index, _MASK_STREAM)))


@dataclasses.dataclass(frozen=True)
class MaskSettings:
  """iBOT mask sampling for one host batch of `num_global_crops` = 2b crops."""

  num_global_crops: int
  grid_size: tuple[int, int]
  max_num_patches: float | None
  mask_ratio_min_max: tuple[float, float] = (0.1, 0.5)
  mask_probability: float = 0.5

  @property
  def upperbound(self) -> int:
    """M, the static length of mask_indices / mask_weights / mask_valid."""
    return masking.mask_upperbound(self.num_global_crops, self.grid_size[0] * self.grid_size[1],
                                   self.mask_ratio_min_max, self.mask_probability)


class _AddMasks(grain.transforms.MapWithIndex):
  """Adds the host's masks to batch `index` (= the step; the pipeline indexes batches by step)."""

  def __init__(self, settings: MaskSettings, seed: int, process_index: int):
    self.settings, self.seed, self.process_index = settings, seed, process_index

  def map_with_index(self, index: int, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    s = self.settings
    m = masking.sample_batch_masks(
        mask_rng(self.seed, index, self.process_index), s.num_global_crops, s.grid_size,
        max_num_patches=s.max_num_patches, mask_ratio_min_max=s.mask_ratio_min_max,
        mask_probability=s.mask_probability)
    return {**batch, "masks": m.masks, "mask_indices": m.mask_indices,
            "mask_weights": m.mask_weights, "mask_valid": m.mask_valid}


def _collate(samples: Sequence[Mapping[str, Any]], normalize: bool) -> dict[str, np.ndarray]:
  batch = augment.collate_crops(samples, normalize=normalize)
  out = {"global_crops": batch["global_crops"], "local_crops": batch["local_crops"]}
  if "label" in batch:
    out["labels"] = batch["label"].astype(np.int32)
  return out


def _host_slice(global_batch_size: int, process_index: int | None,
                process_count: int | None) -> tuple[int, int, int]:
  """(process_index, process_count, per-host batch size b), validated."""
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top  (only when the caller did not say)
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count}).")
  if global_batch_size < 1 or global_batch_size % process_count:
    raise ValueError(f"global_batch_size={global_batch_size} must be a positive multiple of "
                     f"process_count={process_count} (each host loads global_batch_size / "
                     f"process_count images).")
  return process_index, process_count, global_batch_size // process_count


def host_batches(
    source,
    *,
    global_batch_size: int,
    seed: int,
    multicrop: augment.MultiCropConfig,
    mask_ratio_min_max: tuple[float, float] = (0.1, 0.5),
    mask_probability: float = 0.5,
    max_num_patches: float | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    normalize: bool = True,
) -> grain.MapDataset:
  """This host's batches as an infinite grain MapDataset: element k is the batch of step k.

  Random access, so any step can be read directly (`ds[k]`); `TrainIterator` iterates it. See the
  module docstring for the keys, shapes and the multi-host layout. `max_num_patches=None` means
  Meta's `meta_max_num_patches(S, patch)`; `normalize=False` keeps the crops uint8.
  """
  if not 0 <= seed < 2**32:
    raise ValueError(f"seed={seed} must be in [0, 2**32) (grain's shuffle seed range).")
  if len(source) == 0:  # pylint: disable=g-explicit-length-test
    raise ValueError(f"the image source {source!r} is empty.")
  process_index, process_count, b = _host_slice(global_batch_size, process_index, process_count)
  grid = multicrop.global_size // multicrop.patch_size
  if max_num_patches is None:
    max_num_patches = masking.meta_max_num_patches(multicrop.global_size, multicrop.patch_size)
  settings = MaskSettings(2 * b, (grid, grid), max_num_patches, tuple(mask_ratio_min_max),
                          float(mask_probability))
  # Everything up to the multi-crop is indexed by the global example position, so an example and
  # its crops are the same whatever the number of hosts or workers.
  ds = grain.MapDataset.source(source).seed(seed).shuffle().repeat()
  ds = ds.random_map(augment.DinoMultiCrop(multicrop))
  # Consecutive chunks of b examples; global batch k is chunks k P .. k P + P - 1 and this host
  # takes chunk k P + p: rows [p b, (p + 1) b) of the global batch, loading nothing else.
  ds = ds.batch(b, batch_fn=functools.partial(_collate, normalize=normalize))
  ds = ds[process_index::process_count]
  return ds.map_with_index(_AddMasks(settings, seed, process_index))


def train_batch_spec(local_batch_size: int, multicrop: augment.MultiCropConfig, *,
                     mask_ratio_min_max=(0.1, 0.5), mask_probability: float = 0.5,
                     labels: bool = False, normalize: bool = True) -> dict[str, tuple]:
  """{key: (shape, dtype)} of one host batch of b = `local_batch_size` images, without reading."""
  b, S, s = local_batch_size, multicrop.global_size, multicrop.local_size
  n_tokens = (S // multicrop.patch_size) ** 2
  m = masking.mask_upperbound(2 * b, n_tokens, tuple(mask_ratio_min_max), mask_probability)
  crops = np.dtype(np.float32 if normalize else np.uint8)
  spec = {
      "global_crops": ((2 * b, S, S, 3), crops),
      "local_crops": ((multicrop.n_local * b, s, s, 3), crops),
      "masks": ((2 * b, n_tokens), np.dtype(bool)),
      "mask_indices": ((m,), np.dtype(np.int32)),
      "mask_weights": ((m,), np.dtype(np.float32)),
      "mask_valid": ((m,), np.dtype(bool)),
  }
  if labels:
    spec["labels"] = ((b,), np.dtype(np.int32))
  return spec


def host_major_to_crop_major(x, num_hosts: int, num_crops: int):
  """(P K b, ...) hosts stacked, each crop-major -> (K P b, ...) globally crop-major.

  For numpy or jax arrays (in jit too): turns the concatenation of the hosts' `global_crops`
  (num_crops=2) or `local_crops` (num_crops=n_local), or of per-row features of them, into the
  single-host layout of the same global batch.
  """
  b = x.shape[0] // (num_hosts * num_crops)
  y = x.reshape(num_hosts, num_crops, b, *x.shape[1:]).swapaxes(0, 1)
  return y.reshape(num_hosts * num_crops * b, *x.shape[1:])


class TrainIterator(grain.DatasetIterator):
  """Iterates `host_batches` from a step; its state is that step (JSON), restorable anywhere.

  `get_state()` -> {"step", "seed", "global_batch_size"}; `set_state` resumes at that step (a
  restore with another seed or batch size is allowed but logged). With `worker_count > 0` the
  batches are made in grain worker processes (interleaved in order, so the output does not depend
  on `worker_count`); call `close()` to stop them.
  """

  def __init__(self, batches: grain.MapDataset, *, step: int = 0, worker_count: int = 0,
               worker_buffer_size: int = 2, prefetch_batches: int = 1,
               fingerprint: Mapping[str, int] | None = None):
    super().__init__()
    self._batches = batches
    self._step = int(step)
    self._worker_count = int(worker_count)
    self._worker_buffer_size = int(worker_buffer_size)
    self._prefetch_batches = int(prefetch_batches)
    self._fingerprint = dict(fingerprint or {})
    self._inner = None

  @property
  def step(self) -> int:
    """The step of the next batch."""
    return self._step

  def _iterator(self):
    if self._inner is None:
      ds = self._batches[self._step:]  # the masks were added before: their index is the step
      if self._worker_count > 0:
        # grain's process prefetch reads absl flags; outside `absl.app.run` (scripts, pytest)
        # nothing parsed them and it would fail. Marking them parsed keeps their defaults, and a
        # later `app.run` still parses argv.
        if not flags.FLAGS.is_parsed():
          flags.FLAGS.mark_as_parsed()
        # Inside workers: synchronous reads; the per-worker output buffer does the prefetching.
        ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=self._worker_count, per_worker_buffer_size=self._worker_buffer_size))
      else:
        # A background thread builds the next batch(es) while the train step runs.
        n = self._prefetch_batches
        ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=n, prefetch_buffer_size=n))
      self._inner = iter(ds)
    return self._inner

  def __next__(self) -> dict[str, np.ndarray]:
    self._assert_not_closed()
    batch = next(self._iterator())
    self._step += 1
    return batch

  def get_state(self) -> dict[str, int]:
    return {"step": self._step, **self._fingerprint}

  def set_state(self, state: Mapping[str, Any]):
    for key, value in self._fingerprint.items():
      if key in state and int(state[key]) != value:
        logging.warning("Restoring an input pipeline state saved with %s=%s into one with %s=%s: "
                        "the batches after the restore differ from the saved run's.",
                        key, state[key], key, value)
    step = int(state["step"])
    if step != self._step or self._inner is None:
      self._stop()
      self._step = step

  def start_prefetch(self):
    self._iterator().start_prefetch()

  def _stop(self):
    if self._inner is not None:
      self._inner.close()
      self._inner = None

  def close(self):
    self._stop()
    super().close()

  def __str__(self) -> str:
    return f"TrainIterator(step={self._step}, workers={self._worker_count})"


def make_train_iterator(
    source,
    *,
    global_batch_size: int,
    seed: int,
    multicrop: augment.MultiCropConfig,
    mask_ratio_min_max: tuple[float, float] = (0.1, 0.5),
    mask_probability: float = 0.5,
    max_num_patches: float | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    worker_count: int = 0,
    worker_buffer_size: int = 2,
    prefetch_batches: int = 1,
    start_step: int = 0,
    normalize: bool = True,
) -> TrainIterator:
  """This host's training batches from `start_step` on; see the module docstring.

  Args:
    source: a random-access image source (`make_source`), elements {"image", ["label"]}.
    global_batch_size: G, images per step over all hosts; each host loads G / process_count.
    seed: fixes the example order, the crops and the masks.
    multicrop: crop recipe; its global_size / patch_size give the mask grid.
    mask_ratio_min_max, mask_probability: Meta's iBOT settings (config.ibot).
    max_num_patches: per-block cap; None = Meta's `meta_max_num_patches(global_size, patch_size)`.
    process_index, process_count: this host and the host count (default: jax's).
    worker_count: grain worker processes (0: build batches in this process). Scripts using
      workers need an `if __name__ == "__main__":` guard (they are spawned).
    worker_buffer_size: batches each worker may run ahead.
    prefetch_batches: with worker_count=0, batches built ahead in a background thread (0: none).
    start_step: the step of the first batch (the same as `set_state({"step": start_step})`).
    normalize: False keeps the crops uint8 (normalise on device with `imagenet_normalize`).
  """
  batches = host_batches(
      source, global_batch_size=global_batch_size, seed=seed, multicrop=multicrop,
      mask_ratio_min_max=mask_ratio_min_max, mask_probability=mask_probability,
      max_num_patches=max_num_patches, process_index=process_index, process_count=process_count,
      normalize=normalize)
  return TrainIterator(batches, step=start_step, worker_count=worker_count,
                       worker_buffer_size=worker_buffer_size, prefetch_batches=prefetch_batches,
                       fingerprint={"seed": int(seed), "global_batch_size": int(global_batch_size)})


def multicrop_from_config(config: Any, patch_size: int) -> augment.MultiCropConfig:
  """`MultiCropConfig` from `config.crops` (absent fields keep their defaults)."""
  crops = _get(config, "crops")
  defaults = augment.MultiCropConfig()
  fields = {}
  for field, names in _CROP_FIELDS.items():
    value = _get_any(crops, names, getattr(defaults, field))
    fields[field] = tuple(value) if isinstance(value, (list, tuple)) else value
  return augment.MultiCropConfig(patch_size=patch_size, **fields)


def make_train_iterator_from_config(config: Any, patch_size: int, start_step: int = 0, *,
                                    source=None, process_index: int | None = None,
                                    process_count: int | None = None) -> TrainIterator:
  """`make_train_iterator(make_source(config), ...)` with the fields listed in the module docstring."""
  ibot = _get(config, "ibot")
  return make_train_iterator(
      make_source(config) if source is None else source,
      global_batch_size=int(config.batch_size),
      seed=int(config.seed),
      multicrop=multicrop_from_config(config, patch_size),
      mask_ratio_min_max=tuple(_get_any(ibot, ("mask_ratio_min_max",), (0.1, 0.5))),
      mask_probability=float(_get_any(ibot, ("mask_sample_probability", "mask_probability"), 0.5)),
      process_index=process_index,
      process_count=process_count,
      worker_count=int(_get_any(config, ("data_workers",), 0)),
      start_step=start_step,
  )


def checkpoint_save_args(iterator: TrainIterator):
  """orbax args saving the iterator's state (grain's handler: one JSON file per host).

    mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(train_state), data=checkpoint_save_args(it)))
  """
  return grain.checkpoint.CheckpointSave(iterator)


def checkpoint_restore_args(iterator: TrainIterator):
  """orbax args restoring the state into `iterator` (in place; orbax returns it too).

    restored = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=checkpoint_restore_args(it)))
  """
  return grain.checkpoint.CheckpointRestore(iterator)
