"""Process and compiler settings that make the training step fast on the CPU backend.

Found by profiling the ViT-S/14 step (`benchmarks/profile_train_step.py`; figures in
`benchmarks/RESULTS.md`). None of them changes what is computed (the compiler option changes only
float rounding). A third setting, the residual-gradient barrier, lives with the model
(`dinov2_jax.fusion.materialize_cotangent`).

* `keep_freed_host_memory()`: XLA:CPU allocates all of a step's temporaries as one block (2.4 GiB
  for ViT-S/14 at batch 4) and frees it when the step ends. glibc serves a block that large with a
  fresh `mmap` every time, so every step page-faults the whole block in again and unmaps it: half
  of the step's time went to the kernel (more with two threads, which contend for the page tables).
  Serving everything from one heap that is never trimmed lets each step reuse the previous step's
  pages. It must run before JAX creates its threads (before the first device query or computation),
  because threads that already own a malloc arena keep it.
* `compiler_options()`: XLA options for jitting the step. jaxlib 0.10 hands reductions to YNNPACK;
  keeping YNNPACK for matrix products only gives the step 18% less temporary memory and ~5% less
  kernel time (ViT-S/14, batch 4).

The trainer applies them when `config.cpu_tuning` is True (the default) and the backend is the CPU
(`dinov2_jax.main` calls `keep_freed_host_memory`; `trainer.train` passes `compiler_options`).
Elsewhere (GPU, TPU, non-glibc systems) they do nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import importlib.util
import os
import pkgutil
import sys
from importlib import metadata

import jax
import jax.numpy as jnp

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

# jaxlib's default is INDIVIDUAL_DOT, INDIVIDUAL_CONVOLUTION and REDUCE; we drop REDUCE.
_YNN_OPTION = "xla_cpu_experimental_ynn_fusion_type"
_YNN_WITHOUT_REDUCE = "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"


def backend_will_be_cpu() -> bool:
  """Whether JAX will run on the CPU, decided WITHOUT initialising a backend.

  True when `JAX_PLATFORMS` / `jax_platforms` names only "cpu", or when it is unset and no GPU or
  TPU plugin is installed.
  """
  platforms = (jax.config.jax_platforms or "").strip()
  if platforms:
    return platforms.split(",")[0].strip() == "cpu"
  return not _accelerator_plugin_installed()


def _accelerator_plugin_installed() -> bool:
  # JAX finds GPU/ROCm PJRT plugins through the `jax_plugins` entry points or namespace package,
  # and the TPU runtime in `libtpu`.
  if list(metadata.entry_points(group="jax_plugins")):
    return True
  try:
    import jax_plugins  # noqa: PLC0415 - optional namespace package
    if any(pkgutil.iter_modules(jax_plugins.__path__)):
      return True
  except ImportError:
    pass
  return importlib.util.find_spec("libtpu") is not None


def keep_freed_host_memory() -> bool:
  """Serve all host allocations from one never-trimmed glibc heap. Returns whether it was applied.

  Process-wide and irreversible: memory the process frees stays with it for reuse (its resident
  size stays at its peak). Call it once, early, before JAX starts its threads. A no-op returning
  False where the C library is not glibc.
  """
  if not sys.platform.startswith("linux"):
    return False
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    mallopt = libc.mallopt
  except (OSError, AttributeError):
    return False
  mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
  # One arena: allocations made on XLA's worker threads would otherwise land in per-thread arenas,
  # whose heaps are capped at 64 MB and fall back to mmap for anything larger.
  ok = mallopt(_M_ARENA_MAX, 1) == 1
  ok &= mallopt(_M_MMAP_MAX, 0) == 1  # large blocks come from the heap, not from mmap
  ok &= mallopt(_M_TRIM_THRESHOLD, -1) == 1  # -1 is SIZE_MAX for glibc: never give the heap top back
  return bool(ok)


@functools.cache
def _ynn_option_accepted() -> bool:
  """Whether this jaxlib knows the YNNPACK option (it is experimental and may go away)."""
  try:
    jax.jit(lambda x: x.sum(0), compiler_options={_YNN_OPTION: _YNN_WITHOUT_REDUCE}).lower(
        jax.ShapeDtypeStruct((2, 2), jnp.float32)).compile()
    return True
  except Exception:  # noqa: BLE001 - any failure means: do not pass the option
    return False


def compiler_options() -> dict[str, str] | None:
  """`compiler_options` for `jax.jit` of the train step: None except on the CPU backend."""
  if jax.default_backend() != "cpu" or _YNN_OPTION in os.environ.get("XLA_FLAGS", ""):
    return None  # not CPU, or the user chose the YNNPACK fusions explicitly
  return {_YNN_OPTION: _YNN_WITHOUT_REDUCE} if _ynn_option_accepted() else None
