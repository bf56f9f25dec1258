"""The DINOv2 training loop: set-up from a config, sharded init or resume, steps, logs, checkpoints.

One process per host; the same code runs on one CPU, on 8 (fake) devices and on multi-host TPU/GPU
(call `jax.distributed.initialize()` first, which `dinov2_jax.main` does when asked to).
"""

from __future__ import annotations

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

from dinov2_jax import api, cpu_tuning, schedules
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
  patch = config.student.patch_size
  for field in ("global_crops_size", "local_crops_size"):
    size = config.crops[field]
    if size % patch:
      lo, hi = size // patch * patch, (size // patch + 1) * patch
      raise ValueError(f"config.crops.{field}={size} is not a multiple of config.student.patch_size={patch}; "
                       f"use {lo or hi} or {hi}")
  data_ways = sharding.make_mesh(config.mesh).devices.size
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


def initial_student(config, template: dict) -> dict:
  """Student parameters at step 0: Meta's init, or loaded from a Meta hub / teacher checkpoint."""
  student = init_student_params(config, config.seed)
  if config.init.kind == "scratch":
    return student
  cfg = backbone_config_from(config)
  fields = {k: getattr(cfg, k) for k in ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio",
                                           "ffn_layer", "num_register_tokens", "interpolate_antialias",
                                           "interpolate_offset")}
  try:
    if config.init.kind == "hub":
      backbone = api.load_backbone(config.init.path, **fields)
      heads = {}
    else:
      backbone, heads = api.load_training_checkpoint(config.init.path, **fields)
  except CheckpointError as e:
    raise CheckpointError(f"config.init.path: {e}\n(the student's img_size is config.student.img_size or the "
                          "global crop size; Meta's hub weights need img_size=518)") from None
  student = dict(student)
  student["backbone"] = nnx.to_pure_dict(nnx.state(backbone.module, nnx.Param))
  for name, head in heads.items():
    if name not in student:
      raise CheckpointError(f"config.init.path has an {name} but config.ibot.separate_head is False")
    student[name] = nnx.to_pure_dict(nnx.state(head, nnx.Param))
  # Shapes must agree with the configured heads too (prototypes, bottleneck ...).
  for name in heads:
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(student[name])[0], jax.tree.leaves(template[name])):
      if a.shape != b.shape:
        raise CheckpointError(f"config.init.path: {name} {jax.tree_util.keystr(path)} has shape {a.shape}, "
                              f"the configured head expects {b.shape}")
  return jax.tree.map(jnp.asarray, student)


# ------------------------------------------------------------------------------------ logging


class MetricsLogger:
  """Terminal lines, a JSONL log and TensorBoard event files (tensorboardX), from process 0 only."""

  def __init__(self, workdir: str, total: int, images_per_step: int):
    self.total, self.images_per_step = total, images_per_step
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
          f"ibot {metrics['ibot_loss']:.4f} koleo {metrics['koleo_loss']:.4f})  lr {metrics['lr']:.2e}  "
          f"{record['images_per_s']:.1f} img/s  ETA {eta_s}", flush=True)

  def close(self):
    if self.enabled:
      self._jsonl.close()
      self._tb.close()


# ------------------------------------------------------------------------------------ loop


