"""Meta's linear-probe evaluation of frozen features (52 classifiers trained at once), and its command.

The protocol (Meta's `dinov2/eval/linear.py`): a linear layer on frozen features, for every
combination of
  * the normed CLS tokens of the last n in {1, 4} blocks (concatenated, oldest first),
  * with or without the mean of the last block's (normed) patch tokens appended ("avgpool"),
  * 13 learning rates {1e-5, ..., 0.1}, each scaled by batch / 256,
so 52 classifiers, trained simultaneously in ONE compiled step on the same batches: the loss is the
sum of their mean cross-entropies (so their gradients are independent), SGD with momentum 0.9, no
weight decay, a cosine learning rate from lr to 0 over all iterations, weights N(0, 0.01), bias 0.
The classifier with the best top-1 on a validation split is reported.

Implementation: the 52 classifiers form 4 groups sharing an input (n, avgpool); each group's 13
weight matrices are one stacked (13, in, C) tensor, so a group's forward pass is one batched matmul.
Batches are split over a 1-D "data" mesh of this process's devices (weights replicated, gradients
all-reduced).

Differences from Meta, all switchable to Meta's behaviour:
  * Selection: by default the best classifier is chosen on a held-out 10% of the TRAIN split
    (class-stratified, fixed seed), then (refit=True) retrained on the whole train split and
    evaluated once on the evaluation split. Meta selects on the evaluation split itself, which
    over-states the result; `selection="eval"` does that.
  * By default the classifiers train on features computed once with the evaluation transform
    (resize + centre crop) and reused every epoch, instead of Meta's RandomResizedCrop + flip with
    a backbone pass per step. That is about `epochs` x cheaper (one backbone pass per image instead
    of one per image per epoch) and lets the 52 classifiers train in seconds to minutes; the cost is
    the missing augmentation, a regulariser, so accuracy can differ slightly from Meta's (not
    measured here on ImageNet). `augment=True` (`linear_augment.AugmentedImages`) is Meta's setting.

The iteration budget is Meta's, epochs x epoch_length = 10 x 1250, whatever the dataset size: a
budget of one pass per epoch leaves the classifiers far from converged on small datasets (30 steps
on 420 images gave 77% where scikit-learn's LogisticRegression on the same features gives 86%).
  * Features are computed in float32 by default; Meta uses fp16 autocast (`--config.model.dtype=bfloat16`
    is the nearest setting here).

Multi-host: the features are extracted by all processes together; the classifiers are then trained
on each process's own devices (every process computes the same result; process 0 writes it).

The command (the recipe `dinov2_jax/configs/eval_linear.py` documents the fields and expected results):

  python -m dinov2_jax.eval.linear [--config eval_linear[:imagenet] | --config FILE] [--config.FIELD=VALUE ...]
  python -m dinov2_jax.eval.linear --config.weights=dinov2_vitb14_pretrain.pth \\
      --config.dataset.kind=folder --config.dataset.path=DIR     # DIR/train/<class>/*, DIR/val/<class>/*
  python -m dinov2_jax.eval.linear --help                        # every field and its default
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dinov2_jax.eval import command
from dinov2_jax.eval import config as eval_config
from dinov2_jax.eval import devices
from dinov2_jax.eval.features import FeatureSpec
from dinov2_jax.eval.linear_augment import AugmentedImages
from dinov2_jax.eval.metrics import topk_correct
from dinov2_jax.eval.progress import Progress, log_print

LEARNING_RATES = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 1e-1)
MOMENTUM = 0.9
INIT_STD = 0.01
SELECTIONS = ("heldout", "eval")
# Meta's iteration budget: epochs x epoch_length iterations, independent of the dataset size.
EPOCHS = 10
EPOCH_LENGTH = 1250


@dataclasses.dataclass(frozen=True)
class ClassifierSpec:
  """One linear classifier of the grid.

  Attributes:
    n_blocks: CLS tokens of the last n blocks in the input.
    avgpool: append the mean patch token of the last block.
    lr: base learning rate, before the batch / 256 scaling.
  """

  n_blocks: int
  avgpool: bool
  lr: float

  @property
  def name(self) -> str:
    """Meta's name, e.g. `classifier_4_blocks_avgpool_True_lr_0_00100`."""
    return f"classifier_{self.n_blocks}_blocks_avgpool_{self.avgpool}_lr_{self.lr:.5f}".replace(".", "_")

  def input_dim(self, embed_dim: int) -> int:
    return (self.n_blocks + self.avgpool) * embed_dim


