"""Backbone and head behaviour not covered by the transformers parity tests."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx

from dinov2_jax import DINOHead, ViTConfig, create_backbone, head_state_dict
from dinov2_jax.models import vit

TINY = ViTConfig(img_size=28, patch_size=14, embed_dim=64, depth=3, num_heads=2, init_values=0.5,
                 num_register_tokens=1)


def _x(b=2, h=28, w=28, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(b, h, w, 3)), jnp.float32)


def test_image_size_errors_name_the_nearest_valid_sizes():
  model = create_backbone(TINY)
  with pytest.raises(ValueError, match="image height=30 is not a multiple of the patch size=14; nearest valid sizes: 28 or 42"):
    model.forward_features(_x(h=30))
  with pytest.raises(ValueError, match="width=13 .* 14"):
    model.forward_features(_x(w=13))
  with pytest.raises(ValueError, match="looks NCHW"):
    model.forward_features(jnp.zeros((1, 3, 28, 28)))
  with pytest.raises(ValueError, match=r"masks must have shape \(batch, patches\) = \(2, 4\)"):
    model.forward_features(_x(), jnp.zeros((2, 5), bool))


def test_meta_initialisation():
  cfg = ViTConfig(img_size=224, patch_size=14, embed_dim=384, depth=2, num_heads=6, init_values=1e-5,
                  num_register_tokens=4)
  p = nnx.to_pure_dict(nnx.state(create_backbone(cfg, seed=1), nnx.Param))
  assert abs(float(p["pos_embed"].std()) - 0.02) < 0.001
  assert float(jnp.abs(p["cls_token"]).max()) < 1e-5 and float(p["cls_token"].std()) > 0
  assert float(jnp.abs(p["register_tokens"]).max()) < 1e-5
  assert float(jnp.abs(p["mask_token"]).max()) == 0.0
  assert abs(float(p["blocks"][0]["attn"]["qkv"]["kernel"].std()) - 0.02) < 0.001
  assert float(jnp.abs(p["blocks"][0]["attn"]["qkv"]["bias"]).max()) == 0.0
  bound = 1 / np.sqrt(3 * 14 * 14)  # PyTorch's default Conv2d init, kept by Meta for the patch embed
  kernel = p["patch_embed"]["proj"]["kernel"]
  assert float(jnp.abs(kernel).max()) <= bound and float(jnp.abs(kernel).max()) > 0.95 * bound
  np.testing.assert_array_equal(p["blocks"][1]["ls2"]["gamma"], np.full(384, 1e-5, np.float32))
  assert "ls1" not in nnx.to_pure_dict(nnx.state(create_backbone(TINY.replace(init_values=None)), nnx.Param))["blocks"][0]


def test_swiglu_hidden_size_rounding():
  # Meta: hidden = int(D * mlp_ratio); (int(hidden * 2 / 3) + 7) // 8 * 8
  assert ViTConfig(embed_dim=1536, num_heads=24, ffn_layer="swiglufused").ffn_hidden_dim == 4096
  assert ViTConfig(embed_dim=100, num_heads=1, ffn_layer="swiglu").ffn_hidden_dim == 272  # int(266.67)=266 -> 272
  assert ViTConfig(embed_dim=100, num_heads=1, ffn_layer="mlp").ffn_hidden_dim == 400


def test_drop_rates_per_block():
  assert TINY.replace(drop_path_rate=0.3, drop_path_uniform=True).block_drop_rates() == [0.3] * 3
  np.testing.assert_allclose(TINY.replace(drop_path_rate=0.3).block_drop_rates(), [0.0, 0.15, 0.3])


def test_per_sample_drop_path_statistics():
  x = jnp.ones((4000, 2, 3))
  out = np.asarray(vit._drop_path(x, 0.25, jax.random.key(0)))
  per_sample = out[:, 0, 0]
  np.testing.assert_allclose(np.unique(per_sample), [0.0, 1 / 0.75], rtol=1e-6)
  assert abs((per_sample == 0).mean() - 0.25) < 0.03
  assert (out == out[:, :1, :1]).all()  # whole samples are dropped, not elements


def test_batch_subset_residual_like_meta():
  # Meta's drop_add_residual_stochastic_depth: residual for max(int(B * (1 - p)), 1) samples, scaled B / subset.
  x = jnp.asarray(np.random.default_rng(0).normal(size=(10, 3, 4)), jnp.float32)
  out = np.asarray(vit._residual_on_subset(x, lambda y: 2.0 * y, 0.45, jax.random.key(1)))
  changed = ~np.all(np.isclose(out, np.asarray(x)), axis=(1, 2))
  assert changed.sum() == 5  # int(10 * 0.55) = 5
  np.testing.assert_allclose(out[changed], np.asarray(x)[changed] * (1 + 2.0 * 10 / 5), rtol=1e-6)


def test_batch_subset_is_drawn_per_group_like_meta_per_gpu():
  # 4 groups (data shards) of 4 samples: each keeps max(int(4 * 0.55), 1) = 2, scaled by 4 / 2.
  x = jnp.asarray(np.random.default_rng(1).normal(size=(16, 3, 4)), jnp.float32)
  out = np.asarray(vit._residual_on_subset(x, lambda y: 2.0 * y, 0.45, jax.random.key(2), groups=4))
  changed = ~np.all(np.isclose(out, np.asarray(x)), axis=(1, 2))
  assert changed.reshape(4, 4).sum(1).tolist() == [2, 2, 2, 2]
  np.testing.assert_allclose(out[changed], np.asarray(x)[changed] * (1 + 2.0 * 4 / 2), rtol=1e-6)


@pytest.mark.parametrize("mode,rate,subset_calls", [("meta", 0.05, 2), ("meta", 0.4, 2), ("per_sample", 0.4, 0)])
def test_meta_mode_uses_the_batch_subset_at_every_rate(monkeypatch, mode, rate, subset_calls):
  # Meta's SSL training runs lists of crops through `forward_nested`, which drops a batch subset
  # for ANY rate > 0 (`drop_add_residual_stochastic_depth_list`); only its single-tensor path
  # switches to per-sample DropPath at rates <= 0.1.
  calls = []
  original = vit._residual_on_subset
  monkeypatch.setattr(vit, "_residual_on_subset", lambda *a, **k: calls.append(1) or original(*a, **k))
  block = vit.Block(TINY.replace(drop_path_mode=mode, init_values=1.0), rate, rngs=nnx.Rngs(0))
  y = jnp.asarray(np.random.default_rng(0).normal(size=(20, 5, TINY.embed_dim)), jnp.float32)
  out = block(y, jax.random.key(3))
  assert len(calls) == subset_calls
  assert not np.allclose(np.asarray(out), np.asarray(block(y)))  # stochastic depth did act


def test_training_mode_is_stochastic_and_eval_is_not():
  model = create_backbone(TINY.replace(drop_path_rate=0.4, drop_path_uniform=True))
  x = _x(b=8)
  eval_a, eval_b = model(x), model(x)
  np.testing.assert_array_equal(eval_a, eval_b)
  train_a = model.forward_features(x, drop_path_key=jax.random.key(0))["x_norm_clstoken"]
  train_a2 = model.forward_features(x, drop_path_key=jax.random.key(0))["x_norm_clstoken"]
  train_b = model.forward_features(x, drop_path_key=jax.random.key(1))["x_norm_clstoken"]
  np.testing.assert_array_equal(train_a, train_a2)
  assert not np.allclose(train_a, train_b) and not np.allclose(train_a, eval_a)


def test_bfloat16_compute_keeps_float32_params_and_outputs():
  model32 = create_backbone(TINY)
  model16 = create_backbone(TINY.replace(dtype="bfloat16"))
  params = nnx.state(model16, nnx.Param)
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params))
  out16 = model16.forward_features(_x())
  out32 = model32.forward_features(_x())
  assert out16["x_norm_clstoken"].dtype == jnp.float32  # norms run in float32, as under autocast
  np.testing.assert_allclose(np.asarray(out16["x_norm_patchtokens"]),
                             np.asarray(out32["x_norm_patchtokens"]), atol=0.1, rtol=0.05)


def test_bfloat16_blocks_contribute_like_float32_at_meta_layerscale_init():
  # Meta's training init: LayerScale 1e-5. Each block adds ~1e-5 x its branch output to a residual
  # stream of order 1; in a bf16 stream (8 bits of mantissa) that addition would round away and
  # every block would be an exact identity. With autocast semantics (float32 stream and
  # LayerScale, bf16 matmul inputs) the contribution matches float32's to bf16 precision.
  cfg = TINY.replace(init_values=1e-5, depth=4)
  model32 = create_backbone(cfg, seed=3)
  model16 = nnx.merge(nnx.split(create_backbone(cfg.replace(dtype="bfloat16"), seed=3))[0],
                      nnx.state(model32))  # the same parameters
  x = _x(b=4, seed=5)
  contributions = []
  for model in (model32, model16):
    tokens = model.prepare_tokens(x)
    after = model.forward_features(x)["x_prenorm"]
    contributions.append(np.asarray(after, np.float64) - np.asarray(tokens, np.float64))
  c32, c16 = contributions
  assert np.linalg.norm(c32) > 0
  rel = np.linalg.norm(c16 - c32) / np.linalg.norm(c32)
  assert rel < 0.05, rel  # bf16 matmuls: ~1%; a bf16 residual stream gives ~100% (all zero)
  np.testing.assert_array_equal(np.asarray(model16.prepare_tokens(x)).dtype, np.float32)


@pytest.mark.parametrize("variant", [dict(remat_policy="full"), dict(remat_policy="dots_saveable"),
                                     dict(scan_blocks=True), dict(scan_blocks=True, remat_policy="full")])
def test_remat_and_scanned_blocks_give_the_same_outputs_and_gradients(variant):
  # Training mode (Meta's batch-subset stochastic depth, masks): the same keys reach the same blocks.
  cfg = TINY.replace(drop_path_rate=0.3, drop_path_uniform=True)
  x, masks = _x(b=4), jnp.asarray(np.random.default_rng(1).random((4, 4)) < 0.3)
  results = []
  for c in (cfg, cfg.replace(**variant)):
    model = create_backbone(c, seed=2)
    graphdef, params = nnx.split(model)

    def loss(p):
      out = nnx.merge(graphdef, p).forward_features(x, masks, drop_path_key=jax.random.key(7))
      return jnp.sum(out["x_norm_clstoken"] ** 2) + jnp.sum(jnp.sin(out["x_norm_patchtokens"]))

    results.append(jax.jit(jax.value_and_grad(loss))(params))
  (v0, g0), (v1, g1) = results
  np.testing.assert_allclose(float(v1), float(v0), rtol=1e-5)
  assert jax.tree.structure(g0) == jax.tree.structure(g1)  # per-block parameters either way
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):  # float rounding relative to the leaf's scale
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5 * float(np.abs(a).max()))


@pytest.mark.parametrize("scan", [False, True])
def test_forward_features_list_equals_one_call_per_batch(scan):
  # Meta's forward_features_list: crops of different sizes through the blocks together.
  model = create_backbone(TINY.replace(drop_path_rate=0.3, drop_path_uniform=True, scan_blocks=scan), seed=4)
  images = [_x(b=4, seed=1), _x(b=6, h=14, w=14, seed=2)]
  masks = [jnp.asarray(np.random.default_rng(3).random((4, 4)) < 0.5), None]
  keys = [jax.random.key(1), jax.random.key(2)]
  together = model.forward_features_list(images, masks, drop_path_keys=keys)
  for i in range(2):
    alone = model.forward_features(images[i], masks[i], drop_path_key=keys[i])
    for name in ("x_norm_clstoken", "x_norm_patchtokens", "x_prenorm"):
      np.testing.assert_allclose(np.asarray(together[i][name]), np.asarray(alone[name]), atol=1e-5, err_msg=name)


def test_scanned_blocks_for_intermediate_layers_and_their_limits():
  model, scanned = create_backbone(TINY, seed=3), create_backbone(TINY.replace(scan_blocks=True), seed=3)
  for a, b in zip(model.get_intermediate_layers(_x(), n=2), scanned.get_intermediate_layers(_x(), n=2)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
  with pytest.raises(ValueError, match="drop_path_uniform=True"):
    create_backbone(TINY.replace(scan_blocks=True, drop_path_rate=0.3)).forward_features(
        _x(), drop_path_key=jax.random.key(0))
  with pytest.raises(ValueError, match="remat_policy='some'"):
    TINY.replace(remat_policy="some")


def test_intermediate_layer_indices_are_checked():
  model = create_backbone(TINY)
  assert len(model.get_intermediate_layers(_x(), n=3)) == 3
  with pytest.raises(ValueError, match="out of range"):
    model.get_intermediate_layers(_x(), n=4)
  with pytest.raises(ValueError, match="out of range"):
    model.get_intermediate_layers(_x(), n=[0, 5])


def test_forward_features_and_intermediates_equals_the_two_meta_calls():
  model = create_backbone(TINY)  # depth 3, one register token
  x = _x()
  ff = model.forward_features(x)
  for n in (0, 2, 3):
    out = model.forward_features_and_intermediates(x, n)
    for key in ("x_norm_clstoken", "x_norm_regtokens", "x_norm_patchtokens", "x_prenorm"):
      np.testing.assert_allclose(out[key], ff[key], atol=1e-5, err_msg=key)
    assert out["x_norm_clstoken_blocks"].shape == (2, n, 64)
    if n:
      layers = model.get_intermediate_layers(x, n=n, return_class_token=True)
      np.testing.assert_allclose(out["x_norm_clstoken_blocks"], jnp.stack([c for _, c in layers], axis=1),
                                 atol=1e-5)
  assert out["x_norm_regtokens"].shape == (2, 1, 64)
  with pytest.raises(ValueError, match="out of range"):
    model.forward_features_and_intermediates(x, 4)


def _torch_dino_head(sd, in_dim, out_dim, nlayers, hidden, bottleneck):
  """Meta's DINOHead re-stated in torch: Linear/GELU MLP, F.normalize, weight_norm last layer."""
  layers = [torch.nn.Linear(in_dim, hidden if nlayers > 1 else bottleneck)]
  for _ in range(nlayers - 2):
    layers += [torch.nn.GELU(), torch.nn.Linear(hidden, hidden)]
  if nlayers > 1:
    layers += [torch.nn.GELU(), torch.nn.Linear(hidden, bottleneck)]
  head = torch.nn.Module()
  head.mlp = torch.nn.Sequential(*layers) if nlayers > 1 else layers[0]
  head.last_layer = torch.nn.utils.weight_norm(torch.nn.Linear(bottleneck, out_dim, bias=False))
  head.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, strict=True)

  def forward(x):
    return head.last_layer(F.normalize(head.mlp(x), dim=-1, p=2, eps=1e-12))
  return forward


