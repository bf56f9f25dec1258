"""Devices for the evaluations: the 1-D "data" mesh, fixed batch shapes, and host <-> device arrays
that also work when the devices belong to several processes (multi-host runs).

In a multi-process run every process runs the same program; a global array is assembled from the
rows each process holds (`rows_of_this_process`, `global_batch`), and results come back to every
process whole (`to_host`), so that all processes compute the same numbers.
"""

from __future__ import annotations

from collections.abc import Iterable

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P


def data_mesh(devices: Iterable[jax.Device] | None = None) -> jax.sharding.Mesh:
  """A 1-D mesh with axis "data" over `devices` (default: all, of every process). Auto axis types (GSPMD)."""
  devices = list(devices if devices is not None else jax.devices())
  return jax.make_mesh((len(devices),), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=devices)


def local_mesh() -> jax.sharding.Mesh:
  """A "data" mesh over this process's devices only: for work every process repeats in full."""
  return data_mesh(jax.local_devices())


def round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
  """Zero-pads axis 0 of `x` to `rows` rows (a fixed batch shape means one compilation)."""
  if len(x) == rows:
    return x
  return np.concatenate([x, np.zeros((rows - len(x),) + x.shape[1:], x.dtype)])


def rows_of_this_process(mesh: jax.sharding.Mesh, global_rows: int) -> slice:
  """The rows of a (global_rows, ...) array split over `mesh`'s "data" axis that this process holds.

  Contiguous (a mesh from `data_mesh` orders each process's devices together); raises otherwise.
  """
  sharding = NamedSharding(mesh, P("data"))
  starts = sorted(index[0].start or 0 for index in sharding.addressable_devices_indices_map((global_rows,)).values())
  per_device = global_rows // mesh.size
  if starts != list(range(starts[0], starts[0] + per_device * len(starts), per_device)):
    raise ValueError("this process's devices do not hold one contiguous block of the batch; build the mesh "
                     "with dinov2_jax.eval.devices.data_mesh()")
  return slice(starts[0], starts[0] + per_device * len(starts))


def is_local(mesh: jax.sharding.Mesh) -> bool:
  """Whether every device of `mesh` belongs to this process."""
  return all(d.process_index == jax.process_index() for d in mesh.devices.flat)


def global_batch(mesh: jax.sharding.Mesh, local_rows: np.ndarray, global_rows: int) -> jax.Array:
  """A (global_rows, ...) array split over "data" from this process's rows (`rows_of_this_process`)."""
  sharding = NamedSharding(mesh, P("data"))
  if is_local(mesh):
    return jax.device_put(local_rows, sharding)
  return jax.make_array_from_process_local_data(sharding, local_rows, (global_rows,) + local_rows.shape[1:])


def replicated(mesh: jax.sharding.Mesh, tree):
  """A pytree of host (or single-device) arrays, equal in every process, replicated on every mesh device."""
  sharding = NamedSharding(mesh, P())
  if is_local(mesh):
    return jax.device_put(tree, sharding)

  def put(x):
    x = np.asarray(jax.device_get(x))
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

  return jax.tree.map(put, tree)


def to_host(tree):
  """A pytree of jax arrays as numpy, whole in every process (gathered across processes if sharded)."""
  def get(x):
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
      return np.asarray(jax.device_get(x))
    if x.is_fully_replicated:
      return np.asarray(x.addressable_data(0))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return jax.tree.map(get, tree)


def barrier(name: str) -> None:
  """Waits until every process reaches this point (no-op with one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)
