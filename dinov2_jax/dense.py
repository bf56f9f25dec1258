"""Depth estimation and semantic segmentation with Meta's released DINOv2 heads, without PyTorch.

`load_depther` reproduces Meta's torch-hub depthers (`dinov2/hub/depthers.py`: a frozen backbone, a
`BNHead` or `DPTHead`, `DepthEncoderDecoder.whole_inference`); `load_segmenter` reproduces the
linear and multi-scale segmenters of Meta's `semantic_segmentation.ipynb` (mmseg `EncoderDecoder`
with Meta's `BNHead`), whose configs live beside the weights rather than in Meta's repository.
Both run in JAX on NHWC ImageNet-normalised float32 images of any size: as in Meta's code the image
is zero-padded (centred) to a multiple of the patch size for the backbone, and the head's output is
resized bilinearly to the unpadded input size.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dinov2_jax.api import Backbone, load_backbone
from dinov2_jax.models import dense_heads
from dinov2_jax.models.dense_heads import DepthHeadConfig
from dinov2_jax.models.interpolate import resize_bilinear
from dinov2_jax.models.vit import check_image_shape
from dinov2_jax.weights.convert import check_state_dict
from dinov2_jax.weights.io import read_head_state_dict
from dinov2_jax.weights.torch_format import CheckpointError

PREFIX = "decode_head."
# Blocks feeding Meta's 4-layer depth heads, by backbone depth (`_make_dinov2_*_depther`'s table;
# ViT-L's first index is 4, not 5). Other depths get evenly spaced blocks.
HUB_DEPTH_OUT_INDEX = {12: (2, 5, 8, 11), 24: (4, 11, 17, 23), 40: (9, 19, 29, 39)}
# Depth ranges of Meta's hub depthers: a DPT head's comes from its training set; the linear heads
# always use (0.001, 80), whatever the set (their builder ignores the range it is given).
DEPTH_RANGES = {"nyu": (0.001, 10.0), "kitti": (0.001, 80.0)}
LINEAR_DEPTH_RANGE = (0.001, 80.0)
# Test-time scales (`img_ratios`, with flips) of Meta's multi-scale (`_ms`) segmentation configs.
MS_SCALES = (1.0, 1.32, 1.73, 2.28, 3.0)
# Sliding-window inference of Meta's segmentation configs (`test_cfg`), in pixels.
SLIDE_CROP, SLIDE_STRIDE = 512, 341
_DEPTH_HEAD_FIELDS = ("min_depth", "max_depth", "out_index", "dataset", "upsample", "bins_strategy",
                      "norm_strategy", "readout_type")


def center_pad(images: jax.Array, multiple: int) -> jax.Array:
  """Meta's `CenterPadding`: zero-pads H and W up to multiples of `multiple`, the odd pixel at the end.

  (B, H, W, C) -> (B, ceil(H / m) * m, ceil(W / m) * m, C).
  """
  pads = []
  for size in images.shape[1:3]:
    extra = math.ceil(size / multiple) * multiple - size
    pads.append((extra // 2, extra - extra // 2))
  if not any(p for pad in pads for p in pad):
    return images
  return jnp.pad(images, ((0, 0), pads[0], pads[1], (0, 0)))


def _check_images(images, in_chans: int) -> jax.Array:
  images = jnp.asarray(images, jnp.float32)
  check_image_shape(images.shape, 1, in_chans)  # any size: the image is padded for the backbone
  return images


def _evenly_spaced_blocks(depth: int, n: int) -> tuple[int, ...]:
  if n == 1:
    return (depth - 1,)
  if n == 4 and depth in HUB_DEPTH_OUT_INDEX:
    return HUB_DEPTH_OUT_INDEX[depth]
  return tuple((i + 1) * depth // n - 1 for i in range(n))


def _head_tensors(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Meta's files hold `decode_head.*` keys (the head inside its EncoderDecoder); a bare head is fine too.

  A whole model's state dict (`backbone.*` as well, as `depther.state_dict()` writes it) is accepted:
  the backbone comes from the backbone file, so its tensors here are left out.
  """
  if any(k.startswith(PREFIX) for k in state_dict):
    return {k: v for k, v in state_dict.items() if not k.startswith("backbone.")}
  return {PREFIX + k: v for k, v in state_dict.items()}


