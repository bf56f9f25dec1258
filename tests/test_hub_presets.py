"""The eight Meta hub models: presets, architecture inference and the full-size key mapping.

Uses the key names and shapes of Meta's released state dicts (shared/reference/hub_state_dict_shapes.json,
read from Meta's files) with zero-memory stand-in arrays: no real weights are needed.
"""

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

from dinov2_jax import PRESETS, DinoVisionTransformer, preset
from dinov2_jax.weights.convert import chunk_block_keys, infer_backbone_config, meta_to_params, params_to_meta

SHAPES_FILE = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "reference", "hub_state_dict_shapes.json")
if not os.path.exists(SHAPES_FILE):
  SHAPES_FILE = os.path.join(os.path.dirname(__file__), "data", "hub_state_dict_shapes.json")
HUB = json.load(open(SHAPES_FILE))


def _fake_state_dict(keys):
  # Broadcast views of a scalar: the right shapes with no memory, even for ViT-g's 1.1B parameters.
  return {k: np.broadcast_to(np.float32(0), tuple(shape)) for k, shape in keys.items()}


def _abstract_params(cfg):
  return nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: DinoVisionTransformer(cfg, rngs=nnx.Rngs(0))), nnx.Param))


def test_all_eight_presets_exist():
  assert {name for name in PRESETS if name.startswith("dinov2_")} == set(HUB)  # (DINOv3's: test_dinov3.py)


@pytest.mark.parametrize("name", sorted(HUB))
def test_hub_state_dict_maps_one_to_one(name):
  info = HUB[name]
  sd = _fake_state_dict(info["keys"])
  cfg = infer_backbone_config(sd)
  assert cfg == preset(name), "inferred architecture differs from the preset"
  assert (cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.num_register_tokens) == (
      info["embed_dim"], info["depth"], info["num_heads"], info["num_register_tokens"])
  assert (cfg.interpolate_antialias, cfg.interpolate_offset) == (info["interpolate_antialias"], info["interpolate_offset"])
  template = _abstract_params(cfg)
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(template))
  assert n_params == info["n_params"], "parameter count differs from Meta's"
  params = meta_to_params(sd, template)  # strict: raises on any missing/unexpected/mis-shaped key
  back = params_to_meta(params)
  assert set(back) == set(info["keys"])
  assert all(back[k].shape == tuple(s) for k, s in info["keys"].items())


def test_chunked_keys_of_training_checkpoints():
  info = HUB["dinov2_vitl14"]
  chunked = chunk_block_keys(_fake_state_dict(info["keys"]), depth=24, block_chunks=4)
  assert "blocks.1.6.attn.qkv.weight" in chunked and "blocks.3.23.ls2.gamma" in chunked
  assert "blocks.0.6.attn.qkv.weight" not in chunked
  from dinov2_jax.weights.convert import unchunk_block_keys
  assert set(unchunk_block_keys(chunked)) == set(info["keys"])


def test_overrides_and_wrong_architecture():
  sd = _fake_state_dict(HUB["dinov2_vits14"]["keys"])
  assert infer_backbone_config(sd, interpolate_offset=0.0).interpolate_offset == 0.0
  with pytest.raises(ValueError, match="unknown backbone fields"):
    infer_backbone_config(sd, embed_dimension=3)
  cfg = infer_backbone_config(sd, num_heads=8, depth=11)
  with pytest.raises(ValueError, match="unexpected keys.*blocks.11"):
    meta_to_params(sd, _abstract_params(cfg))