def classifier_grid(n_last_blocks: Sequence[int] = (1, 4), avgpool: Sequence[bool] = (False, True),
                    learning_rates: Sequence[float] = LEARNING_RATES) -> list[ClassifierSpec]:
  """The grid in Meta's order (blocks, then avgpool, then lr): ties in selection go to the first."""
  return [ClassifierSpec(int(n), bool(a), float(lr)) for n in n_last_blocks for a in avgpool for lr in learning_rates]


def linear_input(cls_blocks: jax.Array, patch_mean: jax.Array, n_blocks: int, avgpool: bool) -> jax.Array:
  """Meta's `create_linear_input`: (B, m, D) CLS tokens (oldest first), (B, D) patch mean -> (B, in).

  cat[cls_{-n}, ..., cls_{-1}] (+ patch_mean): exactly the input of `dinov2_jax.api.Classifier`
  (and of Meta's released linear heads) when avgpool is True.
  """
  parts = [cls_blocks[:, -n_blocks:].reshape(cls_blocks.shape[0], -1)]
  if avgpool:
    parts.append(patch_mean)
  return jnp.concatenate(parts, axis=-1).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class _Group:
  """Classifiers sharing an input: `members` index into the spec list."""

  key: str
  n_blocks: int
  avgpool: bool
  members: tuple[int, ...]


def _groups(specs: Sequence[ClassifierSpec]) -> tuple[_Group, ...]:
  by_input: dict[tuple[int, bool], list[int]] = {}
  for i, s in enumerate(specs):
    by_input.setdefault((s.n_blocks, s.avgpool), []).append(i)
  return tuple(_Group(f"blocks{n}_avgpool{a}", n, a, tuple(m)) for (n, a), m in by_input.items())


@dataclasses.dataclass
class LinearClassifiers:
  """A trained grid: `params[group.key] = {"w": (G, in, C), "b": (G, C)}` (numpy)."""

  specs: list[ClassifierSpec]
  params: dict[str, dict[str, np.ndarray]]
  num_classes: int
  embed_dim: int

  def spec(self, name: str) -> ClassifierSpec:
    for s in self.specs:
      if s.name == name:
        return s
    raise KeyError(f"no classifier {name!r}")

  def head(self, name: str) -> dict[str, np.ndarray]:
    """Meta's linear-head format: {"weight": (C, in), "bias": (C,)} float32."""
    index = [s.name for s in self.specs].index(name)
    for g in _groups(self.specs):
      if index in g.members:
        j = g.members.index(index)
        p = self.params[g.key]
        return {"weight": np.ascontiguousarray(p["w"][j].T, np.float32), "bias": np.asarray(p["b"][j], np.float32)}
    raise KeyError(name)

  def save_head(self, name: str, path: str) -> None:
    """Writes one classifier as a Meta linear head (.pth or .safetensors).

    With avgpool True and n_blocks 1 or 4, `dinov2_jax.load_classifier(backbone, path)` reproduces
    its logits from images (Meta's `linear_head` / `linear4_head` input layout).
    """
    from dinov2_jax.weights.io import write_state_dict
    write_state_dict(self.head(name), path)

  def logits(self, name: str, cls_blocks: np.ndarray, patch_mean: np.ndarray) -> np.ndarray:
    """(B, C) logits of one classifier on features."""
    s, h = self.spec(name), self.head(name)
    x = np.asarray(linear_input(jnp.asarray(cls_blocks), jnp.asarray(patch_mean), s.n_blocks, s.avgpool))
    return x @ h["weight"].T + h["bias"]


