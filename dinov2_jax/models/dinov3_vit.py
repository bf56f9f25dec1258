"""DINOv3 Vision Transformer backbone (Flax NNX), faithful to Meta's `dinov3` `DinoVisionTransformer`.

What differs from DINOv2 (`vit.py`, whose layers are reused where they are the same):

* no learned position embedding: axial rotary embeddings (RoPE) on the queries and keys of the
  patch tokens only; the CLS and storage tokens are not rotated. Patch centres are normalised to
  [-1, 1] per axis ("separate"; or by the longer/shorter side), each half of a head's channels
  rotates with one axis, with periods `base ** (4 i / head_dim)` kept as the buffer `rope_embed.periods`;
* "storage" tokens (DINOv3's registers) after the CLS token, returned as `x_norm_regtokens`;
* LayerNorm eps 1e-5 (Meta's "layernormbf16"), or RMSNorm;
* the masked key bias: `attn.qkv.bias` is multiplied by the buffer `attn.qkv.bias_mask` (zero on the
  key third in every released model);
* SwiGLU with separate `w1` (gate), `w2`, `w3`, hidden `int(int(D * ffn_ratio) * 2 / 3)` rounded up to
  8 ("swiglu"), 32, 64 or 128 ("swiglu64" etc.);
* optionally separate norms for the CLS/storage tokens (`cls_norm`) and, in training only, for local
  crops (`local_cls_norm`, present in ViT-7B's and the satellite ViT-L's weights, unused here).

Inference only: RoPE's training-time coordinate augmentation (shift, jitter, rescale) and stochastic
depth are not implemented. Images are NHWC; parameter paths mirror Meta's state-dict names, so the
converter in `dinov2_jax.weights` stays a table. Buffers are `Buffer` variables: exported with the
parameters, never trained.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dinov2_jax.models.attention import ATTENTION_IMPLS, multi_head_attention
from dinov2_jax.models.vit import (LAYER_NORM_EPS, LayerScale, Mlp, PatchEmbed, _dense, _identity, _layer_norm,
                                   check_image_shape, intermediate_block_indices, split_intermediate_outputs)

NORM_LAYERS = {"layernorm": LAYER_NORM_EPS, "layernormbf16": 1e-5, "rmsnorm": 1e-5}  # Meta's names -> eps
# SwiGLU widths are rounded up to these multiples. "swiglu1" (no rounding) is not one of Meta's names:
# it holds transformers models whose `intermediate_size` is not a multiple of 8.
SWIGLU_ALIGN = {"swiglu": 8, "swiglu32": 32, "swiglu64": 64, "swiglu128": 128, "swiglu1": 1}
FFN_LAYERS = ("mlp",) + tuple(SWIGLU_ALIGN)
NORMALIZE_COORDS = ("separate", "min", "max")


class Buffer(nnx.Variable):
  """A non-trainable tensor Meta keeps in its state dict (RoPE periods, the key-bias mask)."""


@dataclasses.dataclass(frozen=True)
class DINOv3Config:
  """DINOv3 backbone hyper-parameters; the fields before `dtype` are Meta's constructor arguments.

  Attributes:
    img_size: training resolution (nothing in the weights depends on it).
    patch_size, in_chans, embed_dim, depth, num_heads: transformer size.
    pos_embed_rope_base: RoPE base period; or None with `pos_embed_rope_min_period` and `_max_period`.
    pos_embed_rope_normalize_coords: "separate" (each axis to [-1, 1]), "min" or "max" (both axes by
      the shorter / longer side).
    ffn_ratio: FFN width over embed_dim (before SwiGLU's 2/3).
    qkv_bias, proj_bias, ffn_bias: biases.
    layerscale_init: LayerScale initial value; None or 0 disables LayerScale.
    norm_layer: "layernorm" (eps 1e-6), "layernormbf16" (eps 1e-5, every released model) or "rmsnorm".
    ffn_layer: "mlp" (fc1, GELU, fc2) or "swiglu" / "swiglu32" / "swiglu64" / "swiglu128" (the SwiGLU
      width rounded up to a multiple of 8 / 32 / 64 / 128), or "swiglu1" (not rounded).
    n_storage_tokens: storage (register) tokens.
    mask_k_bias: multiply the qkv bias by the stored `bias_mask` (Meta: zero for the keys).
    untie_cls_and_patch_norms: a separate final norm (`cls_norm`) for the CLS and storage tokens.
    untie_global_and_local_cls_norm: a `local_cls_norm` used only in training (kept for the weights).
    dtype, param_dtype: compute and parameter dtypes ("float32" or "bfloat16").
    attention_impl: "auto", "xla" or "cudnn" (`dinov2_jax/models/attention.py`).
  """

  img_size: int = 224
  patch_size: int = 16
  in_chans: int = 3
  pos_embed_rope_base: float | None = 100.0
  pos_embed_rope_min_period: float | None = None
  pos_embed_rope_max_period: float | None = None
  pos_embed_rope_normalize_coords: str = "separate"
  embed_dim: int = 768
  depth: int = 12
  num_heads: int = 12
  ffn_ratio: float = 4.0
  qkv_bias: bool = True
  layerscale_init: float | None = None
  norm_layer: str = "layernorm"
  ffn_layer: str = "mlp"
  ffn_bias: bool = True
  proj_bias: bool = True
  n_storage_tokens: int = 0
  mask_k_bias: bool = False
  untie_cls_and_patch_norms: bool = False
  untie_global_and_local_cls_norm: bool = False
  dtype: str = "float32"
  param_dtype: str = "float32"
  attention_impl: str = "auto"

  def __post_init__(self):
    for value, allowed, name in ((self.ffn_layer, FFN_LAYERS, "ffn_layer"), (self.norm_layer, tuple(NORM_LAYERS), "norm_layer"),
                                 (self.attention_impl, ATTENTION_IMPLS, "attention_impl"),
                                 (self.pos_embed_rope_normalize_coords, NORMALIZE_COORDS, "pos_embed_rope_normalize_coords")):
      if value not in allowed:
        raise ValueError(f"{name}={value!r}; expected one of {allowed}")
    if self.embed_dim % (4 * self.num_heads):
      raise ValueError(f"embed_dim={self.embed_dim} must be a multiple of 4 * num_heads={4 * self.num_heads} (RoPE)")
    periods = (self.pos_embed_rope_min_period, self.pos_embed_rope_max_period)
    if (self.pos_embed_rope_base is None) == (None in periods) or (None in periods and periods != (None, None)):
      raise ValueError("give either pos_embed_rope_base or both pos_embed_rope_min_period and _max_period")

  @property
  def head_dim(self) -> int:
    return self.embed_dim // self.num_heads

  @property
  def num_register_tokens(self) -> int:
    """The storage tokens, under DINOv2's name (they play the same role)."""
    return self.n_storage_tokens

  @property
  def init_values(self) -> float | None:
    return self.layerscale_init

  @property
  def norm_eps(self) -> float:
    return NORM_LAYERS[self.norm_layer]

  @property
  def ffn_hidden_dim(self) -> int:
    hidden = int(self.embed_dim * self.ffn_ratio)
    if self.ffn_layer in SWIGLU_ALIGN:
      hidden = int(hidden * 2 / 3)
      hidden += -hidden % SWIGLU_ALIGN[self.ffn_layer]
    return hidden

  def replace(self, **changes: Any) -> "DINOv3Config":
    return dataclasses.replace(self, **changes)


# Meta's torch-hub DINOv3 ViTs (`dinov3/hub/backbones.py`). Shared: patch 16, RoPE base 100 with
# separate normalisation, 4 storage tokens, LayerScale, LayerNorm eps 1e-5, masked key bias.
_HUB_COMMON = dict(patch_size=16, pos_embed_rope_base=100.0, layerscale_init=1e-5, norm_layer="layernormbf16",
                   n_storage_tokens=4, mask_k_bias=True)
_SIZES = {
    "vits16": dict(embed_dim=384, depth=12, num_heads=6, ffn_ratio=4.0),
    "vits16plus": dict(embed_dim=384, depth=12, num_heads=6, ffn_ratio=6.0, ffn_layer="swiglu"),
    "vitb16": dict(embed_dim=768, depth=12, num_heads=12, ffn_ratio=4.0),
    "vitl16": dict(embed_dim=1024, depth=24, num_heads=16, ffn_ratio=4.0),
    "vitl16plus": dict(embed_dim=1024, depth=24, num_heads=16, ffn_ratio=6.0, ffn_layer="swiglu"),
    "vith16plus": dict(embed_dim=1280, depth=32, num_heads=20, ffn_ratio=6.0, ffn_layer="swiglu"),
    "vit7b16": dict(embed_dim=4096, depth=40, num_heads=32, ffn_ratio=3.0, ffn_layer="swiglu64", qkv_bias=False,
                    untie_global_and_local_cls_norm=True),
}
PRESETS: dict[str, DINOv3Config] = {f"dinov3_{name}": DINOv3Config(**_HUB_COMMON, **f) for name, f in _SIZES.items()}


# ---------------------------------------------------------------------------------------------
# Rotary position embedding.


def rope_periods(cfg: DINOv3Config) -> np.ndarray:
  """Meta's initial RoPE periods, (head_dim // 4,) float32 (the released weights store them too)."""
  n = cfg.head_dim // 4
  if cfg.pos_embed_rope_base is not None:
    exponents = 2 * np.arange(n, dtype=np.float32) / np.float32(cfg.head_dim // 2)
    return (np.float32(cfg.pos_embed_rope_base) ** exponents).astype(np.float32)
  ratio = np.float32(cfg.pos_embed_rope_max_period / cfg.pos_embed_rope_min_period)
  periods = ratio ** np.linspace(0, 1, n, dtype=np.float32) / ratio * np.float32(cfg.pos_embed_rope_max_period)
  return periods.astype(np.float32)


def patch_coordinates(h: int, w: int, normalize: str = "separate") -> np.ndarray:
  """(h*w, 2) float32 patch centres (row, column) in [-1, 1], row-major, as Meta computes them."""
  dh, dw = {"separate": (h, w), "max": (max(h, w),) * 2, "min": (min(h, w),) * 2}[normalize]
  rows = np.arange(0.5, h, dtype=np.float32) / np.float32(dh)
  cols = np.arange(0.5, w, dtype=np.float32) / np.float32(dw)
  coords = np.stack(np.meshgrid(rows, cols, indexing="ij"), axis=-1).reshape(-1, 2)
  return (np.float32(2.0) * coords - np.float32(1.0)).astype(np.float32)


class RopePositionEmbedding(nnx.Module):
  """Axial RoPE angles for an h x w patch grid; `periods` is a buffer, as in Meta's state dict."""

  def __init__(self, cfg: DINOv3Config):
    self.normalize_coords = cfg.pos_embed_rope_normalize_coords
    self.periods = Buffer(jnp.asarray(rope_periods(cfg)))

  def __call__(self, h: int, w: int) -> tuple[jax.Array, jax.Array]:
    """Returns (sin, cos), each (h*w, head_dim) float32: [row angles, column angles] twice."""
    coords = np.float32(2 * math.pi) * patch_coordinates(h, w, self.normalize_coords)  # static: (h*w, 2)
    angles = jnp.asarray(coords)[:, :, None] / self.periods[...].astype(jnp.float32)  # (h*w, 2, head_dim / 4)
    angles = jnp.tile(angles.reshape(h * w, -1), (1, 2))
    return jnp.sin(angles), jnp.cos(angles)


def rope_apply(x: jax.Array, sin: jax.Array, cos: jax.Array) -> jax.Array:
  """Rotates channel pairs (i, i + d/2) of x (..., d) by the angles: x cos + rotate_half(x) sin."""
  x1, x2 = jnp.split(x, 2, axis=-1)
  return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


# ---------------------------------------------------------------------------------------------
# Layers.


class KeyMaskedLinear(nnx.Module):
  """Meta's `LinearKMaskedBias`: y = x W + bias * bias_mask, the mask a stored buffer."""

  def __init__(self, cfg: DINOv3Config, d_in: int, d_out: int, *, rngs: nnx.Rngs):
    self.dtype = jnp.dtype(cfg.dtype)
    dt = jnp.dtype(cfg.param_dtype)
    self.kernel = nnx.Param(0.02 * jax.random.normal(rngs.params(), (d_in, d_out), dt))
    self.bias = nnx.Param(jnp.zeros((d_out,), dt))
    mask = np.ones(d_out, np.float32)
    mask[d_out // 3: 2 * d_out // 3] = 0.0  # Meta's init: no bias on the keys
    self.bias_mask = Buffer(jnp.asarray(mask, dt))

  def __call__(self, x: jax.Array) -> jax.Array:
    bias = (self.bias[...] * self.bias_mask[...]).astype(self.dtype)
    return x.astype(self.dtype) @ self.kernel[...].astype(self.dtype) + bias


class SwiGLUFFN(nnx.Module):
  """DINOv3's SwiGLU: w3(silu(w1 x) * w2 x), three separate linears."""

  def __init__(self, cfg: DINOv3Config, *, rngs: nnx.Rngs):
    d, h = cfg.embed_dim, cfg.ffn_hidden_dim
    self.w1 = _dense(rngs, cfg, d, h, cfg.ffn_bias)
    self.w2 = _dense(rngs, cfg, d, h, cfg.ffn_bias)
    self.w3 = _dense(rngs, cfg, h, d, cfg.ffn_bias)

  def __call__(self, x):
    return self.w3(jax.nn.silu(self.w1(x)) * self.w2(x))


def _norm(rngs, cfg: DINOv3Config, dim: int):
  if cfg.norm_layer == "rmsnorm":
    return nnx.RMSNorm(dim, epsilon=cfg.norm_eps, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype),
                       rngs=rngs)
  return _layer_norm(rngs, cfg, dim, eps=cfg.norm_eps)


class SelfAttention(nnx.Module):
  """Multi-head self-attention with RoPE on the last h*w (patch) tokens' queries and keys."""

  def __init__(self, cfg: DINOv3Config, *, rngs: nnx.Rngs):
    self.num_heads = cfg.num_heads
    self.attention_impl = cfg.attention_impl
    d = cfg.embed_dim
    if cfg.mask_k_bias and cfg.qkv_bias:
      self.qkv = KeyMaskedLinear(cfg, d, 3 * d, rngs=rngs)
    else:
      self.qkv = _dense(rngs, cfg, d, 3 * d, cfg.qkv_bias)
    self.proj = _dense(rngs, cfg, d, d, cfg.proj_bias)

  def __call__(self, x: jax.Array, rope: tuple[jax.Array, jax.Array]) -> jax.Array:
    b, n, d = x.shape
    qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    sin, cos = (t[None, :, None, :] for t in rope)  # broadcast over batch and heads
    prefix = n - sin.shape[1]

    def rotate(t):  # in float32, as Meta runs RoPE in its (fp32) dtype
      rotated = rope_apply(t[:, prefix:].astype(jnp.float32), sin, cos).astype(t.dtype)
      return jnp.concatenate([t[:, :prefix], rotated], axis=1)

    out = multi_head_attention(rotate(q), rotate(k), v, self.attention_impl)
    return self.proj(out.reshape(b, n, d))


class SelfAttentionBlock(nnx.Module):
  """Pre-norm block: x + ls1(attn(norm1(x), rope)), then x + ls2(ffn(norm2(x)))."""

  def __init__(self, cfg: DINOv3Config, *, rngs: nnx.Rngs):
    self.norm1 = _norm(rngs, cfg, cfg.embed_dim)
    self.attn = SelfAttention(cfg, rngs=rngs)
    self.norm2 = _norm(rngs, cfg, cfg.embed_dim)
    self.mlp = Mlp(cfg, rngs=rngs) if cfg.ffn_layer == "mlp" else SwiGLUFFN(cfg, rngs=rngs)
    if cfg.layerscale_init:
      self.ls1 = LayerScale(cfg.embed_dim, cfg.layerscale_init, jnp.dtype(cfg.param_dtype))
      self.ls2 = LayerScale(cfg.embed_dim, cfg.layerscale_init, jnp.dtype(cfg.param_dtype))
    else:
      self.ls1 = self.ls2 = _identity

  def __call__(self, x: jax.Array, rope) -> jax.Array:
    x = x + self.ls1(self.attn(self.norm1(x), rope))
    return x + self.ls2(self.mlp(self.norm2(x)))


# ---------------------------------------------------------------------------------------------
# The backbone.


class DinoV3VisionTransformer(nnx.Module):
  """Meta's DINOv3 ViT. Same interface as `DinoVisionTransformer`: `forward_features`,
  `get_intermediate_layers`, `forward_features_and_intermediates`, or call it for the CLS token."""

  def __init__(self, cfg: DINOv3Config, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d, dt = cfg.embed_dim, jnp.dtype(cfg.param_dtype)
    self.patch_embed = PatchEmbed(cfg, rngs=rngs)
    self.cls_token = nnx.Param(0.02 * jax.random.normal(rngs.params(), (1, 1, d), dt))
    if cfg.n_storage_tokens:
      self.storage_tokens = nnx.Param(0.02 * jax.random.normal(rngs.params(), (1, cfg.n_storage_tokens, d), dt))
    self.mask_token = nnx.Param(jnp.zeros((1, d), dt))
    self.rope_embed = RopePositionEmbedding(cfg)
    self.blocks = nnx.List([SelfAttentionBlock(cfg, rngs=rngs) for _ in range(cfg.depth)])
    self.norm = _norm(rngs, cfg, d)
    if cfg.untie_cls_and_patch_norms:
      self.cls_norm = _norm(rngs, cfg, d)
    if cfg.untie_global_and_local_cls_norm:
      self.local_cls_norm = _norm(rngs, cfg, d)

  def _grid(self, images: jax.Array) -> tuple[int, int]:
    return images.shape[1] // self.cfg.patch_size, images.shape[2] // self.cfg.patch_size

  def prepare_tokens(self, images: jax.Array, masks: jax.Array | None = None) -> jax.Array:
    """(B,H,W,C) images [+ (B,h*w) bool masks] -> (B, 1+R+h*w, D) tokens `[cls, storage, patches]`."""
    check_image_shape(images.shape, self.cfg.patch_size, self.cfg.in_chans)
    b, (h, w) = images.shape[0], self._grid(images)
    x = self.patch_embed(images.astype(jnp.dtype(self.cfg.dtype)))
    mask_token = self.mask_token[...].astype(x.dtype)
    cls = self.cls_token[...].astype(x.dtype)
    if masks is not None:
      if masks.shape != (b, h * w):
        raise ValueError(f"masks must have shape (batch, patches) = {(b, h * w)}, got {masks.shape}")
      x = jnp.where(masks[..., None], mask_token[None], x)
    else:
      cls = cls + 0 * mask_token  # as Meta (keeps the mask token in the graph)
    tokens = [jnp.broadcast_to(cls, (b, 1, x.shape[-1]))]
    if self.cfg.n_storage_tokens:
      tokens.append(jnp.broadcast_to(self.storage_tokens[...].astype(x.dtype), (b,) + self.storage_tokens.shape[1:]))
    return jnp.concatenate(tokens + [x], axis=1)

  def _run_blocks(self, x: jax.Array, grid: tuple[int, int], keep: Sequence[int] = ()):
    rope = self.rope_embed(*grid)
    kept = []
    for i, block in enumerate(self.blocks):
      x = block(x, rope)
      if i in keep:
        kept.append(x)
    return x, kept

  def _norm_tokens(self, x: jax.Array) -> jax.Array:
    """The final norm: `cls_norm` on the CLS and storage tokens when untied, `norm` on the rest."""
    if not self.cfg.untie_cls_and_patch_norms:
      return self.norm(x)
    r = self.cfg.n_storage_tokens + 1
    return jnp.concatenate([self.cls_norm(x[:, :r]), self.norm(x[:, r:])], axis=1)

  def _final_outputs(self, x: jax.Array) -> dict[str, jax.Array]:
    x_norm = self._norm_tokens(x)
    r = self.cfg.n_storage_tokens
    return {
        "x_norm_clstoken": x_norm[:, 0],
        "x_norm_regtokens": x_norm[:, 1:r + 1],
        "x_storage_tokens": x_norm[:, 1:r + 1],  # DINOv3's name for the same tokens
        "x_norm_patchtokens": x_norm[:, r + 1:],
        "x_prenorm": x,
    }

  def forward_features(self, images: jax.Array, masks: jax.Array | None = None) -> dict[str, jax.Array]:
    """Meta's `forward_features` (eval mode).

    Args:
      images: (B, H, W, C) float images, H and W multiples of the patch size.
      masks: optional (B, h*w) bool, True where the patch embedding is replaced by the mask token.

    Returns:
      dict with `x_norm_clstoken` (B, D), `x_norm_regtokens` (B, R, D) (also as DINOv3's
      `x_storage_tokens`), `x_norm_patchtokens` (B, h*w, D), `x_prenorm` (B, 1+R+h*w, D) and `masks`.
    """
    x, _ = self._run_blocks(self.prepare_tokens(images, masks), self._grid(images))
    return {**self._final_outputs(x), "masks": masks}

  def forward_features_and_intermediates(self, images: jax.Array, n: int = 1) -> dict[str, jax.Array]:
    """As `DinoVisionTransformer.forward_features_and_intermediates`: `forward_features` plus the
    last `n` blocks' normed CLS tokens, `x_norm_clstoken_blocks` (B, n, D), from one pass."""
    depth = len(self.blocks)
    if not 0 <= n <= depth:
      raise ValueError(f"n={n} last blocks out of range for a backbone of depth {depth}")
    x, kept = self._run_blocks(self.prepare_tokens(images), self._grid(images), keep=range(depth - n, depth))
    out = self._final_outputs(x)
    cls = out["x_norm_clstoken"]
    cls_blocks = [self._norm_tokens(o)[:, 0] for o in kept[:-1]] + ([cls] if n else [])
    out["x_norm_clstoken_blocks"] = (jnp.stack(cls_blocks, axis=1) if n
                                     else jnp.zeros((cls.shape[0], 0, cls.shape[-1]), cls.dtype))
    return out

  def get_intermediate_layers(self, images: jax.Array, n: int | Sequence[int] = 1, reshape: bool = False,
                              return_class_token: bool = False, norm: bool = True) -> tuple:
    """Meta's `get_intermediate_layers` (as `DinoVisionTransformer.get_intermediate_layers`).

    Args:
      images: (B, H, W, C).
      n: an int takes the last `n` blocks; a sequence takes those 0-based block indices.
      reshape: return NHWC feature maps (B, h, w, D) instead of (B, h*w, D).
      return_class_token: return `(patches, cls)` pairs, cls of shape (B, D).
      norm: apply the final norm(s) to each output.

    Returns:
      A tuple, in block order, of patch tokens (storage tokens dropped) or `(patches, cls)` pairs.
    """
    keep = intermediate_block_indices(n, len(self.blocks))
    _, outputs = self._run_blocks(self.prepare_tokens(images), self._grid(images), keep=keep)
    if norm:
      outputs = [self._norm_tokens(o) for o in outputs]
    return split_intermediate_outputs(outputs, self.cfg.n_storage_tokens, self._grid(images), reshape,
                                      return_class_token)

  def __call__(self, images: jax.Array) -> jax.Array:
    """The final-normed CLS token (B, D): Meta's `forward(x)` with its identity head."""
    return self.forward_features(images)["x_norm_clstoken"]