def _check_head(state_dict, shapes: Mapping[str, tuple], strict: bool, what: str) -> dict[str, jax.Array]:
  expected = {PREFIX + k: v for k, v in shapes.items()}
  if not strict:  # extra tensors are ignored (as Meta's strict=False load does); missing ones never are
    state_dict = {k: v for k, v in state_dict.items() if k in expected}
  check_state_dict(state_dict, expected, what=what,
                   hint="Check that the head belongs to this backbone (same size) and is the kind you meant; "
                        "strict=False ignores extra tensors.")
  return {k: jnp.asarray(state_dict[PREFIX + k], jnp.float32) for k in shapes
          if PREFIX + k in state_dict and k != "bn.num_batches_tracked"}


# ---------------------------------------------------------------------------------------------
# Depth.


@functools.partial(jax.jit, static_argnames=("graphdef", "cfg"))
def _depth(graphdef, backbone_params, head_params, images, cfg: DepthHeadConfig):
  module = nnx.merge(graphdef, backbone_params)
  h, w = images.shape[1:3]
  padded = center_pad(images, module.cfg.patch_size)
  features = module.get_intermediate_layers(padded, n=cfg.out_index, reshape=True, return_class_token=True, norm=False)
  features = [(p.astype(jnp.float32), c.astype(jnp.float32)) for p, c in features]
  depth = dense_heads.depth_head(head_params, features, cfg)
  # Meta resizes the map of the padded image to the unpadded size (stretching it slightly).
  return resize_bilinear(depth[..., None], (h, w))[..., 0]


class Depther:
  """A backbone with one of Meta's depth heads: Meta's hub depther in eval mode.

  Attributes:
    backbone: the `Backbone` (frozen; its un-normed block outputs feed the head).
    head_config: a `DepthHeadConfig` (head kind, blocks used, depth range, ...).
    head_params: the head's tensors by Meta's names (PyTorch layouts, float32).
  """

  def __init__(self, backbone: Backbone, head_params: Mapping[str, jax.Array], head_config: DepthHeadConfig):
    depth = backbone.config.depth
    if any(not 0 <= i < depth for i in head_config.out_index):
      raise ValueError(f"out_index {head_config.out_index} out of range for a backbone of depth {depth}")
    self.backbone, self.head_params, self.head_config = backbone, dict(head_params), head_config

  def __call__(self, images) -> jax.Array:
    """(B, H, W, 3) ImageNet-normalised float32 images, any H and W -> (B, H, W) float32 depth.

    Meta's `DepthEncoderDecoder.whole_inference(images, img_meta=None, rescale=True)`; depth in the
    units of the head's training set (metres for NYU and KITTI), clamped to [min_depth, max_depth].
    """
    images = _check_images(images, self.backbone.config.in_chans)
    return _depth(self.backbone.graphdef, self.backbone.params, self.head_params, images, cfg=self.head_config)


