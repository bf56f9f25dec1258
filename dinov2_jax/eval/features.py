"""Frozen-backbone features for the evaluations: batched, sharded over all devices (of every process),
chunked on disk (`dinov2_jax/eval/store.py`), resumable, and keyed by what they were computed from.

One backbone pass per image gives everything the protocols use (all normed by the final LayerNorm,
as Meta's `get_intermediate_layers(norm=True)` and `forward_features`):

  cls         (N, D)     the final CLS token (Meta's `model(x)`; k-NN's input before L2-normalising)
  patch_mean  (N, D)     mean of the last block's patch tokens (registers excluded)
  cls_blocks  (N, n, D)  CLS tokens of the last n blocks, oldest first (linear protocol), if n > 0
  registers   (N, R, D)  the final register tokens, if asked for
  labels      (N,)       int32 class ids;  index (N,) int64: the dataset index of each row

Images go through Meta's evaluation transform (resize the shorter side to resolution * 256/224,
bicubic, centre crop, ImageNet normalisation) in host threads, are batched (a fixed global batch,
padded, then trimmed) and run on a 1-D "data" mesh over all devices with the weights replicated.

Multi-process (multi-host) runs: every process runs the same call. Each one reads and preprocesses
only the rows of each batch that its own devices hold, the global batch is assembled from those
pieces, and the features come back whole to every process, so all of them return the same store.
Only process 0 writes files; `out_dir` must be a folder every process sees (as checkpoints are).

The cache key (kept in the store's manifest) is the data's content (`content_fingerprint()` of the
dataset: for a folder, every file's path, size, modification time and label), the preprocessing and
the exact weights. A rerun with the same key reuses or resumes the store and says so; with another
key it stops with an error naming what changed, or recomputes (`on_mismatch="recompute"`, what the
evaluation commands do).
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
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dinov2_jax.data.eval_transform import eval_transform
from dinov2_jax.eval import devices
from dinov2_jax.eval import store as store_lib
from dinov2_jax.eval.progress import Progress, log_print
from dinov2_jax.eval.store import FeatureCacheMismatch, FeatureStore  # noqa: F401  (re-exported)
from dinov2_jax.models.vit import check_image_shape

# Names the evaluation transform in cache keys; change it when `eval_transform` changes its output.
TRANSFORM_ID = "meta_eval: shorter side to resize_size (PIL bicubic), centre crop, ImageNet mean/std"


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
  """A function (B, H, W, 3) float32 images -> dict of features (jax arrays split over "data").

  The images are a numpy array (single process) or a global jax array split over the mesh's
  "data" axis (`devices.global_batch`); B must be a multiple of the mesh size. The weights are
  replicated on every device.
  """
  mesh = mesh or devices.data_mesh()
  batch_sharding = NamedSharding(mesh, P("data"))
  graphdef = backbone.graphdef
  params = devices.replicated(mesh, backbone.params)

  @functools.partial(jax.jit, out_shardings=batch_sharding)
  def run(params, images):
    return backbone_features(nnx.merge(graphdef, params), images, spec.n_last_blocks, spec.registers)

  def fn(images) -> dict[str, jax.Array]:
    if len(images) % mesh.size:
      raise ValueError(f"batch {len(images)} is not a multiple of the {mesh.size} devices; pad it")
    if isinstance(images, np.ndarray):
      images = devices.global_batch(mesh, images, len(images))
    return run(params, images)

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


def data_fingerprint(dataset) -> str:
  """The dataset's `content_fingerprint()`: what makes cached features stale when the data changes."""
  fingerprint = getattr(dataset, "content_fingerprint", None)
  if fingerprint is None:
    raise TypeError(f"{type(dataset).__name__} has no content_fingerprint(); the feature cache needs one to "
                    "notice changed data (see dinov2_jax/eval/datasets.py)")
  return fingerprint()


