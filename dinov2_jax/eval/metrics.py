"""Accuracy counting shared by the k-NN and linear protocols."""

import jax
import jax.numpy as jnp


def topk_correct(scores: jax.Array, labels: jax.Array, k: int) -> jax.Array:
  """(Q, C) scores, (Q,) labels -> (Q,) bool: fewer than k other classes score >= the true class.

  Ties count against the true class; a NaN score counts as beating it, and a NaN true score is wrong.
  """
  true = jnp.take_along_axis(scores, labels[:, None], axis=1)
  others_ge = jnp.sum((scores >= true) | jnp.isnan(scores), axis=1) - 1
  return (others_ge < k) & ~jnp.isnan(true[:, 0])
