"""Public entry points: load a backbone or classifier from weights files, and export back to Meta's format."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dinov2_jax.models import hub
from dinov2_jax.models.dino_head import DINOHead
from dinov2_jax.models.dinov3_vit import Buffer, DINOv3Config
from dinov2_jax.models.hub import BackboneConfig
from dinov2_jax.models.vit import DinoVisionTransformer, check_image_shape
from dinov2_jax.weights import convert, convert_dinov3
from dinov2_jax.weights.io import CONFIG_METADATA_KEY, read_weights, write_state_dict
from dinov2_jax.weights.torch_format import CheckpointError


# What a backbone's state dict holds: its parameters and (DINOv3) buffers such as the RoPE periods.
_STATE = (nnx.Param, Buffer)


def _abstract_backbone(cfg: BackboneConfig):
  # Shapes only: loading real weights should not pay for a random initialisation first.
  return nnx.eval_shape(lambda: hub.build(cfg, nnx.Rngs(0)))


def _fill(abstract_module: nnx.Module, params: Mapping) -> nnx.Module:
  state = nnx.state(abstract_module)
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
  nnx.update(abstract_module, state)
  return abstract_module


def _hashable(value):
  return tuple(value) if isinstance(value, (list, np.ndarray)) else value


@functools.partial(jax.jit, static_argnames=("graphdef", "method", "options"))
def _apply(graphdef, state, images, masks, *, method: str, options: tuple):
  module = nnx.merge(graphdef, state)
  if method == "forward_features":
    return module.forward_features(images, masks)
  return getattr(module, method)(images, **dict(options))


class Backbone:
  """A DINOv2 or DINOv3 backbone with its weights, ready to call.

  Attributes:
    config: the `ViTConfig` (DINOv2) or `DINOv3Config`.
    module: the Flax NNX `DinoVisionTransformer` or `DinoV3VisionTransformer` (stateful object).
    graphdef, params: `nnx.split(module)`, for functional use (`Backbone.apply`, jit, sharding).

  All methods take NHWC float32 images (B, H, W, 3) normalised with the ImageNet mean/std, H and W
  multiples of the patch size, and return jax arrays. Calls are jit-compiled once per input shape.
  """

  def __init__(self, module):
    self.module = module
    self.config: BackboneConfig = module.cfg
    self.graphdef, self.params = nnx.split(module)

  def _run(self, method, images, masks=None, **options):
    images = jnp.asarray(images)
    check_image_shape(images.shape, self.config.patch_size, self.config.in_chans)
    options = tuple(sorted((k, _hashable(v)) for k, v in options.items()))
    return _apply(self.graphdef, self.params, images, masks, method=method, options=options)

  def forward_features(self, images, masks=None) -> dict[str, jax.Array]:
    """Meta's `forward_features`: `x_norm_clstoken` (B,D), `x_norm_regtokens` (B,R,D),
    `x_norm_patchtokens` (B,h*w,D), `x_prenorm` (B,1+R+h*w,D), `masks`; DINOv3 also gives its
    storage tokens as `x_storage_tokens` (= `x_norm_regtokens`)."""
    masks = None if masks is None else jnp.asarray(masks, bool)
    return self._run("forward_features", images, masks)

  def get_intermediate_layers(self, images, n: int | Sequence[int] = 1, reshape: bool = False,
                              return_class_token: bool = False, norm: bool = True) -> tuple:
    """Meta's `get_intermediate_layers`; `reshape=True` gives NHWC maps (B, h, w, D)."""
    return self._run("get_intermediate_layers", images, n=n, reshape=reshape,
                     return_class_token=return_class_token, norm=norm)

  def __call__(self, images) -> jax.Array:
    """The final-normed CLS token, (B, D)."""
    return self._run("__call__", images)

  @staticmethod
  def apply(graphdef, params, images, method: str = "__call__", **kwargs):
    """Functional form for use inside your own jit: `nnx.merge(graphdef, params).<method>(images, ...)`."""
    return getattr(nnx.merge(graphdef, params), method)(images, **kwargs)

  def state_dict(self, block_chunks: int = 0) -> dict[str, np.ndarray]:
    """Meta-format state dict (`strict=True`-loadable by Meta's `DinoVisionTransformer` of dinov2 or dinov3)."""
    return backbone_state_dict(self.module, block_chunks=block_chunks)

  def save(self, path: str | os.PathLike, block_chunks: int = 0) -> None:
    """Writes Meta's format; `.pth` (torch.load(weights_only=True)-readable) or `.safetensors`."""
    write_state_dict(self.state_dict(block_chunks), path, _config_metadata(self.config))


