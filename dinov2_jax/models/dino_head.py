"""DINO / iBOT projection head, as Meta's `DINOHead` (without the unused BatchNorm option).

MLP (GELU between layers) -> L2 normalisation of the bottleneck -> weight-normalised linear layer
to the prototypes. The last layer keeps Meta's separate `g` (gain, one per prototype) and `v`
(direction) parameters: `W = g * v / ||v||`, the norm taken per prototype.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

NORMALIZE_EPS = 1e-12  # F.normalize's default; Meta uses 1e-6 only for float16 inputs.


class WeightNormLinear(nnx.Module):
  """Bias-free linear layer with PyTorch's `weight_norm(dim=0)` parametrisation.

  Parameters: `v` (in_dim, out_dim) and `g` (out_dim,). Meta's checkpoint keys are
  `last_layer.weight_v` (out, in) = v.T and `last_layer.weight_g` (out, 1) = g[:, None].
  """

  def __init__(self, in_dim: int, out_dim: int, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    bound = 1.0 / math.sqrt(in_dim)  # PyTorch's default nn.Linear init, kept by Meta for this layer.
    self.v = nnx.Param(jax.random.uniform(rngs.params(), (in_dim, out_dim), param_dtype, -bound, bound))
    self.g = nnx.Param(jnp.ones((out_dim,), param_dtype))  # Meta fills weight_g with 1.
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    v = self.v[...].astype(jnp.float32)
    w = v * (self.g[...].astype(jnp.float32) / jnp.linalg.norm(v, axis=0))
    return x.astype(self.dtype) @ w.astype(self.dtype)


class DINOHead(nnx.Module):
  """`DINOHead(in_dim, out_dim, nlayers=3, hidden_dim=2048, bottleneck_dim=256, mlp_bias=True)`.

  (..., in_dim) -> (..., out_dim) prototype scores. `mlp` holds `nlayers` Linear layers whose
  Meta keys are `mlp.0`, `mlp.2`, `mlp.4`, ... (`mlp.weight` when nlayers == 1).
  """

  def __init__(
      self,
      in_dim: int,
      out_dim: int,
      *,
      nlayers: int = 3,
      hidden_dim: int = 2048,
      bottleneck_dim: int = 256,
      mlp_bias: bool = True,
      dtype=jnp.float32,
      param_dtype=jnp.float32,
      rngs: nnx.Rngs,
  ):
    if nlayers < 1:
      raise ValueError(f"nlayers must be >= 1, got {nlayers}")
    dims = [in_dim] + [hidden_dim] * (nlayers - 1) + [bottleneck_dim]
    self.mlp = nnx.List([
        nnx.Linear(dims[i], dims[i + 1], use_bias=mlp_bias, dtype=dtype, param_dtype=param_dtype,
                   kernel_init=nnx.initializers.normal(0.02), rngs=rngs)
        for i in range(nlayers)
    ])
    self.last_layer = WeightNormLinear(bottleneck_dim, out_dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    for i, layer in enumerate(self.mlp):
      x = layer(x)
      if i < len(self.mlp) - 1:
        x = jax.nn.gelu(x, approximate=False)
    x = x.astype(jnp.float32)
    x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), NORMALIZE_EPS)
    return self.last_layer(x)
