"""Meta's k-NN protocol against a plain float64 re-derivation, scikit-learn, and the command end to end."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from dinov2_jax.eval import devices
from dinov2_jax.eval import knn

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def reference_knn(train, train_labels, test, test_labels, num_classes, ks=(10, 20, 100, 200), T=0.07):
  """Meta's protocol written plainly in float64 numpy. Returns ({k: (Q, C) scores}, {k: (top1 %, top5 %)})."""
  train = train / np.linalg.norm(train, axis=1, keepdims=True)
  test = test / np.linalg.norm(test, axis=1, keepdims=True)
  max_k = min(max(ks), len(train))
  scores = {k: np.zeros((len(test), num_classes)) for k in ks}
  for q in range(len(test)):
    sims = train @ test[q]
    nearest = np.argsort(-sims, kind="stable")[:max_k]
    weights = np.exp((sims[nearest] - sims[nearest].max()) / T)
    weights /= weights.sum()  # softmax over all max_k neighbours
    for k in ks:
      for rank, j in enumerate(nearest[:k]):  # not renormalised over the first k
        scores[k][q, train_labels[j]] += weights[rank]
  accuracy = {}
  for k in ks:
    s = scores[k]
    true = s[np.arange(len(test)), test_labels]
    rank = (s >= true[:, None]).sum(1) - 1  # other classes scoring at least as high as the truth
    accuracy[k] = (100 * np.mean(rank < 1), 100 * np.mean(rank < 5))
  return scores, accuracy


def _blobs(n_train, n_test, dim, num_classes, seed, spread=2.0):
  rng = np.random.default_rng(seed)
  centers = rng.normal(size=(num_classes, dim))
  y_train, y_test = rng.integers(0, num_classes, n_train), rng.integers(0, num_classes, n_test)
  x_train = (centers[y_train] + spread * rng.normal(size=(n_train, dim))).astype(np.float32)
  x_test = (centers[y_test] + spread * rng.normal(size=(n_test, dim))).astype(np.float32)
  return x_train, y_train, x_test, y_test


def test_knn_matches_float64_reference_with_chunked_bank():
  x_train, y_train, x_test, y_test = _blobs(700, 53, 16, 9, seed=0)
  ref_scores, ref_acc = reference_knn(x_train.astype(np.float64), y_train, x_test.astype(np.float64), y_test, 9)
  # The bank arrives as uneven pieces and is streamed in chunks of 96 rows: every query's top-200
  # spans many chunk boundaries and the last chunk is padded.
  pieces = [x_train[:250], x_train[250:251], x_train[251:]]
  label_pieces = [y_train[:250], y_train[250:251], y_train[251:]]
  sims, labels = knn.knn_topk(x_test, pieces, label_pieces, 200, bank_chunk=96, query_block=4)
  order = np.argsort(-(x_test / np.linalg.norm(x_test, axis=1, keepdims=True))
                     @ (x_train / np.linalg.norm(x_train, axis=1, keepdims=True)).T, axis=1, kind="stable")[:, :200]
  np.testing.assert_array_equal(labels, y_train[order])
  assert np.all(np.diff(sims, axis=1) <= 0)
  scores = knn.class_scores(sims, labels, 9)
  for k in (10, 20, 100, 200):
    np.testing.assert_allclose(scores[k], ref_scores[k], atol=1e-5)
  result = knn.knn_evaluate(pieces, label_pieces, x_test, y_test, 9, bank_chunk=96, batch=20)
  for k in (10, 20, 100, 200):
    assert result["k"][k]["top1"] == pytest.approx(ref_acc[k][0])
    assert result["k"][k]["top5"] == pytest.approx(ref_acc[k][1])
    np.testing.assert_array_equal(result["predictions"][k], ref_scores[k].argmax(1))
  assert 0 < result["k"][20]["top1"] < 100 and result["k"][20]["top5"] > result["k"][20]["top1"]


def test_topk_correct_counts_ties_and_nans_against_the_truth():
  scores = np.array([[0.5, 0.5, 0.0], [0.2, 0.7, 0.1], [np.nan, 0.1, 0.2], [0.3, 0.3, 0.3]], np.float32)
  labels = np.array([0, 1, 2, 2])
  assert np.asarray(knn.topk_correct(scores, labels, 1)).tolist() == [False, True, False, False]
  assert np.asarray(knn.topk_correct(scores, labels, 2)).tolist() == [True, True, True, False]
  assert np.asarray(knn.topk_correct(scores, labels, 3)).tolist() == [True, True, True, True]


