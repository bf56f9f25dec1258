"""DINOv2 in JAX/Flax: Meta's self-supervised Vision Transformers (and DINOv3 backbones), trainable, importable and exportable."""

from dinov2_jax.api import (
    Backbone,
    Classifier,
    backbone_state_dict,
    create_pretrained_like,
    head_state_dict,
    load_backbone,
    load_classifier,
)
from dinov2_jax.dense import Depther, Segmenter, load_depther, load_segmenter
from dinov2_jax.models.dino_head import DINOHead
from dinov2_jax.models.dinov3_vit import DINOv3Config, DinoV3VisionTransformer
from dinov2_jax.models.hub import PRESETS, create_backbone, preset
from dinov2_jax.models.vit import DinoVisionTransformer, ViTConfig
from dinov2_jax.weights.torch_format import CheckpointError, UnsafeCheckpointError

__version__ = "0.1.0"
