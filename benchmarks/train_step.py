"""Full DINOv2 training-step throughput: the jitted JAX step vs the PyTorch re-statement of Meta's step.

    python benchmarks/train_step.py                         # ViT-S/14, 2x224 + 8x98 crops, batch 8, float32
    python benchmarks/train_step.py --model vitb14 --batch 16 --iters 10

Throughput. One step is Meta's whole iteration (teacher forward on the global crops, student
forward/backward on 2 global + n local crops, DINO + KoLeo + iBOT losses, per-submodule clipping,
AdamW with Meta's parameter groups, EMA teacher update), on B images = B x (2 + n_local) crops:

  * JAX: `jax.jit(make_train_step(arch, tx), donate_argnums=0)`, compiled ahead of time (the
    compile time is reported separately);
  * PyTorch: `benchmarks/torch_reference_step.TorchDinov2Step` (transformers `Dinov2Model` student
    and teacher + torch DINO heads + `torch.optim.AdamW`), loaded with the same weights.

The JAX side runs with the trainer's CPU settings (`dinov2_jax.cpu_tuning` and the model's
residual-gradient barrier); `--tuning none` (or a subset: heap, barrier, ynn) measures without them.
The heap setting is process-wide, so the PyTorch step gets it too.

Both get the same batch (random images, Meta-style iBOT masks) and the same schedule values. The
timed iterations alternate between the two frameworks so that machine noise hits both alike; each
figure is the median over `--iters` steps after `--warmup` untimed steps. Stochastic depth is off on
both sides (transformers has no batch-subset drop path), the precision is float32, the positional
embeddings of the local crops are resampled with Meta's offset 0.1 on both sides.

The per-device memory, FLOPs and collectives of the large recipes on fake 64-device meshes are
accounted by `benchmarks/scale.py`.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
import types

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from benchmarks.machine import describe, print_machine  # noqa: E402

TUNINGS = ("heap", "barrier", "ynn")
MODELS = {  # name -> (Meta arch, embed_dim, depth, heads, ffn)
    "tiny": ("custom", 64, 2, 2, "mlp"),
    "vits14": ("vit_small", 384, 12, 6, "mlp"),
    "vitb14": ("vit_base", 768, 12, 12, "mlp"),
    "vitl14": ("vit_large", 1024, 24, 16, "mlp"),
    "vitg14": ("vit_giant2", 1536, 40, 24, "swiglufused"),
}


def make_config(args):
  """A dinov2-jax config (Meta's yaml fields) for the throughput comparison."""
  from dinov2_jax.train.default_config import get_default_config

  arch, dim, depth, heads, ffn = MODELS[args.model]
  c = get_default_config()
  c.student.update(arch=arch, embed_dim=dim, depth=depth, num_heads=heads, patch_size=14, ffn_layer=ffn,
                   drop_path_rate=0.0, layerscale=1.0e-5)
  c.crops.update(global_crops_size=args.global_size, local_crops_size=args.local_size,
                 local_crops_number=args.n_local)
  c.dino.update(head_n_prototypes=args.prototypes)
  c.ibot.update(head_n_prototypes=args.prototypes, separate_head=False)
  c.batch_size = args.batch
  c.compute_dtype = "float32"
  return c


def make_batch(args, rng):
  from dinov2_jax import masking

  grid = args.global_size // 14
  mb = masking.sample_batch_masks(rng, 2 * args.batch, (grid, grid),
                                  max_num_patches=masking.meta_max_num_patches(args.global_size, 14))
  return dict(
      global_crops=rng.normal(size=(2 * args.batch, args.global_size, args.global_size, 3)).astype(np.float32),
      local_crops=rng.normal(size=(args.n_local * args.batch, args.local_size, args.local_size, 3)).astype(np.float32),
      masks=mb.masks, mask_indices=mb.mask_indices, mask_weights=mb.mask_weights, mask_valid=mb.mask_valid)


def parse_tuning(parser: argparse.ArgumentParser, value: str) -> set[str]:
  """`--tuning` ("none" or a comma-separated subset of TUNINGS) -> the set of settings to apply."""
  tuning = set() if value == "none" else set(value.split(","))
  if tuning - set(TUNINGS):
    parser.error(f"--tuning: unknown {sorted(tuning - set(TUNINGS))}; choose from {TUNINGS} or 'none'")
  return tuning


def build_jax_step(args, tuning: set[str]) -> types.SimpleNamespace:
  """The JAX side: config, fresh student and train state, schedule tables, batch, and the jitted step.

  The step is jitted (not yet compiled) with the "barrier" and "ynn" settings of `tuning`; the
  "heap" setting is process-wide and must be applied by the caller before JAX starts.
  `init_s` is the time taken to initialise the student and the state.
  """
  import jax

  from dinov2_jax import cpu_tuning, schedules
  from dinov2_jax.train import state as train_state
  from dinov2_jax.train import step as train_step

  config = make_config(args)
  config.cpu_tuning = "barrier" in tuning  # the residual-gradient barrier (models/vit.py)
  arch = train_state.make_arch(config)
  t0 = time.perf_counter()
  student = train_state.init_student_params(config, 0)
  tx = train_step.build_optimizer_for(student, config)
  state = train_state.init_train_state(student, tx, config, 0)
  jax.block_until_ready(state)
  init_s = time.perf_counter() - t0
  # Meta-like values (lr > 0 and last-layer lr > 0, so every AdamW update is a real one).
  tables = schedules.build_schedules(lr=1e-3, epochs=10, warmup_epochs=0, freeze_last_layer_epochs=0,
                                     epoch_length=100).tables()
  batch = jax.device_put(make_batch(args, np.random.default_rng(0)))
  jitted = jax.jit(train_step.make_train_step(arch, tx), donate_argnums=0,
                   compiler_options=cpu_tuning.compiler_options() if "ynn" in tuning else None)
  return types.SimpleNamespace(config=config, student=student, state=state, tables=tables, batch=batch,
                               jitted=jitted, init_s=init_s)


def bench(args):
  import jax
  import torch

  from benchmarks.torch_reference_step import HeadSpec, TorchDinov2Step
  from dinov2_jax.weights.convert import params_to_meta

  jax_step = build_jax_step(args, args.tuning)
  state, batch, tables, jitted = jax_step.state, jax_step.batch, jax_step.tables, jax_step.jitted
  init_s = jax_step.init_s

  _, dim, depth, heads, ffn = MODELS[args.model]
  reference = TorchDinov2Step(
      embed_dim=dim, depth=depth, num_heads=heads, patch_size=14, img_size=args.global_size,
      n_local_crops=args.n_local, dino_head=HeadSpec(args.prototypes), ibot_head=None, centering="centering",
      schedules=tables, ffn_layer=ffn, layerscale=1.0e-5,
      interpolate_offset=jax_step.config.student.interpolate_offset, attn_implementation="sdpa")
  host = jax.device_get(jax_step.student)
  reference.load_meta_state_dicts({"backbone": params_to_meta(host["backbone"]),
                                   "dino_head": params_to_meta(host["dino_head"], head_nlayers=3)})
  del host, jax_step

  batch_np = jax.device_get(batch)
  t0 = time.perf_counter()
  compiled = jitted.lower(state, batch, tables).compile()
  compile_s = time.perf_counter() - t0
  print(f"init {init_s:.1f} s, JAX compile {compile_s:.1f} s", flush=True)

  it = 0
  def run_jax():
    nonlocal state
    state, metrics = compiled(state, batch, tables)
    jax.block_until_ready(metrics)
    return float(metrics["total_loss"])

  def run_torch():
    return reference.step(batch_np, it)["total_loss"]

  # Wall time, and the process's CPU time (all threads): the machine may be shared, and CPU seconds
  # per step are much less sensitive to other jobs than wall seconds.
  # Page faults and kernel time as well: fresh memory is a large, allocator-dependent part of a CPU step.
  wall, cpu, kernel, faults = ({"jax": [], "torch": []} for _ in range(4))
  for i in range(args.warmup + args.iters):
    it = i
    for name, fn in (("jax", run_jax), ("torch", run_torch)):
      t0, r0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
      loss = fn()
      dt, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
      dc, ds = r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime, r1.ru_stime - r0.ru_stime
      df = r1.ru_minflt - r0.ru_minflt
      if not np.isfinite(loss):
        raise FloatingPointError(f"{name}: loss {loss} at step {i}")
      if i >= args.warmup:
        for table, value in ((wall, dt), (cpu, dc), (kernel, ds), (faults, df)):
          table[name].append(value)
      print(f"  step {i}{' (warmup)' if i < args.warmup else ''} {name}: {dt:.2f} s wall, {dc:.2f} s CPU "
            f"({ds:.2f} s kernel, {df} page faults), loss {loss:.4f}", flush=True)
  med = {k: statistics.median(v) for k, v in wall.items()}
  med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
  med_kernel = {k: statistics.median(v) for k, v in kernel.items()}
  med_faults = {k: statistics.median(v) for k, v in faults.items()}
  return dict(ips_jax=args.batch / med["jax"], ips_torch=args.batch / med["torch"], ratio=med["torch"] / med["jax"],
              cpu_ratio=med_cpu["torch"] / med_cpu["jax"], compile_s=compile_s, init_s=init_s,
              jax_s=med["jax"], torch_s=med["torch"], jax_cpu_s=med_cpu["jax"], torch_cpu_s=med_cpu["torch"],
              jax_kernel_s=med_kernel["jax"], torch_kernel_s=med_kernel["torch"],
              jax_faults=med_faults["jax"], torch_faults=med_faults["torch"],
              torch_threads=torch.get_num_threads(), jax_version=jax.__version__, torch_version=torch.__version__)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model", default="vits14", choices=sorted(MODELS))
  parser.add_argument("--batch", type=int, default=8, help="images per step (each 2 global + n_local crops)")
  parser.add_argument("--iters", type=int, default=3)
  parser.add_argument("--warmup", type=int, default=1)
  parser.add_argument("--prototypes", type=int, default=65536, help="DINO/iBOT head prototypes (Meta: 65536)")
  parser.add_argument("--n-local", type=int, default=8)
  parser.add_argument("--global-size", type=int, default=224)
  parser.add_argument("--local-size", type=int, default=98)
  parser.add_argument("--tuning", default=",".join(TUNINGS),
                      help="CPU settings of dinov2_jax.cpu_tuning to apply, comma-separated, or 'none': heap "
                           "(reuse freed host memory; both frameworks), barrier (residual-gradient barrier in "
                           "the JAX backbone), ynn (no YNNPACK reductions in the JAX step). Default: all, as "
                           "the trainer does")
  args = parser.parse_args()
  print_machine()  # before anything starts: the load average of the idle machine

  print(f"command: python {' '.join(sys.argv)}")
  args.tuning = parse_tuning(parser, args.tuning)
  if "heap" in args.tuning:
    from dinov2_jax import cpu_tuning
    # Before JAX or torch start their threads; it serves both frameworks' allocations alike.
    print(f"heap reuse (cpu_tuning.keep_freed_host_memory) applied: {cpu_tuning.keep_freed_host_memory()}")
  r = bench(args)
  print(f"after the run: {describe()}; jax {r['jax_version']} (CPU), torch {r['torch_version']} "
        f"({r['torch_threads']} threads)")
  print()
  print("| model | crops | batch (images) | K | tuning | dinov2-jax img/s | PyTorch img/s | ratio (jax/torch) "
        "| jax s/step: wall (CPU, kernel) | torch s/step: wall (CPU, kernel) | page faults/step jax, torch "
        "| jax compile s |")
  print("|---|---|---|---|---|---|---|---|---|---|---|---|")
  print(f"| {args.model} | 2x{args.global_size} + {args.n_local}x{args.local_size} | {args.batch} | "
        f"{args.prototypes} | {','.join(sorted(args.tuning)) or 'none'} | {r['ips_jax']:.3f} | "
        f"{r['ips_torch']:.3f} | **{r['ratio']:.2f}** | "
        f"{r['jax_s']:.2f} ({r['jax_cpu_s']:.2f}, {r['jax_kernel_s']:.2f}) | "
        f"{r['torch_s']:.2f} ({r['torch_cpu_s']:.2f}, {r['torch_kernel_s']:.2f}) | "
        f"{r['jax_faults']:.0f}, {r['torch_faults']:.0f} | {r['compile_s']:.1f} |")
  print(f"(median over {args.iters} alternating steps after {args.warmup} warm-up; JAX init {r['init_s']:.1f} s)")


if __name__ == "__main__":
  main()