def init_params(seed: int, specs: Sequence[ClassifierSpec], embed_dim: int, num_classes: int) -> dict:
  """Meta's `LinearClassifier` init: weight N(0, 0.01), bias 0, one stacked (G, in, C) tensor per group.

  Drawn with numpy on the host: an eager `jax.random.normal` compiles a kernel per shape (seconds on CPU).
  """
  rng = np.random.default_rng(seed)
  params = {}
  for g in _groups(specs):
    d = specs[g.members[0]].input_dim(embed_dim)
    params[g.key] = {"w": (INIT_STD * rng.standard_normal((len(g.members), d, num_classes))).astype(np.float32),
                     "b": np.zeros((len(g.members), num_classes), np.float32)}
  return params


def _group_logits(params: dict, groups: tuple[_Group, ...], cls_blocks, patch_mean) -> dict[str, jax.Array]:
  """{group key: (G, B, C) logits}."""
  out = {}
  for g in groups:
    x = linear_input(cls_blocks, patch_mean, g.n_blocks, g.avgpool)
    p = params[g.key]
    out[g.key] = jnp.einsum("bi,gic->gbc", x, p["w"]) + p["b"][:, None]
  return out


@functools.lru_cache(maxsize=8)
def _train_step(groups: tuple[_Group, ...], mesh):
  """jit(step)(params, momentum, lrs, cls_blocks, patch_mean, labels, lr_factor) -> (params, momentum, loss)."""
  replicated, batch = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))

  def loss_fn(params, cls_blocks, patch_mean, labels):
    logits = _group_logits(params, groups, cls_blocks, patch_mean)
    # Sum over classifiers of each one's mean CE: the classifiers' gradients stay independent.
    return sum(optax.softmax_cross_entropy_with_integer_labels(l, labels[None]).mean(axis=1).sum()
               for l in logits.values())

  def step(params, momentum, lrs, cls_blocks, patch_mean, labels, lr_factor):
    loss, grads = jax.value_and_grad(loss_fn)(params, cls_blocks, patch_mean, labels)
    # torch.optim.SGD(momentum=0.9, dampening=0, weight_decay=0): buf = 0.9 buf + g; p -= lr buf.
    momentum = jax.tree.map(lambda m, g: MOMENTUM * m + g, momentum, grads)
    def update(path_key, p, m):
      lr = lrs[path_key] * lr_factor
      return p - lr.reshape((-1,) + (1,) * (p.ndim - 1)) * m
    params = {k: {n: update(k, params[k][n], momentum[k][n]) for n in params[k]} for k in params}
    return params, momentum, loss

  return jax.jit(step, donate_argnums=(0, 1),
                 in_shardings=(replicated, replicated, replicated, batch, batch, batch, replicated),
                 out_shardings=(replicated, replicated, replicated))


def cosine_factor(step: int, total: int) -> float:
  """torch's CosineAnnealingLR(T_max=total, eta_min=0), stepped after every iteration."""
  return 0.5 * (1.0 + math.cos(math.pi * step / total))


def _batch_stream(indices: np.ndarray, batch_size: int, rng: np.random.Generator):
  """Endless full batches from reshuffled passes over `indices` (Meta's infinite sampler)."""
  buf = np.zeros((0,), np.int64)
  while True:
    while len(buf) < batch_size:
      buf = np.concatenate([buf, rng.permutation(indices)])
    yield buf[:batch_size]
    buf = buf[batch_size:]


class PrecomputedFeatures:
  """Batches gathered from precomputed feature arrays (numpy, memory-mapped or `ChunkedArray`)."""

  def __init__(self, features: Mapping[str, np.ndarray]):
    self.cls_blocks, self.patch_mean = features["cls_blocks"], features["patch_mean"]
    self.n_blocks, self.embed_dim = self.cls_blocks.shape[1], self.cls_blocks.shape[-1]

  def batch(self, rows: np.ndarray, step: int, n_blocks: int):
    del step
    return (np.asarray(self.cls_blocks[rows][:, -n_blocks:], np.float32),
            np.asarray(self.patch_mean[rows], np.float32))


