"""The CPU speed settings: each does what it claims, and none changes what is computed."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dinov2_jax import cpu_tuning, fusion
from dinov2_jax.models import vit


def test_materialize_cotangent_is_the_identity_forward_and_backward():
  x = jnp.array([1.0, -2.0, 3.0])
  np.testing.assert_array_equal(fusion.materialize_cotangent(x), x)
  # The cotangent passes through unchanged, including NaN and -inf (the branch predicate must hold
  # for them too): d/dx sum(m(x) * w) = w.
  w = jnp.array([jnp.nan, -jnp.inf, 0.5])
  g = jax.jit(jax.grad(lambda v: jnp.sum(fusion.materialize_cotangent(v) * w)))(x)
  np.testing.assert_array_equal(g, w)


def _backbone_grad_fn(grad_barrier):
  model = vit.create_backbone("dinov2_vits14", depth=3, grad_barrier=grad_barrier, init_values=1.0, seed=1)
  graphdef, params = nnx.split(model)

  def loss(p, images):
    out = nnx.merge(graphdef, p).forward_features(images)
    return jnp.sum(out["x_norm_patchtokens"] ** 2) + jnp.sum(jnp.sin(out["x_norm_clstoken"]))

  return jax.jit(jax.grad(loss)), params


def test_grad_barrier_keeps_the_gradients_and_survives_compilation():
  images = jnp.asarray(np.random.default_rng(0).normal(size=(2, 42, 56, 3)), jnp.float32)
  grads = {}
  for barrier in (False, True):
    fn, params = _backbone_grad_fn(barrier)
    grads[barrier] = fn(params, images)
    hlo = fn.lower(params, images).compile().as_text()
    # The speed-up exists only if XLA keeps the conditional (one per block); a compiler that folds it
    # away would silently bring back the quadratic backward.
    assert hlo.count(" conditional(") == (3 if barrier else 0), barrier
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(grads[False]), jax.tree.leaves(grads[True])):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path))


def test_grad_barrier_default_follows_the_backend():
  fn, params = _backbone_grad_fn(None)
  hlo = fn.lower(params, jnp.zeros((1, 28, 28, 3))).compile().as_text()
  assert jax.default_backend() == "cpu"
  assert hlo.count(" conditional(") == 3


def test_compiler_options_keep_reductions_out_of_ynnpack():
  options = cpu_tuning.compiler_options()
  assert options == {"xla_cpu_experimental_ynn_fusion_type":
                     "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"}

  def column_norms(v):
    return jnp.sqrt(jnp.sum(v * v, axis=0))

  v = jax.ShapeDtypeStruct((256, 1024), jnp.float32)
  tuned = jax.jit(column_norms, compiler_options=options).lower(v).compile().as_text()
  assert "__ynn_fusion" not in tuned
  x = np.random.default_rng(0).normal(size=(256, 1024)).astype(np.float32)
  np.testing.assert_allclose(jax.jit(column_norms, compiler_options=options)(x), np.linalg.norm(x, axis=0),
                             rtol=1e-5)


_FAULTS_SCRIPT = textwrap.dedent("""
    import ctypes, resource, sys
    from dinov2_jax import cpu_tuning
    if sys.argv[1] == "tuned":
      assert cpu_tuning.keep_freed_host_memory()
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
    libc.free.argtypes = (ctypes.c_void_p,)
    size = 256 * 2 ** 20
    def touch_new_block():  # what XLA:CPU does with a step's temporaries (numpy would ask for huge pages)
      block = libc.malloc(size)
      ctypes.memset(block, 1, size)
      libc.free(block)
    touch_new_block()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    touch_new_block()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")

@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings are Linux-only")
def test_keep_freed_host_memory_reuses_pages_of_a_freed_block():
  faults = {}
  for mode in ("default", "tuned"):
    out = subprocess.run([sys.executable, "-c", _FAULTS_SCRIPT, mode], capture_output=True, text=True, check=True)
    faults[mode] = int(out.stdout.split()[-1])
  pages = 256 * 2 ** 20 // 4096
  assert faults["default"] > pages // 2  # glibc maps a fresh block and faults every page in again
  assert faults["tuned"] < pages // 100  # the freed block's pages are reused


@pytest.mark.parametrize("platforms, expected", [("cpu", True), ("cuda", False), ("tpu,cpu", False)])
def test_backend_will_be_cpu_reads_jax_platforms_without_starting_a_backend(platforms, expected):
  script = ("from dinov2_jax import cpu_tuning; import jax._src.xla_bridge as xb; "
            "print(cpu_tuning.backend_will_be_cpu(), len(xb._backends))")
  env = {**os.environ, "JAX_PLATFORMS": platforms}
  out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, env=env)
  assert out.stdout.split() == [str(expected), "0"]
