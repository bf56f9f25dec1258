"""Meta's torch-hub backbone names of both generations, and building a backbone from either config."""

from __future__ import annotations

from typing import Any, Union

from flax import nnx

from dinov2_jax.models import dinov3_vit, vit
from dinov2_jax.models.dinov3_vit import DINOv3Config, DinoV3VisionTransformer
from dinov2_jax.models.vit import DinoVisionTransformer, ViTConfig

BackboneConfig = Union[ViTConfig, DINOv3Config]
PRESETS: dict[str, BackboneConfig] = {**vit.PRESETS, **dinov3_vit.PRESETS}


def preset(name: str, **overrides: Any) -> BackboneConfig:
  """The config of a Meta hub model ("dinov2_vitb14_reg", "dinov3_vitl16", ...), with fields overridden."""
  if name not in PRESETS:
    raise ValueError(f"Unknown preset {name!r}; available: {', '.join(PRESETS)}")
  return PRESETS[name].replace(**overrides)


def build(cfg: BackboneConfig, rngs: nnx.Rngs) -> DinoVisionTransformer | DinoV3VisionTransformer:
  """The backbone module of a config (eager; see `create_backbone` for the compiled initialisation)."""
  module_class = DinoV3VisionTransformer if isinstance(cfg, DINOv3Config) else DinoVisionTransformer
  return module_class(cfg, rngs=rngs)


def create_backbone(cfg: BackboneConfig | str, *, seed: int = 0, **overrides: Any):
  """A randomly initialised backbone from a config or a hub name ("dinov2_vits14", "dinov3_vits16", ...)."""
  if isinstance(cfg, str):
    cfg = preset(cfg)
  if overrides:
    cfg = cfg.replace(**overrides)
  return vit.initialise(lambda: build(cfg, nnx.Rngs(seed)))
