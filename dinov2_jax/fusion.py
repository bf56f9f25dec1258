"""Two identities that stop XLA from fusing a value into its consumers, where fusion changes results.

XLA recomputes cheap elementwise producers inside every consumer fusion. That is usually right, but
(1) a recomputed value may round differently in each consumer (a multiply contracted into a fused
multiply-add in one place and not in another), so two copies of "the same" number differ by an ulp;
and (2) a long chain recomputed in many consumers can cost more than writing it once. An
`optimization_barrier` does not help on CPU (its compiler expands barriers before fusion); a
conditional does, because its operand must exist in memory. The branch taken is always the
identity; the predicate is true for every float, NaN included, but the compiler cannot prove it
(and the branches must differ, or XLA merges them and drops the conditional).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def in_memory(x: jax.Array) -> jax.Array:
  """x, written to a buffer once: every consumer then reads the same rounded values. Any shape/dtype."""
  always = jnp.logical_not(x.reshape(-1)[0] < -jnp.inf)
  return jax.lax.cond(always, lambda t: t, jnp.zeros_like, x)


@jax.custom_vjp
def materialize_cotangent(x: jax.Array) -> jax.Array:
  """Identity whose gradient XLA must write to memory instead of fusing it into its consumers.

  Why: in a pre-LayerNorm transformer the gradient of the residual stream at block l is a sum of
  elementwise LayerNorm-backward terms of every later block. XLA:CPU treats that chain as cheap to
  duplicate and fuses all of it into each consumer (the weight-gradient transposes of every block),
  so the backward recomputes it O(depth^2) times: 24% of the ViT-S/14 train step's kernel time.
  Only the fusion, and so the float rounding, changes. (x: any shape and dtype; returns x.)
  """
  return x


def _materialize_fwd(x):
  return x, None


def _materialize_bwd(_, g):
  return (in_memory(g),)


materialize_cotangent.defvjp(_materialize_fwd, _materialize_bwd)
