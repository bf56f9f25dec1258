"""DINOv2 in JAX/Flax."""
