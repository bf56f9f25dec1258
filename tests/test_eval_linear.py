"""Meta's linear protocol: the grid, the optimiser against torch, selection without the test split,
scikit-learn baseline, saved heads through `load_classifier`, and the command end to end."""

import json
import os

import numpy as np
import pytest

from dinov2_jax import ViTConfig, create_backbone, load_classifier
from dinov2_jax.api import Backbone
from dinov2_jax.data.eval_transform import eval_transform
from dinov2_jax.eval import datasets as D
from dinov2_jax import recipes
from dinov2_jax.eval import features as F
from dinov2_jax.eval import linear as L
from dinov2_jax.eval import linear_augment as A

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _blobs(n, seed, num_classes=5, dim=8, centers_seed=0):
  """Separable in the CLS tokens of all 4 blocks (the patch mean is noise)."""
  centers = np.random.default_rng(centers_seed).normal(size=(num_classes, 4, dim))
  rng = np.random.default_rng(seed)
  y = rng.integers(0, num_classes, n)
  cls_blocks = (centers[y] + 0.6 * rng.normal(size=(n, 4, dim))).astype(np.float32)
  return {"cls_blocks": cls_blocks, "patch_mean": rng.normal(size=(n, dim)).astype(np.float32)}, y


@pytest.fixture(scope="module")
def blobs():
  return _blobs(600, seed=1), _blobs(200, seed=2)


def test_grid_matches_meta():
  grid = L.classifier_grid()
  assert len(grid) == 52 and len({s.name for s in grid}) == 52
  assert grid[0].name == "classifier_1_blocks_avgpool_False_lr_0_00001"
  assert grid[-1].name == "classifier_4_blocks_avgpool_True_lr_0_10000"
  assert L.ClassifierSpec(4, True, 1e-3).name == "classifier_4_blocks_avgpool_True_lr_0_00100"
  assert [s.lr for s in grid[:13]] == list(L.LEARNING_RATES)
  assert L.ClassifierSpec(4, True, 1e-3).input_dim(384) == 5 * 384


def test_linear_input_is_classifier_layout():
  cls_blocks = np.arange(2 * 4 * 3, dtype=np.float32).reshape(2, 4, 3)
  patch_mean = -np.ones((2, 3), np.float32)
  x = np.asarray(L.linear_input(cls_blocks, patch_mean, 4, True))
  np.testing.assert_array_equal(x[0], np.concatenate([cls_blocks[0, 0], cls_blocks[0, 1], cls_blocks[0, 2],
                                                      cls_blocks[0, 3], patch_mean[0]]))
  np.testing.assert_array_equal(np.asarray(L.linear_input(cls_blocks, patch_mean, 1, False)), cls_blocks[:, 3])


def test_optimiser_matches_torch_sgd_momentum_and_cosine():
  import torch
  (feats, y), _ = _blobs(64, seed=3), None
  specs = [L.ClassifierSpec(1, True, 0.05), L.ClassifierSpec(4, False, 0.01)]
  # Full batches (64 rows, sorted) so both sides see identical data at every step.
  clf = L.train_linear(feats, y, 5, specs, batch_size=64, epochs=7, epoch_length=1, seed=0, log=None)
  init = L.init_params(0, specs, 8, 5)
  for spec, key in zip(specs, ("blocks1_avgpoolTrue", "blocks4_avgpoolFalse")):
    x = torch.tensor(np.asarray(L.linear_input(feats["cls_blocks"], feats["patch_mean"], spec.n_blocks, spec.avgpool)))
    layer = torch.nn.Linear(x.shape[1], 5)
    with torch.no_grad():
      layer.weight.copy_(torch.tensor(init[key]["w"][0].T))
      layer.bias.copy_(torch.tensor(init[key]["b"][0]))
    opt = torch.optim.SGD(layer.parameters(), lr=spec.lr * 64 / 256, momentum=0.9, weight_decay=0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=7, eta_min=0)
    for _ in range(7):
      opt.zero_grad()
      torch.nn.functional.cross_entropy(layer(x), torch.tensor(y)).backward()
      opt.step()
      sched.step()
    head = clf.head(spec.name)
    np.testing.assert_allclose(head["weight"], layer.weight.detach().numpy(), atol=2e-6)
    np.testing.assert_allclose(head["bias"], layer.bias.detach().numpy(), atol=2e-6)


def test_stratified_split():
  labels = np.repeat(np.arange(5), [50, 30, 11, 4, 1])
  train, val = L.stratified_split(labels, 0.1, seed=0)
  # 10% rounded, but at least one of every class that has two or more rows.
  assert np.bincount(labels[val], minlength=5).tolist() == [5, 3, 1, 1, 0]
  assert len(np.intersect1d(train, val)) == 0 and len(train) + len(val) == len(labels)
  np.testing.assert_array_equal(L.stratified_split(labels, 0.1, seed=0)[1], val)
  assert not np.array_equal(L.stratified_split(labels, 0.1, seed=1)[1], val)