def train_linear(
    features,
    labels: np.ndarray,
    num_classes: int,
    specs: Sequence[ClassifierSpec] | None = None,
    *,
    indices: np.ndarray | None = None,
    batch_size: int = 1024,
    epochs: int = EPOCHS,
    epoch_length: int = EPOCH_LENGTH,
    seed: int = 0,
    mesh: jax.sharding.Mesh | None = None,
    log: Callable[[str], None] | None = log_print,
) -> LinearClassifiers:
  """Trains all classifiers of `specs` at once, in one compiled step, on frozen features.

  Args:
    features: a mapping with `cls_blocks` (N, m, D) (m >= the largest n_blocks) and `patch_mean`
      (N, D) float; numpy, memory-mapped or `ChunkedArray` (rows are gathered per batch). Or a batch
      source with `batch(rows, step, n_blocks)`, `n_blocks` and `embed_dim`, e.g.
      `linear_augment.AugmentedImages`, which computes each batch's features from augmented images.
    labels: (N,) int class ids.
    num_classes: C.
    specs: the classifiers (default: Meta's 52).
    indices: the rows to train on (default: all), e.g. the train part of a held-out split.
    batch_size: global batch (rounded up to a multiple of the device count); lrs scale by batch/256.
    epochs, epoch_length: iterations = epochs * epoch_length, Meta's 10 x 1250 by default, whatever
      the number of rows (batches are drawn from reshuffled passes over the rows).
    seed: initialisation and sampling seed.
    mesh: a 1-D "data" mesh (default: this process's devices; every process trains the same).

  Returns:
    `LinearClassifiers` (numpy weights).
  """
  specs = list(specs or classifier_grid())
  mesh = mesh or devices.local_mesh()
  indices = np.arange(len(labels)) if indices is None else np.asarray(indices)
  batch_size = devices.round_up(batch_size, mesh.size)
  if epochs < 1 or epoch_length < 1:
    raise ValueError(f"epochs={epochs} and epoch_length={epoch_length} must be >= 1 (iterations = their product)")
  total = epochs * epoch_length
  m = max(s.n_blocks for s in specs)
  source = PrecomputedFeatures(features) if isinstance(features, Mapping) else features
  if source.n_blocks < m:
    raise ValueError(f"classifiers use the last {m} blocks but the features hold {source.n_blocks}")
  embed_dim = source.embed_dim
  groups = _groups(specs)
  step = _train_step(groups, mesh)
  replicated, batch_sharding = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  params = init_params(seed, specs, embed_dim, num_classes)
  momentum = jax.device_put(jax.tree.map(np.zeros_like, params), replicated)
  params = jax.device_put(params, replicated)
  scale = batch_size / 256.0  # Meta: lr * batch_size * world_size / 256
  lrs = jax.device_put({g.key: np.asarray([specs[i].lr * scale for i in g.members], np.float32) for g in groups},
                       replicated)
  labels = np.asarray(labels, np.int32)
  stream = _batch_stream(indices, batch_size, np.random.default_rng(seed))
  progress = Progress(total, f"linear ({len(specs)} classifiers, batch {batch_size})", unit="steps", log=log)
  loss = previous = None
  for it in range(total):
    idx = np.sort(next(stream))  # sorted: memory-mapped feature files are read in order
    cls_blocks, patch_mean = source.batch(idx, it, m)
    # Placed explicitly: in a multi-process run jit refuses host arrays for sharded inputs.
    cls_blocks, patch_mean, batch_labels = jax.device_put((cls_blocks, patch_mean, labels[idx]), batch_sharding)
    params, momentum, loss = step(params, momentum, lrs, cls_blocks, patch_mean, batch_labels,
                                  jax.device_put(np.float32(cosine_factor(it, total)), replicated))
    # At most two steps in flight: the next batch is gathered while this one runs, and the host
    # never queues an unbounded number of all-reduces (which deadlocks XLA's CPU collectives).
    if previous is not None:
      previous.block_until_ready()
    previous = loss
    if log and (time.perf_counter() - progress.last >= progress.every_s or it + 1 == total):
      progress.log(f"  step {it + 1}: summed loss {float(loss):.4f} ({float(loss) / len(specs):.4f} per classifier)")
    progress.update(1)
  return LinearClassifiers(specs, jax.device_get(params), num_classes, embed_dim)


