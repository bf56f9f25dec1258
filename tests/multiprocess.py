"""Real multi-process JAX on one machine, for tests of the multi-host code paths.

Each of N processes gets K fake CPU devices (`XLA_FLAGS`) and joins the others through
`jax.distributed.initialize` on 127.0.0.1 (the program under test does that itself, e.g.
`python -m dinov2_jax.main --coordinator_address=... --num_processes=N --process_id=I`). Processes
start in their own session so that a test can always kill them all, whatever state they are in;
their output goes to files (a full pipe would block them), named in every failure message.

    with ProcessGroup(tmp_path, devices_per_process=4) as group:
      group.start([cmd_for(i, group.port) for i in range(2)])
      outputs = group.wait(timeout=300)          # raises with the logs if one fails or hangs
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
  """A TCP port nothing listens on right now (the OS picks it)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def process_env(devices_per_process: int, extra: dict[str, str] | None = None) -> dict[str, str]:
  """The environment of one process: K fake CPU devices, CPU only, this checkout importable first."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices_per_process}"
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join([REPO_ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
  env["PYTHONUNBUFFERED"] = "1"
  env.update(extra or {})
  return env


class ProcessFailed(AssertionError):
  pass


class ProcessGroup:
  """Starts, signals, waits for and always cleans up a group of processes."""

  def __init__(self, log_dir, devices_per_process: int, env: dict[str, str] | None = None):
    self.log_dir = str(log_dir)
    os.makedirs(self.log_dir, exist_ok=True)
    self.devices_per_process = devices_per_process
    self.extra_env = env or {}
    self.port = free_port()
    self.procs: list[subprocess.Popen] = []
    self.log_paths: list[str] = []
    self._run = 0

  def coordinator_flags(self, process_id: int, num_processes: int) -> list[str]:
    return [f"--coordinator_address=127.0.0.1:{self.port}", f"--num_processes={num_processes}",
            f"--process_id={process_id}"]

  def start(self, commands: Sequence[Sequence[str]]) -> None:
    """Starts one process per command (argv lists; "python" is this interpreter)."""
    self.kill()
    self._run += 1
    self.procs, self.log_paths = [], []
    env = process_env(self.devices_per_process, self.extra_env)
    for i, cmd in enumerate(commands):
      cmd = [sys.executable if c == "python" else c for c in cmd]
      path = os.path.join(self.log_dir, f"run{self._run}_process{i}.log")
      with open(path, "w") as log:
        self.procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT,
                                           start_new_session=True))
      self.log_paths.append(path)

  def output(self, i: int) -> str:
    with open(self.log_paths[i]) as f:
      return f.read()

  def _report(self, why: str) -> str:
    parts = [why]
    for i, p in enumerate(self.procs):
      tail = "\n".join(self.output(i).splitlines()[-40:])
      parts.append(f"--- process {i} (exit code {p.poll()}, log {self.log_paths[i]}) ---\n{tail}")
    return "\n".join(parts)

  def wait(self, timeout: float, expect_success: bool = True) -> list[str]:
    """Waits for every process; returns their outputs. On a hang or a failure, kills all and raises."""
    deadline = time.monotonic() + timeout
    while any(p.poll() is None for p in self.procs):
      failed = [i for i, p in enumerate(self.procs) if p.poll() not in (None, 0)]
      if expect_success and failed:
        time.sleep(2)  # let the others print why they stop too
        self.kill()
        raise ProcessFailed(self._report(f"process(es) {failed} failed"))
      if time.monotonic() > deadline:
        self.kill()
        raise ProcessFailed(self._report(f"still running after {timeout:.0f} s (killed)"))
      time.sleep(0.2)
    if expect_success and any(p.returncode for p in self.procs):
      raise ProcessFailed(self._report("a process failed"))
    return [self.output(i) for i in range(len(self.procs))]

  def wait_for_output(self, i: int, text: str, timeout: float) -> None:
    """Blocks until process i has printed `text` (e.g. a checkpoint line)."""
    deadline = time.monotonic() + timeout
    while text not in self.output(i):
      if self.procs[i].poll() is not None or time.monotonic() > deadline:
        self.kill()
        raise ProcessFailed(self._report(f"process {i} never printed {text!r}"))
      time.sleep(0.2)

  def signal(self, i: int, sig: int) -> None:
    self.procs[i].send_signal(sig)

  def kill(self) -> None:
    """SIGKILL to every process of the group (and anything they started)."""
    for p in self.procs:
      if p.poll() is None:
        try:
          os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
          pass
    for p in self.procs:
      try:
        p.wait(timeout=30)
      except subprocess.TimeoutExpired:
        pass

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.kill()
