"""Device mesh and sharding rules, taken from the config (sharding as data, applied in one place).

`config.mesh` names the mesh axes and their sizes, e.g. `(("data", -1), ("fsdp", 1))` (-1: all
remaining devices). The batch is split over every mesh axis. Parameters, teacher and optimizer
state follow `config.sharding_rules`, a list of `(regex, strategy)` matched in order against each
leaf's path ("student/backbone/blocks/3/attn/qkv/kernel", "opt_state/.../mu/..."):
  "fsdp":      shard the largest dimension divisible by the fsdp axis size (FSDP / ZeRO-3 style);
  "replicate": keep a full copy on every device.
Leaves smaller than `config.fsdp_min_size` elements are always replicated (sharding them costs
more in communication than it saves).

Devices are placed on the mesh by `jax.experimental.mesh_utils`, which knows the interconnect
(TPU torus, NVLink islands): neighbours on the fastest links end up on the inner mesh axes. For
several TPU slices or GPU nodes, `config.dcn_mesh` (same axis names) says how many of each axis run
across slices/nodes (over the data-centre network); the rest of each axis stays within one.

Activations are constrained by logical axis names ("batch", "tokens", "embed", "prototypes"), which
`config.logical_axis_rules` maps to mesh axes: by default the batch over every mesh axis and the
rest unsharded, so that GSPMD never has to guess how to lay out the residual stream or the logits.
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


def _axis_sizes(axes: Sequence[tuple[str, int]], n_devices: int, field: str = "config.mesh") -> list[int]:
  names = [name for name, _ in axes]
  if len(set(names)) != len(names):
    raise ValueError(f"{field}: axis names must be distinct, got {list(axes)}")
  sizes = [int(size) for _, size in axes]
  if sizes.count(-1) > 1:
    raise ValueError(f"{field}: at most one axis may have size -1, got {list(axes)}")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if n_devices % known:
      raise ValueError(f"{field} {list(axes)}: {n_devices} devices are not divisible by {known}")
    sizes[sizes.index(-1)] = n_devices // known
  if math.prod(sizes) != n_devices:
    raise ValueError(f"{field} {list(axes)} needs {math.prod(sizes)} devices, {n_devices} are available")
  return sizes


def make_mesh(axes: Sequence[tuple[str, int]], devices=None, dcn_axes: Sequence[tuple[str, int]] | None = None) -> Mesh:
  """A mesh over `devices` (default: all) with named axes; one size may be -1 (the rest).

  `dcn_axes`: for multi-slice TPU or multi-node GPU runs, how many of each axis (by name, product =
  the number of slices or nodes) run across slices/nodes; omitted axes are 1.
  """
  from jax.experimental import mesh_utils  # pylint: disable=g-import-not-at-top
  devices = list(jax.devices() if devices is None else devices)
  names = [name for name, _ in axes]
  sizes = _axis_sizes(axes, len(devices))
  if not dcn_axes:
    return Mesh(mesh_utils.create_device_mesh(sizes, devices, allow_split_physical_axes=True), names)
  dcn = dict(dcn_axes)
  unknown = set(dcn) - set(names)
  if unknown:
    raise ValueError(f"config.dcn_mesh names {sorted(unknown)}, which config.mesh does not have ({names})")
  dcn_sizes = [int(dcn.get(name, 1)) for name in names]
  if any(size % d for size, d in zip(sizes, dcn_sizes)):
    raise ValueError(f"config.dcn_mesh {list(dcn_axes)} must divide the mesh axis sizes {dict(zip(names, sizes))}")
  ici_sizes = [size // d for size, d in zip(sizes, dcn_sizes)]
  # The units joined by the data-centre network: TPU slices, or processes elsewhere (one per
  # GPU node, or per CPU process in tests).
  by_process = devices[0].platform != "tpu"
  return Mesh(mesh_utils.create_hybrid_device_mesh(ici_sizes, dcn_sizes, devices, process_is_granule=by_process,
                                                   allow_split_physical_axes=True), names)


def mesh_from_config(config) -> Mesh:
  """`make_mesh(config.mesh, dcn_axes=config.dcn_mesh)`."""
  return make_mesh(config.mesh, dcn_axes=config.get("dcn_mesh") or None)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over all mesh axes."""
  return NamedSharding(mesh, P(tuple(mesh.axis_names)))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


# Default `config.logical_axis_rules`: the batch over every mesh axis, everything else unsharded.
BATCH_OVER_ALL_AXES = "*"


def logical_spec(logical_axes: Sequence[str | None], rules: Sequence[tuple[str, object]], mesh: Mesh) -> P:
  """PartitionSpec of an array whose dimensions have these logical names, under `rules`.

  `rules`: (logical name, mesh axis | tuple of mesh axes | None | "*" = all mesh axes). Names
  without a rule are unsharded.
  """
  table = dict(rules)
  spec = []
  for name in logical_axes:
    target = table.get(name) if name is not None else None
    spec.append(tuple(mesh.axis_names) if target == BATCH_OVER_ALL_AXES else
                (tuple(target) if isinstance(target, (list, tuple)) else target))
  return P(*spec)


def activation_constraint(mesh: Mesh, rules: Sequence[tuple[str, object]]):
  """`constrain(x, logical_axes) -> x` pinning activations to their logical layout (inside jit)."""

  def constrain(x, logical_axes):
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_spec(logical_axes, rules, mesh)))

  return constrain


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
