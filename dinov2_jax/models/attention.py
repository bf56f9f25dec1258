"""Scaled dot-product attention with a choice of backend (`ViTConfig.attention_impl`).

  "xla"    softmax(q k^T / sqrt(d)) v written out in jnp, heads-major ((B, H, N, D) batched matmuls),
           logits and softmax in float32: runs everywhere. On CPU the heads-major layout is faster
           than `jax.nn.dot_product_attention`'s (B, N, H, D) einsums (XLA:CPU's batched matmul
           prefers the batch dimensions leading).
  "cudnn"  cuDNN's fused flash attention (`jax.nn.dot_product_attention(implementation="cudnn")`):
           NVIDIA GPUs, bf16/fp16 inputs only.
  "auto"   "cudnn" on an NVIDIA GPU when the compute dtype is bf16 or fp16, "xla" otherwise.

All give Meta's attention (scale head_dim ** -0.5, no mask, no dropout) up to float rounding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

ATTENTION_IMPLS = ("auto", "xla", "cudnn")


def _nvidia_gpu(backend: str) -> bool:
  if backend != "gpu":
    return False
  return "cuda" in jax.devices()[0].client.platform_version.lower()


def resolve_attention_impl(impl: str, dtype, backend: str | None = None) -> str:
  """The backend `impl` means for a compute `dtype` on `backend` (default: JAX's default backend)."""
  if impl not in ATTENTION_IMPLS:
    raise ValueError(f"attention_impl={impl!r}; expected one of {ATTENTION_IMPLS}")
  backend = jax.default_backend() if backend is None else backend
  low_precision = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
  if impl == "auto":
    return "cudnn" if low_precision and _nvidia_gpu(backend) else "xla"
  if impl == "cudnn" and not (low_precision and _nvidia_gpu(backend)):
    raise ValueError(f"attention_impl='cudnn' needs an NVIDIA GPU and a bf16/fp16 compute dtype (backend "
                     f"{backend!r}, dtype {jnp.dtype(dtype).name}); use 'auto' or 'xla'")
  return impl


def multi_head_attention(q: jax.Array, k: jax.Array, v: jax.Array, impl: str = "auto") -> jax.Array:
  """softmax(q k^T / sqrt(D)) v per head.

  Args:
    q, k, v: (B, N, H, D) in the compute dtype.
    impl: see the module docstring.

  Returns:
    (B, N, H, D) in the dtype of `v`.
  """
  impl = resolve_attention_impl(impl, q.dtype)
  if impl == "cudnn":
    return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
  q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))  # (B, H, N, D)
  logits = jnp.matmul(q, k.swapaxes(-1, -2), preferred_element_type=jnp.float32)
  probs = jax.nn.softmax(logits * (q.shape[-1] ** -0.5), axis=-1).astype(v.dtype)
  return jnp.matmul(probs, v).transpose(0, 2, 1, 3)
