"""Frozen-backbone features for the evaluations: batched, sharded over all devices, chunked on disk, resumable.

One backbone pass per image gives everything the protocols use (all normed by the final LayerNorm,
as Meta's `get_intermediate_layers(norm=True)` and `forward_features`):

  cls         (N, D)     the final CLS token (Meta's `model(x)`; k-NN's input before L2-normalising)
  patch_mean  (N, D)     mean of the last block's patch tokens (registers excluded)
  cls_blocks  (N, n, D)  CLS tokens of the last n blocks, oldest first (linear protocol), if n > 0
  registers   (N, R, D)  the final register tokens, if asked for
  labels      (N,)       int32 class ids;  index (N,) int64: the dataset index of each row

Images go through Meta's evaluation transform (resize the shorter side to resolution * 256/224,
bicubic, centre crop, ImageNet normalisation) in host threads, are batched (batch padded to a
multiple of the device count, then trimmed) and run on a 1-D "data" mesh over all devices with
the weights replicated. Results are written every `chunk_size` images as `<name>-<chunk>.npy`
files plus `manifest.json`, which lists the finished chunks: a rerun skips them, so an interrupted
extraction resumes where it stopped, and datasets larger than memory are never held whole.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dinov2_jax.data.eval_transform import eval_transform

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1


def log_print(message: str) -> None:
  print(message, flush=True)


# ----------------------------------------------------------------------------------------------
# Devices.


def data_mesh(devices: Iterable[jax.Device] | None = None) -> jax.sharding.Mesh:
  """A 1-D mesh with axis "data" over `devices` (default: all). Auto axis types: plain GSPMD."""
  devices = list(devices if devices is not None else jax.devices())
  return jax.make_mesh((len(devices),), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=devices)


def round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
  """Zero-pads axis 0 of `x` to `rows` rows (a fixed batch shape means one compilation)."""
  if len(x) == rows:
    return x
  return np.concatenate([x, np.zeros((rows - len(x),) + x.shape[1:], x.dtype)])


class Progress:
  """Logs `what: done/total unit (pct) rate unit/s, ETA` at most every `every_s` seconds and at the end."""

  def __init__(self, total: int, what: str, unit: str = "images", log: Callable[[str], None] | None = log_print,
               every_s: float = 10.0):
    self.total, self.what, self.unit, self.log, self.every_s = total, what, unit, log, every_s
    self.done, self.start = 0, time.perf_counter()
    self.last = self.start

  @property
  def rate(self) -> float:
    return self.done / max(time.perf_counter() - self.start, 1e-9)

  def update(self, n: int) -> None:
    self.done += n
    now = time.perf_counter()
    if self.log and (now - self.last >= self.every_s or self.done >= self.total):
      self.last = now
      eta = (self.total - self.done) / max(self.rate, 1e-9)
      self.log(f"{self.what}: {self.done}/{self.total} {self.unit} ({100 * self.done / max(self.total, 1):.1f}%), "
               f"{self.rate:.1f} {self.unit}/s, ETA {format_seconds(eta)}")


def format_seconds(s: float) -> str:
  s = int(round(s))
  return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


# ----------------------------------------------------------------------------------------------
# The backbone pass.


@dataclasses.dataclass(frozen=True)
class FeatureSpec:
  """Which features to keep.

  Attributes:
    n_last_blocks: keep the normed CLS tokens of the last n blocks as `cls_blocks` (the linear
      protocol uses 4); 0 keeps none (k-NN needs only `cls`).
    registers: keep the final normed register tokens.
  """

  n_last_blocks: int = 4
  registers: bool = False


def backbone_features(module, images: jax.Array, n_last_blocks: int = 4,
                      registers: bool = False) -> dict[str, jax.Array]:
  """One forward pass -> the evaluation features, float32. Pure; call it inside jit.

  Args:
    module: a `DinoVisionTransformer`.
    images: (B, H, W, 3) float32, ImageNet-normalised, H and W multiples of the patch size.
    n_last_blocks, registers: see `FeatureSpec`.

  Returns:
    dict: `cls` (B, D), `patch_mean` (B, D), `cls_blocks` (B, n, D) if n > 0, `registers` (B, R, D)
    if asked. Equal to Meta's `forward_features` / `get_intermediate_layers(n, return_class_token=True)`.
  """
  n = min(n_last_blocks, len(module.blocks))
  f = {k: v.astype(jnp.float32) for k, v in module.forward_features_and_intermediates(images, n).items()}
  out = {"cls": f["x_norm_clstoken"], "patch_mean": f["x_norm_patchtokens"].mean(axis=1)}
  if n:
    out["cls_blocks"] = f["x_norm_clstoken_blocks"]
  if registers:
    out["registers"] = f["x_norm_regtokens"]
  return out


def feature_shapes(cfg, spec: FeatureSpec) -> dict[str, tuple[int, ...]]:
  """Per-image shape of each feature `backbone_features` returns for a `ViTConfig`."""
  d, n = cfg.embed_dim, min(spec.n_last_blocks, cfg.depth)
  shapes = {"cls": (d,), "patch_mean": (d,)}
  if n:
    shapes["cls_blocks"] = (n, d)
  if spec.registers:
    shapes["registers"] = (cfg.num_register_tokens, d)
  return shapes


def make_feature_fn(backbone, spec: FeatureSpec = FeatureSpec(), mesh: jax.sharding.Mesh | None = None):
  """A function (B, H, W, 3) float32 numpy images -> dict of features (sharded jax arrays).

  B must be a multiple of the mesh size: the batch is split over the "data" axis and the weights
  are replicated on every device.
  """
  mesh = mesh or data_mesh()
  batch_sharding = NamedSharding(mesh, P("data"))
  graphdef = backbone.graphdef
  params = jax.device_put(backbone.params, NamedSharding(mesh, P()))

  @functools.partial(jax.jit, out_shardings=batch_sharding)
  def run(params, images):
    return backbone_features(nnx.merge(graphdef, params), images, spec.n_last_blocks, spec.registers)

  def fn(images: np.ndarray) -> dict[str, jax.Array]:
    if len(images) % mesh.size:
      raise ValueError(f"batch {len(images)} is not a multiple of the {mesh.size} devices; pad it")
    return run(params, jax.device_put(images, batch_sharding))

  return fn


def model_fingerprint(backbone) -> str:
  """SHA-1 of the architecture and the exact parameter bytes: cached features belong to one model."""
  h = hashlib.sha1(json.dumps(dataclasses.asdict(backbone.config), sort_keys=True).encode())
  leaves, _ = jax.tree_util.tree_flatten_with_path(backbone.params)
  for path, leaf in leaves:
    value = np.ascontiguousarray(jax.device_get(leaf))
    h.update(f"{jax.tree_util.keystr(path)}:{value.dtype}:{value.shape}".encode())
    h.update(value.tobytes())
  return h.hexdigest()


# ----------------------------------------------------------------------------------------------
# The chunked on-disk store.


class FeatureCacheMismatch(ValueError):
  """An output folder holds features of a different model, dataset or setting."""


def _write_atomic(path: str, write: Callable[[Any], None], mode: str = "wb") -> None:
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, mode) as f:
    write(f)
  os.replace(tmp, path)  # a crash leaves either the old file or the new one, never half of one


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


def _open_manifest(out_dir: str, key: dict, num_chunks: int, class_names, overwrite: bool) -> dict:
  path = os.path.join(out_dir, MANIFEST)
  if os.path.exists(path) and not overwrite:
    with open(path) as f:
      manifest = json.load(f)
    old = manifest.get("key", {})
    diff = sorted(k for k in set(old) | set(key) if old.get(k) != key.get(k))
    if diff:
      raise FeatureCacheMismatch(
          f"{out_dir} holds features of a different extraction (differs in {', '.join(diff)}); "
          "use another output folder, or delete this one (overwrite=True) to start afresh")
    return manifest
  if overwrite and os.path.isdir(out_dir):
    for f in os.listdir(out_dir):
      if f == MANIFEST or f.endswith(".npy"):
        os.remove(os.path.join(out_dir, f))
  os.makedirs(out_dir, exist_ok=True)
  return {"version": MANIFEST_VERSION, "key": key, "num_chunks": num_chunks, "chunks": {},
          "features": {}, "class_names": list(class_names)}


def _save_manifest(out_dir: str, manifest: dict) -> None:
  _write_atomic(os.path.join(out_dir, MANIFEST), lambda f: json.dump(manifest, f, indent=1), mode="w")


def _load_one(dataset, index: int, transform) -> tuple[np.ndarray | None, int]:
  image, label = dataset.load(index)
  return (None if image is None else transform(image)), label


def _prefetch(dataset, batches: list, transform, pool, lookahead: int):
  """Yields `(batch, [(image, label), ...])`, decoding `lookahead` batches ahead in `pool`."""
  queue: collections.deque = collections.deque()
  it = iter(batches)

  def submit():
    batch = next(it, None)
    if batch is not None:
      queue.append((batch, [pool.submit(_load_one, dataset, int(i), transform) for i in batch[1]]))

  for _ in range(lookahead):
    submit()
  while queue:
    batch, futures = queue.popleft()
    submit()
    yield batch, [f.result() for f in futures]


def extract_features(
    backbone,
    dataset,
    out_dir: str | os.PathLike,
    *,
    resolution: int = 224,
    resize_size: int | None = None,
    batch_size: int = 256,
    chunk_size: int = 8192,
    spec: FeatureSpec = FeatureSpec(),
    dtype: str = "float32",
    num_workers: int | None = None,
    mesh: jax.sharding.Mesh | None = None,
    overwrite: bool = False,
    log: Callable[[str], None] | None = log_print,
    on_chunk: Callable[[int], None] | None = None,
) -> FeatureStore:
  """Extracts features of every image of `dataset` into `out_dir`, resuming a previous run.

  Args:
    backbone: a `Backbone`, or a weights path for `dinov2_jax.load_backbone`.
    dataset: an `ImageDataset` (`dinov2_jax.eval.datasets`).
    out_dir: the output folder (created).
    resolution: crop side in pixels; a multiple of the patch size.
    resize_size: shorter side before the centre crop (default resolution * 256 / 224, Meta's).
    batch_size: images per forward pass; rounded up to a multiple of the device count.
    chunk_size: images per file (and per resume step). Part of the cache key.
    spec: which features to keep.
    dtype: storage dtype, "float32" or "float16" (halves the disk for very large datasets).
    num_workers: host threads decoding and transforming images (default: CPU count).
    mesh: a 1-D "data" mesh (default: all devices).
    overwrite: discard whatever `out_dir` holds instead of resuming.
    log: progress printer (None: silent).
    on_chunk: called with the chunk id after each chunk is safely on disk.

  Returns:
    The `FeatureStore`. Its `computed_chunks` lists what this call computed.
  """
  if isinstance(backbone, (str, os.PathLike)):
    from dinov2_jax.api import load_backbone
    backbone = load_backbone(backbone)
  patch = backbone.config.patch_size
  if resolution % patch:
    lo = max(resolution // patch, 1) * patch
    raise ValueError(f"resolution {resolution} is not a multiple of the patch size {patch}; use {lo} or {lo + patch}")
  resize_size = resize_size or round(resolution * 256 / 224)
  out_dir = os.fspath(out_dir)
  n, chunk_size = len(dataset), int(chunk_size)
  num_chunks = math.ceil(n / chunk_size)
  key = {
      "model": model_fingerprint(backbone),
      "dataset": dataset.name,
      "num_examples": n,
      "resolution": resolution,
      "resize_size": resize_size,
      "spec": dataclasses.asdict(spec),
      "dtype": dtype,
      "chunk_size": chunk_size,
  }
  manifest = _open_manifest(out_dir, key, num_chunks, dataset.class_names, overwrite)
  store_manifest = lambda: _save_manifest(out_dir, manifest)  # noqa: E731
  store_manifest()
  todo = [c for c in range(num_chunks) if str(c) not in manifest["chunks"]]
  computed: list[int] = []
  if todo:
    mesh = mesh or data_mesh()
    fn = make_feature_fn(backbone, spec, mesh)
    global_batch = round_up(batch_size, mesh.size)
    transform = functools.partial(eval_transform, crop_size=resolution, resize_size=resize_size)
    batches = []
    for c in todo:
      idx = np.arange(c * chunk_size, min((c + 1) * chunk_size, n))
      batches += [(c, idx[i:i + global_batch]) for i in range(0, len(idx), global_batch)]
    if log and len(todo) < num_chunks:
      log(f"{out_dir}: resuming, {num_chunks - len(todo)}/{num_chunks} chunks already done")
    progress = Progress(sum(len(b[1]) for b in batches), f"features {dataset.name}", log=log)
    workers = num_workers or os.cpu_count() or 1
    parts: dict[str, list] = collections.defaultdict(list)
    skipped: list[int] = []
    in_flight = None  # the previous batch's device outputs: fetched while the next one computes

    def fetch(pending):
      outputs, rows, labels, index = pending
      for name, value in jax.device_get(outputs).items():
        parts[name].append(np.asarray(value[:rows], dtype))
      parts["labels"].append(labels)
      parts["index"].append(index)

    def write_chunk(c):
      for name, values in parts.items():
        array = np.concatenate(values)
        if name not in ("labels", "index"):
          manifest["features"][name] = {"shape": list(array.shape[1:]), "dtype": dtype}
        _write_atomic(os.path.join(out_dir, f"{name}-{c:05d}.npy"), lambda f, a=array: np.save(f, a))
      manifest["chunks"][str(c)] = {"rows": int(sum(map(len, parts["labels"]))), "skipped": skipped[:]}
      store_manifest()
      computed.append(c)
      parts.clear()
      skipped.clear()
      if on_chunk:
        on_chunk(c)

    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
      for pos, ((c, idx), items) in enumerate(_prefetch(dataset, batches, transform, pool, lookahead=2)):
        ok = [j for j, (image, _) in enumerate(items) if image is not None]
        skipped += [int(idx[j]) for j in range(len(items)) if items[j][0] is None]
        if ok:
          images = pad_rows(np.stack([items[j][0] for j in ok]), global_batch)
          pending = (fn(images), len(ok), np.asarray([items[j][1] for j in ok], np.int32), idx[ok].astype(np.int64))
        else:
          pending = None
        if in_flight is not None:
          fetch(in_flight)
        in_flight = pending
        progress.update(len(idx))
        if pos + 1 == len(batches) or batches[pos + 1][0] != c:
          if in_flight is not None:
            fetch(in_flight)
            in_flight = None
          if not parts:  # every image of the chunk was unreadable: keep empty, well-formed files
            for name, shape in feature_shapes(backbone.config, spec).items():
              parts[name].append(np.zeros((0,) + shape, dtype))
            parts["labels"].append(np.zeros((0,), np.int32))
            parts["index"].append(np.zeros((0,), np.int64))
          write_chunk(c)
    if log:
      n_skipped = sum(len(v["skipped"]) for v in manifest["chunks"].values())
      log(f"features {dataset.name}: done, {n - n_skipped} images in {out_dir}"
          + (f"; {n_skipped} unreadable images skipped" if n_skipped else ""))
  store = FeatureStore(out_dir)
  store.computed_chunks = computed
  return store


# ----------------------------------------------------------------------------------------------
# Shared by the evaluation commands (`python -m dinov2_jax.eval.knn` / `.linear`).

MODEL_OVERRIDE_FIELDS = ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "num_register_tokens",
                         "interpolate_offset", "interpolate_antialias", "dtype")


def add_common_config(config, *, output_dir: str) -> None:
  """Fields every evaluation config has: model, weights, data, extraction settings, output folder."""
  import ml_collections
  from ml_collections import config_dict

  config.weights = ""  # a weights file for load_backbone; empty: random weights of model.preset
  config.model = ml_collections.ConfigDict()
  config.model.preset = "dinov2_vits14"  # architecture of the random weights when `weights` is empty
  for field, kind in zip(MODEL_OVERRIDE_FIELDS, (int, int, int, int, int, int, float, bool, str)):
    config.model[field] = config_dict.placeholder(kind)  # ViTConfig overrides; None: keep
  config.seed = 0  # random-weights seed
  config.resolution = 224
  config.resize_size = 0  # 0: resolution * 256 / 224 (Meta's 256 for 224)
  config.dataset = ml_collections.ConfigDict()
  config.dataset.name = "demo"  # "demo", "folder" or a prepared TFDS name ("imagenet2012")
  config.dataset.data_dir = ""  # folder root / TFDS data dir ("" = TFDS default)
  config.dataset.train_split = "train"
  config.dataset.eval_split = "test"
  config.dataset.image_key = "image"
  config.dataset.label_key = "label"
  config.dataset.train_limit = 0  # >0: a fixed random subset of that many images (quick runs)
  config.dataset.eval_limit = 0
  config.batch_size = 64  # images per extraction step, over all devices
  config.chunk_size = 4096  # images per feature file (the resume granularity)
  config.num_workers = 0  # decoding threads; 0 = CPU count
  config.feature_dtype = "float32"
  config.output_dir = output_dir


def backbone_from_config(config):
  """The `Backbone` named by `config.weights` (or random weights of `config.model.preset`)."""
  from dinov2_jax.api import create_pretrained_like, load_backbone
  overrides = {f: config.model[f] for f in MODEL_OVERRIDE_FIELDS if config.model.get(f) is not None}
  if config.weights:
    return load_backbone(config.weights, **overrides)
  return create_pretrained_like(config.model.preset, seed=config.seed, **overrides)


def datasets_from_config(config):
  """The (train, evaluation) `ImageDataset`s named by `config.dataset` (limits applied)."""
  from dinov2_jax.eval import datasets as ds
  d = config.dataset
  kw = dict(data_dir=d.data_dir or None, image_key=d.image_key, label_key=d.label_key)
  train = ds.get_dataset(d.name, d.train_split, **kw)
  test = ds.get_dataset(d.name, d.eval_split, class_names=train.class_names, **kw)
  if list(test.class_names) != list(train.class_names):
    raise ds.DatasetError(f"splits {d.train_split!r} and {d.eval_split!r} have different classes")
  return ds.limit_examples(train, d.train_limit), ds.limit_examples(test, d.eval_limit)


def features_from_config(config, backbone, spec: FeatureSpec, log=log_print) -> tuple[FeatureStore, FeatureStore]:
  """Extracts (or reuses) the train and evaluation split features under `output_dir/features/`."""
  d = config.dataset
  stores = []
  for split, data in zip((d.train_split, d.eval_split), datasets_from_config(config)):
    tag = "".join(ch if ch.isalnum() else "_" for ch in split)
    out = os.path.join(config.output_dir, "features", f"{tag}_blocks{spec.n_last_blocks}")
    stores.append(extract_features(
        backbone, data, out, resolution=config.resolution, resize_size=config.resize_size or None,
        batch_size=config.batch_size, chunk_size=config.chunk_size, spec=spec, dtype=config.feature_dtype,
        num_workers=config.num_workers or None, log=log))
  return stores[0], stores[1]


def markdown_table(rows: list[Mapping[str, Any]], columns: list[str] | None = None) -> str:
  """Rows of dicts -> a GitHub markdown table (floats with 2 decimals)."""
  columns = columns or list(rows[0])
  fmt = lambda v: f"{v:.2f}" if isinstance(v, float) else str(v)  # noqa: E731
  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
  return "\n".join(lines)


def write_report(out_dir: str, name: str, results: Mapping[str, Any], table: str, log=log_print) -> None:
  """Writes `<name>.json` and `<name>.md` to `out_dir` and prints the table."""
  os.makedirs(out_dir, exist_ok=True)
  _write_atomic(os.path.join(out_dir, f"{name}.json"), lambda f: json.dump(results, f, indent=1), mode="w")
  _write_atomic(os.path.join(out_dir, f"{name}.md"), lambda f: f.write(table + "\n"), mode="w")
  if log:
    log(table)
    log(f"results written to {os.path.join(out_dir, name)}.json and .md")


def run_with_config_file(run: Callable[[Any], dict], module: str, config_file: str,
                         argv: Sequence[str] | None = None) -> dict:
  """`python -m <module> --config <config_file> [--config.FIELD=VALUE ...]` -> `run(config)`.

  Uses private absl flags so an entry point can run twice in one process (tests, notebooks).
  """
  from absl import flags
  from ml_collections import config_flags
  argv = list(argv if argv is not None else sys.argv)
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, f"a {os.path.basename(config_file)} config file",
                                  flag_values=flag_values, lock_config=True, sys_argv=argv)
  flag_values(argv)
  if flag_values.config is None:
    raise SystemExit(f"usage: python -m {module} --config {config_file} [--config.FIELD=VALUE ...]")
  return run(flag_values.config)


def apply_dataset_variant(config, arg) -> None:
  """The `:demo` (default) / `:imagenet` variants shared by configs/eval_knn.py and eval_linear.py."""
  if arg in (None, "", "demo"):
    config.resolution = 56
  elif arg == "imagenet":
    config.dataset.name = "imagenet2012"
    config.dataset.eval_split = "validation"
    config.batch_size = 256
    config.chunk_size = 16384
  else:
    raise ValueError(f"unknown config variant {arg!r}; use demo or imagenet")
