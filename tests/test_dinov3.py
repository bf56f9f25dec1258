"""DINOv3 backbones: parity with transformers' DINOv3ViTModel, Meta's checkpoint layout, hub presets, conversion."""

import json
import os

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.torch import save_file

import dinov2_jax
from dinov2_jax import CheckpointError, cli
from dinov2_jax.models import hub
from dinov2_jax.models.dinov3_vit import Buffer, patch_coordinates
from dinov2_jax.weights.convert import hf_to_meta, params_to_meta
from tests import torch_reference as ref

TOL = 1e-4
KEYS = ("x_norm_clstoken", "x_norm_regtokens", "x_norm_patchtokens", "x_prenorm")
SIZES = [(224, 224), (160, 240)]  # square, and a non-square 10 x 15 patch grid
SHAPES = json.load(open(os.path.join(os.path.dirname(__file__), "data", "dinov3_hub_state_dict_shapes.json")))


def _images(h, w, seed=0, batch=2):
  return np.random.default_rng(seed).normal(size=(batch, h, w, 3)).astype(np.float32)


def _assert_close(ours, theirs, context):
  for key in KEYS:
    a, b = np.asarray(ours[key]), theirs[key]
    assert a.shape == b.shape, (context, key, a.shape, b.shape)
    err = float(np.abs(a - b).max())
    assert err <= TOL, f"{context} {key}: max abs error {err:.2e}"


def _save_hf(model, folder):
  """A transformers model folder: model.safetensors (`model.layer.*` names as saved by transformers 5) + config.json."""
  os.makedirs(folder, exist_ok=True)
  save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(folder, "model.safetensors"))
  model.config.to_json_file(os.path.join(folder, "config.json"))
  return os.path.join(folder, "model.safetensors")


@pytest.fixture(scope="module")
def mlp_model():
  return ref.make_hf_dinov3_model(hidden=128, layers=3, heads=2, seed=0)


@pytest.fixture(scope="module")
def swiglu_model():
  # Head dim 32 (4 heads of 128): only config.json says so; the gated MLP is transformers' SwiGLU.
  return ref.make_hf_dinov3_model(hidden=128, layers=2, heads=4, gated=True, intermediate=176, seed=4)


def test_matches_transformers_at_224_and_non_square(tmp_path, mlp_model):
  backbone = dinov2_jax.load_backbone(_save_hf(mlp_model, tmp_path / "hf"))
  cfg = backbone.config
  assert isinstance(cfg, dinov2_jax.DINOv3Config)
  assert (cfg.num_heads, cfg.n_storage_tokens, cfg.ffn_layer, cfg.norm_eps, cfg.mask_k_bias) == (2, 4, "mlp", 1e-5, True)
  for i, (h, w) in enumerate(SIZES):
    x = _images(h, w, seed=i)
    theirs, _ = ref.hf_dinov3_forward(mlp_model, x)
    ours = backbone.forward_features(x)
    _assert_close(ours, theirs, f"{h}x{w}")
    np.testing.assert_array_equal(np.asarray(ours["x_storage_tokens"]), np.asarray(ours["x_norm_regtokens"]))
    np.testing.assert_array_equal(np.asarray(backbone(x)), np.asarray(ours["x_norm_clstoken"]))


def test_transformers_model_folders_plain_and_sharded(tmp_path, swiglu_model):
  x = _images(160, 240, seed=12)
  expected = ref.hf_dinov3_forward(swiglu_model, x)[0]
  swiglu_model.save_pretrained(tmp_path / "folder")
  swiglu_model.save_pretrained(tmp_path / "sharded", max_shard_size="200KB")  # like the 7B's 6 shards
  assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 2
  for folder in ("folder", "sharded"):
    backbone = dinov2_jax.load_backbone(tmp_path / folder)
    assert backbone.config.num_heads == 4  # from the folder's config.json
    _assert_close(backbone.forward_features(x), expected, folder)