def cache_key(backbone, dataset, *, resolution: int, resize_size: int, spec: FeatureSpec, dtype: str,
              chunk_size: int) -> dict:
  """What features are computed from: the data, the preprocessing, the weights, the feature settings."""
  return {
      "data": {"name": dataset.name, "num_examples": len(dataset), "class_names": list(dataset.class_names),
               "content": data_fingerprint(dataset)},
      "preprocessing": {"transform": TRANSFORM_ID, "resolution": resolution, "resize_size": resize_size},
      "model": model_fingerprint(backbone),
      "features": {"spec": dataclasses.asdict(spec), "dtype": dtype, "chunk_size": chunk_size},
  }


def _load_one(dataset, index: int, transform) -> tuple[np.ndarray | None, int]:
  image, label = dataset.load(index)
  return (None if image is None else transform(image)), label


def _prefetch(dataset, batches: list, transform, pool, lookahead: int):
  """Yields `(batch, [(image, label), ...])` for this process's rows, decoding `lookahead` batches ahead."""
  queue: collections.deque = collections.deque()
  it = iter(batches)

  def submit():
    batch = next(it, None)
    if batch is not None:
      queue.append((batch, [pool.submit(_load_one, dataset, int(i), transform) for i in batch[2]]))

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
    on_mismatch: str = "error",
    log: Callable[[str], None] | None = log_print,
    on_chunk: Callable[[int], None] | None = None,
) -> FeatureStore:
  """Extracts features of every image of `dataset` into `out_dir`, reusing or resuming a previous run.

  Args:
    backbone: a `Backbone`, or a weights path for `dinov2_jax.load_backbone`.
    dataset: an `ImageDataset` (`dinov2_jax.eval.datasets`), with `content_fingerprint()`.
    out_dir: the output folder (created). In a multi-process run, one that every process sees.
    resolution: crop side in pixels; a multiple of the patch size.
    resize_size: shorter side before the centre crop (default resolution * 256 / 224, Meta's).
    batch_size: images per forward pass over all devices; rounded up to a multiple of the device count.
    chunk_size: images per file (and per resume step). Part of the cache key.
    spec: which features to keep.
    dtype: storage dtype, "float32" or "float16" (halves the disk for very large datasets).
    num_workers: host threads decoding and transforming images (default: CPU count).
    mesh: a 1-D "data" mesh (default: all devices of all processes).
    overwrite: discard whatever `out_dir` holds instead of reusing it.
    on_mismatch: `out_dir` holds features computed from other data, preprocessing or weights:
      "error" (default) raises `FeatureCacheMismatch` naming what changed, "recompute" says so and
      starts afresh.
    log: progress printer (None: silent).
    on_chunk: called with the chunk id after each chunk is safely on disk.

  Returns:
    The `FeatureStore` (the same in every process). Its `computed_chunks` lists what this call computed.
  """
  if isinstance(backbone, (str, os.PathLike)):
    from dinov2_jax.api import load_backbone
    backbone = load_backbone(backbone)
  check_image_shape((1, resolution, resolution, 3), backbone.config.patch_size)
  resize_size = resize_size or round(resolution * 256 / 224)
  out_dir = os.fspath(out_dir)
  writer = jax.process_index() == 0
  n, chunk_size = len(dataset), int(chunk_size)
  num_chunks = math.ceil(n / chunk_size)
  key = cache_key(backbone, dataset, resolution=resolution, resize_size=resize_size, spec=spec, dtype=dtype,
                  chunk_size=chunk_size)
  # Every process reads the folder and takes the same decision before process 0 changes anything.
  manifest, reset = store_lib.plan_manifest(out_dir, key, num_chunks, dataset.class_names, overwrite=overwrite,
                                            on_mismatch=on_mismatch)
  devices.barrier(f"features-plan-{out_dir}")
  if writer:
    if reset:
      if log:
        log(f"{out_dir}: {reset}; recomputing")
      store_lib.reset_store(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    store_lib.save_manifest(out_dir, manifest)
  todo = [c for c in range(num_chunks) if str(c) not in manifest["chunks"]]
  computed: list[int] = []
  if not todo and log:
    log(f"features {dataset.name}: reusing the {manifest['num_chunks']} cached chunks in {out_dir} (computed from "
        "the same data, preprocessing and weights)")
  if todo:
    mesh = mesh or devices.data_mesh()
    fn = make_feature_fn(backbone, spec, mesh)
    global_rows = devices.round_up(batch_size, mesh.size)
    mine = devices.rows_of_this_process(mesh, global_rows)
    local_rows = mine.stop - mine.start
    transform = functools.partial(eval_transform, crop_size=resolution, resize_size=resize_size)
    batches = []
    for c in todo:
      idx = np.arange(c * chunk_size, min((c + 1) * chunk_size, n))
      for i in range(0, len(idx), global_rows):
        rows = idx[i:i + global_rows]
        batches.append((c, rows, rows[mine]))  # (chunk, the batch's dataset indices, this process's share)
    if log and len(todo) < num_chunks:
      log(f"features {dataset.name}: resuming in {out_dir}, {num_chunks - len(todo)}/{num_chunks} chunks already "
          "done (same data, preprocessing and weights)")
    progress = Progress(sum(len(b[1]) for b in batches), f"features {dataset.name}", log=log)
    workers = num_workers or os.cpu_count() or 1
    parts: dict[str, list] = collections.defaultdict(list)
    skipped: list[int] = []
    in_flight = None  # the previous batch's device outputs: fetched while the next one computes
    image_shape = (resolution, resolution, 3)

    def fetch(pending):
      outputs, meta = devices.to_host(pending)
      valid = meta[:, 0] == 1
      present = meta[:, 2] >= 0
      skipped.extend(int(i) for i in meta[present & ~valid, 2])
      for name, value in outputs.items():
        parts[name].append(np.asarray(value[valid], dtype))
      parts["labels"].append(meta[valid, 1].astype(np.int32))
      parts["index"].append(meta[valid, 2].astype(np.int64))

    def write_chunk(c):
      for name, values in parts.items():
        array = np.concatenate(values)
        if name not in ("labels", "index"):
          manifest["features"][name] = {"shape": list(array.shape[1:]), "dtype": dtype}
        if writer:
          store_lib.write_atomic(os.path.join(out_dir, f"{name}-{c:05d}.npy"), lambda f, a=array: np.save(f, a))
      manifest["chunks"][str(c)] = {"rows": int(sum(map(len, parts["labels"]))), "skipped": sorted(skipped)}
      if writer:
        store_lib.save_manifest(out_dir, manifest)
      computed.append(c)
      parts.clear()
      skipped.clear()
      if on_chunk:
        on_chunk(c)

    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
      for pos, ((c, idx, my_idx), items) in enumerate(_prefetch(dataset, batches, transform, pool, lookahead=2)):
        images = np.zeros((local_rows,) + image_shape, np.float32)
        # Per row: readable (1/0), label, dataset index (-1 for padding). Assembled like the images,
        # so every process learns every row's fate.
        meta = np.full((local_rows, 3), -1, np.int64)
        meta[:, 0] = 0
        for j, (image, label) in enumerate(items):
          meta[j] = (image is not None, label, my_idx[j])
          if image is not None:
            images[j] = image
        pending = (fn(devices.global_batch(mesh, images, global_rows)),
                   devices.global_batch(mesh, meta, global_rows))
        if in_flight is not None:
          fetch(in_flight)
        in_flight = pending
        progress.update(len(idx))
        if pos + 1 == len(batches) or batches[pos + 1][0] != c:
          fetch(in_flight)
          in_flight = None
          write_chunk(c)
    if log:
      n_skipped = sum(len(v["skipped"]) for v in manifest["chunks"].values())
      log(f"features {dataset.name}: done, {n - n_skipped} images in {out_dir}"
          + (f"; {n_skipped} unreadable images skipped" if n_skipped else ""))
  devices.barrier(f"features-done-{out_dir}")  # the files are on disk before any process reads them
  store = FeatureStore(out_dir)
  store.computed_chunks = computed
  return store