def depth_head_config(state_dict: Mapping[str, np.ndarray], embed_dim: int, depth: int, *,
                      filename: str = "", **options: Any) -> DepthHeadConfig:
  """Infers a `DepthHeadConfig` from a head's tensors (Meta-keyed, `decode_head.` prefixed) and its file name.

  Args:
    state_dict: the head file's tensors.
    embed_dim, depth: the backbone's width and number of blocks.
    filename: the head file's name; "kitti" in it selects KITTI's depth range for DPT heads.
    **options: `DepthHeadConfig` fields overriding the inferred ones, and `dataset` ("nyu" or "kitti").
  """
  unknown = set(options) - set(_DEPTH_HEAD_FIELDS)
  if unknown:
    raise ValueError(f"unknown depth-head options {sorted(unknown)}; valid: {list(_DEPTH_HEAD_FIELDS)}")
  options = dict(options)
  dataset = options.pop("dataset", None)
  if dataset is None:
    dataset = "kitti" if "kitti" in os.path.basename(filename).lower() else "nyu"
  if dataset not in DEPTH_RANGES:
    raise ValueError(f"dataset={dataset!r}; expected one of {list(DEPTH_RANGES)}")
  if "out_index" in options:
    options["out_index"] = tuple(int(i) for i in options["out_index"])
  if any(k.startswith(PREFIX + "conv_seg.") for k in state_dict):
    raise CheckpointError("this is a segmentation head (conv_seg.*), not a depth head; use load_segmenter")
  if any(k.startswith(PREFIX + "reassemble_blocks.") for k in state_dict):
    first = state_dict.get(PREFIX + "reassemble_blocks.projects.0.conv.weight")
    if first is not None and first.shape[1] != embed_dim:
      raise CheckpointError(f"the DPT head expects {first.shape[1]}-dimensional features but the backbone has "
                            f"embed_dim {embed_dim}: the head belongs to a different backbone size")
    readout = "project" if any(".readout_projects." in k for k in state_dict) else "ignore"
    min_depth, max_depth = DEPTH_RANGES[dataset]
    fields = dict(kind="dpt", out_index=_evenly_spaced_blocks(depth, 4), min_depth=min_depth, max_depth=max_depth,
                  readout_type=readout)
  elif PREFIX + "conv_depth.weight" in state_dict:
    n_bins, in_channels = state_dict[PREFIX + "conv_depth.weight"].shape[:2]
    n_layers, rest = divmod(int(in_channels), 2 * embed_dim)
    n_layers = len(options["out_index"]) if "out_index" in options else n_layers
    if rest or n_layers < 1 or (n_layers not in (1, 4) and "out_index" not in options):
      raise CheckpointError(
          f"the linear depth head takes {in_channels} input channels, but a head for this backbone (embed_dim "
          f"{embed_dim}) takes {2 * embed_dim} (linear) or {8 * embed_dim} (linear4): the head belongs to a "
          "different backbone size")
    fields = dict(kind="linear", out_index=_evenly_spaced_blocks(depth, n_layers), n_bins=int(n_bins),
                  min_depth=LINEAR_DEPTH_RANGE[0], max_depth=LINEAR_DEPTH_RANGE[1])
  else:
    raise CheckpointError(
        "not a DINOv2 depth head: expected decode_head.conv_depth.* (linear heads) or "
        f"decode_head.reassemble_blocks.* (DPT heads); first keys: {', '.join(list(state_dict)[:5])}")
  return DepthHeadConfig(**{**fields, **options})


def _depth_head_shapes(state_dict, cfg: DepthHeadConfig, embed_dim: int) -> dict[str, tuple]:
  if cfg.kind == "linear":
    return dense_heads.linear_depth_head_shapes(embed_dim, len(cfg.out_index), cfg.n_bins)

  def width(name: str, default: int) -> int:  # read from the file; a missing tensor is reported later
    return int(state_dict[PREFIX + name].shape[0]) if PREFIX + name in state_dict else default

  post = [width(f"reassemble_blocks.projects.{i}.conv.weight", c) for i, c in enumerate(dense_heads.dpt_channels(embed_dim))]
  return dense_heads.dpt_head_shapes(embed_dim, width("convs.0.conv.weight", 256), post, cfg.readout_type)


def load_depther(backbone_path: str | os.PathLike, head_path: str | os.PathLike, *, strict: bool = True,
                 **overrides: Any) -> Depther:
  """Meta's depth estimator from a backbone file and a released depth head.

  Args:
    backbone_path: any backbone `load_backbone` reads (e.g. `dinov2_vitb14_pretrain.pth`).
    head_path: `dinov2_vit{s,b,l,g}14_{nyu,kitti}_{linear,linear4,dpt}_head.pth`, read without running
      pickled code.
    strict: fail on missing or unexpected head tensors (shape mismatches always fail).
    **overrides: head options (`min_depth`, `max_depth`, `dataset`, `out_index`, `upsample`,
      `bins_strategy`, `norm_strategy`, `readout_type`); everything else goes to `load_backbone`.

  Returns:
    A `Depther`. As Meta's hub: linear heads use the depth range (0.001, 80) whatever their training
    set (bins and clamp; Meta's own mmcv configs use (0.001, 10) for NYU: pass `max_depth=10` for
    that); DPT heads use (0.001, 10) for NYU and (0.001, 80) for KITTI, chosen by "kitti" in the
    file name or `dataset=`. The 4-block heads read blocks (2, 5, 8, 11) of ViT-S/B, (4, 11, 17, 23)
    of ViT-L and (9, 19, 29, 39) of ViT-g; the 1-block heads the last block.
  """
  options = {k: overrides.pop(k) for k in list(overrides) if k in _DEPTH_HEAD_FIELDS}
  backbone = load_backbone(backbone_path, **overrides)
  cfg = backbone.config
  try:
    state_dict = _head_tensors(read_head_state_dict(head_path))
    head_config = depth_head_config(state_dict, cfg.embed_dim, cfg.depth, filename=os.fspath(head_path), **options)
    shapes = _depth_head_shapes(state_dict, head_config, cfg.embed_dim)
    params = _check_head(state_dict, shapes, strict, what=f"{head_config.kind} depth head")
  except CheckpointError as e:
    raise CheckpointError(f"{head_path}: {e}") from None
  return Depther(backbone, params, head_config)


