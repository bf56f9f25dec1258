"""Joining a multi-process (multi-host) JAX run: the command-line flags and the one call that uses them.

Every entry point (training, feature extraction) imports this module, which defines:

  --distributed            auto-detect the cluster (TPU pods, SLURM, Open MPI, Kubernetes) and join it
  --coordinator_address    HOST:PORT of process 0, for a launch without a cluster manager, with
  --num_processes          the number of processes and
  --process_id             this process's index in [0, num_processes)

and calls `initialize_from_flags()` before anything touches a device. On the CPU backend with more
than one process it switches XLA's CPU collectives to gloo first (without it, cross-process
collectives on CPU fail), which is how the multi-host code paths are tested on one machine.
"""

from __future__ import annotations

import jax
from absl import flags

from dinov2_jax import cpu_tuning

_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Join a multi-host run by auto-detection: jax.distributed.initialize() "
    "(TPU pods, SLURM, Open MPI, Kubernetes).")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "HOST:PORT of process 0, to launch N processes without a cluster "
    "manager (with --num_processes and --process_id; the same address on every process).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator_address).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, 0 .. num_processes-1 "
                                   "(with --coordinator_address).")


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, auto_detect: bool = False) -> None:
  """Joins the processes of a multi-host run; does nothing for a single-process run.

  Args:
    coordinator_address: "host:port" of process 0, or None.
    num_processes, process_id: required with `coordinator_address`.
    auto_detect: call `jax.distributed.initialize()` without arguments (cluster auto-detection).
  """
  explicit = (coordinator_address, num_processes, process_id)
  if any(v is not None for v in explicit) and any(v is None for v in explicit):
    raise ValueError("--coordinator_address, --num_processes and --process_id go together; got "
                     f"coordinator_address={coordinator_address}, num_processes={num_processes}, "
                     f"process_id={process_id}")
  if coordinator_address is None:
    if auto_detect:
      jax.distributed.initialize()
    return
  if auto_detect:
    raise ValueError("use either --distributed (auto-detection) or --coordinator_address, not both")
  if num_processes < 1 or not 0 <= process_id < num_processes:
    raise ValueError(f"--process_id={process_id} must be in [0, --num_processes={num_processes})")
  if ":" not in coordinator_address:
    raise ValueError(f"--coordinator_address={coordinator_address!r} must be HOST:PORT, e.g. 10.0.0.1:1234")
  if num_processes > 1 and cpu_tuning.backend_will_be_cpu():
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address, num_processes=num_processes, process_id=process_id)


def initialize_from_flags() -> None:
  """`initialize` with the values of the flags above (call after absl parsed them)."""
  initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value, auto_detect=_DISTRIBUTED.value)
