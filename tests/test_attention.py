"""Attention backends: the selection rule and the XLA implementation against an independent statement."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from dinov2_jax.models.attention import multi_head_attention, resolve_attention_impl


def test_auto_picks_cudnn_only_on_nvidia_gpus_in_half_precision(monkeypatch):
  assert resolve_attention_impl("auto", "bfloat16", backend="cpu") == "xla"
  assert resolve_attention_impl("auto", "float32", backend="tpu") == "xla"
  from dinov2_jax.models import attention
  monkeypatch.setattr(attention, "_nvidia_gpu", lambda backend: backend == "gpu")
  assert resolve_attention_impl("auto", "bfloat16", backend="gpu") == "cudnn"
  assert resolve_attention_impl("auto", "float16", backend="gpu") == "cudnn"
  assert resolve_attention_impl("auto", "float32", backend="gpu") == "xla"  # cuDNN's kernel is bf16/fp16
  assert resolve_attention_impl("xla", "bfloat16", backend="gpu") == "xla"
  with pytest.raises(ValueError, match="attention_impl='cudnn' needs an NVIDIA GPU"):
    resolve_attention_impl("cudnn", "bfloat16", backend="cpu")
  with pytest.raises(ValueError, match="attention_impl='flash'"):
    resolve_attention_impl("flash", "float32")


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-5), ("bfloat16", 2e-2)])
def test_xla_attention_matches_torch_sdpa(dtype, tol):
  rng = np.random.default_rng(0)
  q, k, v = (rng.normal(size=(2, 37, 3, 16)).astype(np.float32) for _ in range(3))
  # torch's SDPA takes (B, H, N, D).
  want = torch.nn.functional.scaled_dot_product_attention(
      *(torch.tensor(x).transpose(1, 2) for x in (q, k, v))).transpose(1, 2).numpy()
  got = jax.jit(multi_head_attention, static_argnums=3)(*(jnp.asarray(x, dtype) for x in (q, k, v)), "xla")
  assert got.dtype == jnp.dtype(dtype) and got.shape == (2, 37, 3, 16)
  np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=tol, rtol=tol)