def backbone_state_dict(module, block_chunks: int = 0) -> dict[str, np.ndarray]:
  """A backbone module's parameters (and buffers) as Meta's flat state dict (numpy, PyTorch layouts)."""
  params = nnx.to_pure_dict(nnx.state(module, _STATE))
  sd = convert.params_to_meta(jax.device_get(params))
  return convert.chunk_block_keys(sd, module.cfg.depth, block_chunks)


def head_state_dict(head: DINOHead) -> dict[str, np.ndarray]:
  """A DINOHead's parameters with Meta's keys (`mlp.0.weight`, ..., `last_layer.weight_g/_v`)."""
  params = jax.device_get(nnx.to_pure_dict(nnx.state(head, nnx.Param)))
  return convert.params_to_meta(params, head_nlayers=len(head.mlp))


def _config_metadata(cfg: BackboneConfig) -> dict[str, str]:
  return {CONFIG_METADATA_KEY: json.dumps(dataclasses.asdict(cfg))}


def backbone_from_state_dict(state_dict: Mapping[str, np.ndarray], *, strict: bool = True,
                             stored_config: Mapping[str, Any] | None = None, **overrides) -> Backbone:
  """Builds a `Backbone` from a Meta-keyed (unchunked) DINOv2 or DINOv3 state dict, inferring the architecture."""
  known = convert.backbone_config_class(state_dict).__dataclass_fields__
  fields = {k: v for k, v in (stored_config or {}).items() if k in known}
  cfg = convert.infer_backbone_config(state_dict, **{**fields, **overrides})
  if isinstance(cfg, DINOv3Config):  # transformers files hold no RoPE periods
    state_dict = convert_dinov3.with_rope_periods(state_dict, cfg)
  # Non-strict loads keep Meta's initialisation for absent tensors, so they need a real init.
  module = _abstract_backbone(cfg) if strict else hub.create_backbone(cfg)
  template = nnx.to_pure_dict(nnx.state(module, _STATE))
  params = convert.meta_to_params(state_dict, template, strict=strict)
  return Backbone(_fill(module, params))


def head_from_state_dict(state_dict: Mapping[str, np.ndarray], *, strict: bool = True) -> DINOHead:
  """Builds a `DINOHead` from Meta-keyed head tensors (`mlp.*`, `last_layer.weight_g/_v`)."""
  kwargs = convert.infer_head_config(state_dict)
  in_dim, out_dim = kwargs.pop("in_dim"), kwargs.pop("out_dim")
  build = lambda: DINOHead(in_dim, out_dim, **kwargs, rngs=nnx.Rngs(0))  # noqa: E731
  head = nnx.eval_shape(build) if strict else build()
  template = nnx.to_pure_dict(nnx.state(head, nnx.Param))
  params = convert.meta_to_params(state_dict, template, head_nlayers=kwargs["nlayers"], strict=strict,
                                  what="DINO head")
  return _fill(head, params)


def load_training_checkpoint(path: str | os.PathLike, *, strict: bool = True,
                             **overrides: Any) -> tuple[Backbone, dict[str, DINOHead]]:
  """Loads a Meta teacher checkpoint (`{"teacher": {backbone.*, dino_head.*, ibot_head.*}}`).

  Returns:
    The backbone and a dict of heads (`"dino_head"`, and `"ibot_head"` when the run used a separate one).
  """
  weights = read_weights(path)
  if weights.kind != "training_checkpoint":
    raise CheckpointError(f"{path}: holds a {weights.kind.replace('_', ' ')}, not a training checkpoint "
                          "with heads; use load_backbone for backbone-only files")
  try:
    backbone = backbone_from_state_dict(weights.backbone, strict=strict, stored_config=weights.config, **overrides)
    heads = {name: head_from_state_dict(sd, strict=strict) for name, sd in weights.heads.items()}
  except CheckpointError as e:
    raise CheckpointError(f"{path}: {e}") from None
  return backbone, heads


def save_training_checkpoint(path: str | os.PathLike, backbone: Backbone | DinoVisionTransformer,
                             heads: Mapping[str, DINOHead], block_chunks: int = 0) -> None:
  """Writes Meta's teacher-checkpoint layout: `{"teacher": {backbone.*, dino_head.*, ibot_head.*}}`.

  `.pth` nests the dict as Meta does; `.safetensors` (flat by design) stores the `teacher.`-less keys.
  """
  module = backbone.module if isinstance(backbone, Backbone) else backbone
  teacher = {f"backbone.{k}": v for k, v in backbone_state_dict(module, block_chunks).items()}
  for name, head in heads.items():
    teacher.update({f"{name}.{k}": v for k, v in head_state_dict(head).items()})
  nested = str(path).endswith(".pth")
  write_state_dict({"teacher": teacher} if nested else teacher, path, _config_metadata(module.cfg))


