"""One line naming the machine a benchmark runs on: printed by every benchmark before it starts.

Speed ratios on a CPU depend on its make (AMD vs Intel) and on the load from other jobs (which
slows torch's OpenMP threads more than XLA's), so the CPU model and the load average belong next to
every figure; on an accelerator, the device.
"""

from __future__ import annotations

import os
import platform


def cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
  except (OSError, StopIteration):
    return platform.processor() or platform.machine()


def describe(accelerator: bool = False) -> str:
  """'<CPU model>, N cores, load average a b c' (plus the JAX devices when `accelerator`)."""
  line = f"{cpu_model()}, {os.cpu_count()} cores, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
  if accelerator:
    import jax  # pylint: disable=g-import-not-at-top  (only when asked: it fixes the device count)
    devices = jax.devices()
    line += f"; {len(devices)} x {devices[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}"
  return line


def print_machine(accelerator: bool = False) -> None:
  print(f"machine: {describe(accelerator)}", flush=True)
