"""DINOv2 training input: image sources, per-host multi-crop batches with iBOT masks, grain state.

Sources (`make_source(config)`): grain random-access data sources, `__len__` and
`__getitem__(i) -> {"image", ["label"]}` with "image" an (H, W, 3) RGB uint8 array, decoded when
the element is read. They are defined in `dinov2_jax/data/sources.py`, shared with the evaluations,
and re-exported here:

  TfdsImageSource    a TFDS dataset prepared in the array_record format, read with
                     `tfds.data_source` (no TensorFlow needed); never downloads or prepares.
  FolderImageSource  every jpg/jpeg/png/webp under a folder, at any depth (unlabelled).
  DemoImageSource    the embedded scikit-learn digits (labelled, in memory).

The two file-backed sources skip unreadable images instead of failing: element i is then replaced by
the next readable index (i + 1, i + 2, ... modulo the length, so the replacement is deterministic),
the file is counted (`num_skipped`, `skipped`), the first failure is logged as a warning and a
summary is logged each time the count doubles. The counters live in the process that decodes: with
`worker_count > 0` that is each grain worker, and the warnings come from there.

Batches (`make_train_iterator`). With G the global batch size, split into S data shards of
b = G / S consecutive images (S = the devices the batch is split over; default: one per host), the
layout of `dinov2_jax/data/layout.py`:

  examples:  source -> seed(seed) -> shuffle -> repeat (reshuffled every epoch) -> DinoMultiCrop.
             Example j of this infinite stream and its crops are a function of (seed, j) only.
  global batch k = examples [k G, (k + 1) G); shard s of it = examples [k G + s b, k G + (s + 1) b).
  masks:     drawn per shard from `mask_rng(seed, k, s)` for the shard's 2b global crops, with
             Meta's per-GPU collate semantics (exactly int(2b p) masked crops, stratified ratios).

So every array is a function of (seed, step, global image index) and the number of shards S, never
of the number of hosts: a run on 1 host x 8 devices and one on 2 hosts x 4 devices see the same
batches, and a run resumed on another number of hosts (same S) continues with the same data.
A host loads only its own shards (`shards`, default the contiguous block of host p).

Each step yields a dict of numpy arrays (L = the host's number of shards) whose shapes never change:

  global_crops  (L 2b, H, H, 3) float32 (H: global crop size), ImageNet-normalised; shard after
                shard, each crop-major:
                row l 2b + c b + i is crop c of the shard's image i (Meta's per-GPU layout).
  local_crops   (L n_local b, h, h, 3) float32 (h: local crop size), likewise.
  masks         (L 2b, N) bool, N = (H / patch) ** 2; row r belongs to global_crops row r.
  mask_indices  (L M,) int32: per shard, `flatnonzero` of its (2b, N) masks padded with 0 to M,
                indexing that shard's own flattened (2b N) patch tokens.
  mask_weights  (L M,) float32, 1 / (masked tokens of that crop), 0 on padding.
  mask_valid    (L M,) bool, True on each shard's first `masks.sum()` entries.
  labels        (L b,) int32, only when the source has labels (demo, most TFDS datasets).

M = `masking.mask_upperbound(2b, N, ...)`, Meta's static bound for one GPU's batch of 2b crops.

Checkpointing. The batches are a pure function of (seed, G, S, step, shard), so the iterator state is
{"step": k, "seed": ..., "global_batch_size": ..., "num_shards": ...}, the same on every host and independent of
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
from typing import Any, Mapping, Sequence

import grain
import numpy as np
from absl import flags, logging

from dinov2_jax import masking
from dinov2_jax.data import augment
# The sources live in `sources` (shared with the evaluations); re-exported here, where training
# code has always imported them from.
from dinov2_jax.data.sources import (  # noqa: F401  (re-exports)
    IMAGE_EXTENSIONS,
    DemoImageSource,
    FolderImageSource,
    SkippingSource,
    TfdsImageSource,
    list_image_files,
    to_rgb_uint8,
)

SOURCE_KINDS = ("demo", "tfds", "folder")
# Appended to the mask generator's seed entropy so that it never coincides with the per-image
# streams `augment.image_rng(seed, index)` (SeedSequence of two words) or any other pair/triple.
_MASK_STREAM = 0x6D61736B  # "mask"


# ----------------------------------------------------------------------------------------------
# Sources from the config.


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


def mask_rng(seed: int, step: int, shard: int) -> np.random.Generator:
  """The iBOT mask generator of data shard `shard` at `step`: a pure function of the three."""
  return np.random.default_rng(np.random.SeedSequence((seed, step, shard, _MASK_STREAM)))


@dataclasses.dataclass(frozen=True)
class MaskSettings:
  """iBOT mask sampling for one shard's batch of `num_global_crops` = 2b crops."""

  num_global_crops: int
  grid_size: tuple[int, int]
  max_num_patches: float | None
  mask_ratio_min_max: tuple[float, float] = (0.1, 0.5)
  mask_probability: float = 0.5

  @property
  def upperbound(self) -> int:
    """M, the per-shard static length of mask_indices / mask_weights / mask_valid."""
    return masking.mask_upperbound(self.num_global_crops, self.grid_size[0] * self.grid_size[1],
                                   self.mask_ratio_min_max, self.mask_probability)


