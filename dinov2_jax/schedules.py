"""Training schedules with the semantics of Meta's DINOv2 `CosineScheduler` and `build_schedulers`.

Meta precomputes every schedule as a float64 numpy array indexed by the iteration, and returns the
final value for any iteration at or past the end. We keep exactly that array (`Schedule.values`)
for the host side, and derive a lookup table for use inside `jax.jit`: the same values followed by
the final value, so `table[min(step, len)]` reproduces the past-the-end rule with one gather and a
traced step never recompiles.

Memory: a table holds one float per iteration. Meta's default run (100 epochs x 1250) is 125k
entries; the longest configs (500 epochs) are 625k, i.e. 2.5 MB per schedule in float32 (5 MB in
float64). The JAX tables are float32 (the parameters they multiply are float32 anyway; float32 keeps
~7 significant digits of e.g. a 1e-6 min_lr, and a momentum of 1 - 1e-9 rounds to 1.0 just as it
does when torch casts it for an fp32 EMA).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

# Meta's `train.OFFICIAL_EPOCH_LENGTH`: an "epoch" is this many iterations whatever the dataset.
OFFICIAL_EPOCH_LENGTH = 1250


def cosine_schedule_values(
    base_value: float,
    final_value: float,
    total_iters: int,
    warmup_iters: int = 0,
    start_warmup_value: float = 0.0,
    freeze_iters: int = 0,
) -> np.ndarray:
  """Meta's `CosineScheduler.schedule`: freeze zeros, linear warmup, then a half cosine.

  `[0] * freeze ++ linspace(start_warmup_value, base, warmup) ++ cosine`, with
  `cosine[i] = final + 0.5 * (base - final) * (1 + cos(pi * i / n))`, i in 0..n-1,
  n = total - warmup - freeze. The linspace includes both ends, so `base` appears twice at the
  warmup/cosine boundary, and the cosine stops one step short of `final`. (np.linspace with one
  point returns its start, so a single warmup iteration holds start_warmup_value, as in Meta.)

  Returns:
    (total_iters,) float64.
  """
  n_cosine = total_iters - warmup_iters - freeze_iters
  if min(warmup_iters, freeze_iters, n_cosine) < 0:
    raise ValueError(
        f"total_iters={total_iters} < warmup_iters={warmup_iters} + freeze_iters={freeze_iters}")
  freeze = np.zeros((freeze_iters,), np.float64)
  warmup = np.linspace(start_warmup_value, base_value, warmup_iters)
  i = np.arange(n_cosine)
  # `max(n, 1)` only avoids 0/0 on an empty range; the values are Meta's `pi * i / len(i)`.
  cosine = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * i / max(n_cosine, 1)))
  return np.concatenate((freeze, warmup, cosine))


def lookup(table, step) -> jax.Array:
  """Value of a schedule at a (possibly traced) integer step, for use inside `jax.jit`.

  Args:
    table: (total_iters + 1,) values followed by the final value (`Schedule.table()`); a numpy
      array (becomes a constant of the compiled program) or a jax array passed as an argument
      (keeps the program small for long schedules).
    step: int scalar. Steps at or past the end give the final value; negative steps are clamped
      to 0 (Meta would wrap around).

  Returns:
    () scalar of the table's dtype.
  """
  table = jnp.asarray(table)
  return table[jnp.clip(step, 0, table.shape[0] - 1)]


@dataclasses.dataclass(frozen=True, eq=False)
class Schedule:
  """A precomputed schedule with Meta's `CosineScheduler` indexing semantics.

  Attributes:
    values: (total_iters,) float64, Meta's `.schedule` array.
    final_value: returned for every iteration >= total_iters.
  """

  values: np.ndarray
  final_value: float

  @property
  def total_iters(self) -> int:
    return int(self.values.shape[0])

  def __len__(self) -> int:
    return self.total_iters

  def __getitem__(self, it: int) -> float:
    """Host-side value at iteration `it`, exactly as Meta's `CosineScheduler.__getitem__`."""
    if it >= self.total_iters:
      return float(self.final_value)
    return float(self.values[it])

  def table(self, dtype=np.float32) -> np.ndarray:
    """(total_iters + 1,) `values` then `final_value`, in `dtype`; see `lookup`."""
    return np.append(self.values, self.final_value).astype(dtype)

  def at(self, step) -> jax.Array:
    """`lookup(self.table(), step)`: the value at a traced step; the table becomes a constant."""
    return lookup(self.table(), step)


def cosine_schedule(
    base_value: float,
    final_value: float,
    total_iters: int,
    warmup_iters: int = 0,
    start_warmup_value: float = 0.0,
    freeze_iters: int = 0,
) -> Schedule:
  """Meta's `CosineScheduler(...)` with the same arguments; see `cosine_schedule_values`."""
  values = cosine_schedule_values(
      base_value, final_value, total_iters, warmup_iters, start_warmup_value, freeze_iters)
  return Schedule(values=values, final_value=final_value)


def scaled_lr(base_lr: float, global_batch_size: int, scaling_rule: str = "sqrt_wrt_1024") -> float:
  """Meta's `apply_scaling_rules_to_cfg`: `base_lr * sqrt(global_batch / 1024)`.

  Meta computes the global batch as `batch_size_per_gpu * world_size`; pass that product.
  Meta implements only `sqrt_wrt_1024`; so do we.
  """
  if scaling_rule != "sqrt_wrt_1024":
    raise NotImplementedError(
        f"Unknown optim.scaling_rule {scaling_rule!r}: only 'sqrt_wrt_1024' is implemented "
        "(lr = base_lr * sqrt(global_batch / 1024)), as in Meta's DINOv2.")
  return base_lr * math.sqrt(global_batch_size / 1024.0)


