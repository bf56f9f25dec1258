"""Tests of `dinov2_jax.optim` against hand-written Meta tables and `torch.optim.AdamW`."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx

from dinov2_jax import optim, param_paths
from dinov2_jax.models.dino_head import DINOHead
from dinov2_jax.models.vit import ViTConfig, create_backbone

# ------------------------------------------------------------------------------------------------
# (a) Multipliers of every parameter of real modules, against Meta's names.

DEPTH = 4
# layerwise_decay ** (n_blocks + 1 - layer_id), written out: embeddings are layer 0, blocks.i is
# layer i+1, the final norm is layer n_blocks+1 = 5.
EMB_LR = 0.9 ** 5
BLOCK_LR = {0: 0.9 ** 4, 1: 0.9 ** 3, 2: 0.9 ** 2, 3: 0.9 ** 1}
# Per-block suffix -> wd multiplier (Meta: no decay for '.bias', 'norm', 'gamma').
BLOCK_WD = {
    "norm1.weight": 0, "norm1.bias": 0,
    "attn.qkv.weight": 1, "attn.qkv.bias": 0,
    "attn.proj.weight": 1, "attn.proj.bias": 0,
    "ls1.gamma": 0,
    "norm2.weight": 0, "norm2.bias": 0,
    "mlp.fc1.weight": 1, "mlp.fc1.bias": 0,
    "mlp.fc2.weight": 1, "mlp.fc2.bias": 0,
    "ls2.gamma": 0,
}
# Meta name -> (lr_multiplier, wd_multiplier, is_last_layer).
META_BACKBONE_TABLE = {
    "cls_token": (EMB_LR, 1, False),
    "pos_embed": (EMB_LR, 1, False),
    "register_tokens": (EMB_LR, 1, False),
    "mask_token": (EMB_LR, 1, False),
    "patch_embed.proj.weight": (EMB_LR * 0.2, 1, False),
    "patch_embed.proj.bias": (EMB_LR * 0.2, 0, False),
    "norm.weight": (1.0, 0, False),
    "norm.bias": (1.0, 0, False),
    **{f"blocks.{i}.{suffix}": (BLOCK_LR[i], wd, False)
       for i in range(DEPTH) for suffix, wd in BLOCK_WD.items()},
}
META_HEAD_TABLE = {
    "mlp.0.weight": (1.0, 1, False), "mlp.0.bias": (1.0, 0, False),
    "mlp.2.weight": (1.0, 1, False), "mlp.2.bias": (1.0, 0, False),
    "mlp.4.weight": (1.0, 1, False), "mlp.4.bias": (1.0, 0, False),
    "last_layer.weight_g": (1.0, 1, True),
    "last_layer.weight_v": (1.0, 1, True),
}


def _meta_name(name: str, is_head: bool) -> str:
  """Our '/'-path -> Meta's state-dict name (the inverse of the naming convention of the models)."""
  parts = name.split("/")
  if is_head and parts[0] == "mlp":
    parts[1] = str(2 * int(parts[1]))  # Meta's head mlp is an nn.Sequential with GELUs between.
  leaf = {"kernel": "weight", "scale": "weight", "g": "weight_g", "v": "weight_v"}
  parts[-1] = leaf.get(parts[-1], parts[-1])
  return ".".join(parts)


BACKBONE_CFG = ViTConfig(
    img_size=28, patch_size=14, embed_dim=32, depth=DEPTH, num_heads=2, init_values=1.0,
    num_register_tokens=1)


@pytest.fixture(scope="module")
def modules():
  # Only the parameter names matter here: abstract modules (ShapeDtypeStruct leaves) are enough.
  backbone = nnx.eval_shape(lambda: create_backbone(BACKBONE_CFG))
  head = nnx.eval_shape(lambda: DINOHead(32, 16, nlayers=3, hidden_dim=24, bottleneck_dim=8, rngs=nnx.Rngs(1)))
  return backbone, head


def _check_table(groups, table, is_head):
  got = {_meta_name(n, is_head): g for n, g in groups.items()}
  assert set(got) == set(table), set(got) ^ set(table)
  for name, (lr, wd, last) in table.items():
    g = got[name]
    assert g.lr_mult == pytest.approx(lr, rel=1e-12), name
    assert g.wd_mult == wd, name
    assert g.is_last_layer is last, name