def test_blobs_best_reaches_100_and_lr_grid_is_ordered(blobs):
  (train, y), (test, y_test) = blobs
  results, clf = L.linear_evaluate(train, y, test, y_test, 5, batch_size=64, epochs=10, epoch_length=9, log=None)
  scores = results["selection_scores"]
  best = results["best_classifier"]
  assert scores[best]["top1"] == 100.0 and results["eval"]["top1"] >= 99.0
  assert best.startswith("classifier_4_blocks")  # 4 blocks hold 4x the signal of 1 block
  four = [scores[s.name]["top1"] for s in L.classifier_grid([4], [False])]
  assert four[0] < 50 and min(four[7:]) == 100.0  # 1e-5 barely moves; 2e-3 and up all separate
  assert np.mean(four[:4]) < np.mean(four[4:8]) < np.mean(four[8:])
  assert results["selection"] == "heldout" and results["refit_on_full_train"]
  assert [s.name for s in clf.specs] == [best]  # refit: the reported classifier alone, on all train


def test_selection_never_looks_at_the_test_split(blobs):
  (train, y), (test, y_test) = blobs
  kw = dict(batch_size=64, epochs=3, epoch_length=9, log=None, refit=False)
  # Meta's selection on the evaluation split, then a test split poisoned so that the worst
  # classifier (the first in the grid, which also wins ties) is perfect on it.
  meta, meta_clf = L.linear_evaluate(train, y, test, y_test, 5, selection="eval", **kw)
  worst = L.classifier_grid()[0].name
  poisoned_labels = meta_clf.logits(worst, test["cls_blocks"], test["patch_mean"]).argmax(1)
  assert meta["best_classifier"] != worst
  poisoned, _ = L.linear_evaluate(train, y, test, poisoned_labels, 5, selection="eval", **kw)
  assert poisoned["best_classifier"] == worst and poisoned["eval"]["top1"] == 100.0
  # Held-out selection picks the same classifier whatever the test split holds, even garbage.
  clean, _ = L.linear_evaluate(train, y, test, y_test, 5, **kw)
  for test_feats, labels in ((test, poisoned_labels),
                             ({k: np.full_like(v, np.nan) for k, v in test.items()}, np.zeros_like(y_test))):
    other, _ = L.linear_evaluate(train, y, test_feats, labels, 5, **kw)
    assert other["best_classifier"] == clean["best_classifier"] != worst
    assert other["selection_scores"] == clean["selection_scores"]
  assert other["eval"] == {"top1": 0.0, "top5": 0.0}  # NaN logits never count as correct


def test_default_budget_converges_on_a_small_dataset_like_scikit_learn():
  """420 train images: Meta's fixed 10 x 1250 iterations (the default) reach LogisticRegression on the
  same features; a budget of one pass per epoch (30 steps here, the old default) stops far short."""
  from sklearn.datasets import load_digits
  from sklearn.linear_model import LogisticRegression
  from threadpoolctl import threadpool_limits
  from dinov2_jax.data.demo_dataset import _split_indices
  digits = load_digits()
  x = (digits.data / 16.0).astype(np.float32)
  y = digits.target
  tr, te = _split_indices(y, "train"), _split_indices(y, "test")
  tr = np.concatenate([tr[y[tr] == c][:42] for c in range(10)])
  feats = lambda idx: {"cls_blocks": x[idx][:, None], "patch_mean": np.zeros((len(idx), 64), np.float32)}  # noqa: E731
  specs = L.classifier_grid([1], [False])
  with threadpool_limits(1):  # multi-threaded BLAS crawls on a busy 2-core machine
    sk = 100 * LogisticRegression(max_iter=1000).fit(x[tr], y[tr]).score(x[te], y[te])
  default, _ = L.linear_evaluate(feats(tr), y[tr], feats(te), y[te], 10, specs=specs, batch_size=128, log=None)
  one_pass, _ = L.linear_evaluate(feats(tr), y[tr], feats(te), y[te], 10, specs=specs, batch_size=128,
                                  epoch_length=3, log=None)
  assert sk > 90 and abs(default["eval"]["top1"] - sk) < 2.0, (default["eval"], sk)
  assert one_pass["eval"]["top1"] < sk - 5, (one_pass["eval"], sk)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """A tiny backbone, 40 demo digits and their stored features."""
  backbone = Backbone(create_backbone(ViTConfig(img_size=28, patch_size=14, embed_dim=32, depth=4, num_heads=2,
                                                init_values=1.0)))
  data = D.limit_examples(D.DemoDataset("train", 32), 40)
  store = F.extract_features(backbone, data, tmp_path_factory.mktemp("features"), resolution=28, batch_size=16,
                             log=None)
  return backbone, data, store