def test_ties_do_not_change_the_result():
  # Every train row appears twice with the same label: the top-k is full of exact ties, and the
  # answer must not depend on which copy is taken.
  x_train, y_train, x_test, y_test = _blobs(120, 30, 8, 5, seed=1)
  x2, y2 = np.concatenate([x_train, x_train]), np.concatenate([y_train, y_train])
  ks = (10, 20, 100, 200)
  _, ref_acc = reference_knn(x2.astype(np.float64), y2, x_test.astype(np.float64), y_test, 5, ks)
  for perm_seed, chunk in ((0, 50), (1, 240)):
    perm = np.random.default_rng(perm_seed).permutation(len(x2))
    result = knn.knn_evaluate(x2[perm], y2[perm], x_test, y_test, 5, ks=ks, bank_chunk=chunk)
    for k in ks:
      assert (result["k"][k]["top1"], result["k"][k]["top5"]) == pytest.approx(ref_acc[k])


def test_bank_smaller_than_k_and_single_device_mesh():
  x_train, y_train, x_test, y_test = _blobs(150, 21, 8, 4, seed=2)
  _, ref_acc = reference_knn(x_train.astype(np.float64), y_train, x_test.astype(np.float64), y_test, 4)
  eight = knn.knn_evaluate(x_train, y_train, x_test, y_test, 4, bank_chunk=64)
  one = knn.knn_evaluate(x_train, y_train, x_test, y_test, 4, bank_chunk=64, mesh=devices.data_mesh(jax.devices()[:1]))
  for k in (10, 20, 100, 200):
    assert (eight["k"][k]["top1"], eight["k"][k]["top5"]) == pytest.approx(ref_acc[k])
    assert eight["k"][k] == one["k"][k]


def test_knn_close_to_scikit_learn_on_digits():
  from sklearn.datasets import load_digits
  from sklearn.neighbors import KNeighborsClassifier
  from threadpoolctl import threadpool_limits
  from dinov2_jax.data.demo_dataset import _split_indices
  digits = load_digits()
  x, y = digits.data.astype(np.float32), digits.target
  train, test = _split_indices(y, "train"), _split_indices(y, "test")
  ours = knn.knn_evaluate(x[train], y[train], x[test], y[test], 10, ks=(10, 20))
  for k in (10, 20):
    # Cosine distance-weighted vote: the nearest sklearn has to Meta's softmax(sim / 0.07) weights.
    sk = KNeighborsClassifier(n_neighbors=k, metric="cosine", weights="distance").fit(x[train], y[train])
    with threadpool_limits(1):  # multi-threaded BLAS crawls on a busy 2-core machine
      sk_top1 = 100 * sk.score(x[test], y[test])
    assert ours["k"][k]["top1"] > 95 and abs(ours["k"][k]["top1"] - sk_top1) < 2.0, (k, ours["k"][k], sk_top1)


def test_knn_command_end_to_end(tmp_path):
  # Run from another folder, with the recipe by name, as after `pip install`.
  cmd = [sys.executable, "-m", "dinov2_jax.eval.knn", "--config", "eval_knn",
         f"--config.output_dir={tmp_path}", "--config.model.depth=2", "--config.model.embed_dim=32",
         "--config.model.num_heads=2", "--config.model.img_size=28", "--config.resolution=28",
         "--config.dataset.train_limit=300", "--config.dataset.eval_limit=100", "--config.knn.ks=(5,20)"]
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu",
         "PYTHONPATH": REPO}
  out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "| k | top-1 | top-5 |" in out.stdout and "images/s" in out.stdout
  results = json.loads((tmp_path / "knn_results.json").read_text())
  assert results["num_train"] == 300 and results["num_eval"] == 100 and set(results["results"]) == {"5", "20"}
  for m in results["results"].values():
    assert 20 < m["top1"] <= m["top5"] <= 100  # digits, 10 classes: well above chance
  assert results["model"]["depth"] == 2 and (tmp_path / "knn_results.md").exists()
  assert results["classes"] == [str(c) for c in range(10)]
  assert sum(results["images_per_class"]["eval"].values()) == 100
  # A second run reuses the features and says so.
  again = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
  assert again.returncode == 0 and again.stdout.count("reusing the") == 2, again.stdout
  assert json.loads((tmp_path / "knn_results.json").read_text())["results"] == results["results"]
