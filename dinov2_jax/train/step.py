"""One DINOv2 training iteration as a single pure function (jit it once; it never recompiles).

Follows Meta's `SSLMetaArch.forward_backward` + `do_train` iteration:
  1. schedules at this step (lr, wd, last-layer lr, teacher momentum, teacher temperature);
  2. teacher (no drop path, no masks) on the 2 global crops -> CLS logits and the logits of the
     masked patch tokens -> centred softmax (lazy EMA centre) or Sinkhorn-Knopp targets;
  3. student on the masked global crops and on the local crops (drop path on) -> DINO local and
     global terms, KoLeo on each global crop's backbone CLS, iBOT on the masked tokens;
  4. gradients, clipping per student submodule, AdamW with Meta's parameter groups;
  5. EMA update of the teacher with this step's momentum.

Batch layout: `dinov2_jax/data/layout.py` (S data shards, one per device, each crop-major like one
of Meta's GPUs): global_crops (S 2b, H, H, 3), local_crops (S n b, h, h, 3) (uint8, normalised here,
or already normalised float32), masks (S 2b, N) bool,
mask_indices / mask_weights / mask_valid (S M,): per shard, indices into that shard's flattened
(2b N) patch tokens, padded to M. Every device works on its own images: the iBOT tokens are gathered
per shard, Meta's batch-subset stochastic depth draws per shard, and KoLeo is per shard by default
(Meta: per GPU); only the losses that pair crops of an image read the batch crop-major, through a
view that moves no data. With S = 1 this is exactly Meta's single-GPU layout.

The metrics stay on the device (replicated scalars); the loop fetches them when it logs. Besides
the loss terms they include the health metrics of `dinov2_jax/health.py`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from dinov2_jax import health, losses, optim
from dinov2_jax.data import layout
from dinov2_jax.data.normalize import imagenet_normalize
from dinov2_jax.schedules import values_at
from dinov2_jax.train.state import SSLArch, TrainState, merge


def _teacher_targets(arch: SSLArch, cls_logits, patch_logits, mask_valid, temp, state: TrainState):
  if arch.centering == "sinkhorn_knopp":
    dino_t = losses.sinkhorn_knopp_teacher(cls_logits, temp)
    ibot_t = losses.sinkhorn_knopp_teacher(patch_logits, temp, valid=mask_valid)
    return dino_t, ibot_t, state.dino_center, state.ibot_center
  dino_t, dino_center = losses.softmax_center_teacher(state.dino_center, cls_logits, temp, arch.center_momentum)
  ibot_t, ibot_center = losses.softmax_center_teacher(
      state.ibot_center, patch_logits, temp, arch.center_momentum, valid=mask_valid)
  return dino_t, ibot_t, dino_center, ibot_center


def _matmul_weights_in(params: dict, dtype, shardings=None) -> dict:
  """`params` with every matmul/convolution kernel cast to the compute dtype (bf16), the rest as is.

  The cast is what the layers do anyway (autocast semantics: bf16 matmul inputs), only earlier: on
  FSDP-sharded parameters each device casts its own shard, so the all-gathers move bf16 instead of
  float32 (half the bytes), and the kernels' gradients are reduced in bf16 as Meta's FSDP reduces
  the backbone's in fp16. Norm scales, biases, LayerScale, tokens and the weight-normed last layer
  (whose norm Meta takes in float32) stay float32.
  """
  if jnp.dtype(dtype) == jnp.float32:
    return params

  def cast(path, x):
    return x.astype(dtype) if getattr(path[-1], "key", None) == "kernel" else x

  params = jax.tree_util.tree_map_with_path(cast, params)
  # Pinned to the parameters' own sharding, or GSPMD may gather the float32 shards first.
  return params if shardings is None else jax.lax.with_sharding_constraint(params, shardings)


def _heads(arch: SSLArch, params: dict):
  dino = merge(arch.dino_head, params["dino_head"])
  ibot = dino if arch.ibot_head is None else merge(arch.ibot_head, params["ibot_head"])
  return dino, ibot


def _gather_tokens(patch_tokens: jax.Array, indices: jax.Array, n_shards: int) -> jax.Array:
  """(S 2b, N, D) patch tokens, (S M,) per-shard flat indices -> (S M, D), gathered within shards."""
  tokens = layout.per_shard(patch_tokens.reshape(-1, patch_tokens.shape[-1]), n_shards)  # (S, 2b N, D)
  return jax.vmap(lambda t, i: t[i])(tokens, layout.per_shard(indices, n_shards)).reshape(-1, tokens.shape[-1])


def _koleo(cls: jax.Array, n_shards: int, per_shard: bool) -> jax.Array:
  """Meta's 0.1-weighted KoLeo without the weight: sum over the two global crops of KoLeo over the
  batch; per shard (Meta: per GPU, then averaged over GPUs by the gradient all-reduce) or global."""
  if per_shard:
    by_shard = layout.per_shard(cls, n_shards).reshape(n_shards, 2, -1, cls.shape[-1])  # (S, 2, b, D)
    return jnp.sum(jnp.mean(losses.koleo_loss(by_shard), axis=0))
  return sum(losses.koleo_loss(c) for c in layout.crop_major_view(cls, n_shards, 2))


def _normalized(crops: jax.Array) -> jax.Array:
  """Crops as the backbone takes them: uint8 crops (4x less to transfer) are normalised here."""
  return imagenet_normalize(crops) if crops.dtype == jnp.uint8 else crops


def _health_metrics(dino_targets, ibot_targets, mask_valid, student_entropy, teacher_cls) -> dict[str, jax.Array]:
  """dinov2_jax/health.py's metrics, from values the step has anyway (a few reductions)."""
  out = {f"dino_{k}": v for k, v in health.target_metrics(dino_targets).items()}
  out.update({f"ibot_{k}": v for k, v in health.target_metrics(ibot_targets, mask_valid).items()})
  out["dino_student_entropy"] = student_entropy
  out["cls_mean_cosine"] = health.mean_pairwise_cosine(teacher_cls)
  return out