class _AddMasks(grain.transforms.MapWithIndex):
  """Adds its masks to shard element `index` = step * num_shards + shard."""

  def __init__(self, settings: MaskSettings, seed: int, num_shards: int):
    self.settings, self.seed, self.num_shards = settings, seed, num_shards

  def map_with_index(self, index: int, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    s = self.settings
    step, shard = divmod(index, self.num_shards)
    m = masking.sample_batch_masks(
        mask_rng(self.seed, step, shard), s.num_global_crops, s.grid_size,
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


class _HostShards(grain.MapDataset):
  """Element k: the shards `shards` of step k, concatenated (from a dataset of all steps' shards)."""

  def __init__(self, shard_batches: grain.MapDataset, num_shards: int, shards: Sequence[int]):
    super().__init__(shard_batches)
    self._num_shards, self._shards = num_shards, tuple(shards)

  def __len__(self) -> int:
    return len(self._parent) // self._num_shards

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    parts = [self._parent[index * self._num_shards + s] for s in self._shards]
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}

  def __str__(self) -> str:
    return f"_HostShards(num_shards={self._num_shards}, shards={self._shards})"


def host_shards(num_shards: int | None = None, process_index: int | None = None,
                process_count: int | None = None) -> tuple[int, list[int]]:
  """(S, this host's shard indices): by default one shard per host, and host p the p-th block.

  A trainer passes the shards its local devices hold instead (`shards=` of `host_batches`).
  """
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top  (only when the caller did not say)
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count}).")
  num_shards = process_count if num_shards is None else num_shards
  if num_shards % process_count:
    raise ValueError(f"num_shards={num_shards} must be a multiple of process_count={process_count}.")
  per_host = num_shards // process_count
  return num_shards, list(range(process_index * per_host, (process_index + 1) * per_host))


def host_batches(
    source,
    *,
    global_batch_size: int,
    seed: int,
    multicrop: augment.MultiCropConfig,
    mask_ratio_min_max: tuple[float, float] = (0.1, 0.5),
    mask_probability: float = 0.5,
    max_num_patches: float | None = None,
    num_shards: int | None = None,
    shards: Sequence[int] | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    normalize: bool = True,
) -> grain.MapDataset:
  """This host's batches as an infinite grain MapDataset: element k is the batch of step k.

  Random access, so any step can be read directly (`ds[k]`); `TrainIterator` iterates it. See the
  module docstring for the keys, shapes and layout. `num_shards` is S (default: the number of
  hosts); `shards` the shard indices this host loads, in order (default: `host_shards`).
  `max_num_patches=None` means Meta's `meta_max_num_patches(S, patch)`; `normalize=False` keeps the
  crops uint8.
  """
  if not 0 <= seed < 2**32:
    raise ValueError(f"seed={seed} must be in [0, 2**32) (grain's shuffle seed range).")
  if len(source) == 0:  # pylint: disable=g-explicit-length-test
    raise ValueError(f"the image source {source!r} is empty.")
  if shards is None:
    num_shards, shards = host_shards(num_shards, process_index, process_count)
  elif num_shards is None:
    raise ValueError("host_batches(shards=...) needs num_shards too.")
  if not shards or any(not 0 <= s < num_shards for s in shards):
    raise ValueError(f"shards={list(shards)} must be a non-empty list of indices in [0, {num_shards}).")
  if global_batch_size < 1 or global_batch_size % num_shards:
    raise ValueError(f"global_batch_size={global_batch_size} must be a positive multiple of the "
                     f"{num_shards} data shards (each loads global_batch_size / {num_shards} images).")
  b = global_batch_size // num_shards
  grid = multicrop.global_size // multicrop.patch_size
  if max_num_patches is None:
    max_num_patches = masking.meta_max_num_patches(multicrop.global_size, multicrop.patch_size)
  settings = MaskSettings(2 * b, (grid, grid), max_num_patches, tuple(mask_ratio_min_max),
                          float(mask_probability))
  # Everything up to the multi-crop is indexed by the global example position, so an example and
  # its crops are the same whatever the number of hosts or workers.
  ds = grain.MapDataset.source(source).seed(seed).shuffle().repeat()
  ds = ds.random_map(augment.DinoMultiCrop(multicrop))
  # Element e = step e // S, shard e % S: examples [e b, (e + 1) b), with that shard's masks.
  ds = ds.batch(b, batch_fn=functools.partial(_collate, normalize=normalize))
  ds = ds.map_with_index(_AddMasks(settings, seed, num_shards))
  # Only this host's shards are ever read.
  return _HostShards(ds, num_shards, shards)


