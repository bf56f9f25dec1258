"""Where the JAX train step spends its time: XLA's per-kernel trace of one step, summed by kind.

    taskset -c 1 python benchmarks/profile_train_step.py                   # ViT-S/14, batch 4, as trained
    taskset -c 1 python benchmarks/profile_train_step.py --tuning none     # without dinov2_jax.cpu_tuning

Builds the same step as `benchmarks/train_step.py` (same config, batch and schedules), runs
`--steps` steps (the first compiles; later ones show the steady state) printing wall, user and
kernel seconds and page faults of each, then records one more step with `jax.profiler` and prints
the kernels (XLA thunks) that took the most time, summed by kind (`copy_bitcast_fusion`,
`ynn_fusion`, `dot`, ...) and one by one. The raw trace stays in `--trace-dir` (open the
`perfetto_trace.json.gz` in ui.perfetto.dev). `--hlo FILE` writes the compiled HLO, to look up a
kernel by name.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import resource
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from benchmarks.machine import print_machine  # noqa: E402

from benchmarks.train_step import TUNINGS, build_jax_step, parse_tuning  # noqa: E402

_NOT_KERNELS = ("ThunkExecutor::", "Pjit", "CommonPjRt", "AllocateOutputBuffers", "ParseArguments")


def kernel_times(trace_dir: str) -> dict[str, float]:
  """Milliseconds per XLA kernel name in the newest perfetto trace under `trace_dir`."""
  path = sorted(glob.glob(os.path.join(trace_dir, "plugins", "profile", "*", "perfetto_trace.json.gz")))[-1]
  events = json.load(gzip.open(path))["traceEvents"]
  times: dict[str, float] = collections.defaultdict(float)
  for e in events:
    name = e.get("name", "")
    if e.get("ph") == "X" and not name.startswith("$") and not any(s in name for s in _NOT_KERNELS):
      times[name] += e.get("dur", 0) / 1e3
  return times


def print_summary(times: dict[str, float], top: int) -> None:
  by_kind: dict[str, float] = collections.defaultdict(float)
  count: collections.Counter = collections.Counter()
  for name, ms in times.items():
    kind = re.sub(r"\.\d+$", "", name)
    by_kind[kind] += ms
    count[kind] += 1
  total = sum(times.values())
  print(f"\nkernel time in the traced step: {total / 1e3:.2f} s\n")
  print("| kernel kind | ms | share | kernels |")
  print("|---|---|---|---|")
  for kind, ms in sorted(by_kind.items(), key=lambda kv: -kv[1])[:top]:
    print(f"| {kind} | {ms:.0f} | {100 * ms / total:.1f}% | {count[kind]} |")
  print("\n| kernel | ms |")
  print("|---|---|")
  for name, ms in sorted(times.items(), key=lambda kv: -kv[1])[:top]:
    print(f"| {name} | {ms:.0f} |")


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model", default="vits14")
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--prototypes", type=int, default=65536)
  parser.add_argument("--n-local", type=int, default=8)
  parser.add_argument("--global-size", type=int, default=224)
  parser.add_argument("--local-size", type=int, default=98)
  parser.add_argument("--steps", type=int, default=4, help="timed steps before the traced one")
  parser.add_argument("--tuning", default=",".join(TUNINGS), help="as in benchmarks/train_step.py")
  parser.add_argument("--trace-dir", default="/tmp/dinov2_jax_step_trace")
  parser.add_argument("--hlo", default="", help="write the compiled HLO text here")
  parser.add_argument("--top", type=int, default=15)
  args = parser.parse_args()
  print_machine()  # before anything starts: the load average of the idle machine
  tuning = parse_tuning(parser, args.tuning)

  from dinov2_jax import cpu_tuning
  if "heap" in tuning:
    cpu_tuning.keep_freed_host_memory()  # before JAX starts its threads
  import jax

  step = build_jax_step(args, tuning)
  state, batch, tables = step.state, step.batch, step.tables
  compiled = step.jitted.lower(state, batch, tables).compile()
  del step
  if args.hlo:
    with open(args.hlo, "w") as f:
      f.write(compiled.as_text())
  print(f"command: python {' '.join(sys.argv)}")
  print(f"tuning: {','.join(sorted(tuning)) or 'none'}; temp memory {compiled.memory_analysis().temp_size_in_bytes / 2**30:.2f} GiB")
  for i in range(args.steps):
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    state, metrics = compiled(state, batch, tables)
    jax.block_until_ready(metrics)
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    print(f"step {i}: {time.perf_counter() - t0:.2f} s wall, {r1.ru_utime - r0.ru_utime:.2f} s user, "
          f"{r1.ru_stime - r0.ru_stime:.2f} s kernel, {r1.ru_minflt - r0.ru_minflt} page faults", flush=True)
  jax.profiler.start_trace(args.trace_dir, create_perfetto_trace=True)
  state, metrics = compiled(state, batch, tables)
  jax.block_until_ready(metrics)
  jax.profiler.stop_trace()
  print_summary(kernel_times(args.trace_dir), args.top)


if __name__ == "__main__":
  main()