# ---------------------------------------------------------------------------------------------
# Segmentation.


@functools.partial(jax.jit, static_argnames=("graphdef", "n_layers"))
def _segment(graphdef, backbone_params, head_params, images, n_layers: int):
  module = nnx.merge(graphdef, backbone_params)
  h, w = images.shape[1:3]
  padded = center_pad(images, module.cfg.patch_size)
  features = module.get_intermediate_layers(padded, n=n_layers, reshape=True)
  logits = dense_heads.segmentation_head(head_params, [f.astype(jnp.float32) for f in features])
  return resize_bilinear(logits, (h, w))


def _windows(size: int, crop: int, stride: int) -> list[tuple[int, int]]:
  """mmseg's slide-inference windows along one axis: (start, end) pairs covering [0, size)."""
  count = max(size - crop + stride - 1, 0) // stride + 1
  spans = []
  for i in range(count):
    end = min(i * stride + crop, size)
    spans.append((max(end - crop, 0), end))
  return spans


class Segmenter:
  """A backbone with one of Meta's linear segmentation heads (ADE20K: 150 classes, VOC2012: 21).

  The head reads the last `n_layers` blocks, normed: 1 for the `linear` heads, 4 for the `ms` heads.
  Logits index Meta's class order (ADE20K without "other": class 0 is "wall"; VOC with background 0).

  Attributes:
    backbone, head_params, n_layers, num_classes.
  """

  def __init__(self, backbone: Backbone, head_params: Mapping[str, jax.Array], n_layers: int):
    if not 1 <= n_layers <= backbone.config.depth:
      raise ValueError(f"a head on {n_layers} blocks does not fit a backbone of depth {backbone.config.depth}")
    self.backbone, self.head_params, self.n_layers = backbone, dict(head_params), n_layers
    self.num_classes = int(self.head_params["conv_seg.bias"].shape[0])

  def __call__(self, images) -> jax.Array:
    """(B, H, W, 3) ImageNet-normalised float32 images, any H and W -> (B, H, W, classes) float32 logits.

    mmseg's `EncoderDecoder.encode_decode` (one pass over the whole image).
    """
    images = _check_images(images, self.backbone.config.in_chans)
    return _segment(self.backbone.graphdef, self.backbone.params, self.head_params, images, n_layers=self.n_layers)

  def slide(self, images, crop_size: int | Sequence[int] = SLIDE_CROP, stride: int | Sequence[int] = SLIDE_STRIDE) -> jax.Array:
    """mmseg's sliding-window inference (Meta's `test_cfg`): crops of `crop_size` every `stride`
    pixels, each through `__call__`, logits averaged where crops overlap. (B, H, W, classes) float32."""
    images = _check_images(images, self.backbone.config.in_chans)
    (ch, cw), (sh, sw) = (_pair(crop_size), _pair(stride))
    b, h, w, _ = images.shape
    total = jnp.zeros((b, h, w, self.num_classes), jnp.float32)
    count = np.zeros((h, w, 1), np.float32)
    for y0, y1 in _windows(h, ch, sh):
      for x0, x1 in _windows(w, cw, sw):
        total = total.at[:, y0:y1, x0:x1].add(self(images[:, y0:y1, x0:x1]))
        count[y0:y1, x0:x1] += 1
    return total / count

  def probabilities(self, images, scales: Sequence[float] = (1.0,), flip: bool = False, *, slide: bool = False,
                    crop_size: int | Sequence[int] = SLIDE_CROP, stride: int | Sequence[int] = SLIDE_STRIDE) -> jax.Array:
    """Class probabilities with mmseg's test-time augmentation: softmax averaged over scales and flips.

    Args:
      images: (B, H, W, 3) ImageNet-normalised float32 images.
      scales: image-size multipliers; Meta's `_ms` heads use `MS_SCALES` with `flip=True`. Each scaled
        image has sides `int(side * scale + 0.5)` (mmcv's rounding), resized bilinearly.
      flip: also run every scale mirrored left-right (and mirror the result back).
      slide, crop_size, stride: use `slide` instead of one pass per image.

    Returns:
      (B, H, W, classes) float32 probabilities; `argmax(-1)` gives the segmentation.

    mmseg resizes the uint8 image (cv2, bilinear) before normalising; this resizes the normalised
    image, which is the same up to the uint8 rounding.
    """
    images = _check_images(images, self.backbone.config.in_chans)
    h, w = images.shape[1:3]
    total, n = 0.0, 0
    for scale in scales:
      size = (int(h * scale + 0.5), int(w * scale + 0.5))
      scaled = images if size == (h, w) else resize_bilinear(images, size)
      for mirrored in ((False, True) if flip else (False,)):
        x = scaled[:, :, ::-1] if mirrored else scaled
        logits = self.slide(x, crop_size, stride) if slide else self(x)
        probs = jax.nn.softmax(resize_bilinear(logits, (h, w)), axis=-1)
        total = total + (probs[:, :, ::-1] if mirrored else probs)
        n += 1
    return total / n


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
  return (int(value), int(value)) if np.ndim(value) == 0 else (int(value[0]), int(value[1]))