def test_swiglu_model_and_head_count_from_config_json(tmp_path, swiglu_model):
  path = _save_hf(swiglu_model, tmp_path / "hf")
  backbone = dinov2_jax.load_backbone(path)
  assert (backbone.config.num_heads, backbone.config.ffn_layer, backbone.config.ffn_hidden_dim) == (4, "swiglu", 176)
  for i, (h, w) in enumerate(SIZES):
    x = _images(h, w, seed=10 + i)
    _assert_close(backbone.forward_features(x), ref.hf_dinov3_forward(swiglu_model, x)[0], f"swiglu {h}x{w}")
  # Without config.json the head size cannot be read from the tensors: 64 is assumed, and it matters.
  os.remove(tmp_path / "hf" / "config.json")
  wrong = dinov2_jax.load_backbone(path)
  assert wrong.config.num_heads == 2
  x = _images(224, 224)
  assert np.abs(np.asarray(wrong(x)) - ref.hf_dinov3_forward(swiglu_model, x)[0]["x_norm_clstoken"]).max() > 1e-2
  assert dinov2_jax.load_backbone(path, num_heads=4).config.num_heads == 4


def test_rope_grid_and_positions():
  # Patch centres in [-1, 1], row-major, each axis normalised by its own length ("separate").
  np.testing.assert_allclose(patch_coordinates(2, 4)[:4], [[-0.5, -0.75], [-0.5, -0.25], [-0.5, 0.25], [-0.5, 0.75]])
  np.testing.assert_allclose(patch_coordinates(2, 4, "max")[4:6], [[-0.25, -0.75], [-0.25, -0.25]])  # both axes / 4
  # A uniform image gives every patch the same embedding; only RoPE can tell them apart.
  backbone = dinov2_jax.Backbone(hub.create_backbone("dinov3_vits16", depth=1, layerscale_init=1.0, seed=3))
  patches = np.asarray(backbone.forward_features(np.ones((1, 32, 64, 3), np.float32))["x_norm_patchtokens"][0])
  assert np.abs(patches - patches[:1]).max() > 1e-3


def _meta_state_dict(model):
  """transformers tensors under Meta's names, with the RoPE periods Meta stores (its formula, head dim 64)."""
  sd = hf_to_meta(ref.hf_state_dict(model))
  assert "rope_embed.periods" not in sd  # transformers computes them; Meta's files carry them
  sd["rope_embed.periods"] = (100.0 ** (2 * np.arange(16) / 32)).astype(np.float32)
  return sd


