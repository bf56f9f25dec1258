"""Throughput of the evaluation protocols on random features (no backbone, no data loading).

  python benchmarks/eval.py                       # defaults below, ~1-2 minutes on 2 CPU cores
  python benchmarks/eval.py --queries 8192 --linear_steps 10

k-NN: Meta's protocol (L2-normalise, top-200 by dot product, softmax(sim/0.07) votes for k in
10/20/100/200, top-1/top-5) for `--queries` queries against a bank of `--bank` x `--dim` features
streamed in `--bank_chunk`-row chunks; queries/s is for the whole protocol.

Linear: one training step of Meta's 52 linear classifiers at once (last 1 or 4 blocks x avgpool
x 13 lrs) on a batch of `--batch` rows of 4 x `--dim` CLS + `--dim` patch-mean features, `--classes`
classes; steps/s and rows/s. The host-side batch gather (numpy fancy indexing of the feature
arrays) is included, as in `train_linear`.

Each figure is timed after a warm-up call of the same shapes (compilation excluded), best of
`--repeats`. Runs on whatever devices JAX sees (set XLA_FLAGS yourself for fake CPU devices).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from benchmarks.machine import print_machine  # noqa: E402

import jax  # noqa: E402

from dinov2_jax.eval import knn  # noqa: E402
from dinov2_jax.eval import linear as L  # noqa: E402


def best_time(fn, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return min(times)


def bench_knn(args, rng) -> dict:
  bank = rng.standard_normal((args.bank, args.dim), np.float32)
  bank_labels = rng.integers(0, args.classes, args.bank).astype(np.int32)
  queries = rng.standard_normal((args.queries, args.dim), np.float32)
  query_labels = rng.integers(0, args.classes, args.queries).astype(np.int32)
  kw = dict(num_classes=args.classes, bank_chunk=args.bank_chunk, query_block=args.query_block, batch=args.queries)
  chunk = min(args.bank_chunk, args.bank)
  # Warm-up: a one-chunk bank has the same step shape, so this compiles everything that is timed.
  knn.knn_evaluate(bank[:chunk], bank_labels[:chunk], queries, query_labels, **kw)
  seconds = best_time(lambda: knn.knn_evaluate(bank, bank_labels, queries, query_labels, **kw), args.repeats)
  return {"seconds": seconds, "queries_per_s": args.queries / seconds,
          "similarities_per_s": args.queries * args.bank / seconds}


def bench_linear(args, rng) -> dict:
  rows = max(args.batch * 2, 4096)
  features = {"cls_blocks": rng.standard_normal((rows, 4, args.dim), np.float32),
              "patch_mean": rng.standard_normal((rows, args.dim), np.float32)}
  labels = rng.integers(0, args.classes, rows)
  specs = L.classifier_grid()
  params = sum(s.input_dim(args.dim) * args.classes + args.classes for s in specs)
  run = lambda steps: L.train_linear(features, labels, args.classes, specs, batch_size=args.batch,  # noqa: E731
                                     epochs=1, epoch_length=steps, log=None)
  run(1)  # compile
  # Per-step time from the difference of two runs: removes the fixed cost (init, transfers).
  seconds = best_time(lambda: run(args.linear_steps + 1), args.repeats) - best_time(lambda: run(1), args.repeats)
  seconds_per_step = seconds / args.linear_steps
  return {"seconds_per_step": seconds_per_step, "steps_per_s": 1 / seconds_per_step,
          "rows_per_s": args.batch / seconds_per_step, "classifier_params": params}


def machine() -> str:
  devices = jax.devices()
  return (f"{len(devices)} x {devices[0].device_kind} ({jax.default_backend()}), {os.cpu_count()} host cores, "
          f"{platform.machine()}, jax {jax.__version__}")


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--bank", type=int, default=100_000)
  p.add_argument("--dim", type=int, default=768)
  p.add_argument("--queries", type=int, default=2048)
  p.add_argument("--bank_chunk", type=int, default=16384)
  p.add_argument("--query_block", type=int, default=256)
  p.add_argument("--classes", type=int, default=1000)
  p.add_argument("--batch", type=int, default=1024)
  p.add_argument("--linear_steps", type=int, default=3)
  p.add_argument("--repeats", type=int, default=1)
  p.add_argument("--skip", choices=("knn", "linear"), default=None)
  args = p.parse_args()
  print_machine()  # before anything starts: the load average of the idle machine
  rng = np.random.default_rng(0)
  command = "python benchmarks/eval.py " + " ".join(sys.argv[1:])
  rows = []
  if args.skip != "knn":
    r = bench_knn(args, rng)
    rows.append(f"| k-NN, k=200 (Meta protocol), bank {args.bank:,} x {args.dim}, {args.queries} queries, "
                f"chunk {args.bank_chunk} | {r['queries_per_s']:,.0f} queries/s "
                f"({r['similarities_per_s'] / 1e6:.0f} M similarities/s) |")
  if args.skip != "linear":
    r = bench_linear(args, rng)
    rows.append(f"| linear, 52 classifiers at once, batch {args.batch}, features 4x{args.dim}+{args.dim}, "
                f"{args.classes} classes ({r['classifier_params'] / 1e6:.0f}M weights) | "
                f"{r['steps_per_s']:.2f} steps/s ({r['rows_per_s']:,.0f} rows/s, "
                f"{1000 * r['seconds_per_step']:.0f} ms/step) |")
  print(f"\n`{command.strip()}` on {machine()}\n")
  print("| benchmark | throughput |\n|---|---|")
  print("\n".join(rows))


if __name__ == "__main__":
  main()
