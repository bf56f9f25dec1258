"""Meta's DINOv2 optimiser: name-based parameter groups, per-submodule clipping, scheduled AdamW.

Meta (`dinov2/utils/param_groups.py`, `SSLMetaArch.get_params_groups`, `train.py`) builds parameter
groups per student submodule (backbone, dino_head, ibot_head) from the parameter *names* relative to
that submodule:

* `lr_multiplier = layerwise_decay ** (n_blocks + 1 - layer_id)`, with `layer_id` 0 for the
  embeddings and tokens, `i + 1` for `blocks.i`, `n_blocks + 1` otherwise (the final norm); times
  `patch_embed_lr_mult` for the patch embedding. Heads have no blocks, so their multiplier is 1.
* `wd_multiplier = 0` iff the name ends with `.bias` or contains `norm` or `gamma`.
* `is_last_layer` iff `last_layer` is in the name: those use the `last_layer_lr` schedule, which is
  0 during the first epoch (both `weight_g` and `weight_v`).

Every iteration sets `lr = schedule_lr[it] * lr_multiplier` (or `last_layer_lr[it] * ...`) and
`wd = schedule_wd[it] * wd_multiplier`, clips the gradient norm to 3.0 separately per submodule and
steps `torch.optim.AdamW`.

Here the rules are functions of our '/'-joined parameter paths, which mirror Meta's names
(`blocks/3/attn/qkv/kernel` <-> `blocks.3.attn.qkv.weight`, `norm/scale` <-> `norm.weight`,
`last_layer/g` <-> `last_layer.weight_g`), so the substring tests give the same answers. The
optimiser is an optax chain:

  frozen -> 0,  per-submodule clip,  per submodule [scale_by_adam, + wd * wd_mult * p, * -lr * lr_mult],

wrapped in `optax.inject_hyperparams`, so that one step counter drives all schedules (the first
update reads step 0, as Meta's iteration 0) and the values used at the last step are in
`opt_state.hyperparams` for logging. The `optax.multi_transform` labels are the submodules
("backbone", "dino_head", "ibot_head") and "frozen"; each parameter's multipliers are data looked up
by its name, not part of its label. So the optimizer state has the same structure whatever the
recipe (a checkpoint restores after a change of `layerwise_decay`), and the compiled step carries
one Adam chain per submodule, not one per distinct (lr, wd) pair.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from dinov2_jax.param_paths import param_names, path_name

# Meta's `SSLMetaArch` defaults (`ssl_default_config.yaml`, `optim`).
LAYERWISE_DECAY = 0.9
PATCH_EMBED_LR_MULT = 0.2
CLIP_GRAD = 3.0
ADAMW_B1, ADAMW_B2, ADAMW_EPS = 0.9, 0.999, 1e-8
# torch's `clip_grad_norm_` (and FSDP's) divides by `total_norm + 1e-6`.
CLIP_EPS = 1e-6
FROZEN = "frozen"

# Names containing any of these are the embeddings/tokens: layer_id 0 in a backbone.
_EMBEDDING_NAMES = ("pos_embed", "patch_embed", "mask_token", "cls_token", "register_tokens")
_BLOCK_RE = re.compile(r"(?:^|/)blocks/(\d+)/")

ScalarOrSchedule = float | jax.Array | Callable[[jax.Array], jax.Array]


class ParamGroup(NamedTuple):
  """Meta's per-parameter optimiser settings (its `fuse_params_groups` key)."""

  lr_mult: float
  wd_mult: float
  is_last_layer: bool


# ------------------------------------------------------------------------------------------------
# Names.


def _normalise(name: str) -> str:
  # Accept Meta's dotted names too ('blocks.2.attn.qkv.weight'); the rules only look at substrings.
  return name.replace(".", "/")


def count_blocks(names) -> int:
  """Number of transformer blocks among submodule-relative `names` (0 for the heads).

  Meta takes `model.n_blocks` / `len(model.blocks)`, and 0 for modules without blocks.
  """
  ids = [int(m.group(1)) for m in (_BLOCK_RE.search(_normalise(n)) for n in names) if m]
  return max(ids) + 1 if ids else 0


# ------------------------------------------------------------------------------------------------
# Meta's rules, on one submodule-relative name.