def test_meta_checkpoint_masked_key_bias_and_extra_norms(tmp_path, mlp_model):
  sd = _meta_state_dict(mlp_model)
  assert set(sd) == {"cls_token", "storage_tokens", "mask_token", "patch_embed.proj.weight", "patch_embed.proj.bias",
                     "rope_embed.periods", "norm.weight", "norm.bias"} | {
      f"blocks.{i}.{k}" for i in range(3) for k in SHAPES["dinov3_vits16"]["block"]}
  dim = 128
  bias = sd["blocks.1.attn.qkv.bias"]
  np.testing.assert_array_equal(bias[dim:2 * dim], 0.0)
  np.testing.assert_array_equal(sd["blocks.1.attn.qkv.bias_mask"], np.repeat([1.0, 0.0, 1.0], dim))
  # Meta's files hold trained (nonzero) key biases that the mask removes: they must not matter.
  for i in range(3):
    sd[f"blocks.{i}.attn.qkv.bias"][dim:2 * dim] = np.random.default_rng(i).normal(size=dim) * 3.0
  # ViT-7B's weights carry a training-only local CLS norm; it is loaded and never used.
  sd["local_cls_norm.weight"], sd["local_cls_norm.bias"] = np.full(dim, 7.0, np.float32), np.ones(dim, np.float32)
  torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}, tmp_path / "dinov3.pth")
  backbone = dinov2_jax.load_backbone(tmp_path / "dinov3.pth")
  assert backbone.config.untie_global_and_local_cls_norm and not backbone.config.untie_cls_and_patch_norms
  x = _images(160, 240, seed=3)
  theirs, hidden = ref.hf_dinov3_forward(mlp_model, x)
  _assert_close(backbone.forward_features(x), theirs, "meta file")
  # The mask is read from the file: with an all-ones mask the key bias counts.
  for i in range(3):
    sd[f"blocks.{i}.attn.qkv.bias_mask"][:] = 1.0
  torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}, tmp_path / "unmasked.pth")
  unmasked = dinov2_jax.load_backbone(tmp_path / "unmasked.pth").forward_features(x)
  assert np.abs(np.asarray(unmasked["x_prenorm"]) - theirs["x_prenorm"]).max() > 1e-2
  # Untied CLS norm: CLS and storage tokens through `cls_norm`, patches through `norm`.
  sd = _meta_state_dict(mlp_model)
  sd["cls_norm.weight"] = np.linspace(0.5, 2.0, dim, dtype=np.float32)
  sd["cls_norm.bias"] = np.linspace(-1.0, 1.0, dim, dtype=np.float32)
  torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}, tmp_path / "untied.pth")
  untied = dinov2_jax.load_backbone(tmp_path / "untied.pth")
  assert untied.config.untie_cls_and_patch_norms
  out = untied.forward_features(x)
  cls_norm = torch.nn.functional.layer_norm(hidden[-1][:, :5], (dim,), torch.from_numpy(sd["cls_norm.weight"]),
                                           torch.from_numpy(sd["cls_norm.bias"]), eps=1e-5).numpy()
  np.testing.assert_allclose(np.asarray(out["x_norm_clstoken"]), cls_norm[:, 0], atol=TOL)
  np.testing.assert_allclose(np.asarray(out["x_norm_regtokens"]), cls_norm[:, 1:], atol=TOL)
  np.testing.assert_allclose(np.asarray(out["x_norm_patchtokens"]), theirs["x_norm_patchtokens"], atol=TOL)


def test_masks_and_intermediate_layers(tmp_path, mlp_model):
  backbone = dinov2_jax.load_backbone(_save_hf(mlp_model, tmp_path / "hf"))
  x = _images(160, 240, seed=5)
  masks = np.random.default_rng(6).random((2, 150)) < 0.4
  ours = backbone.forward_features(x, masks)
  _assert_close(ours, ref.hf_dinov3_forward(mlp_model, x, masks)[0], "masked")
  assert np.array_equal(np.asarray(ours["masks"]), masks)
  _, hidden = ref.hf_dinov3_forward(mlp_model, x)
  (patches0, cls0), = backbone.get_intermediate_layers(x, n=[0], reshape=True, return_class_token=True, norm=False)
  assert patches0.shape == (2, 10, 15, 128)
  np.testing.assert_allclose(np.asarray(patches0).reshape(2, 150, 128), hidden[1][:, 5:].numpy(), atol=TOL)
  np.testing.assert_allclose(np.asarray(cls0), hidden[1][:, 0].numpy(), atol=TOL)
  for out, h in zip(backbone.get_intermediate_layers(x, n=2), hidden[2:]):
    with torch.no_grad():
      np.testing.assert_allclose(np.asarray(out), mlp_model.norm(h)[:, 5:].numpy(), atol=TOL)
  both = jax.jit(lambda params, images: dinov2_jax.Backbone.apply(
      backbone.graphdef, params, images, method="forward_features_and_intermediates", n=2))(backbone.params, x)
  with torch.no_grad():
    np.testing.assert_allclose(np.asarray(both["x_norm_clstoken_blocks"][:, 0]), mlp_model.norm(hidden[2])[:, 0].numpy(),
                               atol=TOL)