def test_backbone_multipliers_match_meta_table(modules):
  backbone, _ = modules
  params = nnx.to_pure_dict(nnx.state(backbone, nnx.Param))
  _check_table(optim.submodule_param_groups(params), META_BACKBONE_TABLE, is_head=False)
  # An nnx.State of Variables (what nnx.Optimizer initialises with) gives the same names.
  assert optim.submodule_param_groups(nnx.state(backbone, nnx.Param)) == optim.submodule_param_groups(params)


def test_head_multipliers_match_meta_table(modules):
  _, head = modules
  params = nnx.to_pure_dict(nnx.state(head, nnx.Param))
  _check_table(optim.submodule_param_groups(params), META_HEAD_TABLE, is_head=True)


def test_student_groups_are_per_submodule(modules):
  backbone, head = modules
  student = {
      "backbone": nnx.to_pure_dict(nnx.state(backbone, nnx.Param)),
      "dino_head": nnx.to_pure_dict(nnx.state(head, nnx.Param)),
      "ibot_head": nnx.to_pure_dict(nnx.state(head, nnx.Param)),
  }
  groups = optim.param_groups(student)
  for module, table, is_head in [("backbone", META_BACKBONE_TABLE, False),
                                 ("dino_head", META_HEAD_TABLE, True),
                                 ("ibot_head", META_HEAD_TABLE, True)]:
    sub = {n[len(module) + 1:]: g for n, g in groups.items() if n.startswith(module + "/")}
    _check_table(sub, table, is_head)
  with pytest.raises(ValueError, match="submodule"):  # a bare backbone is not a student tree
    optim.param_groups(student["backbone"])


def test_rules_on_meta_names_and_options():
  # The rules also read Meta's dotted names; decay and patch-embed factor are parameters.
  assert optim.lr_multiplier("blocks.2.attn.qkv.weight", 4) == pytest.approx(0.9 ** 2)
  assert optim.lr_multiplier("patch_embed.proj.weight", 12, layerwise_decay=0.5,
                             patch_embed_lr_mult=0.3) == pytest.approx(0.5 ** 13 * 0.3)
  assert optim.lr_multiplier("pos_embed", 0) == 1.0  # no blocks (a head): no layer decay
  assert optim.wd_multiplier("last_layer.weight_g") == 1.0
  assert optim.wd_multiplier("blocks.0.norm1.weight") == 0.0
  assert optim.is_last_layer("last_layer.weight_v")
  assert optim.count_blocks(["blocks/0/x", "blocks/11/y", "norm/scale"]) == 12
  assert optim.count_blocks(["mlp/0/kernel"]) == 0


# ------------------------------------------------------------------------------------------------
# (b) A few optimizer steps against torch.optim.AdamW with Meta's per-group lr/wd and per-module
# clip_grad_norm_.

