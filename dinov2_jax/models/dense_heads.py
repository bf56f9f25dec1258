"""Meta's DINOv2 dense-prediction heads as pure functions of their Meta-keyed parameters.

* Depth, `dinov2/hub/depth`: `BNHead` (the `linear` and `linear4` heads: depth as the expectation over
  256 depth bins of a per-pixel distribution) and `DPTHead` (reassemble, fusion and head blocks of
  DPT, Ranftl et al. 2021).
* Segmentation, `dinov2/eval/segmentation`: mmseg's `BNHead` (batch norm of the concatenated patch
  features, then a 1x1 convolution to class logits).

Parameters are flat dicts keyed by the names of Meta's head modules without the `decode_head.`
prefix (`conv_depth.weight`, `fusion_blocks.1.res_conv_unit1.conv1.conv.weight`, ...), holding
arrays in PyTorch layouts (convolutions OIHW, transposed convolutions IOHW, linears (out, in)), so
Meta's files load without renaming. Feature maps are NHWC. `*_shapes` give the names and shapes a
head of a given size has: loaders check files against them, and random heads can be made from them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dinov2_jax.models.interpolate import resize_bilinear

DEPTH_HEAD_KINDS = ("linear", "dpt")
BINS_STRATEGIES = ("UD", "SID")
NORM_STRATEGIES = ("linear", "softmax", "sigmoid")
READOUT_TYPES = ("ignore", "add", "project")
BATCH_NORM_EPS = 1e-5  # mmseg's SyncBN default


@dataclasses.dataclass(frozen=True)
class DepthHeadConfig:
  """What a depth head computes, beyond its tensors (hashable: a static argument of jitted code).

  Attributes:
    kind: "linear" (Meta's BNHead over depth bins; the `linear` and `linear4` files) or "dpt".
    out_index: 0-based backbone blocks whose un-normed outputs (patch maps and CLS) feed the head.
    min_depth, max_depth: the bins' range (linear) / the offset added (dpt), and the output clamp.
    n_bins, upsample, bins_strategy, norm_strategy: BNHead's classification settings; bins are
      `linspace` ("UD") or `logspace` ("SID") of the depth range; the bin scores are normalised by
      "linear" (relu + 0.1, then sum to one), "softmax" or "sigmoid" (then sum to one).
    readout_type: DPT's use of the CLS token: "project" (Meta's heads), "add" or "ignore".
  """

  kind: str
  out_index: tuple[int, ...]
  min_depth: float = 0.001
  max_depth: float = 10.0
  n_bins: int = 256
  upsample: int = 4
  bins_strategy: str = "UD"
  norm_strategy: str = "linear"
  readout_type: str = "project"

  def __post_init__(self):
    for value, allowed, name in ((self.kind, DEPTH_HEAD_KINDS, "kind"), (self.bins_strategy, BINS_STRATEGIES, "bins_strategy"),
                                 (self.norm_strategy, NORM_STRATEGIES, "norm_strategy"),
                                 (self.readout_type, READOUT_TYPES, "readout_type")):
      if value not in allowed:
        raise ValueError(f"{name}={value!r}; expected one of {allowed}")
    if not 0 < self.min_depth < self.max_depth:
      raise ValueError(f"need 0 < min_depth < max_depth, got {self.min_depth}, {self.max_depth}")


# ---------------------------------------------------------------------------------------------
# Parameter names and shapes.


def linear_depth_head_shapes(embed_dim: int, n_layers: int, n_bins: int = 256) -> dict[str, tuple]:
  """BNHead: a 1x1 convolution from n_layers x [patch, CLS] features to the bin scores."""
  return {"conv_depth.weight": (n_bins, 2 * embed_dim * n_layers, 1, 1), "conv_depth.bias": (n_bins,)}


def dpt_channels(embed_dim: int) -> tuple[int, ...]:
  """Meta's DPT post-process widths: D/8, D/4, D/2, D."""
  return tuple(embed_dim // 2 ** (3 - i) for i in range(4))


def dpt_head_shapes(embed_dim: int, channels: int = 256, post_process_channels: Sequence[int] | None = None,
                    readout_type: str = "project") -> dict[str, tuple]:
  """DPTHead's tensors, as Meta's module names them."""
  post = tuple(post_process_channels or dpt_channels(embed_dim))
  shapes: dict[str, tuple] = {}
  for i, c in enumerate(post):
    shapes[f"reassemble_blocks.projects.{i}.conv.weight"] = (c, embed_dim, 1, 1)
    shapes[f"reassemble_blocks.projects.{i}.conv.bias"] = (c,)
    if readout_type == "project":
      shapes[f"reassemble_blocks.readout_projects.{i}.0.weight"] = (embed_dim, 2 * embed_dim)
      shapes[f"reassemble_blocks.readout_projects.{i}.0.bias"] = (embed_dim,)
    shapes[f"convs.{i}.conv.weight"] = (channels, c, 3, 3)
  for i, k in ((0, 4), (1, 2), (3, 3)):  # layer 2 keeps the patch resolution (an Identity)
    shapes[f"reassemble_blocks.resize_layers.{i}.weight"] = (post[i], post[i], k, k)
    shapes[f"reassemble_blocks.resize_layers.{i}.bias"] = (post[i],)
  for i in range(4):
    units = ("res_conv_unit2",) if i == 0 else ("res_conv_unit1", "res_conv_unit2")  # Meta drops block 0's unit 1
    for unit in units:
      for conv in ("conv1", "conv2"):
        shapes[f"fusion_blocks.{i}.{unit}.{conv}.conv.weight"] = (channels, channels, 3, 3)
    shapes[f"fusion_blocks.{i}.project.conv.weight"] = (channels, channels, 1, 1)
    shapes[f"fusion_blocks.{i}.project.conv.bias"] = (channels,)
  shapes["project.conv.weight"] = (channels, channels, 3, 3)
  shapes["project.conv.bias"] = (channels,)
  for name, shape in (("0", (channels // 2, channels, 3, 3)), ("2", (32, channels // 2, 3, 3)), ("4", (1, 32, 1, 1))):
    shapes[f"conv_depth.head.{name}.weight"] = shape
    shapes[f"conv_depth.head.{name}.bias"] = shape[:1]
  return shapes


def segmentation_head_shapes(embed_dim: int, n_layers: int, num_classes: int) -> dict[str, tuple]:
  """mmseg BNHead: batch norm over n_layers x D concatenated channels, then a 1x1 convolution."""
  c = embed_dim * n_layers
  return {"bn.weight": (c,), "bn.bias": (c,), "bn.running_mean": (c,), "bn.running_var": (c,),
          "bn.num_batches_tracked": (), "conv_seg.weight": (num_classes, c, 1, 1), "conv_seg.bias": (num_classes,)}


# ---------------------------------------------------------------------------------------------
# Layers (NHWC activations, PyTorch-layout weights).


def _conv(x: jax.Array, weight: jax.Array, bias: jax.Array | None = None, stride: int = 1) -> jax.Array:
  """`nn.Conv2d` with 'same'-style padding k // 2, as all of Meta's convolutions here use."""
  pad = weight.shape[-1] // 2
  y = jax.lax.conv_general_dilated(x, weight, (stride, stride), ((pad, pad), (pad, pad)),
                                   dimension_numbers=("NHWC", "OIHW", "NHWC"))
  return y if bias is None else y + bias


def _conv_transpose(x: jax.Array, weight: jax.Array, bias: jax.Array) -> jax.Array:
  """`nn.ConvTranspose2d` with kernel = stride and no padding: each pixel becomes a k x k block."""
  b, h, w, _ = x.shape
  k, out = weight.shape[-1], weight.shape[1]
  y = jnp.einsum("bhwi,ioyx->bhywxo", x, weight)
  return y.reshape(b, h * k, w * k, out) + bias


def _linear(x: jax.Array, weight: jax.Array, bias: jax.Array) -> jax.Array:
  return x @ weight.T + bias


def _with_cls(patches: jax.Array, cls: jax.Array) -> jax.Array:
  """(B,h,w,D) patch map and (B,D) CLS -> (B,h,w,2D): the CLS token copied to every position."""
  return jnp.concatenate([patches, jnp.broadcast_to(cls[:, None, None, :], patches.shape)], axis=-1)


# ---------------------------------------------------------------------------------------------
# Depth.


def depth_bins(cfg: DepthHeadConfig) -> np.ndarray:
  """The (n_bins,) float32 bin centres: `torch.linspace` ("UD") or `torch.logspace` ("SID")."""
  grid = np.linspace(cfg.min_depth, cfg.max_depth, cfg.n_bins)
  return (grid if cfg.bins_strategy == "UD" else 10.0 ** grid).astype(np.float32)


def linear_depth_head(params: Mapping[str, jax.Array], features: Sequence[tuple[jax.Array, jax.Array]],
                      cfg: DepthHeadConfig) -> jax.Array:
  """Meta's depth BNHead (`classify=True`, resize_concat of every input).

  Args:
    params: `conv_depth.weight` (n_bins, 2*D*L, 1, 1) and `conv_depth.bias`.
    features: L pairs of un-normed (B, h, w, D) patch maps and (B, D) CLS tokens.
    cfg: the head's settings.

  Returns:
    (B, h * upsample, w * upsample) float32 depth, not yet clamped.
  """
  x = jnp.concatenate([_with_cls(p, c) for p, c in features], axis=-1)
  _, h, w, _ = x.shape
  # Meta upsamples the features bilinearly, then applies the 1x1 convolution. Both are linear and
  # the bilinear weights of each output pixel sum to one, so convolving first is the same map; it
  # works on 256 channels instead of 2*D*L at 16x the positions.
  logits = _linear(x, params["conv_depth.weight"][:, :, 0, 0], params["conv_depth.bias"])
  logits = resize_bilinear(logits, (h * cfg.upsample, w * cfg.upsample))
  if cfg.norm_strategy == "linear":  # Adabins' normalisation, Meta's default
    scores = jax.nn.relu(logits) + 0.1
    probs = scores / scores.sum(-1, keepdims=True)
  elif cfg.norm_strategy == "softmax":
    probs = jax.nn.softmax(logits, axis=-1)
  else:
    scores = jax.nn.sigmoid(logits)
    probs = scores / scores.sum(-1, keepdims=True)
  return jnp.einsum("bhwk,k->bhw", probs, jnp.asarray(depth_bins(cfg)))


def _residual_conv_unit(params, prefix: str, x: jax.Array) -> jax.Array:
  """Pre-activation residual unit: x + conv2(relu(conv1(relu(x)))), convolutions without bias."""
  y = _conv(jax.nn.relu(x), params[f"{prefix}.conv1.conv.weight"])
  y = _conv(jax.nn.relu(y), params[f"{prefix}.conv2.conv.weight"])
  return x + y


def _fusion_block(params, prefix: str, x: jax.Array, skip: jax.Array | None = None) -> jax.Array:
  if skip is not None:
    if skip.shape != x.shape:  # odd patch grids: the skip is resized to the running map
      skip = resize_bilinear(skip, x.shape[1:3])
    x = x + _residual_conv_unit(params, f"{prefix}.res_conv_unit1", skip)
  x = _residual_conv_unit(params, f"{prefix}.res_conv_unit2", x)
  x = resize_bilinear(x, scale_factor=2, align_corners=True)
  return _conv(x, params[f"{prefix}.project.conv.weight"], params[f"{prefix}.project.conv.bias"])


def dpt_depth_head(params: Mapping[str, jax.Array], features: Sequence[tuple[jax.Array, jax.Array]],
                   cfg: DepthHeadConfig) -> jax.Array:
  """Meta's DPTHead (`dinov2/hub/depth/decode_heads.py`).

  Args:
    params: the tensors named by `dpt_head_shapes`.
    features: 4 pairs of un-normed (B, h, w, D) patch maps and (B, D) CLS tokens.
    cfg: the head's settings.

  Returns:
    (B, H', W') float32 depth (H' = 16 * ceil(h / 2) for square patch grids), not yet clamped.
  """
  maps = []
  for i, (x, cls) in enumerate(features):
    pre = "reassemble_blocks"
    if cfg.readout_type == "project":
      x = jax.nn.gelu(_linear(_with_cls(x, cls), params[f"{pre}.readout_projects.{i}.0.weight"],
                              params[f"{pre}.readout_projects.{i}.0.bias"]), approximate=False)
    elif cfg.readout_type == "add":
      x = x + cls[:, None, None, :]
    x = _conv(x, params[f"{pre}.projects.{i}.conv.weight"], params[f"{pre}.projects.{i}.conv.bias"])
    if i in (0, 1):  # 4x and 2x upsampling
      x = _conv_transpose(x, params[f"{pre}.resize_layers.{i}.weight"], params[f"{pre}.resize_layers.{i}.bias"])
    elif i == 3:  # 2x downsampling
      x = _conv(x, params[f"{pre}.resize_layers.3.weight"], params[f"{pre}.resize_layers.3.bias"], stride=2)
    maps.append(_conv(x, params[f"convs.{i}.conv.weight"]))
  out = _fusion_block(params, "fusion_blocks.0", maps[-1])
  for i in range(1, len(maps)):
    out = _fusion_block(params, f"fusion_blocks.{i}", out, maps[-(i + 1)])
  out = jax.nn.relu(_conv(out, params["project.conv.weight"], params["project.conv.bias"]))
  out = _conv(out, params["conv_depth.head.0.weight"], params["conv_depth.head.0.bias"])
  out = resize_bilinear(out, scale_factor=2, align_corners=True)
  out = jax.nn.relu(_conv(out, params["conv_depth.head.2.weight"], params["conv_depth.head.2.bias"]))
  out = _conv(out, params["conv_depth.head.4.weight"], params["conv_depth.head.4.bias"])
  return jax.nn.relu(out[..., 0]) + cfg.min_depth


def depth_head(params, features, cfg: DepthHeadConfig) -> jax.Array:
  """Either head, clamped to [min_depth, max_depth] as Meta's DepthEncoderDecoder does. (B, H', W')."""
  fn = linear_depth_head if cfg.kind == "linear" else dpt_depth_head
  return jnp.clip(fn(params, features, cfg), cfg.min_depth, cfg.max_depth)


# ---------------------------------------------------------------------------------------------
# Segmentation.


def segmentation_head(params: Mapping[str, jax.Array], features: Sequence[jax.Array]) -> jax.Array:
  """mmseg BNHead of Meta's linear/ms segmentation heads, in eval mode.

  Args:
    params: the tensors named by `segmentation_head_shapes`.
    features: L normed (B, h, w, D) patch maps, concatenated in this order.

  Returns:
    (B, h, w, num_classes) float32 logits at the patch resolution.
  """
  x = jnp.concatenate(list(features), axis=-1)
  x = (x - params["bn.running_mean"]) * jax.lax.rsqrt(params["bn.running_var"] + BATCH_NORM_EPS)
  x = x * params["bn.weight"] + params["bn.bias"]
  return _linear(x, params["conv_seg.weight"][:, :, 0, 0], params["conv_seg.bias"])