def layer_id(name: str, n_blocks: int) -> int:
  """Meta's `get_vit_lr_decay_rate` layer index: 0 embeddings, i+1 for blocks/i, n_blocks+1 else.

  Only backbones (`n_blocks > 0`) get per-layer ids; in a head every parameter is at n_blocks+1 = 1.
  """
  name = _normalise(name)
  if n_blocks > 0:
    if any(s in name for s in _EMBEDDING_NAMES):
      return 0
    m = _BLOCK_RE.search(name)
    if m:
      return int(m.group(1)) + 1
  return n_blocks + 1


def lr_multiplier(
    name: str, n_blocks: int, *, layerwise_decay: float = LAYERWISE_DECAY,
    patch_embed_lr_mult: float = PATCH_EMBED_LR_MULT) -> float:
  """`layerwise_decay ** (n_blocks + 1 - layer_id)`, times `patch_embed_lr_mult` for patch_embed."""
  mult = layerwise_decay ** (n_blocks + 1 - layer_id(name, n_blocks))
  if "patch_embed" in _normalise(name):
    mult *= patch_embed_lr_mult
  return mult


def wd_multiplier(name: str) -> float:
  """0 for biases, norms (our LayerNorm `scale` lives under `norm*/`) and LayerScale gammas, else 1.

  Everything else is decayed, including pos_embed, the tokens, the patch-embedding kernel and the
  head's weight-norm gain `last_layer/g` (Meta's `weight_g`).
  """
  name = _normalise(name)
  return 0.0 if name.endswith("/bias") or "norm" in name or "gamma" in name else 1.0


def is_last_layer(name: str) -> bool:
  """True for the head's last layer (`g` and `v`), which follows the `last_layer_lr` schedule."""
  return "last_layer" in _normalise(name)


def param_group(
    name: str, n_blocks: int, *, layerwise_decay: float = LAYERWISE_DECAY,
    patch_embed_lr_mult: float = PATCH_EMBED_LR_MULT) -> ParamGroup:
  """All three settings of one submodule-relative parameter name."""
  return ParamGroup(
      lr_multiplier(name, n_blocks, layerwise_decay=layerwise_decay,
                    patch_embed_lr_mult=patch_embed_lr_mult),
      wd_multiplier(name), is_last_layer(name))


# ------------------------------------------------------------------------------------------------
# Trees.


def submodule_param_groups(
    params, *, layerwise_decay: float = LAYERWISE_DECAY,
    patch_embed_lr_mult: float = PATCH_EMBED_LR_MULT) -> dict[str, ParamGroup]:
  """{submodule-relative name: ParamGroup} for one submodule's parameter tree (e.g. a backbone)."""
  names = param_names(params)
  n_blocks = count_blocks(names)
  return {
      n: param_group(n, n_blocks, layerwise_decay=layerwise_decay,
                     patch_embed_lr_mult=patch_embed_lr_mult)
      for n in names
  }


def _split_submodule(name: str) -> tuple[str, str]:
  head, _, rest = name.partition("/")
  return head, rest


def param_groups(
    student_params, *, layerwise_decay: float = LAYERWISE_DECAY,
    patch_embed_lr_mult: float = PATCH_EMBED_LR_MULT) -> dict[str, ParamGroup]:
  """{full name: ParamGroup} for a student tree `{"backbone": ..., "dino_head": ..., ...}`.

  As in Meta, the rules (and `n_blocks`) are applied per top-level submodule, to names relative to
  it: the heads get multiplier 1 whatever the backbone depth.
  """
  by_module: dict[str, list[str]] = {}
  for name in param_names(student_params):
    module, rel = _split_submodule(name)
    if not rel:
      # A bare backbone would silently get its top-level names taken for submodules.
      raise ValueError(
          f"parameter {name!r} is not inside a submodule; pass the student as "
          "{'backbone': ..., 'dino_head': ...} (use submodule_param_groups for one module)")
    by_module.setdefault(module, []).append(rel)
  groups = {}
  for module, rels in by_module.items():
    n_blocks = count_blocks(rels)
    for rel in rels:
      groups[f"{module}/{rel}"] = param_group(
          rel, n_blocks, layerwise_decay=layerwise_decay, patch_embed_lr_mult=patch_embed_lr_mult)
  return groups


def _frozen_predicate(frozen) -> Callable[[str], bool]:
  if frozen is None:
    return lambda name: False
  if isinstance(frozen, str):
    pattern = re.compile(frozen)
    return lambda name: pattern.fullmatch(name) is not None
  return frozen


