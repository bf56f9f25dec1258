"""One DINOv2 training iteration as a single pure function (jit it once; it never recompiles).

Follows Meta's `SSLMetaArch.forward_backward` + `do_train` iteration:
  1. schedules at this step (lr, wd, last-layer lr, teacher momentum, teacher temperature);
  2. teacher (no drop path, no masks) on the 2 global crops -> CLS logits and the logits of the
     masked patch tokens -> centred softmax (lazy EMA centre) or Sinkhorn-Knopp targets;
  3. student on the masked global crops and on the local crops (drop path on) -> DINO local and
     global terms, KoLeo on each global crop's backbone CLS, iBOT on the masked tokens;
  4. gradients, clipping per student submodule, AdamW with Meta's parameter groups;
  5. EMA update of the teacher with this step's momentum.

Batch layout (host-major across processes, crop-major within a process, like Meta's collate):
  global_crops (P*2b, S, S, 3), local_crops (P*n*b, s, s, 3), masks (P*2b, N) bool,
  mask_indices / mask_weights / mask_valid (P*M,): per process, indices into that process's
  flattened (2b*N) global-crop tokens, padded to M. On one process this is exactly Meta's layout;
  with P processes the step reorders rows to the global crop-major layout Meta's loss pairing
  expects (row c*P*b + p*b + i holds crop c of image i of process p).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from dinov2_jax import losses, optim
from dinov2_jax.schedules import values_at
from dinov2_jax.train.state import SSLArch, TrainState, merge


def _crop_major(x: jax.Array, n_processes: int, n_crops: int) -> jax.Array:
  """(P * C * b, ...) host-major rows -> (C * P * b, ...) globally crop-major rows."""
  if n_processes == 1:
    return x
  b = x.shape[0] // (n_processes * n_crops)
  return x.reshape((n_processes, n_crops, b) + x.shape[1:]).swapaxes(0, 1).reshape(x.shape)


def _global_mask_indices(indices: jax.Array, n_processes: int, n_tokens: int, per_process_crops: int) -> jax.Array:
  """Per-process token indices (P blocks of M) -> indices into the crop-major global tokens."""
  if n_processes == 1:
    return indices
  m = indices.shape[0] // n_processes
  process = jnp.arange(indices.shape[0]) // m
  row, token = indices // n_tokens, indices % n_tokens
  b = per_process_crops // 2
  crop, image = row // b, row % b
  return ((crop * n_processes + process) * b + image) * n_tokens + token


def _teacher_targets(arch: SSLArch, cls_logits, patch_logits, mask_valid, temp, state: TrainState):
  if arch.centering == "sinkhorn_knopp":
    dino_t = losses.sinkhorn_knopp_teacher(cls_logits, temp)
    ibot_t = losses.sinkhorn_knopp_teacher(patch_logits, temp, valid=mask_valid)
    return dino_t, ibot_t, state.dino_center, state.ibot_center
  dino_t, dino_center = losses.softmax_center_teacher(state.dino_center, cls_logits, temp, arch.center_momentum)
  ibot_t, ibot_center = losses.softmax_center_teacher(
      state.ibot_center, patch_logits, temp, arch.center_momentum, valid=mask_valid)
  return dino_t, ibot_t, dino_center, ibot_center


def _heads(arch: SSLArch, params: dict):
  dino = merge(arch.dino_head, params["dino_head"])
  ibot = dino if arch.ibot_head is None else merge(arch.ibot_head, params["ibot_head"])
  return dino, ibot


def _gather_tokens(patch_tokens: jax.Array, indices: jax.Array) -> jax.Array:
  """(2B, N, D) patch tokens -> (M, D) tokens at flat indices into (2B * N)."""
  return patch_tokens.reshape(-1, patch_tokens.shape[-1])[indices]


def make_train_step(arch: SSLArch, tx: optax.GradientTransformation, n_processes: int = 1):
  """Returns `train_step(state, batch, tables) -> (state, metrics)`; `tables` from `TrainSchedules.tables()`."""

  def train_step(state: TrainState, batch: dict[str, jax.Array], tables: dict[str, jax.Array]):
    sched = values_at(tables, state.step)
    temp = sched["teacher_temp"]
    global_crops = _crop_major(batch["global_crops"], n_processes, 2)
    local_crops = _crop_major(batch["local_crops"], n_processes, arch.n_local_crops) if arch.n_local_crops else None
    masks = _crop_major(batch["masks"], n_processes, 2)
    n_tokens = masks.shape[1]
    indices = _global_mask_indices(batch["mask_indices"], n_processes, n_tokens, batch["masks"].shape[0] // n_processes)
    weights, valid = batch["mask_weights"], batch["mask_valid"]
    n_global = global_crops.shape[0]
    rng, key_global, key_local = jax.random.split(state.rng, 3)

    # Teacher: eval mode, no masks, no gradients.
    teacher = jax.lax.stop_gradient(state.teacher)
    t_out = merge(arch.backbone, teacher["backbone"]).forward_features(global_crops)
    t_dino_head, t_ibot_head = _heads(arch, teacher)
    t_cls_logits = t_dino_head(t_out["x_norm_clstoken"])
    t_patch_logits = t_ibot_head(_gather_tokens(t_out["x_norm_patchtokens"], indices))
    dino_targets, ibot_targets, dino_center, ibot_center = _teacher_targets(
        arch, t_cls_logits, t_patch_logits, valid, temp, state)

    def loss_fn(student):
      backbone = merge(arch.backbone, student["backbone"])
      s_dino_head, s_ibot_head = _heads(arch, student)
      s_global = backbone.forward_features(global_crops, masks, drop_path_key=key_global)
      s_global_logits = s_dino_head(s_global["x_norm_clstoken"])
      s_local_logits = None
      if local_crops is not None:
        s_local = backbone.forward_features(local_crops, drop_path_key=key_local)
        s_local_logits = s_dino_head(s_local["x_norm_clstoken"])
      dino = losses.dino_loss(s_global_logits, s_local_logits, dino_targets, arch.student_temp)
      cls = s_global["x_norm_clstoken"].astype(jnp.float32)
      koleo = sum(losses.koleo_loss(c) for c in jnp.split(cls, 2))
      s_patch_logits = s_ibot_head(_gather_tokens(s_global["x_norm_patchtokens"], indices))
      ibot = losses.ibot_patch_loss(s_patch_logits, ibot_targets, weights, n_global, arch.student_temp)
      terms = {
          "dino_local_crops_loss": arch.dino_loss_weight * dino.local_crops,
          "dino_global_crops_loss": arch.dino_loss_weight * dino.global_crops,
          "koleo_loss": arch.koleo_loss_weight * koleo,
          "ibot_loss": arch.ibot_loss_weight * ibot,
      }
      return sum(terms.values()), terms

    (total, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.student)

    # Inject this step's schedule values (read from the tables, not baked into the program).
    hyper = state.opt_state.hyperparams
    opt_state = state.opt_state._replace(hyperparams={
        **hyper, "learning_rate": sched["lr"], "weight_decay": sched["wd"],
        "last_layer_learning_rate": sched["last_layer_lr"]})
    updates, opt_state = tx.update(grads, opt_state, state.student)
    if arch.freeze_backbone_steps:
      frozen = state.step < arch.freeze_backbone_steps
      updates = {**updates, "backbone": jax.tree.map(lambda u: jnp.where(frozen, jnp.zeros_like(u), u),
                                                     updates["backbone"])}
    student = optax.apply_updates(state.student, updates)
    m = sched["momentum"]
    teacher = jax.tree.map(lambda t, s: (m * t + (1.0 - m) * s).astype(t.dtype), state.teacher, student)

    metrics = {**terms, "total_loss": total, **{f"grad_norm/{k}": v for k, v in optim.submodule_grad_norms(grads).items()},
               "lr": sched["lr"], "wd": sched["wd"], "last_layer_lr": sched["last_layer_lr"],
               "momentum": m, "teacher_temp": temp, "n_masked_tokens": jnp.sum(valid)}
    new_state = state.replace(step=state.step + 1, student=student, teacher=teacher, opt_state=opt_state,
                              dino_center=dino_center, ibot_center=ibot_center, rng=rng)
    return new_state, metrics

  return train_step


def build_optimizer_for(arch: SSLArch, student_abstract: Any, config) -> optax.GradientTransformation:
  """Meta's optimizer; schedule values are injected per step by `train_step`."""
  o = config.optim
  return optim.build_optimizer(
      student_abstract, learning_rate=0.0, weight_decay=0.0, last_layer_learning_rate=0.0,
      layerwise_decay=o.layerwise_decay, patch_embed_lr_mult=o.patch_embed_lr_mult, clip_grad=o.clip_grad,
      b1=o.adamw_beta1, b2=o.adamw_beta2, frozen=config.init.get("frozen") or None)