def test_saved_head_reloads_through_load_classifier(tiny, tmp_path):
  backbone, data, store = tiny
  feats = {n: store.load(n) for n in ("cls_blocks", "patch_mean")}
  specs = [L.ClassifierSpec(1, True, 0.1), L.ClassifierSpec(4, True, 0.1), L.ClassifierSpec(4, False, 0.1)]
  clf = L.train_linear(feats, store.labels, 10, specs, batch_size=16, epochs=2, epoch_length=3, log=None)
  backbone.save(tmp_path / "backbone.safetensors")
  images = np.stack([eval_transform(data.load(i)[0], 28) for i in range(len(data))])
  for spec in specs[:2]:
    head_path = tmp_path / f"{spec.name}.pth"
    clf.save_head(spec.name, str(head_path))
    classifier = load_classifier(tmp_path / "backbone.safetensors", head_path)
    assert classifier.n_layers == spec.n_blocks
    expected = clf.logits(spec.name, feats["cls_blocks"], feats["patch_mean"])
    np.testing.assert_allclose(np.asarray(classifier(images)), expected, atol=1e-5, rtol=1e-5)
  # Extraction also takes a weights path; the reloaded weights give the same features.
  few = D.limit_examples(data, 8)
  from_path = F.extract_features(str(tmp_path / "backbone.safetensors"), few, tmp_path / "from_path",
                                 resolution=28, log=None)
  np.testing.assert_allclose(from_path.load("cls_blocks"), feats["cls_blocks"][few.indices], atol=1e-5)
  head = clf.head(specs[2].name)  # without avgpool: (C, 4 D), not a Meta hub layout
  assert head["weight"].shape == (10, 128) and head["bias"].shape == (10,)


def test_train_time_augmentation_path(tiny):
  backbone, data, store = tiny
  feats = {n: store.load(n) for n in ("cls_blocks", "patch_mean")}
  specs = [L.ClassifierSpec(4, True, 0.1), L.ClassifierSpec(1, False, 0.01)]
  kw = dict(batch_size=16, epochs=2, epoch_length=3, log=None)
  precomputed = L.train_linear(feats, store.labels, 10, specs, **kw)
  # With the evaluation transform as its "augmentation", the on-the-fly path must train exactly
  # the classifiers of the precomputed path: same rows, same batches, same features.
  same = A.AugmentedImages(backbone, data, store.load("index"), resolution=28,
                           transform=lambda image, rng: eval_transform(image, 28))
  on_the_fly = L.train_linear(same, store.labels, 10, specs, **kw)
  for s in specs:
    for key in ("weight", "bias"):
      np.testing.assert_allclose(on_the_fly.head(s.name)[key], precomputed.head(s.name)[key], atol=1e-5)
  # Meta's RandomResizedCrop + flip: seeded, so reproducible, and different from the precomputed path.
  runs = [L.train_linear(A.AugmentedImages(backbone, data, store.load("index"), resolution=28, seed=3), store.labels,
                         10, specs, **kw) for _ in range(2)]
  np.testing.assert_array_equal(runs[0].head(specs[0].name)["weight"], runs[1].head(specs[0].name)["weight"])
  assert not np.allclose(runs[0].head(specs[0].name)["weight"], precomputed.head(specs[0].name)["weight"], atol=1e-4)
  crop = A.random_resized_crop_flip(data.load(0)[0], np.random.default_rng(0), 28)
  assert crop.shape == (28, 28, 3) and crop.dtype == np.float32


def test_linear_command_end_to_end(tmp_path):
  config = recipes.get_config("eval_linear")
  config.output_dir = str(tmp_path)
  config.model.update(depth=4, embed_dim=32, num_heads=2, img_size=28)
  config.resolution = 28
  config.dataset.update(train_limit=300, eval_limit=100)
  config.linear.update(epochs=3, epoch_length=20, batch_size=64)
  config.chunk_size = 128
  results = L.run(config, log=None)
  saved = json.loads((tmp_path / "linear_results.json").read_text())
  assert saved["best_classifier"] == results["best_classifier"]
  assert saved["best_classifier"] in {s.name for s in L.classifier_grid()} and len(saved["selection_scores"]) == 52
  assert saved["num_train"] == 300 and saved["num_eval"] == 100 and saved["selection"] == "heldout"
  assert 20 < saved["eval"]["top1"] <= saved["eval"]["top5"] <= 100
  assert saved["classes"] == [str(c) for c in range(10)] and saved["splits"] == {"train": "train", "eval": "test"}
  assert sum(saved["images_per_class"]["train"].values()) == 300
  assert (tmp_path / "linear_results.md").read_text().count("|") > 20
  if saved["head"]["loads_with_dinov2_jax.load_classifier"]:
    assert (tmp_path / "best_linear_head.pth").exists()
  assert (tmp_path / "features" / "train_blocks4" / "manifest.json").exists()