def load_segmenter(backbone_path: str | os.PathLike, head_path: str | os.PathLike, *, strict: bool = True,
                   **overrides: Any) -> Segmenter:
  """Meta's linear semantic segmenter from a backbone file and a released head.

  Args:
    backbone_path: any backbone `load_backbone` reads (e.g. `dinov2_vits14_pretrain.pth`).
    head_path: `dinov2_vit{s,b,l,g}14_{ade20k,voc2012}_{linear,ms}_head.pth`, read without running
      pickled code.
    strict: fail on missing or unexpected head tensors (shape mismatches always fail).
    **overrides: backbone fields for `load_backbone`.

  Returns:
    A `Segmenter`: call it for logits, `.slide(...)` for Meta's sliding-window test mode,
    `.probabilities(images, MS_SCALES, flip=True)` for the multi-scale test of the `_ms` heads.
  """
  backbone = load_backbone(backbone_path, **overrides)
  dim = backbone.config.embed_dim
  try:
    state_dict = _head_tensors(read_head_state_dict(head_path))
    if PREFIX + "conv_seg.weight" not in state_dict:
      kind = "a depth head; use load_depther" if any("conv_depth" in k for k in state_dict) else \
          f"keys {', '.join(list(state_dict)[:5])}"
      raise CheckpointError(f"not a DINOv2 segmentation head (no decode_head.conv_seg.weight): {kind}")
    num_classes, in_channels = state_dict[PREFIX + "conv_seg.weight"].shape[:2]
    n_layers, rest = divmod(int(in_channels), dim)
    if rest or not 1 <= n_layers <= backbone.config.depth:
      raise CheckpointError(
          f"the segmentation head takes {in_channels} input channels, but a head for this backbone (embed_dim "
          f"{dim}) takes {dim} (linear) or {4 * dim} (ms): the head belongs to a different backbone size")
    shapes = dense_heads.segmentation_head_shapes(dim, n_layers, int(num_classes))
    params = _check_head(state_dict, shapes, strict, what="segmentation head")
  except CheckpointError as e:
    raise CheckpointError(f"{head_path}: {e}") from None
  return Segmenter(backbone, params, n_layers)