@functools.lru_cache(maxsize=8)
def _eval_counts(groups: tuple[_Group, ...]):
  @jax.jit
  def counts(params, cls_blocks, patch_mean, labels, valid):
    out = {}
    for key, logits in _group_logits(params, groups, cls_blocks, patch_mean).items():
      correct = jax.vmap(lambda l: jnp.stack([topk_correct(l, labels, 1), topk_correct(l, labels, 5)]))(logits)
      out[key] = jnp.sum(correct & valid, axis=-1)  # (G, 2): top-1, top-5 counts
    return out
  return counts


def evaluate_linear(clf: LinearClassifiers, features: Mapping[str, np.ndarray], labels: np.ndarray,
                    indices: np.ndarray | None = None, batch: int = 1024) -> dict[str, dict[str, float]]:
  """Top-1/top-5 accuracy (%) of every classifier on `features[indices]`: {name: {"top1", "top5"}}."""
  indices = np.arange(len(labels)) if indices is None else np.asarray(indices)
  groups = _groups(clf.specs)
  fn = _eval_counts(groups)
  m = max(s.n_blocks for s in clf.specs)
  params = jax.device_put(clf.params)
  totals = {g.key: np.zeros((len(g.members), 2), np.int64) for g in groups}
  labels = np.asarray(labels, np.int32)
  for start in range(0, len(indices), batch):
    idx = np.sort(indices[start:start + batch])
    rows = batch if len(indices) > batch else len(idx)
    valid = np.arange(rows) < len(idx)
    c = fn(params, devices.pad_rows(np.asarray(features["cls_blocks"][idx][:, -m:], np.float32), rows),
           devices.pad_rows(np.asarray(features["patch_mean"][idx], np.float32), rows), devices.pad_rows(labels[idx], rows), valid)
    for k, v in jax.device_get(c).items():
      totals[k] += v
  n = max(len(indices), 1)
  out = {}
  for g in groups:
    for j, i in enumerate(g.members):
      out[clf.specs[i].name] = {"top1": float(100.0 * totals[g.key][j, 0] / n),
                                "top5": float(100.0 * totals[g.key][j, 1] / n)}
  return {s.name: out[s.name] for s in clf.specs}