@pytest.mark.parametrize("nlayers", [1, 3])
def test_dino_head_matches_torch_restatement(nlayers):
  head = DINOHead(32, 50, nlayers=nlayers, hidden_dim=24, bottleneck_dim=8, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(head)
  state = jax.tree.map(lambda a: a * 1.7 if a.ndim == 1 else a, state)  # g != 1 so the weight-norm gain matters
  head = nnx.merge(graphdef, state)
  sd = head_state_dict(head)
  expected_keys = {"mlp.weight", "mlp.bias"} if nlayers == 1 else {f"mlp.{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")}
  assert set(sd) == expected_keys | {"last_layer.weight_g", "last_layer.weight_v"}
  x = np.random.default_rng(0).normal(size=(5, 32)).astype(np.float32)
  with torch.no_grad():
    expected = _torch_dino_head(sd, 32, 50, nlayers, 24, 8)(torch.from_numpy(x)).numpy()
  np.testing.assert_allclose(np.asarray(head(jnp.asarray(x))), expected, atol=1e-5)


def test_dino_head_init_like_meta():
  head = DINOHead(64, 1000, nlayers=3, hidden_dim=128, bottleneck_dim=32, rngs=nnx.Rngs(0))
  np.testing.assert_array_equal(head.last_layer.g[...], np.ones(1000, np.float32))
  assert float(jnp.abs(head.last_layer.v[...]).max()) <= 1 / np.sqrt(32)
  assert abs(float(head.mlp[0].kernel[...].std()) - 0.02) < 0.002