# Toy student: full name -> (shape, lr_mult, wd_mult, is_last_layer), the multipliers by hand for a
# 2-block backbone (layer ids: embeddings 0, blocks.0 -> 1, blocks.1 -> 2, final norm 3).
TOY = {
    "backbone/pos_embed": ((1, 5, 4), 0.9 ** 3, 1, False),
    "backbone/cls_token": ((1, 1, 4), 0.9 ** 3, 1, False),
    "backbone/patch_embed/proj/kernel": ((2, 2, 3, 4), 0.9 ** 3 * 0.2, 1, False),
    "backbone/patch_embed/proj/bias": ((4,), 0.9 ** 3 * 0.2, 0, False),
    "backbone/blocks/0/norm1/scale": ((4,), 0.9 ** 2, 0, False),
    "backbone/blocks/0/norm1/bias": ((4,), 0.9 ** 2, 0, False),
    "backbone/blocks/0/attn/qkv/kernel": ((4, 12), 0.9 ** 2, 1, False),
    "backbone/blocks/0/attn/qkv/bias": ((12,), 0.9 ** 2, 0, False),
    "backbone/blocks/0/ls1/gamma": ((4,), 0.9 ** 2, 0, False),
    "backbone/blocks/1/mlp/fc1/kernel": ((4, 8), 0.9, 1, False),
    "backbone/blocks/1/mlp/fc1/bias": ((8,), 0.9, 0, False),
    "backbone/norm/scale": ((4,), 1.0, 0, False),
    "backbone/norm/bias": ((4,), 1.0, 0, False),
    "dino_head/mlp/0/kernel": ((4, 6), 1.0, 1, False),
    "dino_head/mlp/0/bias": ((6,), 1.0, 0, False),
    "dino_head/last_layer/g": ((5,), 1.0, 1, True),
    "dino_head/last_layer/v": ((6, 5), 1.0, 1, True),
    "ibot_head/mlp/0/kernel": ((4, 3), 1.0, 1, False),
    "ibot_head/last_layer/g": ((3,), 1.0, 1, True),
    "ibot_head/last_layer/v": ((3, 3), 1.0, 1, True),
}
MODULES = ("backbone", "dino_head", "ibot_head")
# Per-step schedules (Meta indexes them with the iteration, starting at 0).
LR = [1e-2, 2e-2, 5e-3, 1e-2, 3e-3]
WD = [0.04, 0.1, 0.2, 0.3, 0.4]
LAST_LR = [0.0, 0.0, 2e-2, 5e-3, 1e-2]  # last layer frozen for the first two steps
# Per-step gradient scales per module: clipping (norm > 3) is on for some modules and steps only.
GRAD_SCALE = {
    "backbone": [20.0, 0.05, 5.0, 0.1, 1.0],
    "dino_head": [0.05, 10.0, 0.1, 3.0, 0.02],
    "ibot_head": [0.1, 0.1, 30.0, 0.05, 4.0],
}
CLIP = 3.0


def _nest(flat: dict) -> dict:
  tree = {}
  for name, value in flat.items():
    node = tree
    *parents, leaf = name.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