class _StopRequest:
  """Turns SIGTERM (preemption) into a request to checkpoint and stop at the next step."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not in the main thread
      self._previous = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

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


def _to_global(batch: dict[str, np.ndarray], batch_sharding) -> dict[str, jax.Array]:
  return {k: jax.make_array_from_process_local_data(batch_sharding, v) for k, v in batch.items()}


def _pad_mask_arrays(batch: dict[str, np.ndarray], multiple: int) -> dict[str, np.ndarray]:
  # The flat masked-token arrays are split over the local devices like the rest of the batch.
  m = batch["mask_indices"].shape[0]
  pad = -m % multiple
  if not pad:
    return batch
  out = dict(batch)
  for key, fill in (("mask_indices", 0), ("mask_weights", 0.0), ("mask_valid", False)):
    out[key] = np.concatenate([batch[key], np.full((pad,), fill, batch[key].dtype)])
  return out


STEP_KEYS = ("global_crops", "local_crops", "masks", "mask_indices", "mask_weights", "mask_valid")


def train(config, workdir: str, *, make_data_iterator: Callable | None = None,
          on_step: Callable[[int, dict], None] | None = None, student: dict | None = None) -> dict[str, Any]:
  """Runs (or resumes) pretraining in `workdir`. Returns the final metrics and paths.

  Args:
    config: an ml_collections config (see dinov2_jax/train/default_config.py and configs/).
    workdir: checkpoints, logs and exports go here; an existing run in it is resumed.
    make_data_iterator: `(config, patch_size, start_step) -> iterator` override (tests).
    on_step: called with (step, metrics) after every step (tests, notebooks).
    student: the step-0 student from `initial_student(config, ...)` when the caller already built it
      (used only when the run starts from scratch, not on resume).
  """
  validate_config(config)
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0 and not os.path.exists(os.path.join(workdir, "config.json")):
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))
  mesh = sharding.make_mesh(config.mesh)
  arch = make_arch(config, drop_path_groups=mesh.devices.size)
  n_steps = total_steps(config)
  tables = jax.device_put({k: jnp.asarray(v) for k, v in schedules_from_config(config).tables().items()},
                          sharding.replicated(mesh))
  student_shapes = abstract_student(config)
  tx = build_optimizer_for(arch, student_shapes, config)
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
    student = initial_student(config, student_shapes) if student is None else student
    state = jax.jit(lambda s: init_train_state(s, tx, config, config.seed), out_shardings=state_shardings)(student)
    data_state, start = None, 0
  start = int(jax.device_get(state.step))

  if make_data_iterator is None:
    from dinov2_jax.data.pipeline import make_train_iterator_from_config
    make_data_iterator = make_train_iterator_from_config
  data = make_data_iterator(config, arch.backbone_config.patch_size, start_step=start)
  if data_state is not None:
    data.set_state(data_state)

  batch_shard = sharding.batch_sharding(mesh)
  step_fn = jax.jit(make_train_step(arch, tx, jax.process_count()), donate_argnums=0,
                    in_shardings=(state_shardings, batch_shard, sharding.replicated(mesh)),
                    out_shardings=(state_shardings, sharding.replicated(mesh)),
                    compiler_options=cpu_tuning.compiler_options() if config.get("cpu_tuning", True) else None)
  logger = MetricsLogger(workdir, n_steps, config.batch_size)
  print(f"training {n_steps} steps from step {start} on {jax.device_count()} devices, mesh "
        f"{dict(zip(mesh.axis_names, mesh.devices.shape))}, global batch {config.batch_size}", flush=True)

  last_metrics: dict[str, float] = {}
  step = start
  with _StopRequest() as stop:
    while step < n_steps:
      batch = next(data)
      host_batch = _pad_mask_arrays({k: batch[k] for k in STEP_KEYS}, jax.local_device_count())
      state, metrics = step_fn(state, _to_global(host_batch, batch_shard), tables)
      step += 1
      metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
      if not math.isfinite(metrics["total_loss"]):
        checkpointer.wait()
        good = checkpointer.latest_step()
        raise NonFiniteLossError(
            f"non-finite loss at step {step - 1}: {metrics}. The run stopped without saving; the last good "
            f"checkpoint is step {good} in {checkpointer.directory}. Lower config.optim.base_lr, check the "
            "data, or use config.compute_dtype='float32'.")
      last_metrics = metrics
      if on_step is not None:
        on_step(step, metrics)
      if step % config.log_every_steps == 0 or step == n_steps or step == start + 1:
        logger.log(step, metrics)
      if step % config.checkpoint_every_steps == 0 or step == n_steps or stop.requested:
        checkpointer.save(step, state, data.get_state(), force=True)
      if stop.requested:
        print(f"SIGTERM: checkpoint of step {step} written, stopping", flush=True)
        break
  checkpointer.wait()
  logger.close()
  result = {"step": step, "metrics": last_metrics, "state": state, "arch": arch, "workdir": workdir}
  if step == n_steps and config.export_teacher:
    result["exports"] = export_teacher(state, arch, workdir)
  checkpointer.close()
  return result


def teacher_backbone(state: TrainState, arch) -> api.Backbone:
  """The EMA teacher's backbone as a ready-to-use `Backbone` (what DINOv2 evaluates and releases)."""
  params = jax.device_get(state.teacher["backbone"])
  return api.Backbone(nnx.merge(arch.backbone, jax.tree.map(jnp.asarray, params)))


def export_teacher(state: TrainState, arch, workdir: str) -> list[str]:
  """Writes the teacher backbone in Meta's hub format (.pth and .safetensors), from process 0."""
  paths = [os.path.join(workdir, "teacher_backbone.pth"), os.path.join(workdir, "teacher_backbone.safetensors")]
  if jax.process_index() == 0:
    backbone = teacher_backbone(state, arch)
    for path in paths:
      backbone.save(path)
    print(f"exported the teacher backbone to {', '.join(paths)}", flush=True)
  return paths
