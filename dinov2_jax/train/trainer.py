"""The DINOv2 training loop: set-up from a config, sharded init or resume, steps, logs, checkpoints.

One process per host; the same code runs on one CPU, on 8 (fake) devices and on multi-host TPU/GPU
(join the processes first: `dinov2_jax.distributed.initialize`, which `dinov2_jax.main` calls). Every
process runs the same loop: the state is created directly in its sharding, each process feeds the
rows of the data shards its devices hold, checkpoints are written by all processes together, a
preemption notice (SIGTERM) to any process makes all of them checkpoint the same step and stop, and
the teacher export gathers the sharded parameters before process 0 writes them.
"""

from __future__ import annotations

import collections
import functools
import json
import math
import os
import signal
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dinov2_jax import api, cpu_tuning, health, schedules
from dinov2_jax.models.vit import check_patch_multiple
from dinov2_jax.train import sharding
from dinov2_jax.train.checkpointing import Checkpointer, abstract_with_shardings
from dinov2_jax.train.state import (TrainState, abstract_student, backbone_config_from, init_student_params,
                                    init_train_state, make_arch)
from dinov2_jax.train.step import build_optimizer_for, make_train_step
from dinov2_jax.weights.torch_format import CheckpointError


class NonFiniteLossError(RuntimeError):
  """The loss became NaN or inf; the run stopped and the last good checkpoint is kept."""


# ------------------------------------------------------------------------------------ config


def total_steps(config) -> int:
  return int(round(config.optim.epochs * config.epoch_length))


def validate_config(config) -> None:
  """Fails fast, before anything is compiled, with the offending field named."""
  for field in ("global_crops_size", "local_crops_size"):
    check_patch_multiple(config.crops[field], config.student.patch_size, f"config.crops.{field}",
                         "config.student.patch_size")
  data_ways = sharding.mesh_from_config(config).devices.size
  if config.batch_size % data_ways:
    raise ValueError(f"config.batch_size={config.batch_size} is not divisible by the {data_ways} devices of "
                     f"config.mesh={tuple(config.mesh)} (the batch is split over every mesh axis)")
  if config.batch_size % jax.process_count():
    raise ValueError(f"config.batch_size={config.batch_size} is not divisible by {jax.process_count()} processes")
  kinds = ("demo", "tfds", "folder")
  if config.dataset.kind not in kinds:
    raise ValueError(f"config.dataset.kind={config.dataset.kind!r} is unknown; expected one of {kinds}")
  if config.init.kind not in ("scratch", "hub", "teacher_checkpoint"):
    raise ValueError(f"config.init.kind={config.init.kind!r}; expected 'scratch', 'hub' or 'teacher_checkpoint'")
  if config.init.kind != "scratch" and not config.init.path:
    raise ValueError(f"config.init.path is required with config.init.kind={config.init.kind!r}")
  if total_steps(config) < 1:
    raise ValueError(f"config.optim.epochs * config.epoch_length = {total_steps(config)}; must be >= 1")
  backbone_config_from(config)  # arch, ffn_layer, ... checked by the config classes


def schedules_from_config(config) -> schedules.TrainSchedules:
  o, t = config.optim, config.teacher
  lr = schedules.scaled_lr(o.base_lr, config.batch_size, o.scaling_rule)
  return schedules.build_schedules(
      lr=lr, min_lr=o.min_lr, epochs=o.epochs, warmup_epochs=o.warmup_epochs, weight_decay=o.weight_decay,
      weight_decay_end=o.weight_decay_end, momentum_teacher=t.momentum_teacher,
      final_momentum_teacher=t.final_momentum_teacher, teacher_temp=t.teacher_temp,
      warmup_teacher_temp=t.warmup_teacher_temp, warmup_teacher_temp_epochs=t.warmup_teacher_temp_epochs,
      freeze_last_layer_epochs=o.freeze_last_layer_epochs, epoch_length=config.epoch_length)


# ------------------------------------------------------------------------------------ init


