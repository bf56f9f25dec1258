"""Progress lines for long evaluation work (feature extraction, k-NN bank, linear training)."""

from __future__ import annotations

import time
from collections.abc import Callable

import jax


def log_print(message: str) -> None:
  """Prints a line at once; in a multi-process run only process 0 prints (the others stay quiet)."""
  if jax.process_index() == 0:
    print(message, flush=True)


def format_seconds(s: float) -> str:
  s = int(round(s))
  return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Progress:
  """Logs `what: done/total unit (pct) rate unit/s, ETA` at most every `every_s` seconds and at the end."""

  def __init__(self, total: int, what: str, unit: str = "images", log: Callable[[str], None] | None = log_print,
               every_s: float = 10.0):
    self.total, self.what, self.unit, self.log, self.every_s = total, what, unit, log, every_s
    self.done, self.start = 0, time.perf_counter()
    self.last = self.start

  @property
  def rate(self) -> float:
    return self.done / max(time.perf_counter() - self.start, 1e-9)

  def update(self, n: int) -> None:
    self.done += n
    now = time.perf_counter()
    if self.log and (now - self.last >= self.every_s or self.done >= self.total):
      self.last = now
      eta = (self.total - self.done) / max(self.rate, 1e-9)
      self.log(f"{self.what}: {self.done}/{self.total} {self.unit} ({100 * self.done / max(self.total, 1):.1f}%), "
               f"{self.rate:.1f} {self.unit}/s, ETA {format_seconds(eta)}")