def make_train_step(arch: SSLArch, tx: optax.GradientTransformation, n_shards: int = 1, constrain=None,
                    param_shardings=None):
  """Returns `train_step(state, batch, tables) -> (state, metrics)`; `tables` from `TrainSchedules.tables()`.

  `n_shards`: S, the data shards of the batch (the devices it is split over; see the module doc).
  `constrain`: optional `(x, logical_axes) -> x` (`sharding.activation_constraint`) pinning the
  layout of the activations: the residual stream ("batch", "tokens", "embed"), the gathered iBOT
  tokens ("batch", "embed") and the head logits ("batch", "prototypes").
  `param_shardings`: optional shardings of the student parameters; the gradients are constrained
  to them, so that each device receives only its shard of the summed gradient (a reduce-scatter)
  instead of the whole sum (an all-reduce) before the sharded optimizer update.
  """
  constrain = constrain or (lambda x, logical_axes: x)

  def head_logits(head, inputs):
    """One head call on the rows of several (S r_i, D) arrays (Meta concatenates them too: on a
    mesh the head's weights are then gathered once); returns the (S r_i, K) logits of each."""
    joined, sizes = layout.concat_shards(inputs, n_shards)
    logits = constrain(head(constrain(joined, ("batch", "embed"))), ("batch", "prototypes"))
    return layout.split_shards(logits, sizes, n_shards)

  def dino_and_ibot_logits(arch_heads, cls_rows, patch_tokens):
    """(DINO logits of each array in `cls_rows`, iBOT logits of `patch_tokens`), sharing one call
    when iBOT shares the DINO head."""
    dino_head, ibot_head = arch_heads
    if ibot_head is dino_head:
      *cls_logits, patch_logits = head_logits(dino_head, [*cls_rows, patch_tokens])
      return cls_logits, patch_logits
    return head_logits(dino_head, cls_rows), head_logits(ibot_head, [patch_tokens])[0]

  def train_step(state: TrainState, batch: dict[str, jax.Array], tables: dict[str, jax.Array]):
    sched = values_at(tables, state.step)
    temp = sched["teacher_temp"]
    global_crops, masks = _normalized(batch["global_crops"]), batch["masks"]
    local_crops = _normalized(batch["local_crops"]) if arch.n_local_crops else None
    indices, weights, valid = batch["mask_indices"], batch["mask_weights"], batch["mask_valid"]
    n_global = global_crops.shape[0]
    crop_major = lambda x, n_crops: layout.crop_major_view(x, n_shards, n_crops)  # noqa: E731
    rng, key_global, key_local = jax.random.split(state.rng, 3)

    # Teacher: eval mode, no masks, no gradients.
    teacher = _matmul_weights_in(jax.lax.stop_gradient(state.teacher), arch.backbone_config.dtype, param_shardings)
    t_out = merge(arch.backbone, teacher["backbone"]).forward_features(global_crops, constrain=constrain)
    (t_cls_logits,), t_patch_logits = dino_and_ibot_logits(
        _heads(arch, teacher), [t_out["x_norm_clstoken"]],
        _gather_tokens(t_out["x_norm_patchtokens"], indices, n_shards))
    # Centring and Sinkhorn-Knopp treat rows alike (or sum over all of them): any row order will do.
    dino_targets, ibot_targets, dino_center, ibot_center = _teacher_targets(
        arch, t_cls_logits, t_patch_logits, valid, temp, state)

    def loss_fn(student):
      student = _matmul_weights_in(student, arch.backbone_config.dtype, param_shardings)
      backbone = merge(arch.backbone, student["backbone"])
      # Global (masked) and local crops through the blocks together, as Meta's forward_features_list.
      crops, crop_masks, keys = [global_crops], [masks], [key_global]
      if local_crops is not None:
        crops, crop_masks, keys = crops + [local_crops], crop_masks + [None], keys + [key_local]
      s_out = backbone.forward_features_list(crops, crop_masks, drop_path_keys=keys, constrain=constrain)
      s_global = s_out[0]
      cls_logits, s_patch_logits = dino_and_ibot_logits(
          _heads(arch, student), [o["x_norm_clstoken"] for o in s_out],
          _gather_tokens(s_global["x_norm_patchtokens"], indices, n_shards))
      s_global_logits = cls_logits[0]
      s_local_logits = crop_major(cls_logits[1], arch.n_local_crops) if local_crops is not None else None
      dino = losses.dino_loss(crop_major(s_global_logits, 2), s_local_logits, crop_major(dino_targets, 2),
                              arch.student_temp)
      koleo = _koleo(s_global["x_norm_clstoken"].astype(jnp.float32), n_shards, arch.koleo_per_shard)
      ibot = losses.ibot_patch_loss(s_patch_logits, ibot_targets, weights, n_global, arch.student_temp)
      terms = {
          "dino_local_crops_loss": arch.dino_loss_weight * dino.local_crops,
          "dino_global_crops_loss": arch.dino_loss_weight * dino.global_crops,
          "koleo_loss": arch.koleo_loss_weight * koleo,
          "ibot_loss": arch.ibot_loss_weight * ibot,
      }
      student_entropy = health.softmax_entropy(jax.lax.stop_gradient(s_global_logits), arch.student_temp)
      return sum(terms.values()), (terms, student_entropy)

    (total, (terms, student_entropy)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.student)
    if param_shardings is not None:
      grads = jax.lax.with_sharding_constraint(grads, param_shardings)

    # Inject this step's schedule values (read from the tables, not baked into the program).
    hyper = state.opt_state.hyperparams
    opt_state = state.opt_state._replace(hyperparams={
        **hyper, "learning_rate": sched["lr"], "weight_decay": sched["wd"],
        "last_layer_learning_rate": sched["last_layer_lr"]})
    updates, opt_state = tx.update(grads, opt_state, state.student)
    student = optax.apply_updates(state.student, updates)
    m = sched["momentum"]
    teacher = jax.tree.map(lambda t, s: (m * t + (1.0 - m) * s).astype(t.dtype), state.teacher, student)

    metrics = {**terms, "total_loss": total, **{f"grad_norm/{k}": v for k, v in optim.submodule_grad_norms(grads).items()},
               "lr": sched["lr"], "wd": sched["wd"], "last_layer_lr": sched["last_layer_lr"],
               "momentum": m, "teacher_temp": temp, "n_masked_tokens": jnp.sum(valid),
               **_health_metrics(dino_targets, ibot_targets, valid, student_entropy, t_out["x_norm_clstoken"])}
    new_state = state.replace(step=state.step + 1, student=student, teacher=teacher, opt_state=opt_state,
                              dino_center=dino_center, ibot_center=ibot_center, rng=rng)
    return new_state, metrics

  return train_step


def build_optimizer_for(student_abstract: Any, config) -> optax.GradientTransformation:
  """Meta's optimizer; schedule values are injected per step by `train_step`.

  `config.init.freeze_backbone_steps`: the backbone gets no update and its Adam state stays
  untouched for that many first steps (only the heads train).
  """
  o = config.optim
  return optim.build_optimizer(
      student_abstract, learning_rate=0.0, weight_decay=0.0, last_layer_learning_rate=0.0,
      layerwise_decay=o.layerwise_decay, patch_embed_lr_mult=o.patch_embed_lr_mult, clip_grad=o.clip_grad,
      b1=o.adamw_beta1, b2=o.adamw_beta2, frozen=config.init.get("frozen") or None,
      frozen_steps={"backbone": config.init.freeze_backbone_steps} if config.init.get("freeze_backbone_steps") else None)
