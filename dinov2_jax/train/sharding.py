"""Device mesh and sharding rules, taken from the config (sharding as data, applied in one place).

`config.mesh` names the mesh axes and their sizes, e.g. `(("data", -1), ("fsdp", 1))` (-1: all
remaining devices). The batch is split over every mesh axis. Parameters, teacher and optimizer
state follow `config.sharding_rules`, a list of `(regex, strategy)` matched in order against each
leaf's path ("student/backbone/blocks/3/attn/qkv/kernel", "opt_state/.../mu/..."):
  "fsdp":      shard the largest dimension divisible by the fsdp axis size (FSDP / ZeRO-3 style);
  "replicate": keep a full copy on every device.
Leaves smaller than `config.fsdp_min_size` elements are always replicated (sharding them costs
more in communication than it saves).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dinov2_jax.param_paths import path_name

FSDP_AXIS = "fsdp"
STRATEGIES = ("fsdp", "replicate")


def make_mesh(axes: Sequence[tuple[str, int]], devices=None) -> Mesh:
  """A mesh over `devices` (default: all) with named axes; one size may be -1 (the rest)."""
  devices = list(jax.devices() if devices is None else devices)
  names = [name for name, _ in axes]
  sizes = [int(size) for _, size in axes]
  if sizes.count(-1) > 1:
    raise ValueError(f"config.mesh: at most one axis may have size -1, got {list(axes)}")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"config.mesh {list(axes)}: {len(devices)} devices are not divisible by {known}")
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ValueError(f"config.mesh {list(axes)} needs {math.prod(sizes)} devices, {len(devices)} are available")
  return Mesh(np.asarray(devices).reshape(sizes), names)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over all mesh axes."""
  return NamedSharding(mesh, P(tuple(mesh.axis_names)))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def _leaf_spec(shape: tuple[int, ...], strategy: str, fsdp_size: int, min_size: int) -> P:
  if strategy == "replicate" or fsdp_size == 1 or math.prod(shape) < min_size:
    return P()
  # The largest dimension the fsdp axis divides; ties go to the later dimension (the output
  # features of a kernel), which keeps the matmul's contraction local.
  candidates = [(size, i) for i, size in enumerate(shape) if size % fsdp_size == 0]
  if not candidates:
    return P()
  _, dim = max(candidates)
  spec = [None] * len(shape)
  spec[dim] = FSDP_AXIS
  return P(*spec)


def tree_shardings(tree, mesh: Mesh, rules: Sequence[tuple[str, str]], min_size: int = 2 ** 14):
  """NamedShardings for every leaf of `tree` (arrays or ShapeDtypeStructs), following the rules."""
  for pattern, strategy in rules:
    if strategy not in STRATEGIES:
      raise ValueError(f"config.sharding_rules: unknown strategy {strategy!r} for {pattern!r}; use {STRATEGIES}")
  compiled = [(re.compile(pattern), strategy) for pattern, strategy in rules]
  fsdp_size = dict(zip(mesh.axis_names, mesh.devices.shape)).get(FSDP_AXIS, 1)

  def leaf_sharding(path, leaf):
    name = path_name(path)
    strategy = next((s for p, s in compiled if p.fullmatch(name)), "replicate")
    return NamedSharding(mesh, _leaf_spec(tuple(np.shape(leaf)), strategy, fsdp_size, min_size))

  return jax.tree_util.tree_map_with_path(leaf_sharding, tree)
