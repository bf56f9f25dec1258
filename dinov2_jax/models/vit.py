"""DINOv2 Vision Transformer backbone (Flax NNX), faithful to Meta's `DinoVisionTransformer`.

Images are NHWC float32 (JAX convention); Meta's are NCHW. Everything else follows Meta: the
constructor fields and their meanings, the token order `[cls, registers, patches]`, the mask token
replacing patch embeddings before the positional embedding is added, registers inserted after it
(they get no positional embedding), exact GELU, LayerNorm eps 1e-6, and Meta's positional-embedding
resampling (see `posemb.py`).

Parameter names mirror Meta's state-dict names (`blocks/3/attn/qkv/kernel` <-> `blocks.3.attn.qkv.weight`)
so that the converter in `dinov2_jax.weights` stays a table, and so the optimizer can apply Meta's
name-based rules (layer-wise decay, no decay on norms/biases/gammas) to the same strings.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dinov2_jax.data import layout
from dinov2_jax.fusion import materialize_cotangent
from dinov2_jax.models.attention import ATTENTION_IMPLS, multi_head_attention
from dinov2_jax.models.posemb import resample_patch_pos_embed

LAYER_NORM_EPS = 1e-6
FFN_LAYERS = ("mlp", "swiglu", "swiglufused", "identity")
DROP_PATH_MODES = ("meta", "per_sample")
# Logical names of the residual stream's dimensions, for sharding constraints.
TOKEN_AXES = ("batch", "tokens", "embed")
Constrain = Callable[[jax.Array, Sequence[str | None]], jax.Array]


def _no_constraint(x, logical_axes):
  del logical_axes
  return x

# remat_policy -> what jax.checkpoint may keep from the forward pass (None: nothing, recompute all).
REMAT_POLICIES = {
    "none": None,
    "full": None,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def check_patch_multiple(size: int, patch_size: int, what: str, patch_what: str = "patch_size") -> int:
  """Returns `size` if it is a positive multiple of `patch_size`, else raises a ValueError naming
  `what` and the nearest valid sizes. The one statement of this rule (images, crops, configs).

  Meta's patch embedding silently drops the leftover pixels (its default local crop of 96 px with
  patch 14 loses 12); we refuse such sizes instead.
  """
  if size > 0 and size % patch_size == 0:
    return size
  lower = size // patch_size * patch_size
  nearest = [v for v in (lower, lower + patch_size) if v > 0]
  raise ValueError(f"{what}={size} is not a multiple of {patch_what}={patch_size}; "
                   f"nearest valid sizes: {' or '.join(map(str, nearest))}.")


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  """Backbone hyper-parameters. The first block of fields are Meta's constructor arguments.

  Attributes:
    img_size: training resolution; fixes the stored positional-embedding grid (img_size // patch_size).
    patch_size: patch side in pixels.
    in_chans: image channels.
    embed_dim, depth, num_heads, mlp_ratio: transformer size.
    qkv_bias, proj_bias, ffn_bias: biases of the attention input/output and FFN layers.
    drop_path_rate: stochastic-depth rate (training only).
    drop_path_uniform: same rate in every block (True) or `linspace(0, rate, depth)` (False).
    init_values: LayerScale initial value; None or 0 disables LayerScale (no `ls1`/`ls2`).
    ffn_layer: "mlp", "swiglu"/"swiglufused" (same layer, Meta's hidden-size rounding) or "identity".
    num_register_tokens: number of register tokens.
    interpolate_antialias: antialiased bicubic resampling of the positional embedding.
    interpolate_offset: Meta's 0.1 offset in the resampling scale factor; 0 resamples by size.
    dtype: compute dtype of the matmuls ("float32" or "bfloat16"), with Meta's autocast semantics:
      matmul and convolution inputs (and GELU) in this dtype; the residual stream, LayerScale,
      LayerNorms, the attention softmax and all outputs stay float32. Parameters stay in
      `param_dtype`.
    param_dtype: parameter dtype.
    drop_path_mode: "meta" (Meta's SSL training path, `forward_features_list` -> `forward_nested`:
      for any rate > 0 the residual is computed for a random subset of the batch and rescaled) or
      "per_sample" (per-sample drop path, timm's DropPath). Meta's single-tensor `forward` uses the
      subset only above 0.1 and per-sample drop path below; its training never takes that path.
    drop_path_groups: for Meta's batch-subset drop path, draw the subset separately in this many
      equal groups of the batch (Meta draws it per GPU); the trainer sets it to the number of data
      shards so each device keeps working on its own samples.
    attention_impl: "auto" (cuDNN flash attention on NVIDIA GPUs in bf16/fp16, XLA elsewhere), "xla"
      or "cudnn" (`dinov2_jax/models/attention.py`).
    remat_policy: what the backward pass recomputes instead of storing, per block: "none" (store
      everything), "full" (recompute each block from its input), "dots_saveable" (keep the matmul
      outputs, recompute the elementwise work) or "dots_with_no_batch_dims_saveable".
    scan_blocks: run the blocks as one `jax.lax.scan` over their stacked parameters: the compiled
      program holds one block instead of `depth` (compile time and program size stop growing with
      depth). Parameters stay per block (`blocks/3/...`: weight files, checkpoints and the
      optimizer's layer-wise rules are unchanged); the stacking happens inside the jitted function.
      Training with stochastic depth needs equal rates in all blocks (`drop_path_uniform`, Meta's
      training default). Results equal the unrolled loop's up to float rounding.
    grad_barrier: materialise the residual-stream gradient at every block boundary in the backward
      pass (`materialize_cotangent`); None turns it on for the CPU backend only, where it removes
      a quarter of the ViT-S/14 train step's time (benchmarks/RESULTS.md). Results change only by
      float rounding.
  """

  img_size: int = 224
  patch_size: int = 16
  in_chans: int = 3
  embed_dim: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  proj_bias: bool = True
  ffn_bias: bool = True
  drop_path_rate: float = 0.0
  drop_path_uniform: bool = False
  init_values: float | None = None
  ffn_layer: str = "mlp"
  num_register_tokens: int = 0
  interpolate_antialias: bool = False
  interpolate_offset: float = 0.1
  dtype: str = "float32"
  param_dtype: str = "float32"
  drop_path_mode: str = "meta"
  drop_path_groups: int = 1
  attention_impl: str = "auto"
  remat_policy: str = "none"
  scan_blocks: bool = False
  grad_barrier: bool | None = None

  def __post_init__(self):
    if self.ffn_layer not in FFN_LAYERS:
      raise ValueError(f"ffn_layer={self.ffn_layer!r}; expected one of {FFN_LAYERS}")
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ValueError(f"attention_impl={self.attention_impl!r}; expected one of {ATTENTION_IMPLS}")
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"remat_policy={self.remat_policy!r}; expected one of {tuple(REMAT_POLICIES)}")
    if self.drop_path_mode not in DROP_PATH_MODES:
      raise ValueError(f"drop_path_mode={self.drop_path_mode!r}; expected one of {DROP_PATH_MODES}")
    if self.embed_dim % self.num_heads:
      raise ValueError(f"embed_dim={self.embed_dim} is not divisible by num_heads={self.num_heads}")
    check_patch_multiple(self.img_size, self.patch_size, "img_size")

  @property
  def layerscale(self) -> bool:
    return bool(self.init_values)

  @property
  def grid_size(self) -> int:
    return self.img_size // self.patch_size

  @property
  def ffn_hidden_dim(self) -> int:
    hidden = int(self.embed_dim * self.mlp_ratio)
    if self.ffn_layer in ("swiglu", "swiglufused"):
      # Meta's SwiGLUFFNFused keeps 2/3 of the MLP width, rounded up to a multiple of 8.
      hidden = (int(hidden * 2 / 3) + 7) // 8 * 8
    return hidden

  def block_drop_rates(self) -> list[float]:
    if self.drop_path_uniform:
      return [self.drop_path_rate] * self.depth
    return [float(r) for r in np.linspace(0, self.drop_path_rate, self.depth)]

  def replace(self, **changes: Any) -> "ViTConfig":
    return dataclasses.replace(self, **changes)


# Meta's builders (`vit_small` ... `vit_giant2`, the `student.arch` names of its configs): head dim 64.
ARCH_SIZES = {
    "vit_small": dict(embed_dim=384, depth=12, num_heads=6),
    "vit_base": dict(embed_dim=768, depth=12, num_heads=12),
    "vit_large": dict(embed_dim=1024, depth=24, num_heads=16),
    "vit_giant2": dict(embed_dim=1536, depth=40, num_heads=24),
}

# The eight backbones Meta released on torch hub. Shared settings: patch 14, 518 px positional grid
# (37 x 37), LayerScale, all biases on; the giant uses the fused SwiGLU FFN.
_HUB_COMMON = dict(img_size=518, patch_size=14, init_values=1.0)
_REGISTERS = dict(num_register_tokens=4, interpolate_antialias=True, interpolate_offset=0.0)
_SIZES = {
    "s": ARCH_SIZES["vit_small"],
    "b": ARCH_SIZES["vit_base"],
    "l": ARCH_SIZES["vit_large"],
    "g": dict(ARCH_SIZES["vit_giant2"], ffn_layer="swiglufused"),
}
PRESETS: dict[str, ViTConfig] = {}
for _size, _fields in _SIZES.items():
  PRESETS[f"dinov2_vit{_size}14"] = ViTConfig(**_HUB_COMMON, **_fields)
  PRESETS[f"dinov2_vit{_size}14_reg"] = ViTConfig(**_HUB_COMMON, **_fields, **_REGISTERS)


def preset(name: str, **overrides: Any) -> ViTConfig:
  """The `ViTConfig` of a Meta hub model (e.g. "dinov2_vitb14_reg"), with fields overridden."""
  if name not in PRESETS:
    raise ValueError(f"Unknown preset {name!r}; available: {', '.join(PRESETS)}")
  return PRESETS[name].replace(**overrides)


def _dense(rngs, cfg: ViTConfig, d_in: int, d_out: int, bias: bool) -> nnx.Linear:
  # Meta initialises every nn.Linear with trunc_normal(std=.02) truncated at +-2 (absolute), which is
  # an untruncated normal in practice, and zero bias.
  return nnx.Linear(
      d_in, d_out, use_bias=bias, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype),
      kernel_init=nnx.initializers.normal(0.02), rngs=rngs)


def _layer_norm(rngs, cfg: ViTConfig, dim: int, eps: float = LAYER_NORM_EPS) -> nnx.LayerNorm:
  # float32 whatever the compute dtype: autocast runs layer_norm in float32 (and so its output).
  return nnx.LayerNorm(
      dim, epsilon=eps, dtype=jnp.float32, param_dtype=jnp.dtype(cfg.param_dtype),
      use_fast_variance=False, rngs=rngs)


def _uniform(bound: float):
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


class PatchEmbed(nnx.Module):
  """Non-overlapping p x p patches -> D features (Meta's Conv2d k=s=p). (B,H,W,C) -> (B,h*w,D)."""

  def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
    p, c = cfg.patch_size, cfg.in_chans
    # PyTorch's default Conv2d init (kaiming_uniform a=sqrt(5)): U(+-1/sqrt(fan_in)) for weight and bias.
    bound = 1.0 / math.sqrt(c * p * p)
    self.proj = nnx.Conv(
        c, cfg.embed_dim, (p, p), strides=(p, p), padding="VALID",
        dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype),
        kernel_init=_uniform(bound), bias_init=_uniform(bound), rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.proj(x)
    return x.reshape(x.shape[0], -1, x.shape[-1])


class LayerScale(nnx.Module):
  """x * gamma in float32: with Meta's init (1e-5) a bf16 product added to a bf16 residual stream
  would be below its resolution and every block an exact identity."""

  def __init__(self, dim: int, init_values: float, param_dtype):
    self.gamma = nnx.Param(jnp.full((dim,), init_values, param_dtype))

  def __call__(self, x):
    return x.astype(jnp.float32) * self.gamma[...].astype(jnp.float32)


class Attention(nnx.Module):
  """Multi-head self-attention; `qkv` rows are [q; k; v], each head-major, as in Meta."""

  def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
    self.num_heads = cfg.num_heads
    self.attention_impl = cfg.attention_impl
    self.qkv = _dense(rngs, cfg, cfg.embed_dim, 3 * cfg.embed_dim, cfg.qkv_bias)
    self.proj = _dense(rngs, cfg, cfg.embed_dim, cfg.embed_dim, cfg.proj_bias)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.proj(self.attend(self.qkv(x)))

  def attend(self, qkv: jax.Array) -> jax.Array:
    """(B, N, 3D) projected [q; k; v] -> (B, N, D) attention output, before `proj`."""
    b, n, d3 = qkv.shape
    qkv = qkv.reshape(b, n, 3, self.num_heads, d3 // (3 * self.num_heads))
    return multi_head_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], self.attention_impl).reshape(b, n, -1)


class Mlp(nnx.Module):

  def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
    self.fc1 = _dense(rngs, cfg, cfg.embed_dim, cfg.ffn_hidden_dim, cfg.ffn_bias)
    self.fc2 = _dense(rngs, cfg, cfg.ffn_hidden_dim, cfg.embed_dim, cfg.ffn_bias)

  def __call__(self, x):
    return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


class SwiGLUFFN(nnx.Module):
  """Meta's SwiGLUFFNFused: `w12` packs [gate; value], out = w3(silu(gate) * value)."""

  def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
    self.w12 = _dense(rngs, cfg, cfg.embed_dim, 2 * cfg.ffn_hidden_dim, cfg.ffn_bias)
    self.w3 = _dense(rngs, cfg, cfg.ffn_hidden_dim, cfg.embed_dim, cfg.ffn_bias)

  def __call__(self, x):
    gate, value = jnp.split(self.w12(x), 2, axis=-1)
    return self.w3(jax.nn.silu(gate) * value)


def _identity(x):
  return x


def _make_ffn(cfg: ViTConfig, rngs: nnx.Rngs):
  if cfg.ffn_layer == "mlp":
    return Mlp(cfg, rngs=rngs)
  if cfg.ffn_layer in ("swiglu", "swiglufused"):
    return SwiGLUFFN(cfg, rngs=rngs)
  return _identity


def _drop_path(x: jax.Array, rate: float, key: jax.Array) -> jax.Array:
  """Per-sample stochastic depth: zero a sample's residual with prob `rate`, rescale the rest."""
  keep = 1.0 - rate
  mask = jax.random.bernoulli(key, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
  return x * (mask.astype(x.dtype) / keep)


def _residual_on_subset(x: jax.Array, residual_fn, rate: float, key: jax.Array, groups: int = 1) -> jax.Array:
  """Meta's `drop_add_residual_stochastic_depth`: the residual of a random batch subset, rescaled.

  Meta draws the subset on each GPU from its local batch. Here the batch is split into `groups`
  equal groups (set to the number of data shards when training on a mesh), and each group keeps
  `max(int(b * (1 - rate)), 1)` of its `b` samples, scaled by `b / subset`. Gathering within groups
  keeps the work on each device's own shard (a global gather would replicate the batch). The sizes
  are static, so this is jit-friendly and saves the compute of the dropped samples, as in Meta.
  """
  picked, add_back = _batch_subset(x, rate, key, groups)
  return add_back(residual_fn(picked))


def _batch_subset(x: jax.Array, rate: float, key: jax.Array, groups: int = 1):
  """`_residual_on_subset` in two halves: (the subset's rows (groups * subset, ...), and a function
  adding their residual back to `x`, rescaled)."""
  if x.shape[0] % groups:
    groups = 1
  per_group = x.shape[0] // groups
  subset = max(int(per_group * (1 - rate)), 1)
  keys = jax.random.split(key, groups) if groups > 1 else key[None]
  idx = jax.vmap(lambda k: jax.random.permutation(k, per_group)[:subset])(keys)  # (groups, subset)
  grouped = x.reshape((groups, per_group) + x.shape[1:])
  picked = jax.vmap(lambda g, i: g[i])(grouped, idx)  # (groups, subset, ...)

  def add_back(residual):
    residual = residual.astype(x.dtype).reshape(picked.shape) * (per_group / subset)
    return jax.vmap(lambda g, i, r: g.at[i].add(r))(grouped, idx, residual).reshape(x.shape)

  return picked.reshape((groups * subset,) + x.shape[1:]), add_back


def _concat_tokens(xs: Sequence[jax.Array], groups: int) -> jax.Array:
  """(B_i, T_i, D) arrays -> (sum B_i T_i, D) rows, each group's (data shard's) rows kept together."""
  if any(x.shape[0] % groups for x in xs):
    groups = 1
  return layout.concat_shards([x.reshape(-1, x.shape[-1]) for x in xs], groups)[0]


def _split_tokens(rows: jax.Array, like: Sequence[jax.Array], groups: int) -> list[jax.Array]:
  """Inverse of `_concat_tokens`, for rows of any width: -> (B_i, T_i, rows.shape[-1])."""
  if any(x.shape[0] % groups for x in like):
    groups = 1
  sizes = [x.shape[0] // groups * x.shape[1] for x in like]
  parts = layout.split_shards(rows, sizes, groups)
  return [p.reshape(x.shape[0], x.shape[1], -1) for p, x in zip(parts, like)]


class Block(nnx.Module):
  """Pre-norm transformer block: x + ls1(attn(norm1(x))), then x + ls2(ffn(norm2(x)))."""

  def __init__(self, cfg: ViTConfig, drop_rate: float, *, rngs: nnx.Rngs):
    self.drop_rate = drop_rate
    self.drop_path_mode = cfg.drop_path_mode
    self.drop_path_groups = cfg.drop_path_groups
    self.norm1 = _layer_norm(rngs, cfg, cfg.embed_dim)
    self.attn = Attention(cfg, rngs=rngs)
    self.norm2 = _layer_norm(rngs, cfg, cfg.embed_dim)
    self.mlp = _make_ffn(cfg, rngs)
    if cfg.layerscale:
      self.ls1 = LayerScale(cfg.embed_dim, cfg.init_values, jnp.dtype(cfg.param_dtype))
      self.ls2 = LayerScale(cfg.embed_dim, cfg.init_values, jnp.dtype(cfg.param_dtype))
    else:
      self.ls1 = self.ls2 = _identity

  # The residual stream x is float32; the branches compute their matmuls in the compute dtype and
  # return float32 (LayerScale, or the cast below without it), so the additions are float32.
  def _attn_residual(self, x):
    return self.ls1(self.attn(self.norm1(x))).astype(x.dtype)

  def _ffn_residual(self, x):
    return self.ls2(self.mlp(self.norm2(x))).astype(x.dtype)

  def __call__(self, x: jax.Array, drop_path_key: jax.Array | None = None) -> jax.Array:
    if drop_path_key is None or self.drop_rate <= 0.0:
      x = x + self._attn_residual(x)
      return x + self._ffn_residual(x)
    key_attn, key_ffn = jax.random.split(drop_path_key)
    if self.drop_path_mode == "meta":
      x = _residual_on_subset(x, self._attn_residual, self.drop_rate, key_attn, self.drop_path_groups)
      return _residual_on_subset(x, self._ffn_residual, self.drop_rate, key_ffn, self.drop_path_groups)
    x = x + _drop_path(self._attn_residual(x), self.drop_rate, key_attn)
    return x + _drop_path(self._ffn_residual(x), self.drop_rate, key_ffn)

  def apply_list(self, xs: Sequence[jax.Array], drop_path_keys: Sequence[jax.Array | None]) -> list[jax.Array]:
    """The block on several (B_i, T_i, D) batches at once, element i equal to `self(xs[i], keys[i])`.

    The linear layers run once on all batches' tokens concatenated (attention stays per batch), as
    Meta's nested tensors do: on a mesh each kernel then gets one gradient, reduced once, instead of
    one per batch. Tokens are concatenated within each data shard, so no row changes device.
    """
    groups = self.drop_path_groups

    def attn_branch(ys):
      rows = self.attn.qkv(_concat_tokens([self.norm1(y) for y in ys], groups))
      out = [self.attn.attend(q) for q in _split_tokens(rows, ys, groups)]
      rows = self.attn.proj(_concat_tokens(out, groups))
      return [self.ls1(r).astype(y.dtype) for r, y in zip(_split_tokens(rows, ys, groups), ys)]

    def ffn_branch(ys):
      rows = self.mlp(_concat_tokens([self.norm2(y) for y in ys], groups))
      return [self.ls2(r).astype(y.dtype) for r, y in zip(_split_tokens(rows, ys, groups), ys)]

    keys = [None if k is None or self.drop_rate <= 0.0 else jax.random.split(k) for k in drop_path_keys]
    for branch, which in ((attn_branch, 0), (ffn_branch, 1)):
      inputs, finish = [], []
      for x, k in zip(xs, keys):
        if k is None:
          inputs.append(x)
          finish.append(lambda r, x=x: x + r)
        elif self.drop_path_mode == "meta":
          picked, add_back = _batch_subset(x, self.drop_rate, k[which], groups)
          inputs.append(picked)
          finish.append(add_back)
        else:
          inputs.append(x)
          finish.append(lambda r, x=x, k=k[which]: x + _drop_path(r, self.drop_rate, k))
      xs = [f(r) for f, r in zip(finish, branch(inputs))]
    return xs


def check_image_shape(shape: Sequence[int], patch_size: int, in_chans: int = 3) -> None:
  """Raises a ValueError naming the problem if `shape` is not (B, H, W, C) with H, W multiples of p."""
  if len(shape) != 4:
    raise ValueError(f"expected images of shape (batch, height, width, {in_chans}) (NHWC), got {tuple(shape)}")
  _, h, w, c = shape
  if c != in_chans:
    hint = " The input looks NCHW; transpose it with x.transpose(0, 2, 3, 1)." if h == in_chans else ""
    raise ValueError(f"expected {in_chans} channels in the last axis (NHWC), got shape {tuple(shape)}.{hint}")
  for name, size in (("height", h), ("width", w)):
    check_patch_multiple(size, patch_size, f"image {name}", "the patch size")


class DinoVisionTransformer(nnx.Module):
  """Meta's DINOv2 backbone. Call `forward_features`, `get_intermediate_layers` or the module itself."""

  def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d, dt = cfg.embed_dim, jnp.dtype(cfg.param_dtype)
    self.patch_embed = PatchEmbed(cfg, rngs=rngs)
    self.cls_token = nnx.Param(1e-6 * jax.random.normal(rngs.params(), (1, 1, d), dt))
    self.pos_embed = nnx.Param(0.02 * jax.random.normal(rngs.params(), (1, cfg.grid_size ** 2 + 1, d), dt))
    if cfg.num_register_tokens:
      self.register_tokens = nnx.Param(
          1e-6 * jax.random.normal(rngs.params(), (1, cfg.num_register_tokens, d), dt))
    self.mask_token = nnx.Param(jnp.zeros((1, d), dt))
    self.blocks = nnx.List([Block(cfg, r, rngs=rngs) for r in cfg.block_drop_rates()])
    self.norm = _layer_norm(rngs, cfg, d)

  def _pos_embed(self, h: int, w: int) -> jax.Array:
    pos = self.pos_embed[...]
    n_stored = pos.shape[1] - 1
    if h * w == n_stored and h == w:  # Meta skips resampling only for square inputs of the stored size.
      return pos
    patch_pos = resample_patch_pos_embed(
        pos[0, 1:], h, w, offset=self.cfg.interpolate_offset, antialias=self.cfg.interpolate_antialias)
    return jnp.concatenate([pos[:, :1], patch_pos[None].astype(pos.dtype)], axis=1)

  def prepare_tokens(self, images: jax.Array, masks: jax.Array | None = None) -> jax.Array:
    """(B,H,W,C) images [+ (B,h*w) bool masks] -> (B, 1+R+h*w, D) tokens, in Meta's order."""
    check_image_shape(images.shape, self.cfg.patch_size, self.cfg.in_chans)
    b, h, w = images.shape[0], images.shape[1] // self.cfg.patch_size, images.shape[2] // self.cfg.patch_size
    # The convolution runs in the compute dtype; the residual stream starts in float32.
    x = self.patch_embed(images.astype(jnp.dtype(self.cfg.dtype))).astype(jnp.float32)
    if masks is not None:
      if masks.shape != (b, h * w):
        raise ValueError(f"masks must have shape (batch, patches) = {(b, h * w)}, got {masks.shape}")
      x = jnp.where(masks[..., None], self.mask_token[...].astype(x.dtype)[None], x)
    cls = jnp.broadcast_to(self.cls_token[...].astype(x.dtype), (b, 1, x.shape[-1]))
    x = jnp.concatenate([cls, x], axis=1) + self._pos_embed(h, w).astype(x.dtype)
    if self.cfg.num_register_tokens:
      reg = jnp.broadcast_to(self.register_tokens[...].astype(x.dtype), (b,) + self.register_tokens.shape[1:])
      x = jnp.concatenate([x[:, :1], reg, x[:, 1:]], axis=1)
    return x

  def _run_blocks(self, xs: Sequence[jax.Array], drop_path_keys: Sequence[jax.Array | None],
                  keep: Sequence[int] = (), constrain: Constrain | None = None):
    """Runs all blocks on a list of (B_i, T_i, D) token arrays, block by block.

    Each block is applied to every array before the next block runs (Meta's `forward_nested`), so
    on a sharded mesh a block's parameters are gathered once for all of them and their gradients
    summed before they are reduced. Returns the outputs and, for a single input, the outputs of
    the blocks in `keep`. `constrain(x, ("batch", "tokens", "embed"))`, if given, pins the residual
    stream's sharding at every block boundary (`dinov2_jax/train/sharding.py` activation_constraint).
    """
    constrain = constrain or _no_constraint
    xs = [constrain(x, TOKEN_AXES) for x in xs]
    depth = len(self.blocks)
    keys = [None if k is None else jax.random.split(k, depth) for k in drop_path_keys]
    # Blocks before the first kept one may run as a scan; kept blocks (the last few, for the
    # evaluations) run one by one, so their outputs need not be stacked for every block.
    n_scanned = min(min(keep, default=depth), depth) if self.cfg.scan_blocks else 0
    if n_scanned:
      xs = self._scan_blocks(xs, n_scanned, [None if k is None else k[:n_scanned] for k in keys], constrain)
    kept = []
    for i in range(n_scanned, depth):
      xs = [constrain(y, TOKEN_AXES) for y in
            self._apply_block(self.blocks[i], xs, [None if k is None else k[i] for k in keys])]
      if i in keep:
        kept.append(xs[0])
    return xs, kept

  def _apply_block(self, block: Block, xs: Sequence[jax.Array], keys: Sequence[jax.Array | None]) -> list[jax.Array]:
    """One block on every array of `xs`, with the configured remat policy and CPU gradient barrier."""
    def apply(blk, ys, ks):
      return [blk(ys[0], ks[0])] if len(ys) == 1 else blk.apply_list(ys, ks)

    if self.cfg.remat_policy != "none":
      apply = nnx.remat(apply, policy=REMAT_POLICIES[self.cfg.remat_policy])
    xs = apply(block, list(xs), list(keys))
    barrier = self.cfg.grad_barrier if self.cfg.grad_barrier is not None else jax.default_backend() == "cpu"
    return [materialize_cotangent(x) for x in xs] if barrier else xs

  def _scan_blocks(self, xs: Sequence[jax.Array], n: int, keys: Sequence[jax.Array | None],
                   constrain: Constrain) -> list[jax.Array]:
    """The first `n` blocks as one `lax.scan` over their parameters, stacked here (inside jit)."""
    graphdefs, states = zip(*(nnx.split(block) for block in self.blocks[:n]))
    if any(k is not None for k in keys) and len(set(graphdefs)) > 1:
      raise ValueError("scan_blocks with stochastic depth needs the same drop-path rate in every block: "
                       "set drop_path_uniform=True (Meta's training default) or scan_blocks=False")
    stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *states)

    def body(ys, per_block):
      state, ks = per_block
      ys = self._apply_block(nnx.merge(graphdefs[0], state), ys, ks)
      return [constrain(y, TOKEN_AXES) for y in ys], None

    xs, _ = jax.lax.scan(body, list(xs), (stacked, list(keys)))
    return xs

  def forward_features(
      self, images: jax.Array, masks: jax.Array | None = None, *, drop_path_key: jax.Array | None = None,
      constrain: Constrain | None = None) -> dict[str, jax.Array]:
    """Meta's `forward_features`.

    Args:
      images: (B, H, W, C) float images, H and W multiples of the patch size.
      masks: optional (B, h*w) bool, True where the patch embedding is replaced by the mask token.
      drop_path_key: PRNG key; when given, stochastic depth is active (training mode).
      constrain: optional `(x, logical_axes) -> x` sharding constraint for the residual stream.

    Returns:
      dict with `x_norm_clstoken` (B, D), `x_norm_regtokens` (B, R, D), `x_norm_patchtokens`
      (B, h*w, D), `x_prenorm` (B, 1+R+h*w, D) and `masks` (as given); float32 in every compute
      dtype (the residual stream and the norms are float32).
    """
    return self.forward_features_list([images], [masks], drop_path_keys=[drop_path_key], constrain=constrain)[0]

  def forward_features_list(
      self, images: Sequence[jax.Array], masks: Sequence[jax.Array | None] | None = None, *,
      drop_path_keys: Sequence[jax.Array | None] | None = None,
      constrain: Constrain | None = None) -> list[dict[str, jax.Array]]:
    """Meta's `forward_features_list`: several batches (e.g. global and local crops, of different
    sizes) through the blocks together, block by block. Element i equals
    `forward_features(images[i], masks[i], drop_path_key=drop_path_keys[i])`.
    """
    masks = [None] * len(images) if masks is None else list(masks)
    keys = [None] * len(images) if drop_path_keys is None else list(drop_path_keys)
    xs = [self.prepare_tokens(x, m) for x, m in zip(images, masks)]
    xs, _ = self._run_blocks(xs, keys, constrain=constrain)
    return [{**self._final_outputs(x), "masks": m} for x, m in zip(xs, masks)]

  def _final_outputs(self, x: jax.Array) -> dict[str, jax.Array]:
    """The last block's (B, 1+R+h*w, D) tokens -> `forward_features`' normed and prenorm outputs."""
    x_norm = self.norm(x)
    r = self.cfg.num_register_tokens
    return {
        "x_norm_clstoken": x_norm[:, 0],
        "x_norm_regtokens": x_norm[:, 1:r + 1],
        "x_norm_patchtokens": x_norm[:, r + 1:],
        "x_prenorm": x,
    }

  def forward_features_and_intermediates(self, images: jax.Array, n: int = 1) -> dict[str, jax.Array]:
    """`forward_features` plus the last `n` blocks' normed CLS tokens, from one pass of the blocks.

    Inference only (no masks, no drop path): what the frozen-feature evaluations need, where
    `forward_features` and `get_intermediate_layers` would run the blocks twice.

    Args:
      images: (B, H, W, C) float images, H and W multiples of the patch size.
      n: how many of the last blocks' CLS tokens to return, 0 <= n <= depth.

    Returns:
      dict, float32, with `forward_features`' `x_norm_clstoken` (B, D),
      `x_norm_regtokens` (B, R, D), `x_norm_patchtokens` (B, h*w, D) and `x_prenorm`
      (B, 1+R+h*w, D), and `x_norm_clstoken_blocks` (B, n, D): block depth-n+j's output through the
      final LayerNorm, CLS token, at [:, j]; equal to `get_intermediate_layers(images, n,
      return_class_token=True)`'s class tokens stacked on axis 1.
    """
    depth = len(self.blocks)
    if not 0 <= n <= depth:
      raise ValueError(f"n={n} last blocks out of range for a backbone of depth {depth}")
    (x,), kept = self._run_blocks([self.prepare_tokens(images)], [None], keep=range(depth - n, depth))
    out = self._final_outputs(x)
    cls = out["x_norm_clstoken"]
    # The last kept block is the final output: reuse its norm instead of computing it twice.
    cls_blocks = [self.norm(o)[:, 0] for o in kept[:-1]] + ([cls] if n else [])
    out["x_norm_clstoken_blocks"] = (jnp.stack(cls_blocks, axis=1) if n
                                     else jnp.zeros((cls.shape[0], 0, cls.shape[-1]), cls.dtype))
    return out

  def get_intermediate_layers(
      self,
      images: jax.Array,
      n: int | Sequence[int] = 1,
      reshape: bool = False,
      return_class_token: bool = False,
      norm: bool = True,
  ) -> tuple:
    """Meta's `get_intermediate_layers`.

    Args:
      images: (B, H, W, C).
      n: an int takes the last `n` blocks; a sequence takes those 0-based block indices.
      reshape: return patch tokens as NHWC feature maps (B, h, w, D) instead of (B, h*w, D).
      return_class_token: return `(patches, cls)` pairs, cls of shape (B, D).
      norm: apply the final LayerNorm to each output.

    Returns:
      A tuple, in block order, of patch tokens (register tokens dropped) or `(patches, cls)` pairs.
    """
    depth = len(self.blocks)
    keep = intermediate_block_indices(n, depth)
    _, outputs = self._run_blocks([self.prepare_tokens(images)], [None], keep=keep)
    if norm:
      outputs = [self.norm(o) for o in outputs]
    grid = (images.shape[1] // self.cfg.patch_size, images.shape[2] // self.cfg.patch_size)
    return split_intermediate_outputs(outputs, self.cfg.num_register_tokens, grid, reshape, return_class_token)

  def __call__(self, images: jax.Array) -> jax.Array:
    """The final-normed CLS token (B, D): Meta's `forward(x)` with its identity head."""
    return self.forward_features(images)["x_norm_clstoken"]


def intermediate_block_indices(n: int | Sequence[int], depth: int) -> list[int]:
  """`get_intermediate_layers`' `n`: an int takes the last n blocks, a sequence those 0-based indices."""
  keep = [int(i) for i in (range(depth - n, depth) if isinstance(n, int) else n)]
  if any(not 0 <= i < depth for i in keep) or not keep:
    raise ValueError(f"block indices {keep} out of range for a backbone of depth {depth}")
  return keep


def split_intermediate_outputs(outputs: Sequence[jax.Array], n_prefix: int, grid: tuple[int, int], reshape: bool,
                               return_class_token: bool) -> tuple:
  """(B, 1 + R + h*w, D) block outputs -> `get_intermediate_layers`' tuple: patch tokens ((B, h*w, D),
  or (B, h, w, D) NHWC with `reshape`), paired with the CLS tokens (B, D) if asked; R = `n_prefix`
  register/storage tokens are dropped."""
  patches = [o[:, n_prefix + 1:] for o in outputs]
  if reshape:
    patches = [p.reshape(p.shape[0], grid[0], grid[1], -1) for p in patches]
  if return_class_token:
    return tuple(zip(patches, [o[:, 0] for o in outputs]))
  return tuple(patches)


def create_backbone(cfg: ViTConfig | str, *, seed: int = 0, **overrides: Any) -> DinoVisionTransformer:
  """Builds a randomly initialised backbone from a `ViTConfig` or a preset name (e.g. "dinov2_vits14")."""
  if isinstance(cfg, str):
    cfg = preset(cfg, **overrides)
  elif overrides:
    cfg = cfg.replace(**overrides)
  return initialise(lambda: DinoVisionTransformer(cfg, rngs=nnx.Rngs(seed)))


def initialise(build: Callable[[], nnx.Module]) -> nnx.Module:
  """Runs a module constructor as one compiled initialisation instead of hundreds of eager random ops."""
  graphdef, _ = nnx.split(nnx.eval_shape(build))
  state = jax.jit(lambda: nnx.split(build())[1])()
  return nnx.merge(graphdef, state)