def load_backbone(path: str | os.PathLike, *, strict: bool = True, **overrides: Any) -> Backbone:
  """Loads a DINOv2 or DINOv3 backbone from a weights file.

  Args:
    path: a Meta hub backbone (`dinov2_vitb14_pretrain.pth`, `dinov3_vits16_pretrain_lvd1689m-*.pth`),
      a Meta DINOv2 teacher checkpoint (`{"teacher": ...}`), a `transformers` Dinov2 / DINOv3ViT state
      dict (`.safetensors`/`.bin`, or the model folder, sharded or not; its `config.json` is read for
      DINOv3's head count), or one of our exports. Pickles are read without executing code.
    strict: fail on missing or unexpected keys (shape mismatches always fail).
    **overrides: `ViTConfig` / `DINOv3Config` fields replacing the inferred ones, e.g.
      `interpolate_offset=0.0`, `dtype="bfloat16"`, `num_heads=...`.

  Returns:
    A `Backbone`.
  """
  weights = read_weights(path)
  if weights.backbone is None:
    raise CheckpointError(f"{path}: holds a {weights.kind.replace('_', ' ')}, not a backbone")
  try:
    return backbone_from_state_dict(weights.backbone, strict=strict, stored_config=weights.config, **overrides)
  except CheckpointError as e:
    raise CheckpointError(f"{path}: {e}") from None


def create_pretrained_like(name: str, seed: int = 0, **overrides) -> Backbone:
  """A randomly initialised `Backbone` with a hub preset's architecture (e.g. "dinov2_vits14", "dinov3_vitb16")."""
  return Backbone(hub.create_backbone(name, seed=seed, **overrides))


class Classifier:
  """Meta's hub linear classifier: a frozen backbone + a linear layer on CLS (+ patch-mean) features.

  `n_layers` = 1: input `[x_norm_clstoken, x_norm_patchtokens.mean(1)]`; `n_layers` = 4: the CLS
  tokens of the last 4 blocks (normed, oldest first) and the last block's patch mean.
  Calling it on (B, H, W, 3) images returns (B, num_classes) logits.
  """

  def __init__(self, backbone: Backbone, weight: np.ndarray, bias: np.ndarray):
    dim = backbone.config.embed_dim
    in_dim = weight.shape[1]
    n_layers = in_dim // dim - 1
    if in_dim % dim or n_layers not in (1, 4) or n_layers > backbone.config.depth:
      raise CheckpointError(
          f"the linear head expects {in_dim}-dimensional inputs, but a head for this backbone "
          f"(embed_dim {dim}) takes {2 * dim} (linear_head) or {5 * dim} (linear4_head): "
          "the head belongs to a different backbone size")
    self.backbone, self.n_layers = backbone, n_layers
    self.weight, self.bias = jnp.asarray(weight, jnp.float32), jnp.asarray(bias, jnp.float32)

  def features(self, images) -> jax.Array:
    """The linear layer's input, (B, (1 + n_layers) * D)."""
    return _classifier_features(self.backbone.graphdef, self.backbone.params, jnp.asarray(images), self.n_layers)

  def __call__(self, images) -> jax.Array:
    images = jnp.asarray(images)
    check_image_shape(images.shape, self.backbone.config.patch_size, self.backbone.config.in_chans)
    return self.features(images) @ self.weight.T + self.bias


@functools.partial(jax.jit, static_argnames=("graphdef", "n_layers"))
def _classifier_features(graphdef, params, images, n_layers: int):
  module = nnx.merge(graphdef, params)
  if n_layers == 1:
    out = module.forward_features(images)
    return jnp.concatenate([out["x_norm_clstoken"], out["x_norm_patchtokens"].mean(1)], axis=-1)
  layers = module.get_intermediate_layers(images, n=n_layers, return_class_token=True)
  return jnp.concatenate([cls for _, cls in layers] + [layers[-1][0].mean(1)], axis=-1)


def load_classifier(backbone_path: str | os.PathLike, head_path: str | os.PathLike, **overrides: Any) -> Classifier:
  """Meta's ImageNet classifier from a backbone file and a `*_linear_head.pth` / `*_linear4_head.pth`."""
  head = read_weights(head_path)
  if head.linear_head is None:
    raise CheckpointError(f"{head_path}: not a linear classifier head (expected keys 'weight' and 'bias')")
  backbone = load_backbone(backbone_path, **overrides)
  try:
    return Classifier(backbone, head.linear_head["weight"], head.linear_head["bias"])
  except CheckpointError as e:
    raise CheckpointError(f"{head_path}: {e}") from None