def stratified_split(labels: np.ndarray, fraction: float = 0.1, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """(train, val) sorted row indices: round(fraction * n_c) random rows of each class c go to val, and at
  least one for a class of two or more rows, so that small datasets still select on every class."""
  labels = np.asarray(labels)
  rng = np.random.default_rng(seed)
  val = []
  order = np.argsort(labels, kind="stable")
  _, starts = np.unique(labels[order], return_index=True)
  for members in np.split(order, starts[1:]):
    n_val = int(round(fraction * len(members)))
    if fraction > 0 and len(members) >= 2:
      n_val = max(n_val, 1)
    val.append(rng.permutation(members)[:n_val])
  val = np.sort(np.concatenate(val)) if val else np.zeros((0,), np.int64)
  if len(val) == 0:
    raise ValueError(f"a {fraction:.0%} held-out split of {len(labels)} examples is empty; raise val_fraction")
  train = np.setdiff1d(np.arange(len(labels)), val)
  return train, val


def select_best(scores: Mapping[str, Mapping[str, float]]) -> str:
  """The first classifier (grid order) with the highest top-1, as Meta's strict `>` scan."""
  best, best_top1 = None, -1.0
  for name, m in scores.items():
    if m["top1"] > best_top1:
      best, best_top1 = name, m["top1"]
  return best


def linear_evaluate(
    train_features: Mapping[str, np.ndarray],
    train_labels: np.ndarray,
    eval_features: Mapping[str, np.ndarray],
    eval_labels: np.ndarray,
    num_classes: int,
    *,
    specs: Sequence[ClassifierSpec] | None = None,
    selection: str = "heldout",
    val_fraction: float = 0.1,
    refit: bool = True,
    seed: int = 0,
    train_source=None,
    log: Callable[[str], None] | None = log_print,
    **train_kwargs,
) -> tuple[dict, LinearClassifiers]:
  """The linear protocol: train the grid, select a classifier, evaluate it on the evaluation split.

  Args:
    train_features, eval_features: dicts with `cls_blocks` (N, m, D) and `patch_mean` (N, D).
    train_labels, eval_labels: (N,) int.
    selection: "heldout" (default) picks the best classifier on a class-stratified `val_fraction`
      of the train split, never looking at the evaluation split; "eval" is Meta's behaviour (train
      on the whole train split, pick the best on the evaluation split itself).
    refit: with "heldout", retrain the selected classifier on the whole train split before testing.
    train_source: train on features from this source (e.g. `linear_augment.AugmentedImages`, rows aligned with
      `train_features`) instead of `train_features`; selection and testing still use the
      precomputed (evaluation-transform) features, as Meta evaluates.
    **train_kwargs: `batch_size`, `epochs`, `epoch_length`, `mesh` for `train_linear`.

  Returns:
    (results dict, the classifiers whose `best` is the reported one). results: `best_classifier`,
    `eval` {"top1", "top5"} of it, `selection_scores` {name: {"top1", "top5"}} (held-out or eval
    split, per `selection`), sizes.
  """
  if selection not in SELECTIONS:
    raise ValueError(f"selection={selection!r}; expected one of {SELECTIONS}")
  specs = list(specs or classifier_grid())
  n_train = len(train_labels)
  if selection == "heldout":
    fit_idx, val_idx = stratified_split(train_labels, val_fraction, seed)
    if log:
      log(f"linear: {len(specs)} classifiers on {len(fit_idx)} train rows, selecting on a held-out "
          f"{len(val_idx)} train rows ({val_fraction:.0%}, class-stratified, seed {seed})")
    grid = train_linear(train_source or train_features, train_labels, num_classes, specs, indices=fit_idx,
                        seed=seed, log=log, **train_kwargs)
    scores = evaluate_linear(grid, train_features, train_labels, val_idx)
    best = select_best(scores)
    final = grid
    if refit:
      if log:
        log(f"linear: refitting {best} on all {n_train} train rows")
      final = train_linear(train_source or train_features, train_labels, num_classes, [grid.spec(best)],
                           seed=seed, log=log, **train_kwargs)
    test = evaluate_linear(final, eval_features, eval_labels)[best]
  else:
    if log:
      log(f"linear: {len(specs)} classifiers on {n_train} train rows, selecting on the evaluation split (Meta)")
    final = train_linear(train_source or train_features, train_labels, num_classes, specs, seed=seed, log=log,
                         **train_kwargs)
    scores = evaluate_linear(final, eval_features, eval_labels)
    best = select_best(scores)
    test = scores[best]
  results = {
      "best_classifier": best,
      "eval": test,
      "selection": selection,
      "selection_split": f"heldout {val_fraction:.0%} of train" if selection == "heldout" else "eval",
      "refit_on_full_train": bool(refit and selection == "heldout"),
      "selection_scores": scores,
      "num_train": n_train,
      "num_eval": len(eval_labels),
  }
  return results, final


# ----------------------------------------------------------------------------------------------
# The command.


def run(config, log=log_print) -> dict:
  """Extracts (or reuses) features, runs the linear protocol, writes `linear_results.{json,md}` and the head.

  Returns the results dict (also in every process of a multi-host run).
  """
  t0 = time.perf_counter()
  lc = config.linear
  out_dir = eval_config.output_dir(config, "linear")
  resolution, why = eval_config.resolution(config)
  backbone = eval_config.backbone_from_config(config)
  eval_config.check_resolution(resolution, backbone.config.patch_size)
  n_blocks = max(lc.n_last_blocks)
  if n_blocks > backbone.config.depth:
    raise eval_config.ConfigError(f"config.linear.n_last_blocks={tuple(lc.n_last_blocks)} exceeds the backbone "
                                  f"depth {backbone.config.depth}")
  if lc.epochs < 1 or lc.epoch_length < 1:
    raise eval_config.ConfigError(f"config.linear.epochs={lc.epochs} and epoch_length={lc.epoch_length} must be "
                                  f">= 1 (iterations = epochs x epoch_length; Meta's {EPOCHS} x {EPOCH_LENGTH})")
  if log:
    log(f"linear: {config.weights or 'random ' + config.model.preset + ' weights'}, {config.dataset.kind} data, "
        f"{resolution} px ({why}); output in {out_dir}")
  train, test = command.features_from_config(config, backbone, FeatureSpec(n_last_blocks=n_blocks), out_dir,
                                             resolution, log=log)
  load = lambda store: {n: store.array(n, lc.features_in_memory) for n in ("cls_blocks", "patch_mean")}  # noqa: E731
  specs = classifier_grid(lc.n_last_blocks, lc.avgpool, lc.learning_rates)
  source = None
  if lc.augment:
    source = AugmentedImages(backbone, eval_config.datasets_from_config(config)[0], train.load("index"),
                             resolution=resolution, n_blocks=n_blocks, seed=lc.seed,
                             num_workers=config.num_workers or None)
  results, clf = linear_evaluate(
      load(train), train.labels, load(test), test.labels, len(train.class_names), specs=specs,
      selection=lc.selection, val_fraction=lc.val_fraction, refit=lc.refit, seed=lc.seed, train_source=source,
      batch_size=lc.batch_size, epochs=lc.epochs, epoch_length=lc.epoch_length, log=log)
  best = clf.spec(results["best_classifier"])
  head_path = None
  if lc.save_head:
    head_path = os.path.join(out_dir, "best_linear_head.pth")
    if jax.process_index() == 0:
      clf.save_head(best.name, head_path)
  scores = results["selection_scores"]
  ranked = sorted(scores, key=lambda n: -scores[n]["top1"])[:5]
  split = results["selection_split"]
  rows = [{"classifier": results["best_classifier"] + " (selected)", f"{split} top-1": scores[best.name]["top1"],
           "eval top-1": results["eval"]["top1"], "eval top-5": results["eval"]["top5"]}]
  rows += [{"classifier": n, f"{split} top-1": scores[n]["top1"], "eval top-1": "", "eval top-5": ""}
           for n in ranked if n != best.name][:4]
  header = (f"Linear probe on {config.dataset.kind} data: {results['num_train']} train / {results['num_eval']} eval "
            f"images, {len(train.class_names)} classes, {config.weights or 'random ' + config.model.preset} at "
            f"{resolution}px; {lc.epochs} x {lc.epoch_length} iterations of batch {lc.batch_size}; selected on {split}"
            + (", refit on all train" if results["refit_on_full_train"] else "")
            + ("; trained with RandomResizedCrop + flip" if lc.augment else "; trained on precomputed features"))
  results.update({
      "protocol": "linear",
      "weights": config.weights or None,
      "model": dataclasses.asdict(backbone.config),
      "dataset": config.dataset.to_dict(),
      "splits": dict(zip(("train", "eval"), eval_config.splits(config))),
      "resolution": resolution,
      "linear": lc.to_dict(),
      **command.data_summary(train, test),
      "head": None if head_path is None else {
          "path": head_path, "classifier": best.name, "input": (
              f"cat[cls of the last {best.n_blocks} blocks (normed, oldest first)"
              + (", mean patch token of the last block]" if best.avgpool else "]")),
          "loads_with_dinov2_jax.load_classifier": bool(best.avgpool and best.n_blocks in (1, 4))},
      "elapsed_s": round(time.perf_counter() - t0, 1),
  })
  command.write_report(out_dir, "linear_results", results, f"{header}\n\n{command.markdown_table(rows)}", log=log)
  return results


def main(argv: Sequence[str] | None = None) -> None:
  """Entry point: `python -m dinov2_jax.eval.linear [--config RECIPE_OR_FILE] [--config.FIELD=VALUE ...]`."""
  command.run_command(run, __doc__, "eval_linear", argv)


if __name__ == "__main__":
  main()
