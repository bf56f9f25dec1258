"""Names of pytree leaves as '/'-joined paths: what the optimizer's and the sharding's rules match.

`blocks/3/attn/qkv/kernel` mirrors Meta's `blocks.3.attn.qkv.weight`, so name-based rules (Meta's
layer-wise decay, no decay on norms; `config.sharding_rules` regexes) read the same strings for
parameters, gradients, optimizer state and whole train states.
"""

from __future__ import annotations

import jax


def _key_name(key) -> str:
  if isinstance(key, jax.tree_util.DictKey):
    return str(key.key)
  if isinstance(key, jax.tree_util.SequenceKey):
    return str(key.idx)
  if isinstance(key, jax.tree_util.GetAttrKey):
    return key.name
  if isinstance(key, jax.tree_util.FlattenedIndexKey):
    return str(key.key)
  return str(key)


def path_name(key_path) -> str:
  """'/'-joined name of a `jax.tree_util` key path, e.g. 'backbone/blocks/0/attn/qkv/kernel'.

  A trailing `.value` (the array inside an `nnx.Variable`, present when the tree is an `nnx.State`
  of Variables rather than a pure dict) is dropped, so both kinds of tree give the same names.
  """
  keys = list(key_path)
  if keys and isinstance(keys[-1], jax.tree_util.GetAttrKey) and keys[-1].name == "value":
    keys = keys[:-1]
  return "/".join(_key_name(k) for k in keys)


def param_names(tree) -> list[str]:
  """Names of the leaves of `tree` (pure dict or `nnx.State`), in `jax.tree.leaves` order."""
  return [path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
