"""forward_features throughput: dinov2-jax vs transformers' PyTorch Dinov2Model, same weights, same run.

    python benchmarks/inference.py                       # ViT-S/14 and ViT-B/14, 224 px, batch 16, float32
    python benchmarks/inference.py --models vits14,vitb14,vitl14,vitg14 --sizes 224,518 --dtype bfloat16  # GPU

Both models get the same random weights (hub architecture: 518 px positional grid, so 224 px inputs
resample the positional embedding, as with Meta's weights). The timed loops alternate between the
two frameworks so that machine noise hits both alike; each figure is the median over `--iters`
calls after warm-up (JAX compiles during warm-up). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from benchmarks.machine import describe, print_machine  # noqa: E402

HF_SIZES = {  # hub preset -> transformers config fields
    "vits14": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6),
    "vitb14": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12),
    "vitl14": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16),
    "vitg14": dict(hidden_size=1536, num_hidden_layers=40, num_attention_heads=24, use_swiglu_ffn=True),
}


def build_pair(name: str, jax_dtype: str, torch_dtype, device: str):
  import torch
  from transformers import Dinov2Config, Dinov2Model

  from dinov2_jax.api import backbone_from_state_dict
  from dinov2_jax.weights.convert import hf_to_meta

  torch.manual_seed(0)
  cfg = Dinov2Config(image_size=518, patch_size=14, layerscale_value=1.0, attn_implementation="sdpa", **HF_SIZES[name])
  model = Dinov2Model(cfg).eval()
  sd = {k: v.numpy() for k, v in model.state_dict().items()}
  # transformers resamples by size: offset 0 makes the two models compute the same function.
  backbone = backbone_from_state_dict(hf_to_meta(sd), interpolate_offset=0.0, dtype=jax_dtype)
  return model.to(device=device, dtype=torch_dtype), backbone


def bench(args):
  import jax
  import jax.numpy as jnp
  import torch

  device = "cuda" if torch.cuda.is_available() else "cpu"
  jax_dtype = args.dtype
  torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
  rows = []
  for name in args.models.split(","):
    torch_model, backbone = build_pair(name, jax_dtype, torch_dtype, device)
    for size in [int(s) for s in args.sizes.split(",")]:
      x = np.random.default_rng(0).normal(size=(args.batch, size, size, 3)).astype(np.float32)
      xj = jax.device_put(jnp.asarray(x))
      xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).to(device=device, dtype=torch_dtype)

      def run_jax():
        jax.block_until_ready(backbone.forward_features(xj)["x_norm_patchtokens"])

      def run_torch():
        with torch.inference_mode():
          torch_model(pixel_values=xt)
        if device == "cuda":
          torch.cuda.synchronize()

      t0 = time.perf_counter()
      run_jax()
      compile_s = time.perf_counter() - t0
      for _ in range(args.warmup):
        run_jax()
        run_torch()
      tj, tt = [], []
      for _ in range(args.iters):
        for fn, acc in ((run_jax, tj), (run_torch, tt)):
          t0 = time.perf_counter()
          fn()
          acc.append(time.perf_counter() - t0)
      ips_j, ips_t = args.batch / statistics.median(tj), args.batch / statistics.median(tt)
      rows.append((name, size, ips_j, ips_t, ips_j / ips_t, compile_s))
      print(f"  {name} {size}px: jax {ips_j:.1f} img/s, torch {ips_t:.1f} img/s, ratio {ips_j / ips_t:.2f}", flush=True)
  return rows, device


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--models", default="vits14,vitb14")
  parser.add_argument("--sizes", default="224")
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--iters", type=int, default=10)
  parser.add_argument("--warmup", type=int, default=2)
  args = parser.parse_args()
  print_machine()
  import jax
  import torch
  rows, device = bench(args)
  print()
  print(f"command: python {' '.join(sys.argv)}")
  print(f"after the run: {describe()}; jax {jax.__version__} ({jax.devices()[0].device_kind}), torch "
        f"{torch.__version__} ({device}, {torch.get_num_threads()} threads)")
  print()
  print("| model | px | batch | dtype | dinov2-jax img/s | PyTorch img/s | ratio (jax/torch) | jax compile s |")
  print("|---|---|---|---|---|---|---|---|")
  for name, size, ips_j, ips_t, ratio, comp in rows:
    print(f"| {name} | {size} | {args.batch} | {args.dtype} | {ips_j:.1f} | {ips_t:.1f} | {ratio:.2f} | {comp:.1f} |")


if __name__ == "__main__":
  main()
