"""The row layout of a training batch, in one place: data shards, each crop-major like Meta's collate.

The global batch of G images is split into S data shards (S = the devices the batch is split over;
Meta: one shard per GPU) of b = G / S consecutive images; shard s holds images [s b, (s + 1) b).
Within a shard the crops are crop-major, as Meta's `collate_data_and_cast` lays out one GPU's batch:

  global crops  (S * 2b, ...)  row  s 2b + c b + i  = global crop c (0, 1) of image s b + i
  local crops   (S * n b, ...) row  s n b + l b + i = local crop l of image s b + i

This is what the input pipeline produces (each host the rows of its own shards) and what the train
step consumes: every device's rows are its own images, so the backbone, Meta's per-GPU stochastic
depth, the iBOT gather and KoLeo per shard need no communication. The losses that pair crops of the
same image read the batch through `crop_major_view`, which for one shard (S = 1) is Meta's layout.
Works on numpy and jax arrays alike (inside jit too); `concat_shards` returns jax arrays.
"""

from __future__ import annotations

import jax.numpy as jnp


def image_major_to_crop_major(x):
  """(b, C, ...) crops of each image -> (C * b, ...) crop-major: [crop 0 of all images; crop 1; ...]."""
  return x.swapaxes(0, 1).reshape((-1,) + tuple(x.shape[2:]))


def crop_major_view(x, n_shards: int, n_crops: int):
  """(S * C * b, ...) shard-major rows -> (C, S * b, ...): crop c of global image j at [c, j].

  On a batch sharded over S devices along axis 0 this is a relabelling without data movement (the
  image axis stays split over the same devices).
  """
  b = x.shape[0] // (n_shards * n_crops)
  if n_shards * n_crops * b != x.shape[0]:
    raise ValueError(f"{x.shape[0]} rows are not {n_shards} shards x {n_crops} crops x b images")
  y = x.reshape((n_shards, n_crops, b) + tuple(x.shape[1:])).swapaxes(0, 1)
  return y.reshape((n_crops, n_shards * b) + tuple(x.shape[1:]))


def per_shard(x, n_shards: int):
  """(S * r, ...) -> (S, r, ...): the rows of each shard on their own axis (for per-shard maths)."""
  return x.reshape((n_shards, x.shape[0] // n_shards) + tuple(x.shape[1:]))


def concat_shards(arrays, n_shards: int):
  """Row arrays (S * r_i, ...) -> (S * sum r_i, ...), each shard's rows kept on its shard.

  For running one layer on several batches at once (Meta's single head call on the concatenated
  CLS and patch tokens) without moving rows between devices. Returns (joined, [r_i]).
  """
  parts = [per_shard(a, n_shards) for a in arrays]
  joined = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1)
  return joined.reshape((-1,) + tuple(joined.shape[2:])), [p.shape[1] for p in parts]


def split_shards(x, sizes, n_shards: int):
  """Inverse of `concat_shards`: (S * sum r_i, ...) -> [(S * r_i, ...)]."""
  y = per_shard(x, n_shards)
  out, start = [], 0
  for r in sizes:
    out.append(y[:, start:start + r].reshape((-1,) + tuple(y.shape[2:])))
    start += r
  return out