def train_batch_spec(local_batch_size: int, multicrop: augment.MultiCropConfig, *,
                     mask_ratio_min_max=(0.1, 0.5), mask_probability: float = 0.5,
                     labels: bool = False, normalize: bool = True, local_shards: int = 1) -> dict[str, tuple]:
  """{key: (shape, dtype)} of one host batch of `local_batch_size` images in `local_shards` shards."""
  if local_batch_size % local_shards:
    raise ValueError(f"local_batch_size={local_batch_size} is not a multiple of local_shards={local_shards}")
  b, S, s = local_batch_size, multicrop.global_size, multicrop.local_size
  n_tokens = (S // multicrop.patch_size) ** 2
  m = local_shards * masking.mask_upperbound(2 * b // local_shards, n_tokens, tuple(mask_ratio_min_max),
                                             mask_probability)
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


class TrainIterator(grain.DatasetIterator):
  """Iterates `host_batches` from a step; its state is that step (JSON), restorable anywhere.

  `get_state()` -> {"step", "seed", "global_batch_size", "num_shards"}; `set_state` resumes at that
  step (a restore with another seed, batch size or shard count is allowed but logged: the crops
  depend only on the seed and the global image index, the masks also on the shard count). With `worker_count > 0` the
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
    num_shards: int | None = None,
    shards: Sequence[int] | None = None,
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
    num_shards: S, the data shards of the global batch (default: the host count); masks are drawn
      per shard.
    shards: the shard indices this host loads, in the order of its rows (default: host p's block).
    process_index, process_count: this host and the host count (default: jax's), for the default
      `num_shards` / `shards`.
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
      max_num_patches=max_num_patches, num_shards=num_shards, shards=shards,
      process_index=process_index, process_count=process_count, normalize=normalize)
  num_shards = num_shards or host_shards(None, process_index, process_count)[0]
  return TrainIterator(batches, step=start_step, worker_count=worker_count,
                       worker_buffer_size=worker_buffer_size, prefetch_batches=prefetch_batches,
                       fingerprint={"seed": int(seed), "global_batch_size": int(global_batch_size),
                                    "num_shards": int(num_shards)})


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
                                    source=None, num_shards: int | None = None,
                                    shards: Sequence[int] | None = None, process_index: int | None = None,
                                    process_count: int | None = None, normalize: bool = True) -> TrainIterator:
  """`make_train_iterator(make_source(config), ...)` with the fields listed in the module docstring."""
  ibot = _get(config, "ibot")
  return make_train_iterator(
      make_source(config) if source is None else source,
      global_batch_size=int(config.batch_size),
      seed=int(config.seed),
      multicrop=multicrop_from_config(config, patch_size),
      mask_ratio_min_max=tuple(_get_any(ibot, ("mask_ratio_min_max",), (0.1, 0.5))),
      mask_probability=float(_get_any(ibot, ("mask_sample_probability", "mask_probability"), 0.5)),
      num_shards=num_shards,
      shards=shards,
      process_index=process_index,
      process_count=process_count,
      worker_count=int(_get_any(config, ("data_workers",), 0)),
      start_step=start_step,
      normalize=normalize,
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
