"""Feature extraction, k-NN and the linear probe with 2 processes x 4 CPU devices give the results of
1 process x 8 devices, and an interrupted multi-process extraction resumes (real processes joined
through jax.distributed on 127.0.0.1, launched with the commands' own --coordinator_address flags)."""

import json
import re
import signal
import time

import numpy as np
import pytest

from dinov2_jax.eval.store import FeatureStore
from tests.multiprocess import ProcessGroup

COMMON = ["--config.model.depth=2", "--config.model.embed_dim=32", "--config.model.num_heads=2",
          "--config.model.img_size=28", "--config.resolution=28", "--config.dataset.train_limit=150",
          "--config.dataset.eval_limit=50", "--config.batch_size=16", "--config.chunk_size=48"]
TIMEOUT_S = 400


def _command(module, out_dir, extra=()):
  return ["python", "-m", module, f"--config.output_dir={out_dir}", *COMMON, *extra]


def _run(tmp_path, name, module, processes, extra=()):
  out_dir = tmp_path / name
  with ProcessGroup(tmp_path / f"logs_{name}", devices_per_process=8 // processes) as group:
    if processes == 1:
      group.start([_command(module, out_dir, extra)])
    else:
      group.start([_command(module, out_dir, extra) + group.coordinator_flags(i, processes)
                   for i in range(processes)])
    outputs = group.wait(timeout=TIMEOUT_S)
  return out_dir, outputs


def _assert_same_features(a, b):
  for split in ("train", "test"):
    [sa] = [FeatureStore(p) for p in sorted((a / "features").glob(f"{split}_blocks*"))]
    [sb] = [FeatureStore(p) for p in sorted((b / "features").glob(f"{split}_blocks*"))]
    assert sa.complete and sb.complete and sa.names == sb.names
    np.testing.assert_array_equal(sa.labels, sb.labels)
    np.testing.assert_array_equal(sa.load("index"), sb.load("index"))
    for name in sa.names:
      np.testing.assert_allclose(sa.load(name), sb.load(name), atol=1e-5, rtol=1e-5)


def _assert_same_digest(outputs):
  """Every process computed the same results (each prints a digest of its results dict)."""
  digests = [re.search(rf"process {i} of 2: results digest (\w+)", out).group(1) for i, out in enumerate(outputs)]
  assert digests[0] == digests[1], digests


def test_knn_with_2_processes_equals_1_process(tmp_path):
  one, _ = _run(tmp_path, "one", "dinov2_jax.eval.knn", 1)
  two, outputs = _run(tmp_path, "two", "dinov2_jax.eval.knn", 2)
  _assert_same_features(one, two)
  r1, r2 = (json.loads((d / "knn_results.json").read_text()) for d in (one, two))
  assert r1["results"] == r2["results"] and r1["num_train"] == r2["num_train"] == 150
  assert "2 processes, 8 devices in all (4 per process)" in outputs[0]
  _assert_same_digest(outputs)
  # Both processes computed the table; only process 0 printed it.
  assert "| k | top-1 | top-5 |" in outputs[0] and "| k | top-1 | top-5 |" not in outputs[1]


def test_linear_with_2_processes_equals_1_process(tmp_path):
  extra = ["--config.linear.epochs=2", "--config.linear.epoch_length=20", "--config.linear.batch_size=32",
           "--config.linear.n_last_blocks=(1,2)"]
  one, _ = _run(tmp_path, "one", "dinov2_jax.eval.linear", 1, extra)
  two, outputs = _run(tmp_path, "two", "dinov2_jax.eval.linear", 2, extra)
  _assert_same_digest(outputs)
  _assert_same_features(one, two)
  r1, r2 = (json.loads((d / "linear_results.json").read_text()) for d in (one, two))
  assert r1["best_classifier"] == r2["best_classifier"] and r1["eval"] == r2["eval"]
  for name, scores in r1["selection_scores"].items():
    assert r2["selection_scores"][name] == pytest.approx(scores, abs=1e-9)


def test_interrupted_multiprocess_extraction_resumes(tmp_path):
  # ViT-S/14 at 56 px, 20 chunks of 16 images: enough work to stop the processes part-way.
  args = ["--config.resolution=56", "--config.dataset.train_limit=320", "--config.dataset.eval_limit=32",
          "--config.batch_size=16", "--config.chunk_size=16", "--config.knn.ks=(10,20)"]
  command = lambda out_dir: ["python", "-m", "dinov2_jax.eval.knn", f"--config.output_dir={out_dir}", *args]  # noqa: E731
  out_dir = tmp_path / "run"
  manifest = out_dir / "features" / "train_blocks0" / "manifest.json"
  chunks_done = lambda: len(json.loads(manifest.read_text())["chunks"]) if manifest.exists() else 0  # noqa: E731
  with ProcessGroup(tmp_path / "logs", devices_per_process=4) as group:
    group.start([command(out_dir) + group.coordinator_flags(i, 2) for i in range(2)])
    deadline = time.monotonic() + TIMEOUT_S
    while chunks_done() < 3 and time.monotonic() < deadline and all(p.poll() is None for p in group.procs):
      time.sleep(0.02)
    for i in range(2):  # freeze both, then read what is on disk, then kill: a hard interruption
      group.signal(i, signal.SIGSTOP)
    done_before = chunks_done()
    group.kill()
    assert 3 <= done_before < 20, (done_before, group.output(0)[-2000:])
    group.start([command(out_dir) + group.coordinator_flags(i, 2) for i in range(2)])
    outputs = group.wait(timeout=TIMEOUT_S)
  assert f"resuming in {out_dir}" in outputs[0] and f"{done_before}/20 chunks already done" in outputs[0]
  with ProcessGroup(tmp_path / "logs_reference", devices_per_process=8) as group:
    group.start([command(tmp_path / "reference")])
    group.wait(timeout=TIMEOUT_S)
  _assert_same_features(out_dir, tmp_path / "reference")
  r1, r2 = (json.loads((d / "knn_results.json").read_text()) for d in (out_dir, tmp_path / "reference"))
  assert r1["results"] == r2["results"]