def param_labels(student_params, *, frozen=None):
  """Tree like `student_params` with its submodule's name ("backbone", ...) or `FROZEN` at every leaf.

  Args:
    student_params: student parameter tree (pure dict or `nnx.State`), or one of gradients.
    frozen: None, a regex fully matching frozen full names (e.g. "backbone/.*"), or a predicate.
  """
  is_frozen = _frozen_predicate(frozen)

  def label(path, _):
    name = path_name(path)
    return FROZEN if is_frozen(name) else _split_submodule(name)[0]

  return jax.tree_util.tree_map_with_path(label, student_params)


# ------------------------------------------------------------------------------------------------
# Gradient clipping per submodule.


def submodule_grad_norms(grads) -> dict[str, jax.Array]:
  """{submodule: float32 global L2 norm of its gradients}, keyed by the top-level names.

  These are the norms Meta's per-module `clip_grad_norm_` computes (and would clip against).
  """
  leaves: dict[str, list[jax.Array]] = {}
  for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
    module, _ = _split_submodule(path_name(path))
    leaves.setdefault(module, []).append(g)
  return {
      m: jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32))) for g in gs))
      for m, gs in leaves.items()
  }


def clip_by_submodule_norm(max_norm: float) -> optax.GradientTransformation:
  """Scales each top-level submodule's gradients by `min(1, max_norm / (norm + 1e-6))`.

  This is torch's `clip_grad_norm_` applied separately to every student submodule, as Meta does
  (a huge head gradient does not shrink the backbone's, and vice versa). optax's
  `clip_by_global_norm` would clip all submodules together and lacks torch's 1e-6.
  """

  def update_fn(updates, state, params=None):
    del params
    norms = submodule_grad_norms(updates)
    coefs = {m: jnp.minimum(1.0, max_norm / (n + CLIP_EPS)) for m, n in norms.items()}

    def clip(path, g):
      module, _ = _split_submodule(path_name(path))
      return (g * coefs[module]).astype(g.dtype)

    return jax.tree_util.tree_map_with_path(clip, updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


# ------------------------------------------------------------------------------------------------
# The optimiser.


def _scale_by_param_groups(groups: dict[str, ParamGroup], lr, wd, last_layer_lr) -> optax.GradientTransformation:
  """torch.optim.AdamW's step after the moments, per parameter: u <- -lr_p * (u + wd_p * p).

  lr_p = (last_layer_lr if the parameter is a last layer else lr) * its lr multiplier, and wd_p = wd
  * its wd multiplier, looked up by the parameter's full name in `groups`. Decoupled decay is added
  before the -lr scaling, so it is multiplied by lr like in torch: a lr of exactly 0 (the frozen last
  layer) leaves the parameter bit-for-bit unchanged.
  """

  def update_fn(updates, state, params):
    def scale(path, u, p):
      group = groups[path_name(path)]
      if group.wd_mult:
        u = u + (wd * group.wd_mult) * p
      return u * (-(last_layer_lr if group.is_last_layer else lr) * group.lr_mult)

    # Leaves of other submodules are `optax.MaskedNode`s here (multi_transform), which have no leaves.
    return jax.tree_util.tree_map_with_path(scale, updates, params), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


class HoldState(NamedTuple):
  """`hold_for_steps` state: its own step counter and the held transformation's state."""

  count: jax.Array
  inner: optax.OptState


def hold_for_steps(inner: optax.GradientTransformation, n_steps: int) -> optax.GradientTransformation:
  """`inner`, except that for its first `n_steps` updates it outputs zeros and keeps its state.

  Freezing a submodule for the first steps this way leaves its optimizer state exactly as at
  initialisation (no Adam moments or step count accumulate on frozen steps), so at step `n_steps`
  it starts as if training began there.
  """

  def init_fn(params):
    return HoldState(jnp.zeros([], jnp.int32), inner.init(params))

  def update_fn(updates, state, params=None):
    new_updates, new_inner = inner.update(updates, state.inner, params)
    hold = state.count < n_steps
    new_updates = jax.tree.map(lambda u: jnp.where(hold, jnp.zeros_like(u), u), new_updates)
    new_inner = jax.tree.map(lambda old, new: jnp.where(hold, old, new), state.inner, new_inner)
    return new_updates, HoldState(optax.safe_int32_increment(state.count), new_inner)

  return optax.GradientTransformation(init_fn, update_fn)


def build_optimizer(
    params,
    *,
    learning_rate: ScalarOrSchedule,
    weight_decay: ScalarOrSchedule,
    last_layer_learning_rate: ScalarOrSchedule | None = None,
    layerwise_decay: float = LAYERWISE_DECAY,
    patch_embed_lr_mult: float = PATCH_EMBED_LR_MULT,
    clip_grad: float | None = CLIP_GRAD,
    b1: float = ADAMW_B1,
    b2: float = ADAMW_B2,
    eps: float = ADAMW_EPS,
    frozen: str | Callable[[str], bool] | None = None,
    frozen_steps: dict[str, int] | None = None,
) -> optax.GradientTransformationExtraArgs:
  """Meta's DINOv2 optimiser as an optax transformation.

  Args:
    params: the student parameter tree `{"backbone": ..., "dino_head": ..., ["ibot_head": ...]}`
      (pure dict or `nnx.State`; arrays or `jax.ShapeDtypeStruct`s): fixes the parameter groups.
      `init`/`update` must then be called with trees of the same structure.
    learning_rate: base lr, a float/array or a schedule `step -> scalar` (e.g. an optax schedule).
    weight_decay: base weight decay, same kinds.
    last_layer_learning_rate: base lr of the heads' `last_layer` (Meta's `last_layer_lr`, 0 during
      the first epoch); defaults to `learning_rate`.
    layerwise_decay, patch_embed_lr_mult: Meta's `optim.layerwise_decay` / `patch_embed_lr_mult`.
    clip_grad: per-submodule max gradient norm (Meta's `optim.clip_grad`); None or 0 disables it.
    b1, b2, eps: AdamW constants (torch's defaults, as Meta).
    frozen: parameters that are not trained (Meta's `requires_grad=False`): None, a regex fully
      matching full names (e.g. "backbone/.*"), or a predicate on the full name. Their updates are
      zero, they keep no Adam state and their gradients do not count in the clipping norm.
    frozen_steps: {submodule: n}: that submodule gets no update during the first n updates and its
      optimizer state stays untouched meanwhile (`hold_for_steps`), e.g. {"backbone": 1000} to
      train only fresh heads on top of loaded weights first.

  Returns:
    A transformation whose `update(grads, state, params)` returns updates to add to `params`
    (`optax.apply_updates`); `params` is required (weight decay). Schedules are read at the
    transformation's own step counter, which is 0 at the first update. `state.hyperparams` holds
    `learning_rate`, `weight_decay` and `last_layer_learning_rate` as used by the latest update
    (numeric ones may be overwritten there between steps to inject traced values).
  """
  if last_layer_learning_rate is None:
    last_layer_learning_rate = learning_rate
  groups = param_groups(params, layerwise_decay=layerwise_decay, patch_embed_lr_mult=patch_embed_lr_mult)
  submodules = sorted({_split_submodule(name)[0] for name in groups})
  frozen_steps = dict(frozen_steps or {})
  unknown = set(frozen_steps) - set(submodules)
  if unknown:
    raise ValueError(f"frozen_steps names {sorted(unknown)}; the submodules are {submodules}")
  labels = lambda tree: param_labels(tree, frozen=frozen)
  is_frozen = lambda tree: jax.tree.map(lambda label: label == FROZEN, labels(tree))

  def make(learning_rate, weight_decay, last_layer_learning_rate):
    per_submodule = {}
    for module in submodules:
      adamw = optax.chain(optax.scale_by_adam(b1, b2, eps),
                          _scale_by_param_groups(groups, learning_rate, weight_decay, last_layer_learning_rate))
      n_hold = frozen_steps.get(module, 0)
      per_submodule[module] = hold_for_steps(adamw, n_hold) if n_hold else adamw
    per_submodule[FROZEN] = optax.set_to_zero()
    return optax.chain(
        # Zero frozen gradients first so that they do not count in the clipping norms.
        optax.masked(optax.set_to_zero(), is_frozen),
        clip_by_submodule_norm(clip_grad) if clip_grad else optax.identity(),
        optax.multi_transform(per_submodule, labels),
    )

  # float32 hyperparameters even for low-precision params: a bf16 lr would be off by up to 0.4%.
  return optax.inject_hyperparams(make, hyperparam_dtype=jnp.float32)(
      learning_rate=learning_rate, weight_decay=weight_decay,
      last_layer_learning_rate=last_layer_learning_rate)
