"""Meta's weighted k-NN evaluation of frozen features, and its command.

The protocol (Meta's `dinov2/eval/knn.py`): L2-normalise the final CLS features of train and test
images; for each test image take the 200 most similar (dot product) train images; weight them by
`softmax(similarity / 0.07)` over those 200; for each k in {10, 20, 100, 200}, a class's score is
the sum of the weights of its neighbours among the first k (not renormalised); report top-1 and
top-5 accuracy.

The train bank is streamed in fixed-size chunks (host -> device once per chunk): a jitted step takes
the chunk's top-k for every query and merges it with the running top-k. Queries are split over the
devices (a 1-D "data" mesh, `shard_map`) and processed in blocks inside the step, so memory is
bounded by (query block x bank chunk) similarities whatever the bank size (1.28M x 1536 works).

Ties: the merge keeps earlier bank rows first among equal similarities. Accuracy counts a class
score tie with the true class as a miss ("pessimistic"): top-k is correct iff fewer than k other
classes score >= the true class. Meta's `torch.topk` leaves ties unspecified; with continuous
features they do not occur, except among zero-score classes when the true class has none, where
Meta's result would depend on torch's tie order and ours is always a miss.

Multi-host: the features are extracted by all processes together; the protocol then runs on each
process's own devices (every process computes the same result; process 0 writes it).

The command (the recipe `dinov2_jax/configs/eval_knn.py` documents the fields and expected results):

  python -m dinov2_jax.eval.knn [--config eval_knn[:imagenet] | --config FILE] [--config.FIELD=VALUE ...]
  python -m dinov2_jax.eval.knn --config.weights=dinov2_vitb14_pretrain.pth \\
      --config.dataset.kind=folder --config.dataset.path=DIR     # DIR/train/<class>/*, DIR/val/<class>/*
  python -m dinov2_jax.eval.knn --help                           # every field and its default
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dinov2_jax.eval import command
from dinov2_jax.eval import config as eval_config
from dinov2_jax.eval import devices
from dinov2_jax.eval import features as F
from dinov2_jax.eval.metrics import topk_correct
from dinov2_jax.eval.progress import Progress, log_print

KS = (10, 20, 100, 200)
TEMPERATURE = 0.07


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """Row-wise x / max(||x||, eps) in float32 (torch's F.normalize)."""
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def class_scores(topk_sims: jax.Array, topk_labels: jax.Array, num_classes: int, ks: Sequence[int] = KS,
                 temperature: float = TEMPERATURE) -> dict[int, jax.Array]:
  """Meta's k-NN vote: {k: (Q, C) scores} from the sorted top-max(ks) neighbours.

  Args:
    topk_sims: (Q, K) float32 similarities, descending; -inf for missing neighbours.
    topk_labels: (Q, K) int32 neighbour labels; -1 for missing neighbours (one-hot of -1 is zero).
  """
  weights = jax.nn.softmax(topk_sims / temperature, axis=1)  # over all max(ks) neighbours, as Meta
  weights = jnp.where(topk_labels >= 0, weights, 0.0)
  labels = jnp.maximum(topk_labels, 0)
  rows = jnp.arange(topk_sims.shape[0])[:, None]
  # A scatter-add instead of Meta's one-hot product: memory (Q, C) instead of (Q, K, C).
  zeros = jnp.zeros((topk_sims.shape[0], num_classes), jnp.float32)
  return {k: zeros.at[rows, labels[:, :k]].add(weights[:, :k]) for k in ks}


def _iter_bank(bank, bank_labels, chunk: int) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
  """Yields (chunk x D float32, chunk int32 labels, valid rows) re-blocked from an array or a list of arrays."""
  parts = list(bank) if isinstance(bank, (list, tuple)) else [bank]
  label_parts = list(bank_labels) if isinstance(bank_labels, (list, tuple)) else [bank_labels]
  buf, buf_labels, size = [], [], 0

  def emit():
    x = np.concatenate(buf).astype(np.float32, copy=False)
    y = np.concatenate(buf_labels).astype(np.int32, copy=False)
    return devices.pad_rows(x, chunk), devices.pad_rows(y, chunk), len(x)

  for part, part_labels in zip(parts, label_parts):
    start = 0
    while start < len(part):
      take = min(chunk - size, len(part) - start)
      buf.append(np.asarray(part[start:start + take]))
      buf_labels.append(np.asarray(part_labels[start:start + take]))
      size, start = size + take, start + take
      if size == chunk:
        yield emit()
        buf, buf_labels, size = [], [], 0
  if size:
    yield emit()


@functools.lru_cache(maxsize=16)
def _merge_step(mesh, k: int, chunk: int, precision: str):
  """The jitted per-chunk step: running top-k (blocks, qb, k) x bank chunk -> new running top-k."""

  def per_device(queries, sims, labels, bank, bank_labels, n_valid):
    bank = l2_normalize(bank)
    valid = jnp.arange(chunk) < n_valid

    def block(args):
      q, s, l = args
      chunk_sims = jnp.dot(q, bank.T, precision=precision)
      chunk_sims = jnp.where(valid[None], chunk_sims, -jnp.inf)
      cs, ci = jax.lax.top_k(chunk_sims, min(k, chunk))
      # Running entries come first, so among equal similarities the earlier bank row wins.
      all_s = jnp.concatenate([s, cs], axis=1)
      all_l = jnp.concatenate([l, bank_labels[ci]], axis=1)
      ts, ti = jax.lax.top_k(all_s, k)
      return ts, jnp.take_along_axis(all_l, ti, axis=1)

    return jax.lax.map(block, (queries, sims, labels))

  step = jax.shard_map(per_device, mesh=mesh, in_specs=(P("data"), P("data"), P("data"), P(), P(), P()),
                       out_specs=(P("data"), P("data")))
  return jax.jit(step, donate_argnums=(1, 2))


def knn_topk(
    queries: np.ndarray,
    bank,
    bank_labels,
    k: int = max(KS),
    *,
    bank_chunk: int = 65536,
    query_block: int = 256,
    mesh: jax.sharding.Mesh | None = None,
    precision: str = "highest",
    log: Callable[[str], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
  """The k most similar bank rows of each query, by dot product of L2-normalised features.

  Args:
    queries: (Q, D) features (normalised here).
    bank: (N, D) features, or a list of (n_i, D) chunks (e.g. `FeatureStore.chunks("cls")`); read
      `bank_chunk` rows at a time, so it may be memory-mapped and larger than memory.
    bank_labels: (N,) int labels, or a list of chunks matching `bank`.
    k: neighbours to keep; k > N keeps N real neighbours plus (-inf, -1) fillers.
    bank_chunk: bank rows per device step (all devices see the whole chunk).
    query_block: queries per matmul inside a step, per device.
    mesh: 1-D "data" mesh over which the queries are split (default: this process's devices).
    precision: matmul precision ("highest": exact float32 similarities also on TF32/bf16 hardware).

  Returns:
    (Q, k) float32 similarities, descending, and (Q, k) int32 labels.
  """
  mesh = mesh or devices.local_mesh()
  q = np.asarray(queries, np.float32)
  n_q = len(q)
  query_block = max(1, min(query_block, -(-n_q // mesh.size)))
  padded = devices.round_up(max(n_q, 1), mesh.size * query_block)
  shard = NamedSharding(mesh, P("data"))
  blocks = padded // query_block
  q_dev = jax.device_put(devices.pad_rows(q, padded).reshape(blocks, query_block, -1), shard)
  q_dev = jax.jit(l2_normalize, out_shardings=shard)(q_dev)
  sims = jax.device_put(np.full((blocks, query_block, k), -np.inf, np.float32), shard)
  labels = jax.device_put(np.full((blocks, query_block, k), -1, np.int32), shard)
  n_bank = sum(len(b) for b in bank) if isinstance(bank, (list, tuple)) else len(bank)
  bank_chunk = max(1, min(bank_chunk, n_bank))
  step = _merge_step(mesh, k, bank_chunk, precision)
  replicated = NamedSharding(mesh, P())
  progress = Progress(n_bank, "k-NN bank", unit="rows", log=log)
  chunks = _iter_bank(bank, bank_labels, bank_chunk)
  put = lambda c: None if c is None else (*jax.device_put(c[:2], replicated), c[2])  # noqa: E731
  upcoming = put(next(chunks, None))
  while upcoming is not None:
    x, y, n_valid = upcoming
    sims, labels = step(q_dev, sims, labels, x, y, jnp.int32(n_valid))
    # The next chunk is read and copied while this step runs; then wait, so that at most two
    # chunks are ever on the device however large the bank.
    upcoming = put(next(chunks, None))
    sims.block_until_ready()
    progress.update(n_valid)
  sims, labels = jax.device_get((sims, labels))
  return sims.reshape(padded, k)[:n_q], labels.reshape(padded, k)[:n_q]


@functools.partial(jax.jit, static_argnames=("num_classes", "ks", "temperature"))
def _accuracy_counts(topk_sims, topk_labels, labels, valid, *, num_classes, ks, temperature):
  scores = class_scores(topk_sims, topk_labels, num_classes, ks, temperature)
  out = {}
  for k, s in scores.items():
    out[k] = (jnp.sum(topk_correct(s, labels, 1) & valid), jnp.sum(topk_correct(s, labels, 5) & valid),
              jnp.argmax(s, axis=1))
  return out


def knn_evaluate(
    train_features,
    train_labels,
    test_features: np.ndarray,
    test_labels: np.ndarray,
    num_classes: int,
    *,
    ks: Sequence[int] = KS,
    temperature: float = TEMPERATURE,
    batch: int = 256,
    **topk_kwargs,
) -> dict:
  """Meta's k-NN protocol. Features are L2-normalised here.

  Args:
    train_features, train_labels: the bank ((N, D) and (N,), or lists of chunks; see `knn_topk`).
    test_features, test_labels: (Q, D) and (Q,).
    num_classes: C.
    ks: the k values (the top-max(ks) neighbours are found once and shared).
    temperature: softmax temperature of the neighbour weights.
    batch: queries per scoring call.
    **topk_kwargs: `bank_chunk`, `query_block`, `mesh`, `precision`, `log` for `knn_topk`.

  Returns:
    {"k": {k: {"top1": %, "top5": %}}, "predictions": {k: (Q,) int32 top-1 class}, "num_queries": Q,
     "num_train": N}.
  """
  ks = tuple(sorted(int(k) for k in ks))
  sims, nbr_labels = knn_topk(test_features, train_features, train_labels, max(ks), **topk_kwargs)
  test_labels = np.asarray(test_labels, np.int32)
  top1 = dict.fromkeys(ks, 0)
  top5 = dict.fromkeys(ks, 0)
  preds: dict[int, list] = {k: [] for k in ks}
  n_q = len(test_labels)
  for start in range(0, n_q, batch):
    stop = min(start + batch, n_q)
    rows = devices.round_up(stop - start, 8) if n_q > batch else stop - start  # few distinct shapes
    pad = lambda a: devices.pad_rows(a[start:stop], rows)  # noqa: E731
    valid = np.arange(rows) < stop - start
    counts = _accuracy_counts(pad(sims), pad(nbr_labels), pad(test_labels), valid, num_classes=num_classes,
                              ks=ks, temperature=temperature)
    for k, (c1, c5, p) in jax.device_get(counts).items():
      top1[k] += int(c1)
      top5[k] += int(c5)
      preds[k].append(np.asarray(p[:stop - start], np.int32))
  n_train = sum(len(b) for b in train_labels) if isinstance(train_labels, (list, tuple)) else len(train_labels)
  return {
      "k": {k: {"top1": 100.0 * top1[k] / max(n_q, 1), "top5": 100.0 * top5[k] / max(n_q, 1)} for k in ks},
      "predictions": {k: np.concatenate(preds[k]) if preds[k] else np.zeros((0,), np.int32) for k in ks},
      "num_queries": n_q,
      "num_train": n_train,
  }


# ----------------------------------------------------------------------------------------------
# The command.


def run(config, log=log_print) -> dict:
  """Extracts (or reuses) features, runs the k-NN protocol and writes `knn_results.{json,md}`.

  Returns the results dict (also in every process of a multi-host run).
  """
  t0 = time.perf_counter()
  out_dir = eval_config.output_dir(config, "knn")
  resolution, why = eval_config.resolution(config)
  backbone = eval_config.backbone_from_config(config)
  eval_config.check_resolution(resolution, backbone.config.patch_size)
  if log:
    log(f"k-NN: {config.weights or 'random ' + config.model.preset + ' weights'}, {config.dataset.kind} data, "
        f"{resolution} px ({why}); output in {out_dir}")
  # k-NN needs only the final CLS token; no intermediate blocks are stored.
  train, test = command.features_from_config(config, backbone, F.FeatureSpec(n_last_blocks=0), out_dir, resolution,
                                              log=log)
  num_classes = len(train.class_names)
  result = knn_evaluate(
      train.chunks("cls"), train.chunks("labels"), test.load("cls"), test.labels, num_classes,
      ks=tuple(config.knn.ks), temperature=config.knn.temperature, bank_chunk=config.knn.bank_chunk,
      query_block=config.knn.query_block, log=log)
  rows = [{"k": k, "top-1": m["top1"], "top-5": m["top5"]} for k, m in result["k"].items()]
  header = (f"k-NN (T={config.knn.temperature}) on {config.dataset.kind} data: {result['num_train']} train / "
            f"{result['num_queries']} eval images, {num_classes} classes, "
            f"{config.weights or 'random ' + config.model.preset} at {resolution}px")
  results = {
      "protocol": "knn",
      "weights": config.weights or None,
      "model": dataclasses.asdict(backbone.config),
      "dataset": config.dataset.to_dict(),
      "splits": dict(zip(("train", "eval"), eval_config.splits(config))),
      "resolution": resolution,
      "temperature": config.knn.temperature,
      "num_train": result["num_train"],
      "num_eval": result["num_queries"],
      **command.data_summary(train, test),
      "results": {str(k): m for k, m in result["k"].items()},
      "best": max(({"k": k, **m} for k, m in result["k"].items()), key=lambda r: r["top1"]),
      "elapsed_s": round(time.perf_counter() - t0, 1),
  }
  command.write_report(out_dir, "knn_results", results, f"{header}\n\n{command.markdown_table(rows)}", log=log)
  return results


def main(argv: Sequence[str] | None = None) -> None:
  """Entry point: `python -m dinov2_jax.eval.knn [--config RECIPE_OR_FILE] [--config.FIELD=VALUE ...]`."""
  command.run_command(run, __doc__, "eval_knn", argv)


if __name__ == "__main__":
  main()
