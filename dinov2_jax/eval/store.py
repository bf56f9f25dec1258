"""The on-disk store of extracted features: a folder of chunk files plus `manifest.json`.

Layout: `<name>-<chunk:05d>.npy` for every feature (`cls`, `patch_mean`, `cls_blocks`, `registers`)
and for `labels` (int32) and `index` (int64, the dataset index of each row), one file per chunk of
`chunk_size` dataset images. `manifest.json` holds the cache key (what the features were computed
from: the data's content, the preprocessing, the weights; see `dinov2_jax/eval/features.py`), the
finished chunks with their row counts and unreadable images, and the class names. A chunk is listed
only after its files are on disk, and every file is written to a temporary name and renamed, so an
interrupted extraction leaves a store that resumes where it stopped.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import numpy as np

MANIFEST = "manifest.json"
# 2: the key holds the data's content fingerprint, the preprocessing and the weights.
MANIFEST_VERSION = 2


class FeatureCacheMismatch(ValueError):
  """An output folder holds features of a different model, dataset or setting."""


def write_atomic(path: str, write: Callable[[Any], None], mode: str = "wb") -> None:
  """Writes `path` through `write(file)` to a temporary name, then renames it into place.

  A crash leaves either the old file or the new one, never half of one.
  """
  tmp = f"{path}.tmp{os.getpid()}"
  try:
    with open(tmp, mode) as f:
      write(f)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_json(path: str, value: Any) -> None:
  write_atomic(path, lambda f: json.dump(value, f, indent=1), mode="w")


class ChunkedArray:
  """Several arrays seen as one along axis 0, for row gathers (`x[indices]`) from memory-mapped chunks.

  Lets the linear protocol sample random batches from feature files larger than memory.
  """

  def __init__(self, parts: list[np.ndarray]):
    self.parts = parts
    self.offsets = np.cumsum([0] + [len(p) for p in parts])
    self.shape = (int(self.offsets[-1]),) + tuple(parts[0].shape[1:])
    self.dtype = parts[0].dtype

  def __len__(self) -> int:
    return self.shape[0]

  def __getitem__(self, index) -> np.ndarray:
    index = np.arange(len(self))[index] if isinstance(index, slice) else np.asarray(index, np.int64)
    out = np.empty((len(index),) + self.shape[1:], self.dtype)
    part = np.searchsorted(self.offsets, index, side="right") - 1
    for p in np.unique(part):
      rows = np.flatnonzero(part == p)
      out[rows] = self.parts[p][index[rows] - self.offsets[p]]
    return out


def describe_key_difference(old: dict, new: dict) -> str:
  """Which parts of two cache keys differ, in words ("the data (files, sizes, ...)", "the weights")."""
  words = {
      "data": "the data (image files, their sizes or modification times, or their labels)",
      "model": "the weights",
      "preprocessing": "the preprocessing (resolution, resize, transform)",
      "features": "the feature settings (blocks kept, dtype, chunk size)",
  }
  diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
  return ", ".join(words.get(k, k) for k in diff)


class FeatureStore:
  """A folder of extracted features: `manifest.json` plus `<name>-<chunk:05d>.npy` files.

  Attributes:
    path: the folder.
    manifest: the parsed manifest (`key`, `num_chunks`, `chunks` = finished chunks with their row
      counts and skipped dataset indices, `class_names`).
    computed_chunks: chunk ids computed by the `extract_features` call that returned this store
      (empty when everything was already on disk).
  """

  def __init__(self, path: str | os.PathLike):
    self.path = os.fspath(path)
    with open(os.path.join(self.path, MANIFEST)) as f:
      self.manifest = json.load(f)
    self.computed_chunks: list[int] = []

  @property
  def complete(self) -> bool:
    return len(self.manifest["chunks"]) == self.manifest["num_chunks"]

  @property
  def names(self) -> list[str]:
    return list(self.manifest["features"]) + ["labels", "index"]

  @property
  def num_rows(self) -> int:
    return sum(c["rows"] for c in self.manifest["chunks"].values())

  @property
  def skipped(self) -> list[int]:
    """Dataset indices of images that could not be decoded (left out of the features)."""
    return sorted(i for c in self.manifest["chunks"].values() for i in c["skipped"])

  @property
  def class_names(self) -> list[str]:
    return self.manifest["class_names"]

  def chunk_path(self, name: str, chunk: int) -> str:
    return os.path.join(self.path, f"{name}-{chunk:05d}.npy")

  def chunks(self, name: str, mmap: bool = True) -> list[np.ndarray]:
    """The finished chunks of one feature, in dataset order (memory-mapped by default)."""
    if name not in self.names:
      raise KeyError(f"{self.path} has no feature {name!r}; it has {self.names}")
    ids = sorted(int(c) for c in self.manifest["chunks"])
    return [np.load(self.chunk_path(name, c), mmap_mode="r" if mmap else None) for c in ids]

  def array(self, name: str, in_memory: bool = True) -> np.ndarray | ChunkedArray:
    """One feature for the whole dataset: in memory, or a memory-mapped `ChunkedArray` view."""
    return self.load(name) if in_memory else ChunkedArray(self.chunks(name, mmap=True))

  def load(self, name: str) -> np.ndarray:
    """One feature for the whole dataset, in memory: (num_rows, ...)."""
    if not self.complete:
      raise RuntimeError(f"{self.path}: extraction incomplete ({len(self.manifest['chunks'])}/"
                         f"{self.manifest['num_chunks']} chunks); rerun the extraction to resume it")
    parts = self.chunks(name, mmap=False)
    return np.concatenate(parts) if parts else np.zeros((0,), np.float32)

  @property
  def labels(self) -> np.ndarray:
    return self.load("labels")

  def class_counts(self) -> dict[str, int]:
    """{class name: rows (readable images) of that class}, in label order."""
    counts = np.bincount(self.labels, minlength=len(self.class_names))
    return {name: int(c) for name, c in zip(self.class_names, counts)}


def plan_manifest(out_dir: str, key: dict, num_chunks: int, class_names, *, overwrite: bool = False,
                  on_mismatch: str = "error") -> tuple[dict, str | None]:
  """Decides what to extract into `out_dir`, without writing anything.

  Args:
    key: what the features are computed from (`data`, `preprocessing`, `model`, `features` entries).
    overwrite: discard whatever `out_dir` holds.
    on_mismatch: when `out_dir` holds features of another key: "error" raises `FeatureCacheMismatch`
      naming what differs; "recompute" starts afresh.

  Returns:
    (manifest, reset): the manifest to continue (the one on disk when its key equals `key`) or a
    fresh one, and None, or, when the folder's features must be deleted first, why (for the log).
  """
  path = os.path.join(out_dir, MANIFEST)
  fresh = {"version": MANIFEST_VERSION, "key": key, "num_chunks": num_chunks, "chunks": {}, "features": {},
           "class_names": list(class_names)}
  if not os.path.exists(path):
    return fresh, None
  if overwrite:
    return fresh, "overwrite requested"
  with open(path) as f:
    manifest = json.load(f)
  old = manifest.get("key", {}) if manifest.get("version") == MANIFEST_VERSION else {"format": "old"}
  if old == key:
    return manifest, None
  what = describe_key_difference(old, key)
  if on_mismatch != "recompute":
    raise FeatureCacheMismatch(
        f"{out_dir} holds features computed from different inputs ({what} changed); use another "
        "output folder, or delete this one to start afresh")
  return fresh, f"the cached features are stale: {what} changed since they were computed"


def reset_store(out_dir: str) -> None:
  """Deletes the manifest and feature files of `out_dir` (other files stay) and makes sure it exists."""
  if os.path.isdir(out_dir):
    for f in os.listdir(out_dir):
      if f == MANIFEST or f.endswith(".npy"):
        os.remove(os.path.join(out_dir, f))
  os.makedirs(out_dir, exist_ok=True)


def save_manifest(out_dir: str, manifest: dict) -> None:
  write_json(os.path.join(out_dir, MANIFEST), manifest)