def loaded_student_parts(config, template: dict) -> dict[str, dict]:
  """The parts of the step-0 student that `config.init` reads from a file, as host numpy trees.

  {} for `init.kind="scratch"`; {"backbone"} for a Meta hub file; {"backbone", "dino_head"[,
  "ibot_head"]} for a Meta teacher checkpoint. Checked against `template` (the configured student's
  shapes). The file is decoded on the host CPU, never on an accelerator.
  """
  if config.init.kind == "scratch":
    return {}
  cfg = backbone_config_from(config)
  fields = {k: getattr(cfg, k) for k in ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio",
                                           "ffn_layer", "num_register_tokens", "interpolate_antialias",
                                           "interpolate_offset")}
  try:
    with jax.default_device(jax.local_devices(backend="cpu")[0]):
      if config.init.kind == "hub":
        backbone, heads = api.load_backbone(config.init.path, **fields), {}
      else:
        backbone, heads = api.load_training_checkpoint(config.init.path, **fields)
      parts = {"backbone": nnx.to_pure_dict(nnx.state(backbone.module, nnx.Param))}
      for name, head in heads.items():
        parts[name] = nnx.to_pure_dict(nnx.state(head, nnx.Param))
  except CheckpointError as e:
    raise CheckpointError(f"config.init.path: {e}\n(the student's img_size is config.student.img_size or the "
                          "global crop size; Meta's hub weights need img_size=518)") from None
  for name in parts:
    if name not in template:
      raise CheckpointError(f"config.init.path has an {name} but config.ibot.separate_head is False")
    # Shapes must agree with the configured heads too (prototypes, bottleneck ...).
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(parts[name])[0], jax.tree.leaves(template[name])):
      if a.shape != b.shape:
        raise CheckpointError(f"config.init.path: {name} {jax.tree_util.keystr(path)} has shape {a.shape}, "
                              f"the configured {name} expects {b.shape}")
  return jax.tree.map(np.asarray, parts)


def initial_state(config, tx, state_shardings) -> TrainState:
  """The train state at step 0, created directly in `state_shardings` (no full copy on one device).

  Meta's random initialisation runs inside one jit whose outputs are already sharded (a ViT-g/14
  state would not fit on one device); parts loaded by `config.init` replace their random
  counterparts (XLA drops the unused random init) and arrive per shard.
  """
  loaded = loaded_student_parts(config, abstract_student(config))
  loaded = {name: jax.tree.map(lambda x, s: jax.make_array_from_callback(x.shape, s, lambda idx, x=x: x[idx]),
                               tree, state_shardings.student[name]) for name, tree in loaded.items()}

  def init(loaded):
    student = {**init_student_params(config, config.seed), **loaded}
    return init_train_state(student, tx, config, config.seed)

  return jax.jit(init, out_shardings=state_shardings)(loaded)


# ------------------------------------------------------------------------------------ logging


class MetricsLogger:
  """Terminal lines, a JSONL log and TensorBoard event files (tensorboardX), from process 0 only."""

  def __init__(self, workdir: str, total: int, images_per_step: int, n_prototypes: int):
    self.total, self.images_per_step = total, images_per_step
    self.log_k = math.log(n_prototypes)
    self.enabled = jax.process_index() == 0
    self._tb = None
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
    self._t0, self._step0 = time.perf_counter(), None

  def log(self, step: int, metrics: dict[str, float]) -> None:
    if not self.enabled:
      return
    now = time.perf_counter()
    if self._step0 is None:
      self._t0, self._step0 = now, step
      rate = float("nan")
    else:
      rate = (step - self._step0) / max(now - self._t0, 1e-9)
    record = {"step": step, **metrics, "images_per_s": rate * self.images_per_step}
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    for k, v in metrics.items():
      self._tb.add_scalar(k, v, step)
    if rate == rate:  # the first logged step has no rate yet
      self._tb.add_scalar("images_per_s", record["images_per_s"], step)
    eta = (self.total - step) / rate if rate and rate == rate else float("nan")
    eta_s = "?" if eta != eta else time.strftime("%H:%M:%S", time.gmtime(eta))
    print(f"step {step:>7}/{self.total}  loss {metrics['total_loss']:.4f} (dino {metrics['dino_local_crops_loss'] + metrics['dino_global_crops_loss']:.4f} "
          f"ibot {metrics['ibot_loss']:.4f} koleo {metrics['koleo_loss']:.4f})  teacher entropy "
          f"{metrics['dino_teacher_entropy']:.2f}/{self.log_k:.2f}  lr {metrics['lr']:.2e}  "
          f"{record['images_per_s']:.1f} img/s  ETA {eta_s}", flush=True)

  def close(self):
    if self.enabled:
      self._jsonl.close()
      self._tb.close()


