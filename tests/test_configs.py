"""Every shipped config builds, validates and matches the recipe it names."""

import importlib.util
import os

import pytest

from dinov2_jax.train import trainer
from dinov2_jax.train.state import backbone_config_from

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")


def _load(name, arg=None):
  spec = importlib.util.spec_from_file_location(name, os.path.join(CONFIGS, f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


@pytest.mark.parametrize("variant", ["vits14", "vitb14", "vitl16_short", "vitl14", "vitg14"])
def test_pretrain_variants_validate(variant):
  c = _load("pretrain", variant)
  trainer.validate_config(c)
  cfg = backbone_config_from(c)
  assert cfg.img_size == c.crops.global_crops_size and cfg.patch_size in (14, 16)
  assert c.crops.local_crops_size % cfg.patch_size == 0


def test_vitl14_and_vitg14_follow_meta():
  for variant, dim, depth in (("vitl14", 1024, 24), ("vitg14", 1536, 40)):
    c = _load("pretrain", variant)
    cfg = backbone_config_from(c)
    assert (cfg.embed_dim, cfg.depth, cfg.ffn_layer, cfg.ffn_hidden_dim if dim == 1536 else 0) == (
        dim, depth, "swiglufused", 4096 if dim == 1536 else 0)
    assert c.dino.head_n_prototypes == 131072 and c.dino.head_bottleneck_dim == 384
    assert c.ibot.separate_head and c.ibot.head_n_prototypes == 131072
    assert c.centering == "sinkhorn_knopp" and c.optim.layerwise_decay == 1.0
    assert c.student.drop_path_rate == 0.4 and c.teacher.momentum_teacher == 0.994


def test_unknown_variant():
  with pytest.raises(ValueError, match="unknown variant"):
    _load("pretrain", "vith14")


def test_demo_config_validates():
  trainer.validate_config(_load("demo"))
