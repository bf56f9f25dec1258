"""DINOv2 training losses and teacher targets, numerically equal to Meta's `dinov2/loss/`.

Everything here is a pure function of arrays (plus an explicit `CenterState` pytree for the
teacher centring), so it can be jitted and run on globally sharded arrays: all reductions are
plain `jnp` reductions over global arrays and XLA inserts the collectives. There are no axis
names or hand-written `psum`s.

All loss maths runs in float32, whatever the input dtype (Meta disables autocast for KoLeo and
calls `.float()` in Sinkhorn-Knopp; bf16 log-softmaxes over 65k prototypes are not accurate
enough).

Layouts are crop-major, as Meta collates them: the 2B global-crop rows are
`[crop 0 of images 0..B-1; crop 1 of images 0..B-1]`, and local crops likewise
`[local 0 of all images; local 1 of all images; ...]`.

How `SSLMetaArch.forward_backward` combines these (for the train step):

  total = dino.local_crops + dino.global_crops        # `dino_loss`, weights 1.0
        + 0.1 * sum_c koleo_loss(student_backbone_cls[crop c])   # per global crop
        + ibot_patch_loss(...)                        # Meta: forward_masked * 2 * 0.5

Meta *logs* koleo/2 and ibot/2 but backpropagates the full values.

Where we differ from Meta (each deliberate; Meta's behaviour stays reachable):

* Sinkhorn-Knopp works in log space, so it stays finite where Meta's `exp(t / temp)` overflows
  (logit/temp > ~88 in float32). Where Meta's result is finite the two agree up to float32
  rounding, because Meta's constant factors cancel exactly (see `sinkhorn_knopp_teacher`).
* The pending (lazy) centre update is part of `CenterState`, so it is checkpointed; Meta keeps it
  in a non-persistent attribute and drops it on resume. `discard_pending_center_update` gives
  Meta's resume behaviour.
* Multi-device iBOT centre: Meta averages the per-rank means of the masked tokens; we take the
  global mean over all valid masked tokens. They agree on one device or with equal per-rank counts.
* With no valid row at all (impossible in Meta's pipeline), the centre is left unchanged instead
  of becoming NaN.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from dinov2_jax import fusion

_F32 = jnp.float32


def _cross_entropy_rows(student_logits, teacher_probs, student_temp):
  """Per-row `sum_k t_k * log_softmax(s / temp)_k` (NOT negated), float32, shape (..., )."""
  log_p = jax.nn.log_softmax(student_logits.astype(_F32) / student_temp, axis=-1)
  return jnp.sum(teacher_probs.astype(_F32) * log_p, axis=-1)


# ----------------------------------------------------------------------------------------------
# DINO (image-level) loss.
# ----------------------------------------------------------------------------------------------


class DinoLossTerms(NamedTuple):
  """The two DINO terms as Meta logs them (`dino_local_crops_loss`, `dino_global_crops_loss`).

  Both are float32 scalars and both enter the total loss with weight 1.
  """

  local_crops: jax.Array
  global_crops: jax.Array


def dino_loss(
    student_global_logits: jax.Array,
    student_local_logits: jax.Array | None,
    teacher_probs: jax.Array,
    student_temp: float | jax.Array = 0.1,
) -> DinoLossTerms:
  """Meta's DINO loss terms, with Meta's crop pairing and 1/(2*n_local + 2) weighting.

  Meta runs the teacher on the global crops and *swaps* its two CLS chunks before the head, so
  that the global term pairs student crop k with teacher crop 1-k. This function does that swap
  itself: pass the teacher probabilities in the teacher's natural crop order (teacher crop 0
  first), i.e. do NOT swap beforehand. (Centring and Sinkhorn-Knopp are equivariant under row
  permutations, so computing the teacher targets on unswapped rows is exact.)

  With n_local local crops per image (Meta: 8) the terms are

    local  = -sum_{l < n_local} sum_{c in {0,1}} mean_b CE(teacher[c, b], student_local[l, b]) / D
    global = -sum_{c in {0,1}} mean_b CE(teacher[1-c, b], student_global[c, b]) / D

  with `CE(t, s) = sum_k t_k log_softmax(s / student_temp)_k` and D = max(2*n_local, 1) + 2
  (18 for n_local = 8; 3 for n_local = 0, where the local term is 0). Meta computes the global
  term as `2 * mean over 2B rows / D`, which is the same sum of two per-crop means.

  Args:
    student_global_logits: (2B, K) student head logits of the two global crops, crop-major, or
      the same as (2, B, K).
    student_local_logits: (n_local*B, K) student head logits of the local crops, crop-major (or
      (n_local, B, K)), or None (or zero rows) for n_local = 0.
    teacher_probs: (2B, K) or (2, B, K) teacher targets (centred softmax or Sinkhorn-Knopp) of the
      global crops, crop-major and NOT swapped. Used as constants by the caller's gradient.
    student_temp: student softmax temperature (Meta: 0.1).

  Returns:
    `DinoLossTerms(local_crops, global_crops)`, float32 scalars.
  """
  k = student_global_logits.shape[-1]
  two_b = student_global_logits.size // k
  if two_b % 2 or teacher_probs.size != two_b * k or student_global_logits.ndim not in (2, 3):
    raise ValueError(
        f'Expected (2B, K) or (2, B, K) student/teacher global rows, got {student_global_logits.shape} and '
        f'{teacher_probs.shape}.')
  b = two_b // 2
  n_local = 0 if student_local_logits is None else student_local_logits.size // (b * k)
  if student_local_logits is not None and student_local_logits.shape not in ((n_local * b, k), (n_local, b, k)):
    raise ValueError(
        f'Local logits {student_local_logits.shape} are not (n_local*B, K) with B={b}, K={k}.')
  denominator = max(2 * n_local, 1) + 2

  # Meta's swap: teacher target for student crop c is teacher crop 1-c.
  teacher = teacher_probs.astype(_F32).reshape(2, b, k)
  swapped = teacher[::-1]

  global_ce = _cross_entropy_rows(student_global_logits.reshape(2, b, k), swapped, student_temp)
  global_term = -jnp.sum(jnp.mean(global_ce, axis=1)) / denominator

  if n_local == 0:
    local_term = jnp.zeros((), _F32)
  else:
    # Every local crop is paired with both teacher crops: sum_l sum_c <t_c, logp_l>
    # = <sum_c t_c, sum_l logp_l> per image, which avoids materialising the 2*n_local pairs.
    log_p = jax.nn.log_softmax(
        student_local_logits.astype(_F32).reshape(n_local, b, k) / student_temp, axis=-1)
    pair_sum = jnp.sum(jnp.sum(teacher, axis=0) * jnp.sum(log_p, axis=0))
    local_term = -(pair_sum / b) / denominator
  return DinoLossTerms(local_crops=local_term, global_crops=global_term)


# ----------------------------------------------------------------------------------------------
# iBOT (masked patch) loss.
# ----------------------------------------------------------------------------------------------


def ibot_patch_loss(
    student_patch_logits: jax.Array,
    teacher_patch_probs: jax.Array,
    token_weights: jax.Array,
    n_global_crops: int | jax.Array,
    student_temp: float | jax.Array = 0.1,
) -> jax.Array:
  """Meta's `iBOTPatchLoss.forward_masked` on a fixed-size (padded) list of masked tokens.

    loss = -sum_i w_i * sum_k t_ik log_softmax(s_i / student_temp)_k / n_global_crops

  with w_i = 1 / (number of masked tokens in token i's crop). Each masked crop thus contributes
  its mean cross-entropy, and the sum is divided by the number of ALL global crop images (2B),
  including crops without a mask. Meta's train step scales this by 2 * 0.5 = 1.

  Rows with weight 0 are padding (our masked-token list has a fixed upper bound M, Meta's is
  ragged): they contribute exactly 0, and neither their value nor their gradient can become NaN,
  whatever their logits/targets contain, because they are replaced by zeros before any maths.

  Args:
    student_patch_logits: (M, K) student head logits of the masked tokens, padded to M.
    teacher_patch_probs: (M, K) teacher targets of the same tokens (padded rows arbitrary).
    token_weights: (M,) float, 1/#masked-in-crop for real tokens, 0 for padding.
    n_global_crops: the number of global crop IMAGES in the batch, 2B (Meta: `masks.shape[0]`),
      not the number of global crops per image.
    student_temp: student softmax temperature (Meta: 0.1).

  Returns:
    float32 scalar.
  """
  weights = token_weights.astype(_F32)
  valid = (weights != 0)[:, None]
  # Sanitise padded rows first (the "double where"): a `where` after the maths would still leak
  # NaN from garbage rows into the gradient.
  student = jnp.where(valid, student_patch_logits.astype(_F32), 0.0)
  teacher = jnp.where(valid, teacher_patch_probs.astype(_F32), 0.0)
  per_token = _cross_entropy_rows(student, teacher, student_temp)
  return -jnp.sum(per_token * weights) / jnp.asarray(n_global_crops, _F32)


# ----------------------------------------------------------------------------------------------
# KoLeo regulariser.
# ----------------------------------------------------------------------------------------------


def _l2_normalize(x, eps):
  """`F.normalize(x, dim=-1, eps)`: x / max(||x||, eps), with a finite gradient at x = 0."""
  # sqrt(max(|x|^2, eps^2)) == max(|x|, eps), but avoids sqrt'(0) = inf in the backward pass.
  norm = jnp.sqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))
  return x / norm


def koleo_nearest_neighbour(x_normalized: jax.Array) -> jax.Array:
  """(..., B) int32 index of each row's nearest neighbour within its batch, exactly as Meta picks it.

  Meta takes the argmax of `x x^T` with the diagonal *filled with -1* (not -inf), and argmax
  returns the first index on ties. So a point whose only other points are exactly antipodal
  (dot = -1) is its own "neighbour", and then its distance is just the pairwise-distance eps.
  (x_normalized: (..., B, D), batches along the leading axes.)
  """
  n = x_normalized.shape[-2]
  # Full float32 matmul even where the default precision is bf16 (TPU): Meta runs KoLeo with
  # autocast off, and a rounded dot can change which neighbour wins.
  dots = jnp.matmul(x_normalized, jnp.swapaxes(x_normalized, -1, -2), precision=jax.lax.Precision.HIGHEST)
  dots = jnp.where(jnp.eye(n, dtype=bool), -1.0, dots)
  return jnp.argmax(dots, axis=-1)


def koleo_loss(x: jax.Array, eps: float = 1e-8) -> jax.Array:
  """Meta's `KoLeoLoss` (Kozachenko-Leonenko differential-entropy regulariser), float32.

    x_hat = x / max(||x||, eps)
    nn_i  = argmax_{j} x_hat_i . x_hat_j   with the diagonal set to -1, first index on ties
    d_i   = ||x_hat_i - x_hat_{nn_i} + eps||_2      # torch PairwiseDistance adds eps to the diff
    loss  = -mean_i log(d_i + eps)

  The train step applies it to the student *backbone* CLS tokens (pre-head) of the masked
  student forward, separately for each global crop (and, like Meta on each GPU, for each data
  shard), with weight 0.1: `0.1 * sum_c koleo_loss(cls[c*B:(c+1)*B])`.

  Args:
    x: (B, D) features, any float dtype; or (..., B, D) for independent batches side by side
      (one `koleo_loss` per leading index; use this rather than `vmap`, see below).
    eps: Meta's eps (1e-8), used in all three places as Meta does.

  Returns:
    float32 scalar, or (...) for batched input.
  """
  # Meta normalises once and subtracts copies of the normalised rows, so two equal rows (or a row
  # and itself) differ by exactly 0. Left to itself XLA fuses the normalisation into both operands
  # of the subtraction and contracts one side into a fused multiply-add, leaving ~1 ulp (distance
  # ~4e-8 instead of sqrt(D) * 1e-8: 3.9270 instead of Meta's 3.9360 for a duplicated row), so the
  # normalised rows are written to memory once and both operands read the same values. (Under
  # `vmap` that conditional would become a select, which XLA fuses again.)
  x_hat = fusion.in_memory(_l2_normalize(x.astype(_F32), eps))
  # Meta's argmax is not differentiated; the gradient flows through the gathered neighbour.
  neighbour = jax.lax.stop_gradient(koleo_nearest_neighbour(x_hat))
  x_neighbour = jnp.take_along_axis(x_hat, neighbour[..., None], axis=-2)
  diff = x_hat - x_neighbour + eps
  distance = jnp.sqrt(jnp.sum(diff * diff, axis=-1))
  return -jnp.mean(jnp.log(distance + eps), axis=-1)


# ----------------------------------------------------------------------------------------------
# Teacher targets: lazy-EMA centring and Sinkhorn-Knopp.
# ----------------------------------------------------------------------------------------------


class CenterState(NamedTuple):
  """Teacher centring state (a pytree; checkpoint it with the train state).

  Attributes:
    center: (K,) float32, the centre used at the previous step (Meta's `center` buffer, which is
      (1, K) for DINO and (1, 1, K) for iBOT).
    pending: (K,) float32, the batch centre of the previous step's raw teacher logits, not yet
      folded into `center` (Meta's `async_batch_center / len`). Meta does not checkpoint it; we do,
      which is strictly more correct on resume (see `discard_pending_center_update`).
  """

  center: jax.Array
  pending: jax.Array


def init_center_state(num_prototypes: int) -> CenterState:
  """Zero centre and zero pending update (Meta's initial buffer)."""
  zeros = jnp.zeros((num_prototypes,), _F32)
  return CenterState(center=zeros, pending=zeros)


def discard_pending_center_update(state: CenterState) -> CenterState:
  """Meta's behaviour after a resume: the next step uses `state.center` without a pending update.

  Setting pending = center makes the next EMA `m*c + (1-m)*c` a no-op (up to one rounding).
  """
  return CenterState(center=state.center, pending=state.center)


def _as_valid(valid, n):
  if valid is None:
    return jnp.ones((n,), bool)
  # Any nonzero counts as valid, so per-token iBOT weights can be passed directly; their values
  # are NOT used as weights (Meta's centre is an unweighted mean over masked tokens).
  return jnp.asarray(valid) != 0


def softmax_center_teacher(
    state: CenterState,
    teacher_logits: jax.Array,
    teacher_temp: float | jax.Array,
    momentum: float | jax.Array = 0.9,
    valid: jax.Array | None = None,
) -> tuple[jax.Array, CenterState]:
  """Meta's `softmax_center_teacher` followed by `update_center`, as one pure step.

  Meta's centre is lazy: `softmax_center_teacher` first folds the *previous* step's batch centre
  into the EMA, `center = m*center + (1-m)*batch_center`, then returns
  `softmax((t - center)/temp)`; `update_center(t)` only stores this step's batch centre. So the
  centre used at step k depends on the teacher outputs of steps < k only. Meta skips the fold on
  the very first step (its `updated` flag starts True); folding a zero pending into a zero centre
  gives the same zero centre, so we fold unconditionally.

  The batch centre is the mean of the RAW teacher logits over the valid rows: all 2B global-crop
  CLS rows for DINO, the real (non-padded) masked tokens for iBOT. Multi-device: Meta's iBOT
  centre is the average of per-rank means, ours is the mean over all valid tokens of the global
  array (identical on one device or with equal per-rank counts); for DINO both are the global mean.

  Args:
    state: the `CenterState` after the previous step.
    teacher_logits: (N, K) raw teacher head logits, any float dtype.
    teacher_temp: teacher temperature (may be a traced scalar, e.g. from a warmup schedule).
    momentum: EMA momentum (Meta: 0.9).
    valid: optional (N,) mask; nonzero rows are real. Padded rows neither enter the batch centre
      nor get targets: their output rows are 0.

  Returns:
    (probs (N, K) float32 with rows summing to 1 (0 for padding), new `CenterState`). The probs
    carry no gradient (Meta: `@torch.no_grad`).
  """
  n, _ = teacher_logits.shape
  row_ok = _as_valid(valid, n)[:, None]
  t = jnp.where(row_ok, teacher_logits.astype(_F32), 0.0)

  center = momentum * state.center + (1.0 - momentum) * state.pending
  probs = jax.nn.softmax((t - center) / teacher_temp, axis=-1)
  probs = jax.lax.stop_gradient(jnp.where(row_ok, probs, 0.0))

  count = jnp.sum(row_ok, dtype=_F32)
  batch_center = jnp.sum(t, axis=0) / jnp.maximum(count, 1.0)
  # No valid row: keep the centre (pending = center makes the next fold a no-op) instead of NaN.
  batch_center = jnp.where(count > 0, batch_center, center)
  new_state = CenterState(center=center, pending=jax.lax.stop_gradient(batch_center))
  return probs, new_state


def sinkhorn_knopp_teacher(
    teacher_logits: jax.Array,
    teacher_temp: float | jax.Array,
    n_iterations: int = 3,
    valid: jax.Array | None = None,
) -> jax.Array:
  """Meta's `sinkhorn_knopp_teacher` (DINO and iBOT), computed in log space.

  Meta (with Q = exp(t/temp)^T, K x B):
    Q /= sum(Q)
    repeat n_iterations: Q /= rowsum(Q); Q /= K; Q /= colsum(Q); Q /= B
    return (Q * B)^T
  i.e. alternately normalise every prototype over the samples and every sample over the
  prototypes; each sample's output row sums to 1 and the prototype marginals approach uniform.
  The global sum, /K and /B and the final *B are constants that cancel exactly in the following
  normalisation, so working in log space gives Meta's result up to float32 rounding wherever
  Meta's is finite, and stays finite where Meta's `exp` overflows (logit/temp > ~88).

  B is the number of valid rows: 2B CLS rows for DINO; for iBOT the number of real masked tokens
  (Meta: the all-reduced `n_masked_patches`), with padded rows ignored and returned as 0. On a
  sharded array the sums are global, matching Meta's all-reduced row sums.

  Args:
    teacher_logits: (N, K) raw teacher head logits, any float dtype.
    teacher_temp: teacher temperature (may be traced).
    n_iterations: Meta: 3.
    valid: optional (N,) mask; nonzero rows are real, the rest are padding.

  Returns:
    (N, K) float32 targets; valid rows sum to 1, padded rows are 0. No gradient (Meta:
    `@torch.no_grad`).
  """
  n, _ = teacher_logits.shape
  row_ok = _as_valid(valid, n)[:, None]
  # Padded rows are set to a finite value so garbage (inf/NaN) cannot leak; they are excluded
  # from every sum over samples by `where=` and zeroed at the end.
  t = jnp.where(row_ok, teacher_logits.astype(_F32), 0.0)
  # A global shift cancels in the first per-prototype normalisation (Meta's `Q /= sum(Q)` is the
  # same kind of constant), so subtracting the max is exact and keeps t/temp small, which
  # keeps its float32 rounding error small.
  t_max = jnp.max(t, where=row_ok, initial=-jnp.inf)
  log_q = jnp.where(row_ok, (t - jnp.where(jnp.isfinite(t_max), t_max, 0.0)) / teacher_temp, 0.0)
  for _ in range(n_iterations):
    per_prototype = jax.nn.logsumexp(log_q, axis=0, keepdims=True, where=row_ok)
    # No valid row at all: nothing to normalise (avoid inf - inf).
    per_prototype = jnp.where(jnp.isfinite(per_prototype), per_prototype, 0.0)
    log_q = log_q - per_prototype
    log_q = log_q - jax.nn.logsumexp(log_q, axis=1, keepdims=True)
  return jax.lax.stop_gradient(jnp.where(row_ok, jnp.exp(log_q), 0.0))
