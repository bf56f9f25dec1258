"""Is the run learning? Health metrics of the DINO / iBOT targets and features, and collapse warnings.

A DINO-family run can look fine while learning nothing: when the teacher's targets are uniform over
the K prototypes the DINO loss sits at ln K (plus a constant) and carries no signal; when they
concentrate on one prototype the loss goes to ~0 and the features collapse to one point. Both are
common on small datasets (dinov2 #143, #272). The train step computes, on the device and for free
next to the losses:

  dino_teacher_entropy         mean entropy (nats) of the teacher's DINO targets, one per global crop
  dino_teacher_batch_entropy   entropy of their mean over the batch (ln K = all prototypes used alike)
  dino_student_entropy         mean entropy of the student's DINO softmax on the global crops
  dino_prototypes_used         prototypes that are the teacher's top choice for at least one crop
  ibot_teacher_entropy, ibot_teacher_batch_entropy, ibot_prototypes_used   the same over masked tokens
  cls_mean_cosine              mean cosine similarity between the teacher's CLS features of
                               different images (1 = all images look the same to the backbone)

`CollapseMonitor` reads them at log steps on the host and warns once per kind of collapse.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

_F32 = jnp.float32


def _entropy(p: jax.Array) -> jax.Array:
  """(..., K) probabilities -> (...) entropy in nats (0 log 0 = 0)."""
  p = p.astype(_F32)
  return -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), axis=-1)


def target_metrics(probs: jax.Array, valid: jax.Array | None = None) -> dict[str, jax.Array]:
  """Entropies and prototype usage of teacher targets.

  Args:
    probs: (N, K) target distributions (rows sum to 1; padded rows arbitrary).
    valid: optional (N,) bool; only these rows count.

  Returns:
    float32 scalars: `teacher_entropy` (mean row entropy), `teacher_batch_entropy` (entropy of the
    mean row) and `prototypes_used` (distinct argmax prototypes), nats / counts.
  """
  n, k = probs.shape
  valid = jnp.ones((n,), bool) if valid is None else valid.astype(bool)
  weight = valid.astype(_F32)
  count = jnp.maximum(jnp.sum(weight), 1.0)
  probs = jnp.where(valid[:, None], probs.astype(_F32), 0.0)  # padded rows may hold anything
  mean_row = jnp.sum(probs, axis=0) / count
  top = jnp.argmax(probs, axis=-1)
  hits = jnp.zeros((k,), _F32).at[top].add(weight)
  return {
      "teacher_entropy": jnp.sum(_entropy(probs) * weight) / count,
      "teacher_batch_entropy": _entropy(mean_row),
      "prototypes_used": jnp.sum(hits > 0).astype(_F32),
  }


def softmax_entropy(logits: jax.Array, temperature: float | jax.Array) -> jax.Array:
  """Mean entropy (nats) of `softmax(logits / temperature)` over the rows of (N, K) logits."""
  log_p = jax.nn.log_softmax(logits.astype(_F32) / temperature, axis=-1)
  return jnp.mean(-jnp.sum(jnp.exp(log_p) * log_p, axis=-1))


def mean_pairwise_cosine(x: jax.Array) -> jax.Array:
  """Mean cosine similarity over pairs i != j of the rows of (N, D) features (float32 scalar).

  Uses |sum_i x_i / |x_i||^2 = N + sum_{i != j} cos_ij, so it costs O(N D).
  """
  x = x.astype(_F32)
  n = x.shape[0]
  unit = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
  total = jnp.sum(jnp.square(jnp.sum(unit, axis=0)))
  return (total - n) / max(n * (n - 1), 1)


# ----------------------------------------------------------------------------------------------
# On the host: collapse warnings.


class Collapse(NamedTuple):
  kind: str
  message: str


class CollapseError(RuntimeError):
  """The run collapsed and `config.health.stop_on_collapse` is set."""


class CollapseMonitor:
  """Watches the logged health metrics; reports each kind of collapse once.

  A kind is reported when its condition holds at `patience` consecutive checks, after the first
  `warmup_fraction` of the run and after `warmup_steps` (the learning-rate warm-up): a freshly
  initialised network is "collapsed" by every measure (with Meta's LayerScale 1e-5 every image
  has the same CLS feature), until training has had a chance to change that:
    uniform targets   the teacher's DINO targets have an entropy within `uniform_margin` nats of
                      ln K: the DINO loss carries no signal;
    one prototype     the batch-mean target entropy is below `one_prototype_nats`: every image
                      gets the same target;
    CLS features      the teacher's CLS features of different images have a mean cosine above
                      `cls_cosine`: the backbone maps all images to (nearly) one point.
  """

  def __init__(self, n_prototypes: int, total_steps: int, *, warmup_steps: int = 0, warmup_fraction: float = 0.2,
               uniform_margin: float = 0.05, one_prototype_nats: float = 0.5, cls_cosine: float = 0.95,
               patience: int = 3):
    self.log_k = math.log(n_prototypes)
    self.start_step = max(int(warmup_fraction * total_steps), warmup_steps)
    self.uniform_margin, self.one_prototype_nats, self.cls_cosine = uniform_margin, one_prototype_nats, cls_cosine
    self.patience = patience
    self._streaks: dict[str, int] = {}
    self.reported: set[str] = set()

  def _conditions(self, step: int, metrics: dict[str, float]) -> dict[str, str | None]:
    """{kind: message if its condition holds now, else None}."""
    entropy = metrics.get("dino_teacher_entropy", 0.0)
    batch_entropy = metrics.get("dino_teacher_batch_entropy", self.log_k)
    cosine = metrics.get("cls_mean_cosine", 0.0)
    return {
        "uniform targets": None if entropy <= self.log_k - self.uniform_margin else (
            f"collapse (uniform targets) at step {step}: the teacher's DINO targets have entropy {entropy:.3f} "
            f"nats, the maximum is ln K = {self.log_k:.3f}, so the DINO (and likely iBOT) loss carries no "
            "signal and only KoLeo shapes the features. Try fewer prototypes (dino.head_n_prototypes, "
            "ibot.head_n_prototypes), a lower teacher.teacher_temp, centering='sinkhorn_knopp', or more "
            "data; small datasets often do this with Meta's recipe."),
        "one prototype": None if batch_entropy >= self.one_prototype_nats else (
            f"collapse (one prototype) at step {step}: the batch-mean of the teacher's DINO targets has "
            f"entropy {batch_entropy:.3f} nats (ln K = {self.log_k:.3f}): every image gets the same target. "
            "Try centering='sinkhorn_knopp', a higher teacher.teacher_temp or a lower optim.base_lr."),
        "CLS features": None if cosine <= self.cls_cosine else (
            f"collapse (CLS features) at step {step}: the teacher's CLS features of different images have "
            f"mean cosine similarity {cosine:.3f}: the backbone maps all images to nearly one point. Try a "
            "higher dino.koleo_loss_weight, a lower optim.base_lr or a slower teacher "
            "(teacher.momentum_teacher)."),
    }

  def check(self, step: int, metrics: dict[str, float]) -> list[Collapse]:
    """New collapses seen at `step` (each kind is reported once per run)."""
    if step < self.start_step or "dino_teacher_entropy" not in metrics:
      return []
    new = []
    for kind, message in self._conditions(step, metrics).items():
      self._streaks[kind] = self._streaks.get(kind, 0) + 1 if message else 0
      if self._streaks[kind] >= self.patience and kind not in self.reported:
        self.reported.add(kind)
        new.append(Collapse(kind, message))
    return new