def _flat(tree) -> dict:
  return {param_paths.path_name(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _toy_data(n_steps):
  rng = np.random.default_rng(0)
  params = {n: rng.normal(size=s).astype(np.float32) for n, (s, *_) in TOY.items()}
  grads = []
  for it in range(n_steps):
    grads.append({n: (GRAD_SCALE[n.split("/")[0]][it] * rng.normal(size=s)).astype(np.float32)
                  for n, (s, *_) in TOY.items()})
  return params, grads


def _module_norms(grads):
  return {m: np.sqrt(sum(np.sum(g.astype(np.float64) ** 2) for n, g in grads.items()
                         if n.startswith(m + "/"))) for m in MODULES}


def _torch_reference(params, grads, per_module_clip=True):
  """Meta's loop with torch.optim.AdamW: returns the params (flat dict) after every step."""
  tparams = {n: torch.nn.Parameter(torch.tensor(p)) for n, p in params.items()}
  groups = [{"params": [tparams[n]], "name": n, "lr_mult": lr_m, "wd_mult": wd_m, "last": last}
            for n, (_, lr_m, wd_m, last) in TOY.items()]
  opt = torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-8)
  history = []
  for it, step_grads in enumerate(grads):
    for g in opt.param_groups:  # apply_optim_scheduler
      g["lr"] = (LAST_LR[it] if g["last"] else LR[it]) * g["lr_mult"]
      g["weight_decay"] = WD[it] * g["wd_mult"]
    opt.zero_grad()
    for n, p in tparams.items():
      p.grad = torch.tensor(step_grads[n])
    if per_module_clip:
      for m in MODULES:
        torch.nn.utils.clip_grad_norm_([p for n, p in tparams.items() if n.startswith(m + "/")], CLIP)
    else:
      torch.nn.utils.clip_grad_norm_(list(tparams.values()), CLIP)
    opt.step()
    history.append({n: p.detach().numpy().copy() for n, p in tparams.items()})
  return history


def _jax_run(params, grads, **kwargs):
  tree = _nest({n: jnp.asarray(p) for n, p in params.items()})
  tx = optim.build_optimizer(
      tree,
      learning_rate=lambda s: jnp.asarray(LR)[s],
      weight_decay=lambda s: jnp.asarray(WD)[s],
      last_layer_learning_rate=lambda s: jnp.asarray(LAST_LR)[s],
      clip_grad=CLIP, **kwargs)
  state = tx.init(tree)

  @jax.jit
  def step(tree, state, g):
    updates, state = tx.update(g, state, tree)
    return optax.apply_updates(tree, updates), state

  history, hparams = [], []
  for step_grads in grads:
    tree, state = step(tree, state, _nest({n: jnp.asarray(g) for n, g in step_grads.items()}))
    history.append(_flat(tree))
    hparams.append({k: float(v) for k, v in state.hyperparams.items()})
  return history, hparams, state


def test_matches_torch_adamw_with_meta_groups_and_clipping():
  n_steps = len(LR)
  params, grads = _toy_data(n_steps)
  norms = [_module_norms(g) for g in grads]
  # The scenario exercises clipping in one submodule but not another within a step.
  assert norms[0]["backbone"] > CLIP > norms[0]["dino_head"]
  assert norms[1]["dino_head"] > CLIP > norms[1]["backbone"]
  assert norms[2]["ibot_head"] > CLIP > norms[2]["dino_head"]

  ref = _torch_reference(params, grads)
  got, hparams, _ = _jax_run(params, grads)
  for it in range(n_steps):
    # The schedules are read at step `it` for the it-th update (Meta's iteration it).
    assert hparams[it] == pytest.approx(
        {"learning_rate": LR[it], "weight_decay": WD[it], "last_layer_learning_rate": LAST_LR[it]},
        rel=1e-6)
    for n in TOY:
      np.testing.assert_allclose(got[it][n], ref[it][n], rtol=1e-6, atol=1e-6, err_msg=f"step {it} {n}")

  # lr exactly 0 (last-layer freeze) leaves g and v bit-for-bit unchanged, weight decay included.
  for it in (0, 1):
    for n in ("dino_head/last_layer/g", "dino_head/last_layer/v", "ibot_head/last_layer/v"):
      np.testing.assert_array_equal(got[it][n], params[n])
  assert not np.array_equal(got[2]["dino_head/last_layer/g"], params["dino_head/last_layer/g"])

  # The scenario is sensitive to the clipping rule: one global clip would give other numbers.
  ref_global = _torch_reference(params, grads, per_module_clip=False)
  diff = max(np.abs(ref_global[-1][n] - ref[-1][n]).max() for n in TOY)
  assert diff > 1e-4


def test_traced_hyperparams_can_be_injected():
  # A base lr/wd given as numbers lives in opt_state.hyperparams and can be replaced by traced
  # values inside a jitted step (e.g. read from a schedule array by the trainer).
  params, grads = _toy_data(2)
  tree = _nest({n: jnp.asarray(p) for n, p in params.items()})
  g = [_nest({n: jnp.asarray(x) for n, x in step.items()}) for step in grads]
  tx = optim.build_optimizer(tree, learning_rate=0.0, weight_decay=0.0, last_layer_learning_rate=0.0)

  @jax.jit
  def step(tree, state, grads, lr, wd, last_lr):
    hp = dict(state.hyperparams, learning_rate=lr, weight_decay=wd, last_layer_learning_rate=last_lr)
    updates, state = tx.update(grads, state._replace(hyperparams=hp), tree)
    return optax.apply_updates(tree, updates), state

  state, injected = tx.init(tree), tree
  for it in range(2):
    injected, state = step(injected, state, g[it], LR[it], WD[it], LAST_LR[it])
  scheduled, _, _ = _jax_run(params, grads)
  for n, x in _flat(injected).items():
    np.testing.assert_allclose(x, scheduled[-1][n], rtol=1e-7, atol=1e-8, err_msg=n)


# ------------------------------------------------------------------------------------------------
# (c) Clipping per submodule, frozen parameters, nnx integration.


def test_clipping_is_per_submodule():
  rng = np.random.default_rng(1)
  grads = {
      "backbone": {"a": jnp.asarray(1e4 * rng.normal(size=(7, 3)), jnp.float32),
                   "b": jnp.asarray(1e4 * rng.normal(size=(5,)), jnp.float32)},
      "dino_head": {"w": jnp.asarray(0.1 * rng.normal(size=(4, 4)), jnp.float32)},
      "ibot_head": {"w": jnp.asarray(rng.normal(size=(6,)), jnp.float32)},
  }
  norms = optim.submodule_grad_norms(grads)
  for m, tree in grads.items():
    expected = np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2) for x in jax.tree.leaves(tree)))
    assert float(norms[m]) == pytest.approx(expected, rel=1e-6)

  clipped, _ = optim.clip_by_submodule_norm(3.0).update(grads, optax.EmptyState())
  assert float(optim.submodule_grad_norms(clipped)["backbone"]) == pytest.approx(3.0, rel=1e-5)
  # The huge backbone gradient does not shrink the heads' gradients (norms below 3: untouched).
  for m in ("dino_head", "ibot_head"):
    np.testing.assert_array_equal(clipped[m]["w"], grads[m]["w"])
  # Backbone leaves keep their direction (one common factor).
  ratio = np.asarray(clipped["backbone"]["a"]) / np.asarray(grads["backbone"]["a"])
  np.testing.assert_allclose(ratio, ratio.flat[0], rtol=1e-6)


