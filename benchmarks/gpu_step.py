"""The DINOv2 train step on one accelerator: step time, images/s and MFU (model FLOPs utilisation).

    python benchmarks/gpu_step.py                      # ViT-L/14 recipe (dinov2_jax/configs/pretrain.py:vitl14), bf16
    python benchmarks/gpu_step.py --recipe vitg14 --batches 16,12,8
    python benchmarks/gpu_step.py --smoke              # a tiny model on any backend, to check the script

The recipe's crops (2 x 224 + 8 x 98), heads (131072 prototypes), Sinkhorn-Knopp, drop path 0.4 and
bf16 compute, on one device. It tries the (batch, remat policy) candidates in order and keeps the
first that compiles and runs (the largest batch that fits, without recomputation if possible).
MFU = analytic model FLOPs per step (`benchmarks/scale.py` model_flops: the matmuls of the teacher
forward and the student forward + backward) / step time / the device's peak dense bf16 FLOP/s.
Also checks that `attention_impl="auto"` picked cuDNN's fused attention on an NVIDIA GPU and that it
agrees with the XLA attention.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from benchmarks.machine import print_machine  # noqa: E402

# Peak dense bf16 tensor-core FLOP/s (vendor figures, no sparsity).
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "H100 PCIe": 756e12, "A100": 312e12, "L4": 121e12, "B200": 2250e12}


def peak_flops(device_kind: str) -> float | None:
  kind = device_kind.upper()
  for name in sorted(PEAK_BF16, key=len, reverse=True):
    if name.upper() in kind:
      return PEAK_BF16[name]
  return None


def check_cudnn_attention() -> str:
  import jax
  import jax.numpy as jnp

  from dinov2_jax.models.attention import multi_head_attention, resolve_attention_impl
  impl = resolve_attention_impl("auto", jnp.bfloat16)
  if impl != "cudnn":
    return f"attention_impl='auto' resolves to {impl!r} here (cuDNN needs an NVIDIA GPU)"
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.normal(size=(4, 257, 16, 64)), jnp.bfloat16) for _ in range(3))
  fused = jax.jit(multi_head_attention, static_argnums=3)(q, k, v, "cudnn")
  plain = jax.jit(multi_head_attention, static_argnums=3)(q, k, v, "xla")
  err = float(jnp.max(jnp.abs(fused.astype(jnp.float32) - plain.astype(jnp.float32))))
  return f"attention_impl='auto' -> cudnn; max |cudnn - xla| on (4, 257, 16, 64) bf16: {err:.4f}"


def build(config, batch_size: int, remat_policy: str):
  import jax
  import jax.numpy as jnp

  from dinov2_jax import masking, schedules
  from dinov2_jax.train import state as train_state
  from dinov2_jax.train import step as train_step

  config.batch_size = batch_size
  config.remat_policy = remat_policy
  arch = train_state.make_arch(config)
  tx = train_step.build_optimizer_for(train_state.abstract_student(config), config)
  state = jax.jit(lambda: train_state.init_train_state(train_state.init_student_params(config, 0), tx, config, 0))()
  c = config.crops
  rng = np.random.default_rng(0)
  grid = c.global_crops_size // config.student.patch_size
  masks = masking.sample_batch_masks(rng, 2 * batch_size, (grid, grid), max_num_patches=masking.meta_max_num_patches(
      c.global_crops_size, config.student.patch_size))
  batch = {
      "global_crops": rng.integers(0, 256, (2 * batch_size, c.global_crops_size, c.global_crops_size, 3), np.uint8),
      "local_crops": rng.integers(0, 256, (c.local_crops_number * batch_size, c.local_crops_size, c.local_crops_size, 3),
                                  np.uint8),
      "masks": masks.masks, "mask_indices": masks.mask_indices, "mask_weights": masks.mask_weights,
      "mask_valid": masks.mask_valid}
  batch = jax.device_put(batch)
  tables = {k: jnp.asarray(v) for k, v in schedules.build_schedules(
      lr=1e-4, epochs=10, warmup_epochs=0, freeze_last_layer_epochs=0, epoch_length=100).tables().items()}
  step = jax.jit(train_step.make_train_step(arch, tx), donate_argnums=0)
  return arch, state, batch, tables, step, masks.upperbound


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--recipe", default="vitl14", help="a recipe of dinov2_jax/configs/pretrain.py")
  parser.add_argument("--batches", default="96,64,48,32", help="per-step batches to try, largest first")
  parser.add_argument("--remat-policies", default="none,dots_saveable,full", help="tried in this order per batch")
  parser.add_argument("--iters", type=int, default=10)
  parser.add_argument("--smoke", action="store_true", help="the demo recipe with batch 8 (checks the script)")
  args = parser.parse_args()
  print_machine(accelerator=True)
  import jax

  from benchmarks.scale import model_flops
  from dinov2_jax import recipes

  print(check_cudnn_attention(), flush=True)
  recipe = "demo" if args.smoke else f"pretrain:{args.recipe}"
  batches = [8] if args.smoke else [int(b) for b in args.batches.split(",")]
  candidates = [(b, r) for b in batches for r in args.remat_policies.split(",")]
  device = jax.devices()[0]
  for batch_size, remat in candidates:
    config = recipes.get_config(recipe)
    config.scan_blocks = True
    try:
      t0 = time.perf_counter()
      arch, state, batch, tables, step, masked_rows = build(config, batch_size, remat)
      state, metrics = step(state, batch, tables)
      jax.block_until_ready(metrics["total_loss"])
      compile_s = time.perf_counter() - t0
      times = []
      for _ in range(args.iters):
        t0 = time.perf_counter()
        state, metrics = step(state, batch, tables)
        jax.block_until_ready(metrics["total_loss"])
        times.append(time.perf_counter() - t0)
    except Exception as e:  # noqa: BLE001  (out of memory is reported as several exception types)
      if "RESOURCE_EXHAUSTED" not in str(e) and "out of memory" not in str(e).lower():
        raise
      print(f"batch {batch_size}, remat {remat}: does not fit ({str(e).splitlines()[0][:120]})", flush=True)
      continue
    seconds = statistics.median(times)
    flops = model_flops(config, arch, batch_size, masked_rows)["total"]
    peak = peak_flops(device.device_kind)
    mfu = f"{100 * flops / seconds / peak:.1f}%" if peak else "n/a (unknown peak)"
    print(f"| recipe | device | batch | remat | step s | images/s | model TFLOP/step | TFLOP/s | MFU | compile s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {'demo' if args.smoke else args.recipe} ({config.compute_dtype}) | {device.device_kind} | "
          f"{batch_size} | {remat} | {seconds:.3f} | {batch_size / seconds:.1f} | {flops / 1e12:.2f} | "
          f"{flops / seconds / 1e12:.1f} | **{mfu}** | {compile_s:.0f} |")
    print(f"(median of {args.iters} steps; loss {float(metrics['total_loss']):.3f}; peak {peak or 0:.3g} FLOP/s)")
    return
  print("no candidate fitted", flush=True)


if __name__ == "__main__":
  main()