# ------------------------------------------------------------------------------------ loop


class PreemptionNotice:
  """Turns SIGTERM (a scheduler's preemption notice) into "checkpoint this step and stop".

  With several processes, JAX's preemption service (started by `jax.distributed.initialize`)
  catches SIGTERM in any of them and agrees with all the others on one step to stop at:
  `reached(step)` is then True at that same step in every process, so all of them save the same
  checkpoint and exit, instead of one process leaving the others hanging in a collective. With one
  process a Python signal handler does the same. `reached` must be called at every step.
  """

  def __init__(self):
    self._multi_process = jax.process_count() > 1
    self._requested = False
    self._previous = None

  def __enter__(self):
    if not self._multi_process:
      try:
        self._previous = signal.signal(signal.SIGTERM, self._handle)
      except ValueError:  # not in the main thread
        self._previous = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self._requested = True

  def reached(self, step: int) -> bool:
    if self._multi_process:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      return multihost_utils.reached_preemption_sync_point(step)
    return self._requested

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _config_changes(workdir: str, config) -> str:
  """Human-readable differences between the workdir's saved config and `config`."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return ""
  saved, now = json.load(open(path)), json.loads(config.to_json_best_effort())

  def flat(d, prefix=""):
    out = {}
    for k, v in d.items():
      out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out
  saved, now = flat(saved), flat(now)
  diffs = [f"{k}: {saved.get(k)!r} in the checkpoint's run, {now.get(k)!r} now"
           for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]
  return "; ".join(diffs)


class ShardFeeder:
  """Puts a host's batch (the rows of its data shards, in shard order) onto the devices holding them.

  Device d of the batch sharding holds data shard `shard_of[d]` (its position along the batch axis);
  `shards` lists this process's shards in increasing order, which is the order its input pipeline
  must produce rows in. Works for any device order (topology-aware TPU meshes included).
  """

  def __init__(self, batch_sharding):
    self.sharding = batch_sharding
    self.num_shards = batch_sharding.mesh.devices.size
    index_map = batch_sharding.devices_indices_map((self.num_shards,))
    local = {index_map[d][0].indices(self.num_shards)[0]: d for d in batch_sharding.addressable_devices}
    self.shards = sorted(local)
    self._devices = [local[s] for s in self.shards]

  def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    out = {}
    for key, value in batch.items():
      pieces = np.split(value, len(self._devices))
      shape = (value.shape[0] // len(self._devices) * self.num_shards,) + value.shape[1:]
      out[key] = jax.make_array_from_single_device_arrays(
          shape, self.sharding, [jax.device_put(p, d) for p, d in zip(pieces, self._devices)])
    return out


def fetch_to_host(tree):
  """A pytree of (possibly multi-process sharded) arrays as numpy, on every process. Collective:
  every process must call it. Leaf by leaf, so at most one parameter is gathered at a time."""
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return jax.tree.map(lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)), tree)


STEP_KEYS = ("global_crops", "local_crops", "masks", "mask_indices", "mask_weights", "mask_valid")


def train(config, workdir: str, *, make_data_iterator: Callable | None = None,
          on_step: Callable[[int, dict], None] | None = None,
          on_start: Callable[[api.Backbone], None] | None = None) -> dict[str, Any]:
  """Runs (or resumes) pretraining in `workdir`. Returns the final metrics and paths.

  Every process of a multi-host run calls it with the same arguments.

  Args:
    config: an ml_collections config (see dinov2_jax/train/default_config.py and dinov2_jax/configs/).
    workdir: checkpoints, logs and exports go here; an existing run in it is resumed.
    make_data_iterator: `(config, patch_size, start_step=, num_shards=, shards=) -> iterator`
      override (tests); it must yield this process's shards' rows (dinov2_jax/data/layout.py).
    on_step: called with (step, metrics) after every step (tests, notebooks).
    on_start: called with the step-0 teacher backbone (on every process) before the first step of
      a run that starts from scratch, e.g. to evaluate the initialisation.
  """
  validate_config(config)
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0 and not os.path.exists(os.path.join(workdir, "config.json")):
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))
  mesh = sharding.mesh_from_config(config)
  feeder = ShardFeeder(sharding.batch_sharding(mesh))
  arch = make_arch(config, drop_path_groups=feeder.num_shards)
  n_steps = total_steps(config)
  tables = jax.device_put({k: jnp.asarray(v) for k, v in schedules_from_config(config).tables().items()},
                          sharding.replicated(mesh))
  tx = build_optimizer_for(abstract_student(config), config)
  abstract_state = jax.eval_shape(lambda: init_train_state(init_student_params(config, config.seed), tx, config,
                                                           config.seed))
  state_shardings = sharding.tree_shardings(abstract_state, mesh, config.sharding_rules, config.fsdp_min_size)
  checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.keep_checkpoints)

  if checkpointer.latest_step() is not None:
    try:
      state, data_state, start = checkpointer.restore(abstract_with_shardings(abstract_state, state_shardings))
    except ValueError as e:
      raise ValueError(f"cannot resume from {checkpointer.directory}: its checkpoint does not fit this config "
                       f"({_config_changes(workdir, config) or e}). Use a new --workdir, or the run's own "
                       "config (saved as config.json in the workdir).") from None
    print(f"resumed from {checkpointer.directory}/{start} (step {int(state.step)})", flush=True)
  else:
    state, data_state = initial_state(config, tx, state_shardings), None
    if on_start is not None:
      on_start(teacher_backbone(state, arch))
  start = int(jax.device_get(state.step))

  if make_data_iterator is None:
    from dinov2_jax.data.pipeline import make_train_iterator_from_config
    # uint8 crops: a quarter of the bytes to move; the step normalises them on the device.
    make_data_iterator = functools.partial(make_train_iterator_from_config, normalize=False)
  data = make_data_iterator(config, arch.backbone_config.patch_size, start_step=start,
                            num_shards=feeder.num_shards, shards=feeder.shards)
  if data_state is not None:
    data.set_state(data_state)

  constrain = sharding.activation_constraint(mesh, config.logical_axis_rules)
  step_fn = jax.jit(make_train_step(arch, tx, feeder.num_shards, constrain, state_shardings.student), donate_argnums=0,
                    in_shardings=(state_shardings, feeder.sharding, sharding.replicated(mesh)),
                    out_shardings=(state_shardings, sharding.replicated(mesh)),
                    compiler_options=cpu_tuning.compiler_options() if config.get("cpu_tuning", True) else None)
  logger = MetricsLogger(workdir, n_steps, config.batch_size, n_prototypes=config.dino.head_n_prototypes)
  monitor = health.CollapseMonitor(config.dino.head_n_prototypes, n_steps,
                                   warmup_steps=int(config.optim.warmup_epochs * config.epoch_length))
  print(f"training {n_steps} steps from step {start} on {jax.device_count()} devices in "
        f"{jax.process_count()} process(es), mesh {dict(zip(mesh.axis_names, mesh.devices.shape))}, global "
        f"batch {config.batch_size}", flush=True)

  # The loop never waits for the device on ordinary steps: metrics stay there until a log,
  # checkpoint or callback step fetches all pending ones at once, and the next batch is read and
  # sent to the devices while the current step runs.
  pending: list[tuple[int, dict[str, jax.Array]]] = []
  last_metrics: dict[str, float] = {}

  def fetch_pending() -> None:
    """Fetches the pending metrics; raises at the first non-finite step (nothing after it is saved)."""
    nonlocal last_metrics
    for done_step, values in zip([s for s, _ in pending], jax.device_get([m for _, m in pending])):
      values = {k: float(v) for k, v in values.items()}
      bad = sorted(k for k, v in values.items() if not math.isfinite(v))
      if bad:
        checkpointer.wait()
        raise NonFiniteLossError(
            f"non-finite loss at step {done_step - 1} ({', '.join(bad)}): {values}. The run stopped without "
            f"saving; the last good checkpoint is step {checkpointer.latest_step()} in {checkpointer.directory}. "
            "Lower config.optim.base_lr, check the data, or use config.compute_dtype='float32'.")
      last_metrics = values
      if on_step is not None:
        on_step(done_step, values)
    pending.clear()

  step = start
  batches = DeviceBatches(data, feeder)
  with PreemptionNotice() as preemption:
    while step < n_steps:
      batch, data_state = batches.next()
      state, metrics = step_fn(state, batch, tables)
      step += 1
      pending.append((step, metrics))
      log_now = step % config.log_every_steps == 0 or step == n_steps or step == start + 1
      save_now = step % config.checkpoint_every_steps == 0 or step == n_steps
      if log_now or save_now or on_step is not None:
        fetch_pending()
      preempted = preemption.reached(step)
      if preempted:
        fetch_pending()
        save_now = True
      if log_now:
        logger.log(step, last_metrics)
        for collapse in monitor.check(step, last_metrics):
          if jax.process_index() == 0:
            print(f"WARNING: {collapse.message}", flush=True)
          if config.health.stop_on_collapse:
            checkpointer.save(step, state, data_state, force=True)
            checkpointer.wait()
            raise health.CollapseError(f"{collapse.message}\nStopped (config.health.stop_on_collapse); "
                                       f"checkpoint of step {step} in {checkpointer.directory}.")
      if save_now:
        checkpointer.save(step, state, data_state, force=True)
      if preempted:
        checkpointer.wait()
        print(f"preemption notice (SIGTERM): checkpoint of step {step} written, stopping", flush=True)
        break
  batches.close()
  checkpointer.wait()
  logger.close()
  result = {"step": step, "metrics": last_metrics, "state": state, "arch": arch, "workdir": workdir}
  if step == n_steps and config.export_teacher:
    result["exports"] = export_teacher(state, arch, workdir)
  checkpointer.close()
  return result


class DeviceBatches:
  """Batches already on their devices, `depth` steps ahead of the step that consumes them.

  `next()` returns (batch, the input pipeline's state right after that batch), so a checkpoint
  saved after the step resumes at the following batch however far the prefetch has read.
  """

  def __init__(self, data, feeder: ShardFeeder, depth: int = 1):
    self._data, self._feeder, self._depth = data, feeder, depth
    self._queue: collections.deque = collections.deque()

  def _read_one(self) -> None:
    batch = next(self._data)
    # `device_put` returns at once: the copy overlaps with the step already running.
    self._queue.append((self._feeder({k: batch[k] for k in STEP_KEYS}), self._data.get_state()))

  def next(self):
    while len(self._queue) <= self._depth:
      self._read_one()
    return self._queue.popleft()

  def close(self) -> None:
    self._queue.clear()


def teacher_backbone(state: TrainState, arch) -> api.Backbone:
  """The EMA teacher's backbone as a ready-to-use `Backbone` (what DINOv2 evaluates and releases).

  Gathers the (sharded) parameters onto every process: all processes must call it.
  """
  params = fetch_to_host(state.teacher["backbone"])
  return api.Backbone(nnx.merge(arch.backbone, jax.tree.map(jnp.asarray, params)))


def export_teacher(state: TrainState, arch, workdir: str) -> list[str]:
  """Writes the teacher backbone in Meta's hub format (.pth and .safetensors), from process 0.

  All processes must call it (the parameters are gathered from all of them).
  """
  paths = [os.path.join(workdir, "teacher_backbone.pth"), os.path.join(workdir, "teacher_backbone.safetensors")]
  backbone = teacher_backbone(state, arch)
  if jax.process_index() == 0:
    for path in paths:
      backbone.save(path)
    print(f"exported the teacher backbone to {', '.join(paths)}", flush=True)
  return paths