def _iters(epochs, epoch_length: int, name: str) -> int:
  # Meta multiplies config integers; a fractional epoch count that does not land on a whole
  # iteration is almost certainly a config mistake, so say so instead of rounding.
  iters = epochs * epoch_length
  if iters != int(iters):
    raise ValueError(f"{name}={epochs} epochs x {epoch_length} is not a whole number of iterations")
  return int(iters)


@dataclasses.dataclass(frozen=True, eq=False)
class TrainSchedules:
  """The five per-iteration schedules of Meta's `build_schedulers`."""

  lr: Schedule
  wd: Schedule
  momentum: Schedule
  teacher_temp: Schedule
  last_layer_lr: Schedule

  def tables(self, dtype=np.float32) -> dict[str, np.ndarray]:
    """{name: (len + 1,) table}; pass the dict into a jitted step and read it with `values_at`."""
    return {f.name: getattr(self, f.name).table(dtype) for f in dataclasses.fields(self)}


def values_at(tables: Mapping[str, jax.Array], step) -> dict[str, jax.Array]:
  """{name: scalar} for a (possibly traced) step, from `TrainSchedules.tables()`."""
  return {name: lookup(table, step) for name, table in tables.items()}


def build_schedules(
    *,
    lr: float,
    min_lr: float = 1.0e-6,
    epochs: int = 100,
    warmup_epochs: int = 10,
    weight_decay: float = 0.04,
    weight_decay_end: float = 0.4,
    momentum_teacher: float = 0.992,
    final_momentum_teacher: float = 1.0,
    teacher_temp: float = 0.07,
    warmup_teacher_temp: float = 0.04,
    warmup_teacher_temp_epochs: int = 30,
    freeze_last_layer_epochs: int = 1,
    epoch_length: int = OFFICIAL_EPOCH_LENGTH,
) -> TrainSchedules:
  """Meta's `build_schedulers`; defaults are `ssl_default_config.yaml`.

  Args:
    lr: the peak lr after scaling (`scaled_lr(base_lr, global_batch)`), Meta's `optim.lr`.
    min_lr ... freeze_last_layer_epochs: Meta's `optim.*` / `teacher.*` entries of the same name.
    epoch_length: iterations per epoch (Meta's `train.OFFICIAL_EPOCH_LENGTH`).

  Returns:
    lr: warmup 0 -> lr over warmup_epochs, cosine to min_lr, `epochs` long.
    wd: cosine weight_decay -> weight_decay_end, no warmup.
    momentum: cosine momentum_teacher -> final_momentum_teacher, no warmup.
    teacher_temp: only `warmup_teacher_temp_epochs` long: linspace warmup_teacher_temp ->
      teacher_temp, then teacher_temp forever (past-the-end value).
    last_layer_lr: the lr schedule with its first `freeze_last_layer_epochs` epochs set to 0.
      Meta does this by zeroing the array after construction, not with `freeze_iters` (which
      would shift the warmup later); we do the same.
  """
  total = _iters(epochs, epoch_length, "epochs")
  lr_schedule = cosine_schedule(
      lr, min_lr, total, warmup_iters=_iters(warmup_epochs, epoch_length, "warmup_epochs"))
  wd_schedule = cosine_schedule(weight_decay, weight_decay_end, total)
  momentum_schedule = cosine_schedule(momentum_teacher, final_momentum_teacher, total)
  temp_iters = _iters(warmup_teacher_temp_epochs, epoch_length, "warmup_teacher_temp_epochs")
  temp_schedule = cosine_schedule(
      teacher_temp, teacher_temp, temp_iters, warmup_iters=temp_iters,
      start_warmup_value=warmup_teacher_temp)
  last_layer_values = lr_schedule.values.copy()
  last_layer_values[:_iters(freeze_last_layer_epochs, epoch_length, "freeze_last_layer_epochs")] = 0
  return TrainSchedules(
      lr=lr_schedule,
      wd=wd_schedule,
      momentum=momentum_schedule,
      teacher_temp=temp_schedule,
      last_layer_lr=Schedule(values=last_layer_values, final_value=min_lr),
  )


def build_schedules_from_meta_config(cfg, world_size: int = 1) -> TrainSchedules:
  """`build_schedules` from a Meta-structured config (nested mappings or a ConfigDict).

  Reads `cfg["optim"]`, `cfg["teacher"]` and `cfg["train"]` with Meta's key names. The peak lr is
  `scaled_lr(optim.base_lr, train.batch_size_per_gpu * world_size, optim.scaling_rule)`, which is
  what Meta writes into `optim.lr` before building the schedulers.
  """
  optim, teacher, train = cfg["optim"], cfg["teacher"], cfg["train"]
  lr = scaled_lr(
      optim["base_lr"], train["batch_size_per_gpu"] * world_size,
      optim.get("scaling_rule", "sqrt_wrt_1024"))
  return build_schedules(
      lr=lr,
      min_lr=optim["min_lr"],
      epochs=optim["epochs"],
      warmup_epochs=optim["warmup_epochs"],
      weight_decay=optim["weight_decay"],
      weight_decay_end=optim["weight_decay_end"],
      momentum_teacher=teacher["momentum_teacher"],
      final_momentum_teacher=teacher["final_momentum_teacher"],
      teacher_temp=teacher["teacher_temp"],
      warmup_teacher_temp=teacher["warmup_teacher_temp"],
      warmup_teacher_temp_epochs=teacher["warmup_teacher_temp_epochs"],
      freeze_last_layer_epochs=optim["freeze_last_layer_epochs"],
      epoch_length=train.get("OFFICIAL_EPOCH_LENGTH", OFFICIAL_EPOCH_LENGTH),
  )