@pytest.mark.parametrize("name", sorted(k for k in SHAPES if k.startswith("dinov3_")))
def test_hub_presets_have_metas_names_shapes_and_sizes(name):
  info = SHAPES[name]
  module = nnx.eval_shape(lambda: hub.build(hub.preset(name), nnx.Rngs(0)))
  params = nnx.to_pure_dict(nnx.state(module, nnx.Param))
  assert sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params)) == info["n_params"]
  state = jax.tree.map(lambda s: np.broadcast_to(np.float32(0), s.shape), nnx.to_pure_dict(nnx.state(module, (nnx.Param, Buffer))))
  ours = {k: list(v.shape) for k, v in params_to_meta(state).items()}
  expected = {**info["top"], **{f"blocks.{i}.{k}": s for i in range(info["depth"]) for k, s in info["block"].items()}}
  assert ours == expected
  # And the architecture is read back from the names and shapes alone.
  fake = {k: np.broadcast_to(np.float32(1), s) for k, s in expected.items()}
  inferred = dinov2_jax.api.convert.infer_backbone_config(fake)
  cfg = hub.preset(name)
  for field in ("embed_dim", "depth", "num_heads", "ffn_hidden_dim", "n_storage_tokens", "qkv_bias", "norm_eps",
                "untie_global_and_local_cls_norm", "patch_size"):
    assert getattr(inferred, field) == getattr(cfg, field), field
  assert inferred.mask_k_bias == (cfg.mask_k_bias and cfg.qkv_bias)  # ViT-7B has no qkv bias to mask


def test_convert_both_ways(tmp_path, mlp_model, capsys):
  hf_path = _save_hf(mlp_model, tmp_path / "hf")
  # transformers -> Meta .pth (torch.load(weights_only=True) reads it; Meta's names)
  assert cli.main(["convert", hf_path, str(tmp_path / "dinov3.pth")]) == 0
  assert "DINOv3 backbone embed_dim=128 depth=3 heads=2" in capsys.readouterr().out
  meta = torch.load(tmp_path / "dinov3.pth", weights_only=True)
  assert "rope_embed.periods" in meta and "blocks.2.attn.qkv.bias_mask" in meta and meta["mask_token"].shape == (1, 128)
  # Meta .pth -> our safetensors -> Meta .pth: bit-exact
  assert cli.main(["convert", str(tmp_path / "dinov3.pth"), str(tmp_path / "ours.safetensors")]) == 0
  assert cli.main(["convert", str(tmp_path / "ours.safetensors"), str(tmp_path / "again.pth")]) == 0
  again = torch.load(tmp_path / "again.pth", weights_only=True)
  assert again.keys() == meta.keys() and all(torch.equal(again[k], meta[k]) for k in meta)
  # Meta .pth -> transformers (with a config.json): transformers loads it and computes the same thing
  out_dir = tmp_path / "back"
  os.makedirs(out_dir)
  assert cli.main(["convert", str(tmp_path / "dinov3.pth"), str(out_dir / "model.safetensors"), "--layout", "hf"]) == 0
  from transformers import DINOv3ViTModel
  reloaded = DINOv3ViTModel.from_pretrained(out_dir, attn_implementation="eager").eval()
  x = _images(160, 240, seed=8)
  _assert_close(ref.hf_dinov3_forward(reloaded, x)[0], ref.hf_dinov3_forward(mlp_model, x)[0], "transformers round trip")
  with open(out_dir / "config.json") as f:
    assert json.load(f)["num_attention_heads"] == 2


def test_create_backbone_by_hub_name_and_errors(tmp_path):
  backbone = dinov2_jax.create_pretrained_like("dinov3_vits16", depth=1)
  assert backbone.config.n_storage_tokens == 4 and backbone.config.num_heads == 6
  out = backbone.forward_features(_images(32, 48, batch=1))
  assert out["x_norm_patchtokens"].shape == (1, 6, 384) and out["x_norm_regtokens"].shape == (1, 4, 384)
  with pytest.raises(ValueError, match="Unknown preset 'dinov3_vitx16'.*dinov3_vit7b16"):
    dinov2_jax.create_backbone("dinov3_vitx16")
  with pytest.raises(ValueError, match="multiple of the patch size=16"):
    backbone.forward_features(_images(30, 48, batch=1))
  backbone.save(tmp_path / "b.pth")
  with pytest.raises(CheckpointError, match="missing keys.*blocks.1.attn.qkv.weight"):
    dinov2_jax.load_backbone(tmp_path / "b.pth", depth=2)
