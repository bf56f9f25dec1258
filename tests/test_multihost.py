"""Training as several real processes (jax.distributed on 127.0.0.1, gloo collectives, fake CPU devices).

The training command (`python -m dinov2_jax.main`, demo config, a tiny model) launched as 1 process x
8 devices and as 2 processes x 4 devices must see the same data and give the same losses, the same
final checkpoint and the same exported teacher, also when both processes are killed (SIGKILL) and
restarted mid-run; a preemption notice (SIGTERM) to one process must stop both at the same step with
a checkpoint.
"""

import json
import os
import signal

import numpy as np
import pytest

from safetensors.numpy import load_file as read_safetensors
from tests.multiprocess import ProcessGroup

STEPS = 12
# The demo recipe with a tiny model, 8 data shards of 2 images, a log line and loss record per step.
OVERRIDES = [
    "--config.batch_size=16", "--config.epoch_length=4", "--config.optim.epochs=3",
    "--config.optim.warmup_epochs=1", "--config.optim.freeze_last_layer_epochs=0.5",
    "--config.teacher.warmup_teacher_temp_epochs=1",
    "--config.student.embed_dim=32", "--config.student.depth=2", "--config.student.num_heads=2",
    "--config.crops.local_crops_number=2",
    "--config.dino.head_n_prototypes=64", "--config.dino.head_hidden_dim=32", "--config.dino.head_bottleneck_dim=16",
    "--config.ibot.head_n_prototypes=64", "--config.ibot.head_hidden_dim=32", "--config.ibot.head_bottleneck_dim=16",
    "--config.fsdp_min_size=256",
    "--config.log_every_steps=1", "--config.checkpoint_every_steps=4", "--config.keep_checkpoints=2",
    "--config.knn_eval.enabled=False",
]
TIMEOUT = 420


# Parameters and optimizer state sharded over all 8 devices (across the processes), FSDP-style.
FSDP_ACROSS_PROCESSES = ["--config.mesh=(('data', 1), ('fsdp', 8))"]


def _command(workdir, extra=(), mesh=tuple(FSDP_ACROSS_PROCESSES)):
  return ["python", "-m", "dinov2_jax.main", "--config", "demo", "--workdir", str(workdir),
          *OVERRIDES, *mesh, *extra]


def _launch(group, workdir, n_processes):
  if n_processes == 1:
    group.start([_command(workdir)])
  else:
    group.start([_command(workdir, group.coordinator_flags(i, n_processes)) for i in range(n_processes)])


def _losses(workdir):
  """{step: {loss name: value}} from metrics.jsonl (the last record of a step wins after a resume)."""
  out = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      record = json.loads(line)
      out[record["step"]] = {k: v for k, v in record.items() if k.endswith("_loss")}
  return out


def _complete_checkpoints(workdir):
  root = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(root):
    return []
  return sorted(int(name) for name in os.listdir(root) if name.isdigit())


def _assert_losses_equal(got, want, steps):
  for step in steps:
    for name, value in want[step].items():
      np.testing.assert_allclose(got[step][name], value, rtol=2e-5, atol=2e-6, err_msg=f"step {step} {name}")


def _wait_for_checkpoint(group, workdir, timeout=TIMEOUT):
  import time
  deadline = time.monotonic() + timeout
  while not _complete_checkpoints(workdir):
    if any(p.poll() is not None for p in group.procs) or time.monotonic() > deadline:
      group.kill()
      raise AssertionError(group._report("no checkpoint appeared"))  # pylint: disable=protected-access
    time.sleep(0.05)


@pytest.fixture(scope="module")
def single_process_run(tmp_path_factory):
  """The reference: 1 process x 8 devices, uninterrupted."""
  root = tmp_path_factory.mktemp("one_process")
  with ProcessGroup(root / "logs", devices_per_process=8) as group:
    _launch(group, root / "run", 1)
    group.wait(TIMEOUT)
  return root / "run"


def test_two_processes_train_like_one_also_after_both_are_killed_and_restarted(single_process_run, tmp_path):
  run = tmp_path / "run"
  with ProcessGroup(tmp_path / "logs", devices_per_process=4) as group:
    _launch(group, run, 2)
    _wait_for_checkpoint(group, run)
    group.kill()  # SIGKILL to both, wherever they are (maybe in the middle of a later save)
    killed_at = _complete_checkpoints(run)[-1]
    assert killed_at < STEPS
    _launch(group, run, 2)
    outputs = group.wait(TIMEOUT)
  assert f"resumed from {run / 'checkpoints'}/{killed_at}" in outputs[0] and "in 2 process(es)" in outputs[0]
  # Every step's losses equal the one-process run's: before the kill (the same data, masks and
  # per-shard maths on 2 x 4 devices as on 1 x 8) and after the restart (resumed exactly).
  got = _losses(run)
  assert sorted(got) == list(range(1, STEPS + 1))  # one record per step, from process 0 only
  _assert_losses_equal(got, _losses(single_process_run), range(1, STEPS + 1))
  # One complete set of final checkpoints, nothing half-written left.
  assert _complete_checkpoints(run) == _complete_checkpoints(single_process_run) == [STEPS - 4, STEPS]
  assert not [n for n in os.listdir(run / "checkpoints") if not n.isdigit()]
  # The teacher export gathers the FSDP shards of both processes: equal to the one-process export.
  ours = read_safetensors(str(run / "teacher_backbone.safetensors"))
  ref = read_safetensors(str(single_process_run / "teacher_backbone.safetensors"))
  assert sorted(ours) == sorted(ref)
  for key in ref:
    np.testing.assert_allclose(ours[key], ref[key], rtol=1e-5, atol=1e-6, err_msg=key)


def test_sigterm_to_one_process_checkpoints_all_at_the_same_step(tmp_path):
  # Also a two-level mesh as on several nodes: data parallel across the processes (the slow
  # network), FSDP within each one.
  hybrid = ["--config.mesh=(('data', 2), ('fsdp', 4))", "--config.dcn_mesh=(('data', 2),)"]
  with ProcessGroup(tmp_path / "logs", devices_per_process=4) as group:
    group.start([_command(tmp_path / "run", group.coordinator_flags(i, 2), mesh=hybrid) for i in range(2)])
    _wait_for_checkpoint(group, tmp_path / "run")
    group.signal(1, signal.SIGTERM)  # the preemption notice reaches one host only
    outputs = group.wait(TIMEOUT)  # both exit 0, neither hangs
  stops = []
  for out in outputs:
    lines = [l for l in out.splitlines() if l.startswith("preemption notice")]
    assert len(lines) == 1, out[-3000:]
    stops.append(int(lines[0].split("checkpoint of step ")[1].split()[0]))
  assert stops[0] == stops[1] < STEPS
  assert _complete_checkpoints(tmp_path / "run")[-1] == stops[0]
  assert not os.path.exists(tmp_path / "run" / "teacher_backbone.pth")  # stopped early: no export
