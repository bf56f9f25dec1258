"""Test set-up: 8 fake CPU devices for sharding tests, float32 matmuls, shared helpers."""

import os

# Must happen before jax is imported anywhere: gives jax.devices() 8 CPU devices.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
