"""The sharded train step and the training loop: sharding equality, resume, failures, validation."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dinov2_jax import masking
from dinov2_jax.train import sharding, trainer
from dinov2_jax.train.default_config import get_default_config
from dinov2_jax.train.state import abstract_student, init_student_params, init_train_state, make_arch
from dinov2_jax.train.step import build_optimizer_for, make_train_step


def tiny_config():
  c = get_default_config()
  c.batch_size = 8
  c.epoch_length = 4
  c.student.update(arch="custom", embed_dim=32, depth=2, num_heads=2, patch_size=7, drop_path_rate=0.2,
                   layerscale=1.0e-1)
  c.crops.update(global_crops_size=28, local_crops_size=14, local_crops_number=2)
  for head in (c.dino, c.ibot):
    head.update(head_n_prototypes=64, head_hidden_dim=32, head_bottleneck_dim=16)
  c.optim.update(epochs=2.0, warmup_epochs=0.5, freeze_last_layer_epochs=0.25)
  c.teacher.update(warmup_teacher_temp_epochs=1.0, momentum_teacher=0.9)
  c.log_every_steps = 1
  c.checkpoint_every_steps = 3
  c.knn_eval.enabled = False
  return c


def make_shard_batch(c, step, shard, n_shards):
  """Shard `shard` of the global batch of `step` (dinov2_jax/data/layout.py): a function of the three."""
  rng = np.random.default_rng((c.seed, step, shard, n_shards))
  b, g = c.batch_size // n_shards, c.crops.global_crops_size // c.student.patch_size
  masks = masking.sample_batch_masks(rng, 2 * b, (g, g), max_num_patches=masking.meta_max_num_patches(
      c.crops.global_crops_size, c.student.patch_size))
  return {
      "global_crops": rng.normal(size=(2 * b, 28, 28, 3)).astype(np.float32),
      "local_crops": rng.normal(size=(c.crops.local_crops_number * b, 14, 14, 3)).astype(np.float32),
      "masks": masks.masks, "mask_indices": masks.mask_indices, "mask_weights": masks.mask_weights,
      "mask_valid": masks.mask_valid,
  }


def make_batch(c, step, n_shards=1, shards=None):
  """The rows of `shards` (default: all) of the global batch of `step`, shard after shard."""
  parts = [make_shard_batch(c, step, s, n_shards) for s in (range(n_shards) if shards is None else shards)]
  return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


class ArrayIterator:
  """Deterministic stand-in for the grain pipeline: batch k depends only on (seed, k) and the shards."""

  def __init__(self, config, patch_size, start_step=0, num_shards=1, shards=(0,)):
    self.config, self.step, self.num_shards, self.shards = config, start_step, num_shards, shards

  def __next__(self):
    batch = make_batch(self.config, self.step, self.num_shards, self.shards)
    self.step += 1
    return batch

  def get_state(self):
    return {"step": self.step}

  def set_state(self, state):
    self.step = state["step"]


def _run_steps(c, mesh, n_steps, n_shards):
  arch = make_arch(c, drop_path_groups=n_shards)
  student = init_student_params(c, 0)
  tx = build_optimizer_for(student, c)
  abstract = jax.eval_shape(lambda: init_train_state(student, tx, c, 0))
  state_sh = sharding.tree_shardings(abstract, mesh, c.sharding_rules, min_size=256)
  state = jax.jit(lambda s: init_train_state(s, tx, c, 0), out_shardings=state_sh)(student)
  batch_sh = sharding.batch_sharding(mesh)
  tables = {k: jnp.asarray(v) for k, v in trainer.schedules_from_config(c).tables().items()}
  step = jax.jit(make_train_step(arch, tx, n_shards), in_shardings=(state_sh, batch_sh, sharding.replicated(mesh)),
                 out_shardings=(state_sh, sharding.replicated(mesh)), donate_argnums=0)
  history = []
  for i in range(n_steps):
    batch = make_batch(c, i, n_shards)
    state, metrics = step(state, {k: jax.device_put(v, batch_sh) for k, v in batch.items()}, tables)
    history.append(jax.device_get(metrics))
  return jax.device_get(state), history, state_sh


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices: XLA_FLAGS set in conftest.py")
def test_one_device_and_4x2_mesh_agree():
  c = tiny_config()
  # No stochastic depth here: with it, the tiny random model's CLS tokens are so alike that KoLeo's
  # nearest-neighbour argmax can flip on float rounding (a discontinuity, not a sharding error).
  c.student.drop_path_rate = 0.0
  c.batch_size = 16  # 2 images per shard
  # The same 8-shard batch layout (per-shard masks and KoLeo) on one device and on 8.
  single, hist1, _ = _run_steps(c, sharding.make_mesh((("data", 1), ("fsdp", 1)), jax.devices()[:1]), 3, 8)
  c.mesh = (("data", 4), ("fsdp", 2))
  multi, hist8, shardings = _run_steps(c, sharding.make_mesh(c.mesh), 3, 8)
  # FSDP really shards something (the qkv kernel's output features over the fsdp axis).
  spec = shardings.student["backbone"]["blocks"][0]["attn"]["qkv"]["kernel"].spec
  assert "fsdp" in tuple(spec)
  for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(multi)):
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=1e-5, rtol=1e-5)
  for m1, m8 in zip(hist1, hist8):
    for k in m1:
      np.testing.assert_allclose(m1[k], m8[k], rtol=1e-5, atol=1e-5, err_msg=k)


def test_koleo_is_per_data_shard_like_meta_per_gpu_or_global_by_switch():
  # Meta computes KoLeo on each GPU's local batch and the gradient all-reduce averages the GPUs'
  # losses: 0.1 * mean_s sum_c KoLeo(crop c of shard s). The rows are shard-major, crop-major
  # within a shard (dinov2_jax/data/layout.py).
  from dinov2_jax.train.step import _koleo
  from tests.test_losses import meta_koleo
  n_shards, b, d = 4, 3, 8
  cls = np.random.default_rng(0).normal(size=(n_shards, 2, b, d)).astype(np.float32)
  rows = cls.reshape(-1, d)
  per_gpu = np.mean([sum(meta_koleo(cls[s, c]) for c in range(2)) for s in range(n_shards)])
  np.testing.assert_allclose(float(jax.jit(_koleo, static_argnums=(1, 2))(rows, n_shards, True)), per_gpu, rtol=1e-5)
  whole = sum(meta_koleo(cls[:, c].reshape(-1, d)) for c in range(2))
  np.testing.assert_allclose(float(jax.jit(_koleo, static_argnums=(1, 2))(rows, n_shards, False)), whole, rtol=1e-5)
  assert abs(per_gpu - whole) > 0.1  # the two scopes really differ
  c = tiny_config()
  assert make_arch(c).koleo_per_shard and c.dino.koleo_scope == "shard"
  c.dino.koleo_scope = "global"
  assert not make_arch(c).koleo_per_shard
  c.dino.koleo_scope = "gpu"
  with pytest.raises(ValueError, match="config.dino.koleo_scope='gpu'"):
    make_arch(c)


def test_bfloat16_demo_run_tracks_float32():
  # The demo recipe (LayerScale 1e-5, where a bf16 residual stream made every block an identity) on
  # demo batches for 50 steps, in float32 and in bfloat16 (Meta's autocast semantics): the losses
  # of the two runs stay together (a run that cannot learn drifts away within a few steps).
  from dinov2_jax import recipes
  from dinov2_jax.data.pipeline import make_train_iterator_from_config
  c = recipes.get_config("demo")
  c.update(batch_size=16, epoch_length=10)
  c.optim.epochs = 5
  it = make_train_iterator_from_config(c, c.student.patch_size, num_shards=1, shards=[0])
  batches = [{k: v for k, v in next(it).items() if k != "labels"} for _ in range(50)]
  tables = {k: jnp.asarray(v) for k, v in trainer.schedules_from_config(c).tables().items()}
  losses = {}
  for dtype in ("float32", "bfloat16"):
    c.compute_dtype = dtype
    arch = make_arch(c)
    student = init_student_params(c, 0)
    tx = build_optimizer_for(student, c)
    state = init_train_state(student, tx, c, 0)
    step = jax.jit(make_train_step(arch, tx), donate_argnums=0)
    losses[dtype] = []
    for batch in batches:
      state, metrics = step(state, batch, tables)
      losses[dtype].append(float(metrics["total_loss"]))
  f32, bf16 = np.asarray(losses["float32"]), np.asarray(losses["bfloat16"])
  assert f32[-10:].mean() < f32[:10].mean() - 0.3  # the run does learn something in 50 steps
  np.testing.assert_allclose(bf16, f32, rtol=0.01)


def test_step_changes_student_and_teacher_by_ema():
  c = tiny_config()
  c.optim.update(warmup_epochs=0.25, freeze_last_layer_epochs=0.5)  # lr 0 at step 0 (Meta), last layer frozen 2 steps
  arch = make_arch(c)
  student = init_student_params(c, 0)
  tx = build_optimizer_for(student, c)
  state = init_train_state(student, tx, c, 0)
  tables = {k: jnp.asarray(v) for k, v in trainer.schedules_from_config(c).tables().items()}
  step = jax.jit(make_train_step(arch, tx))
  state, metrics0 = step(state, make_batch(c, 0), tables)
  assert float(metrics0["lr"]) == 0.0  # Meta's warmup starts at 0
  before = jax.device_get(state)
  new, metrics = step(state, make_batch(c, 1), tables)
  assert float(metrics["lr"]) > 0 and float(metrics["last_layer_lr"]) == 0.0
  m = float(metrics["momentum"])
  assert 0.9 < m < 1.0
  s_new, t_new = jax.device_get(new.student), jax.device_get(new.teacher)
  leaf = lambda t: np.asarray(t["backbone"]["blocks"][1]["attn"]["qkv"]["kernel"])  # noqa: E731
  np.testing.assert_allclose(leaf(t_new), m * leaf(before.teacher) + (1 - m) * leaf(s_new), rtol=1e-6, atol=1e-7)
  assert not np.allclose(leaf(s_new), leaf(before.student))
  for name in ("v", "g"):  # the whole weight-normalised last layer is frozen (no decay either)
    np.testing.assert_array_equal(s_new["dino_head"]["last_layer"][name], before.student["dino_head"]["last_layer"][name])
  assert int(new.step) == 2
  for key in ("dino_local_crops_loss", "dino_global_crops_loss", "koleo_loss", "ibot_loss", "total_loss",
              "grad_norm/backbone", "grad_norm/dino_head", "lr", "wd", "momentum", "teacher_temp"):
    assert np.isfinite(metrics[key]), key
  total = sum(float(metrics[k]) for k in ("dino_local_crops_loss", "dino_global_crops_loss", "koleo_loss", "ibot_loss"))
  assert float(metrics["total_loss"]) == pytest.approx(total, rel=1e-6)


def test_resume_gives_identical_parameters(tmp_path):
  c = tiny_config()
  c.optim.epochs = 1.5  # 6 steps
  straight = trainer.train(c, str(tmp_path / "straight"), make_data_iterator=ArrayIterator)
  assert straight["step"] == 6
  c_half = tiny_config()
  c_half.optim.epochs = 1.5
  # First 3 steps, then a new process-like call resumes from the step-3 checkpoint.
  stopper = {"n": 0}

  def stop_after_three(step, metrics):
    if step == 3:
      raise KeyboardInterrupt

  with pytest.raises(KeyboardInterrupt):
    trainer.train(c_half, str(tmp_path / "resumed"), make_data_iterator=ArrayIterator, on_step=stop_after_three)
  del stopper
  # The step-3 checkpoint was written (checkpoint_every_steps=3) before the interruption.
  resumed = trainer.train(c_half, str(tmp_path / "resumed"), make_data_iterator=ArrayIterator)
  assert resumed["step"] == 6
  for a, b in zip(jax.tree.leaves(jax.device_get(straight["state"])), jax.tree.leaves(jax.device_get(resumed["state"]))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  lines = [json.loads(l) for l in open(tmp_path / "resumed" / "metrics.jsonl")]
  assert [l["step"] for l in lines][-3:] == [4, 5, 6]
  for name in ("teacher_backbone.pth", "teacher_backbone.safetensors"):
    assert os.path.getsize(tmp_path / "straight" / name) > 0


def test_incomplete_checkpoint_is_ignored(tmp_path):
  c = tiny_config()
  c.optim.epochs = 0.75  # 3 steps
  trainer.train(c, str(tmp_path), make_data_iterator=ArrayIterator)
  # A save cut off mid-write leaves only orbax's temporary directory behind.
  os.makedirs(tmp_path / "checkpoints" / "5.orbax-checkpoint-tmp-123" / "state")
  from dinov2_jax.train.checkpointing import Checkpointer
  assert Checkpointer(str(tmp_path / "checkpoints")).latest_step() == 3


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  c = tiny_config()
  c.optim.epochs = 2.0

  class PoisonAtStep4(ArrayIterator):
    def __next__(self):
      batch = super().__next__()
      if self.step == 5:  # the 5th batch (step index 4)
        batch["global_crops"] = np.full_like(batch["global_crops"], np.nan)
      return batch

  with pytest.raises(trainer.NonFiniteLossError, match="non-finite loss at step 4.*last good checkpoint is step 3"):
    trainer.train(c, str(tmp_path), make_data_iterator=PoisonAtStep4)
  from dinov2_jax.train.checkpointing import Checkpointer
  assert Checkpointer(str(tmp_path / "checkpoints")).all_steps() == [3]


@pytest.mark.parametrize("field,value,message", [
    ("crops.global_crops_size", 30, "config.crops.global_crops_size=30 is not a multiple of config.student.patch_size=7"),
    ("batch_size", 6, "config.batch_size=6 is not divisible by the 8 devices"),
    ("dataset.kind", "imagenet", "config.dataset.kind='imagenet' is unknown"),
    ("centering", "sinkhorn", "config.centering='sinkhorn'"),
    ("student.arch", "vit_huge", "config.student.arch='vit_huge'"),
])
def test_invalid_configs_fail_before_compiling(field, value, message):
  c = tiny_config()
  section, _, name = field.rpartition(".")
  (c[section] if section else c)[name] = value
  with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
    trainer.validate_config(c) if field != "centering" else make_arch(c)


def _save_tiny_weights(c, tmp_path, with_heads):
  from dinov2_jax import api
  from flax import nnx
  from dinov2_jax.train.state import build_modules
  modules, _ = build_modules(c, seed=123)
  path = str(tmp_path / ("teacher_checkpoint.pth" if with_heads else "hub.pth"))
  if with_heads:
    api.save_training_checkpoint(path, modules["backbone"], {"dino_head": modules["dino_head"]}, block_chunks=2)
  else:
    api.Backbone(modules["backbone"]).save(path)
  return path, {k: nnx.to_pure_dict(nnx.state(m, nnx.Param)) for k, m in modules.items()}


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices: XLA_FLAGS set in conftest.py")
@pytest.mark.parametrize("kind", ["hub", "teacher_checkpoint"])
def test_initial_state_from_meta_weights_is_born_sharded(tmp_path, kind):
  c = tiny_config()
  c.mesh = (("data", 2), ("fsdp", 4))
  path, saved = _save_tiny_weights(c, tmp_path, with_heads=kind == "teacher_checkpoint")
  c.init.update(kind=kind, path=path)
  tx = build_optimizer_for(abstract_student(c), c)
  abstract = jax.eval_shape(lambda: init_train_state(init_student_params(c, 0), tx, c, 0))
  shardings = sharding.tree_shardings(abstract, sharding.make_mesh(c.mesh), c.sharding_rules, min_size=256)
  state = trainer.initial_state(c, tx, shardings)
  qkv = state.student["backbone"]["blocks"][0]["attn"]["qkv"]["kernel"]
  assert qkv.sharding == shardings.student["backbone"]["blocks"][0]["attn"]["qkv"]["kernel"]
  assert "fsdp" in tuple(qkv.sharding.spec) and len(qkv.addressable_shards) == 8
  fresh = init_student_params(c, c.seed)
  for tree in (state.student, state.teacher):
    for a, b in zip(jax.tree.leaves(tree["backbone"]), jax.tree.leaves(saved["backbone"])):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    heads_from = saved if kind == "teacher_checkpoint" else fresh  # hub: heads keep the fresh init
    for a, b in zip(jax.tree.leaves(tree["dino_head"]), jax.tree.leaves(heads_from["dino_head"])):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # A mismatched architecture is reported with the config field to fix.
  c.student.depth = 3
  with pytest.raises(Exception, match="(?s)config.init.path.*missing keys.*blocks.2"):
    trainer.loaded_student_parts(c, abstract_student(c))


def test_frozen_backbone_for_the_first_steps_leaves_its_optimizer_state_untouched():
  c = tiny_config()
  c.optim.update(warmup_epochs=0.25)
  c.init.freeze_backbone_steps = 2
  arch = make_arch(c)
  student = init_student_params(c, 0)
  tx = build_optimizer_for(student, c)
  state = init_train_state(student, tx, c, 0)
  initial_opt = jax.device_get(state.opt_state)
  tables = {k: jnp.asarray(v) for k, v in trainer.schedules_from_config(c).tables().items()}
  step = jax.jit(make_train_step(arch, tx))
  snapshots, opt_states = [jax.device_get(state.student)], [initial_opt]
  for i in range(3):
    state, _ = step(state, make_batch(c, i), tables)
    snapshots.append(jax.device_get(state.student))
    opt_states.append(jax.device_get(state.opt_state))
  kernel = lambda s: np.asarray(s["backbone"]["blocks"][0]["mlp"]["fc1"]["kernel"])  # noqa: E731
  head = lambda s: np.asarray(s["dino_head"]["mlp"][0]["kernel"])  # noqa: E731
  np.testing.assert_array_equal(kernel(snapshots[2]), kernel(snapshots[0]))  # steps 0 and 1: frozen
  assert not np.array_equal(head(snapshots[2]), head(snapshots[1]))  # the heads train meanwhile
  assert not np.array_equal(kernel(snapshots[3]), kernel(snapshots[2]))  # step 2: the backbone trains
  # The backbone's Adam state (moments and step count) is exactly the initial one after the frozen
  # steps, so step 2 is its first Adam step; the heads' state has moved on.
  backbone_adam = lambda o: o.inner_state[2].inner_states["backbone"].inner_state.inner  # noqa: E731
  head_adam = lambda o: o.inner_state[2].inner_states["dino_head"].inner_state  # noqa: E731
  for a, b in zip(jax.tree.leaves(backbone_adam(opt_states[2])), jax.tree.leaves(backbone_adam(initial_opt))):
    np.testing.assert_array_equal(a, b)
  assert int(head_adam(opt_states[2])[0].count) == 2
  assert int(backbone_adam(opt_states[3])[0].count) == 1


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices: XLA_FLAGS set in conftest.py")
def test_checkpoint_restores_after_a_change_of_layerwise_decay(tmp_path):
  # The optimizer's labels are the submodules and the multipliers are data: a recipe change of the
  # multipliers keeps the state's structure, so a run can continue with the new value.
  c = tiny_config()
  c.optim.epochs = 0.75  # 3 steps, a checkpoint at step 3
  trainer.train(c, str(tmp_path), make_data_iterator=ArrayIterator)
  c.optim.update(epochs=1.0, layerwise_decay=0.5, patch_embed_lr_mult=0.7)
  resumed = trainer.train(c, str(tmp_path), make_data_iterator=ArrayIterator)
  assert resumed["step"] == 4


def test_sigterm_saves_a_checkpoint_and_stops(tmp_path):
  import signal
  c = tiny_config()
  c.checkpoint_every_steps = 100

  def preempt(step, metrics):
    if step == 2:
      os.kill(os.getpid(), signal.SIGTERM)  # what a scheduler sends before preempting

  result = trainer.train(c, str(tmp_path), make_data_iterator=ArrayIterator, on_step=preempt)
  assert result["step"] == 2 and "exports" not in result
  from dinov2_jax.train.checkpointing import Checkpointer
  assert Checkpointer(str(tmp_path / "checkpoints")).all_steps() == [2]
  assert signal.getsignal(signal.SIGTERM) is not None  # the previous handler is restored


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices: XLA_FLAGS set in conftest.py")
def test_mesh_from_topology_and_logical_activation_axes():
  mesh = sharding.make_mesh((("data", -1), ("fsdp", 2)))
  assert dict(zip(mesh.axis_names, mesh.devices.shape)) == {"data": 4, "fsdp": 2}
  assert sorted(d.id for d in mesh.devices.flat) == list(range(8))
  # One slice/process: a DCN factor of 1 is the plain mesh; wrong factors name the problem.
  assert sharding.make_mesh((("data", 4), ("fsdp", 2)), dcn_axes=(("data", 1),)).devices.shape == (4, 2)
  with pytest.raises(ValueError, match="config.dcn_mesh names \\['model'\\]"):
    sharding.make_mesh((("data", 4), ("fsdp", 2)), dcn_axes=(("model", 2),))
  with pytest.raises(ValueError, match="must divide the mesh axis sizes"):
    sharding.make_mesh((("data", 4), ("fsdp", 2)), dcn_axes=(("fsdp", 4),))
  # Logical axes -> mesh axes: the batch over all axes by default, others as the rules say.
  rules = (("batch", "*"), ("prototypes", "fsdp"))
  assert sharding.logical_spec(("batch", "tokens", "embed"), rules, mesh) == jax.sharding.PartitionSpec(
      ("data", "fsdp"), None, None)
  assert sharding.logical_spec(("embed", "prototypes"), rules, mesh) == jax.sharding.PartitionSpec(None, "fsdp")
  constrain = sharding.activation_constraint(mesh, (("batch", "data"), ("prototypes", "fsdp")))
  out = jax.jit(lambda x: constrain(x * 2.0, ("batch", "prototypes")))(jnp.ones((8, 6)))
  assert out.sharding.spec == jax.sharding.PartitionSpec("data", "fsdp")
  np.testing.assert_array_equal(np.asarray(out), 2.0)


def test_ordinary_steps_do_not_wait_for_the_device(tmp_path, monkeypatch):
  # Metrics stay on the device; the loop fetches them only at log and checkpoint steps, all the
  # pending ones at once (so the next batch's transfer and the step overlap).
  c = tiny_config()
  c.update(log_every_steps=4, checkpoint_every_steps=100, export_teacher=False)  # 8 steps
  fetches = []
  real_device_get = jax.device_get

  def recording_device_get(tree):
    if isinstance(tree, list) and tree and isinstance(tree[0], dict) and "total_loss" in tree[0]:
      fetches.append(len(tree))
    return real_device_get(tree)

  monkeypatch.setattr(jax, "device_get", recording_device_get)
  result = trainer.train(c, str(tmp_path), make_data_iterator=ArrayIterator)
  assert result["step"] == 8
  assert fetches == [1, 3, 4]  # steps 1 (the first log line), 2-4 and 5-8: 3 waits for 8 steps
  assert [json.loads(l)["step"] for l in open(tmp_path / "metrics.jsonl")] == [1, 4, 8]


def test_uint8_crops_normalised_on_the_device_equal_host_normalisation():
  from dinov2_jax.data.normalize import imagenet_normalize
  c = tiny_config()
  c.student.drop_path_rate = 0.0
  arch = make_arch(c)
  student = init_student_params(c, 0)
  tx = build_optimizer_for(student, c)
  tables = {k: jnp.asarray(v) for k, v in trainer.schedules_from_config(c).tables().items()}
  step = jax.jit(make_train_step(arch, tx))
  batch = make_batch(c, 0)
  rng = np.random.default_rng(0)
  raw = {k: rng.integers(0, 256, batch[k].shape, np.uint8) for k in ("global_crops", "local_crops")}
  on_host = {**batch, **{k: imagenet_normalize(v) for k, v in raw.items()}}
  on_device = {**batch, **raw}
  m_host = step(init_train_state(student, tx, c, 0), on_host, tables)[1]
  m_device = step(init_train_state(student, tx, c, 0), on_device, tables)[1]
  for k in ("total_loss", "dino_global_crops_loss", "ibot_loss", "koleo_loss"):
    np.testing.assert_allclose(float(m_device[k]), float(m_host[k]), rtol=1e-6, err_msg=k)


def test_device_batches_prefetch_keeps_the_pipeline_state_of_each_batch():
  c = tiny_config()
  feeder = trainer.ShardFeeder(sharding.batch_sharding(sharding.make_mesh((("data", 8),))))
  data = ArrayIterator(c, 7, num_shards=8, shards=feeder.shards)
  batches = trainer.DeviceBatches(data, feeder, depth=2)
  for k in range(3):
    batch, state = batches.next()
    assert state == {"step": k + 1}  # a checkpoint after this batch resumes at the next one
    want = make_batch(c, k, 8)
    for key in trainer.STEP_KEYS:
      np.testing.assert_array_equal(np.asarray(batch[key]), want[key])
  assert data.step == 5  # the pipeline itself ran `depth` = 2 batches ahead of the 3 consumed