def test_frozen_backbone_gets_no_update_and_does_not_affect_heads():
  params, grads = _toy_data(3)
  free, _, _ = _jax_run(params, grads)
  frozen, _, state = _jax_run(params, grads, frozen="backbone/.*")
  for n in TOY:
    if n.startswith("backbone/"):
      np.testing.assert_array_equal(frozen[-1][n], params[n])
    else:  # per-submodule clipping: the heads do not see the backbone at all
      np.testing.assert_array_equal(frozen[-1][n], free[-1][n])
  # Frozen parameters keep no Adam moments.
  n_state = sum(x.size for x in jax.tree.leaves(state.inner_state) if np.ndim(x) > 0)
  n_trainable = sum(np.prod(s) for n, (s, *_) in TOY.items() if not n.startswith("backbone/"))
  assert n_state == 2 * n_trainable


def test_works_with_nnx_optimizer():
  # Real (small) modules: nnx.Optimizer initialises with an nnx.State of Variables and updates with
  # pure arrays; both must give the same labels.
  backbone = create_backbone(BACKBONE_CFG.replace(depth=2))
  head = DINOHead(32, 16, nlayers=2, hidden_dim=24, bottleneck_dim=8, rngs=nnx.Rngs(1))
  student = nnx.Dict(backbone=backbone, dino_head=head)
  before = _flat(nnx.to_pure_dict(nnx.state(student, nnx.Param)))
  tx = optim.build_optimizer(
      nnx.state(student, nnx.Param), learning_rate=optax.linear_schedule(1e-3, 2e-3, 10),
      weight_decay=0.04, last_layer_learning_rate=0.0)
  opt = nnx.Optimizer(student, tx, wrt=nnx.Param)

  @nnx.jit
  def step(student, opt):
    grads = jax.tree.map(jnp.ones_like, nnx.state(student, nnx.Param))
    opt.update(student, grads)

  step(student, opt)
  after = _flat(nnx.to_pure_dict(nnx.state(student, nnx.Param)))
  assert float(opt.opt_state.hyperparams["learning_rate"][...]) == pytest.approx(1e-3)
  np.testing.assert_array_equal(after["dino_head/last_layer/v"], before["dino_head/last_layer/v"])
  # Adam's first step is lr * g / |g| (up to eps and float32 bias corrections: hence atol) plus
  # decoupled decay: pos_embed has lr_mult 0.9**3.
  p0 = before["backbone/pos_embed"]
  np.testing.assert_allclose(
      after["backbone/pos_embed"], p0 - 1e-3 * 0.9 ** 3 * (1.0 + 0.04 * p0), rtol=1e-6, atol=1e-7)
  # Biases get no decay; the final norm has lr_mult 1.
  np.testing.assert_allclose(after["backbone/norm/bias"], before["backbone/norm/bias"] - 1e-3, rtol=0, atol=1e-7)
