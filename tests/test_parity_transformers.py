"""Backbone parity with `transformers`' PyTorch Dinov2 models, through our weight converter."""

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import dinov2_jax
from dinov2_jax.weights.convert import hf_to_meta
from tests import torch_reference as ref

TOL = 1e-4
KEYS = ("x_norm_clstoken", "x_norm_regtokens", "x_norm_patchtokens", "x_prenorm")
# Stored grid 8x8 (112 px): 224 upsamples, 98 downsamples, 280x196 is non-square, 112 needs no resampling.
SIZES = [(224, 224), (98, 98), (280, 196), (112, 112)]


def _images(h, w, batch=2, seed=0):
  return np.random.default_rng(seed).normal(size=(batch, h, w, 3)).astype(np.float32)


def _assert_close(ours, theirs, context):
  for key in KEYS:
    a, b = np.asarray(ours[key]), theirs[key]
    assert a.shape == b.shape, (context, key, a.shape, b.shape)
    err = float(np.abs(a - b).max()) if a.size else 0.0
    assert err <= TOL, f"{context} {key}: max abs error {err:.2e}"


@pytest.fixture(scope="module")
def plain_model():
  return ref.make_hf_model(registers=False, swiglu=False, seed=0)


@pytest.fixture(scope="module")
def register_model():
  return ref.make_hf_model(registers=True, swiglu=True, seed=3)


def _load(tmp_path, model, name, **overrides):
  path = tmp_path / name
  sd = {k: v.contiguous() for k, v in model.state_dict().items()}
  if name.endswith(".safetensors"):
    save_file(sd, str(path))
  else:
    torch.save(sd, str(path))
  return dinov2_jax.load_backbone(path, **overrides)


def test_plain_model_matches_transformers_at_every_size(tmp_path, plain_model):
  # transformers resamples by size, i.e. Meta's interpolate_offset=0; the offset path is tested below.
  backbone = _load(tmp_path, plain_model, "model.safetensors", interpolate_offset=0.0)
  assert backbone.config.ffn_layer == "mlp" and backbone.config.num_register_tokens == 0
  for h, w in SIZES:
    x = _images(h, w)
    _assert_close(backbone.forward_features(x), ref.hf_forward_features(plain_model, x), f"{h}x{w}")


def test_plain_model_with_meta_offset_interpolation(tmp_path, plain_model):
  backbone = _load(tmp_path, plain_model, "pytorch_model.bin")  # default offset 0.1, as Meta's hub models
  assert backbone.config.interpolate_offset == 0.1 and not backbone.config.interpolate_antialias
  meta_like = ref.use_meta_interpolation(ref.make_hf_model(registers=False, seed=0), offset=0.1)
  for h, w in SIZES:
    x = _images(h, w, seed=1)
    _assert_close(backbone.forward_features(x), ref.hf_forward_features(meta_like, x), f"offset {h}x{w}")
  # And the offset matters: the transformers (size-based) result differs visibly at 224.
  x = _images(224, 224)
  diff = np.abs(np.asarray(backbone.forward_features(x)["x_prenorm"]) -
                ref.hf_forward_features(plain_model, x)["x_prenorm"]).max()
  assert diff > 1e-3


def test_register_swiglu_model_matches_transformers(tmp_path, register_model):
  backbone = _load(tmp_path, register_model, "model.safetensors")
  cfg = backbone.config
  assert cfg.num_register_tokens == 4 and cfg.ffn_layer == "swiglufused"
  assert cfg.interpolate_antialias and cfg.interpolate_offset == 0.0  # Meta's register-model settings
  for h, w in SIZES:
    x = _images(h, w, seed=2)
    _assert_close(backbone.forward_features(x), ref.hf_forward_features(register_model, x, registers=4),
                  f"registers {h}x{w}")


def test_masked_tokens_match_transformers(tmp_path, register_model):
  backbone = _load(tmp_path, register_model, "model.safetensors")
  x = _images(98, 98, seed=4)
  masks = np.random.default_rng(5).random((2, 49)) < 0.4
  ours = backbone.forward_features(x, masks)
  _assert_close(ours, ref.hf_forward_features(register_model, x, masks, registers=4), "masked")
  assert np.array_equal(np.asarray(ours["masks"]), masks)


def test_intermediate_layers_match_transformers_hidden_states(tmp_path, plain_model):
  backbone = _load(tmp_path, plain_model, "model.safetensors", interpolate_offset=0.0)
  x = _images(98, 126, seed=6)
  with torch.no_grad():
    hidden = plain_model(pixel_values=torch.from_numpy(x.transpose(0, 3, 1, 2).copy()),
                         output_hidden_states=True).hidden_states
  norm = plain_model.layernorm
  # Block 0 un-normed, block indices as a sequence, reshaped to NHWC feature maps.
  (patches0, cls0), = backbone.get_intermediate_layers(x, n=[0], reshape=True, return_class_token=True, norm=False)
  assert patches0.shape == (2, 7, 9, 128)
  np.testing.assert_allclose(np.asarray(patches0).reshape(2, 63, 128), hidden[1][:, 1:].numpy(), atol=TOL)
  np.testing.assert_allclose(np.asarray(cls0), hidden[1][:, 0].numpy(), atol=TOL)
  # int n = the last n blocks, in block order, normed.
  outs = backbone.get_intermediate_layers(x, n=2)
  assert len(outs) == 2
  for out, h in zip(outs, hidden[1:]):
    with torch.no_grad():
      expected = norm(h)[:, 1:].numpy()
    np.testing.assert_allclose(np.asarray(out), expected, atol=TOL)


def test_call_returns_normed_cls(tmp_path, plain_model):
  backbone = _load(tmp_path, plain_model, "model.safetensors")
  x = _images(112, 112)
  np.testing.assert_allclose(np.asarray(backbone(x)),
                             np.asarray(backbone.forward_features(x)["x_norm_clstoken"]), atol=0)


def test_hf_names_of_both_transformers_generations_convert_alike(register_model):
  sd = ref.hf_state_dict(register_model)
  old = {}
  for k, v in sd.items():  # re-state the pre-5.0 names: fused SwiGLU input, attention.attention.*
    k2 = k.replace("attention.q_proj", "attention.attention.query").replace(
        "attention.k_proj", "attention.attention.key").replace("attention.v_proj", "attention.attention.value")
    k2 = k2.replace("attention.o_proj", "attention.output.dense").replace("mlp.down_proj", "mlp.weights_out")
    if "mlp.gate_proj" in k:
      old[k.replace("gate_proj", "weights_in")] = np.concatenate([v, sd[k.replace("gate_proj", "up_proj")]])
    elif "mlp.up_proj" not in k:
      old["dinov2." + k2] = v
  new_meta, old_meta = hf_to_meta(sd), hf_to_meta(old)
  assert new_meta.keys() == old_meta.keys()
  for k in new_meta:
    np.testing.assert_array_equal(new_meta[k], old_meta[k])
