"""Training input pipeline: sources, batch contract, multi-host slicing, determinism, state.

The expectations are restated here from the documented contract (module docstring of
`dinov2_jax.data.pipeline`), not read back from the implementation: example order from grain's
shuffle of the source, masks against their definition, host slices against the single-host batch.
"""

import io
import json
import logging
import os

import grain
import ml_collections
import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata

from dinov2_jax import masking
from dinov2_jax.data import augment
from dinov2_jax.data import pipeline as P

# 28 px global / 14 px local crops with patch 7: a 4 x 4 token grid, fast on 2 cores.
CROPS = augment.MultiCropConfig(global_size=28, local_size=14, n_local=2, patch_size=7)
GRID_TOKENS = (28 // 7) ** 2


def _photos(n=6, size=(40, 52)):
  """n real photographs (scikit-image, bundled), downscaled: (H, W, 3) uint8 RGB."""
  names = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "retina")
  out = []
  for name in names[:n]:
    img = getattr(skdata, name)()
    out.append(np.asarray(Image.fromarray(img).convert("RGB").resize(size[::-1], Image.BILINEAR)))
  return out


def _encode(image, fmt):
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format=fmt)
  return buf.getvalue()


class _IndexedSource:
  """In-memory source whose label is the element's own index: makes the example order visible."""

  def __init__(self, n):
    self.images = _photos(6)
    self.n = n

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    return {"image": self.images[i % len(self.images)], "label": np.int32(i)}


def _iterator(source, **overrides):
  kw = dict(global_batch_size=4, seed=0, multicrop=CROPS, process_index=0, process_count=1,
            prefetch_batches=0)
  kw.update(overrides)
  return P.make_train_iterator(source, **kw)


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert sorted(x) == sorted(y)
    for k in x:
      np.testing.assert_array_equal(np.asarray(x[k]), np.asarray(y[k]), err_msg=k)


@pytest.fixture(scope="module")
def demo_source():
  return P.DemoImageSource("train", 32)


# ---------------------------------------------------------------------------------------------
# Sources.


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  """A tiny array_record TFDS dataset built locally from real photos (PNG and JPEG bytes)."""
  tfds = pytest.importorskip("tensorflow_datasets")
  photos = _photos(6)

  class PipelineTestPhotos(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(shape=(None, None, 3)),
          "label": tfds.features.ClassLabel(num_classes=len(photos)),
          "file_name": tfds.features.Text(),
      }))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for i, photo in enumerate(photos):
        # Even indices as PNG (lossless), odd ones as JPEG.
        fmt = "PNG" if i % 2 == 0 else "JPEG"
        yield i, {"image": _encode(photo, fmt), "label": i, "file_name": f"{i}.{fmt.lower()}"}

  # TFDS looks up the code path of builders defined in a package module with
  # `importlib_resources`, which it does not depend on and which is not installed; a one-part
  # module name takes the path that needs nothing.
  PipelineTestPhotos.__module__ = "pipeline_test_photos"
  data_dir = tmp_path_factory.mktemp("tfds")
  builder = PipelineTestPhotos(data_dir=str(data_dir), file_format="array_record")
  builder.download_and_prepare()
  return str(data_dir), builder.name, photos


def test_tfds_source_reads_a_locally_prepared_array_record_dataset(tfds_dir):
  data_dir, name, photos = tfds_dir
  source = P.TfdsImageSource(name, split="train", data_dir=data_dir)
  assert len(source) == len(photos)
  seen = set()
  for i in range(len(source)):
    element = source[i]
    assert sorted(element) == ["image", "label"]  # file_name is dropped
    image, label = element["image"], int(element["label"])
    assert image.dtype == np.uint8 and image.shape == photos[label].shape
    if label % 2 == 0:
      np.testing.assert_array_equal(image, photos[label])  # PNG: lossless
    else:
      assert np.abs(image.astype(int) - photos[label]).mean() < 8  # JPEG
    seen.add(label)
  assert seen == set(range(len(photos)))
  assert source.num_skipped == 0

  # Through the config factory and the pipeline: labels come along.
  config = ml_collections.ConfigDict(
      {"dataset": {"kind": "tfds", "name": name, "split": "train", "data_dir": data_dir}})
  batch = next(_iterator(P.make_source(config)))
  assert batch["global_crops"].shape == (8, 28, 28, 3) and batch["labels"].shape == (4,)


def test_tfds_missing_dataset_names_the_fix_and_downloads_nothing(tmp_path):
  pytest.importorskip("tensorflow_datasets")
  # A registered TFDS dataset that is not prepared here: TFDS alone would report a file format.
  with pytest.raises(FileNotFoundError, match=r"not prepared.*\n  tfds build mnist --data_dir"):
    P.TfdsImageSource("mnist", data_dir=str(tmp_path))
  with pytest.raises(FileNotFoundError, match="--manual_dir"):
    P.TfdsImageSource("imagenet2012", data_dir=str(tmp_path))
  with pytest.raises(FileNotFoundError, match="neither prepared .* nor a known TFDS dataset"):
    P.TfdsImageSource("no_such_dataset_xyz", data_dir=str(tmp_path))
  assert os.listdir(tmp_path) == []


def test_tfds_unknown_split_names_the_config_field(tfds_dir):
  data_dir, name, _ = tfds_dir
  with pytest.raises(ValueError, match="config.dataset.split='validation'"):
    P.TfdsImageSource(name, split="validation", data_dir=data_dir)


@pytest.fixture()
def image_tree(tmp_path):
  """Nested folders, mixed and upper-case suffixes, a corrupt and a truncated file, non-images."""
  photos = _photos(6)
  files = {
      "UPPER.PNG": _encode(photos[0], "PNG"),
      "a/b/c/deep.JPG": _encode(photos[1], "JPEG"),
      "a/b/truncated.png": _encode(photos[2], "PNG")[:900],
      "a/corrupt.jpg": b"\xff\xd8\xff\xe0 definitely not a jpeg" * 10,
      "a/x.png": _encode(photos[3], "PNG"),
      "y.webp": _encode(photos[4], "WEBP"),
      "z.jpeg": _encode(photos[5], "JPEG"),
      "notes.txt": b"not an image",
      "a/b/.hidden.jpg": _encode(photos[0], "JPEG"),
  }
  for rel, content in files.items():
    path = tmp_path / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
  return tmp_path, photos


def test_folder_source_lists_images_at_any_depth_sorted_case_insensitively(image_tree):
  root, photos = image_tree
  source = P.FolderImageSource(str(root))
  assert source.files == ["UPPER.PNG", "a/b/c/deep.JPG", "a/b/truncated.png", "a/corrupt.jpg",
                          "a/x.png", "y.webp", "z.jpeg"]
  np.testing.assert_array_equal(source[0]["image"], photos[0])
  np.testing.assert_array_equal(source[4]["image"], photos[3])
  assert sorted(source[5]) == ["image"] and source[5]["image"].shape == photos[4].shape


def test_folder_source_skips_counts_and_reports_unreadable_files(image_tree, caplog):
  root, _ = image_tree
  source = P.FolderImageSource(str(root))
  with caplog.at_level(logging.INFO):
    elements = [source[i] for i in range(len(source))]
  # Both bad files are replaced by the next readable one, a/x.png (index 4).
  for i in (2, 3):
    np.testing.assert_array_equal(elements[i]["image"], elements[4]["image"])
  assert source.num_skipped == 2
  assert source.skipped == ["a/b/truncated.png", "a/corrupt.jpg"]
  assert source.num_replaced == 2
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert sum("Skipping unreadable image a/b/truncated.png" in w for w in warnings) == 1
  assert any("skipped 2 unreadable of 7" in w for w in warnings)  # summary at the 2nd skip
  assert "a/corrupt.jpg" in source.summary() and "truncated.png" in source.summary()

  # Iteration never stops; known-bad files are not decoded again nor counted twice.
  it = _iterator(source, global_batch_size=2)
  batches = _take(it, 8)  # 16 examples: every file at least twice
  assert all(b["global_crops"].shape == (4, 28, 28, 3) for b in batches)
  assert "labels" not in batches[0]
  assert source.num_skipped == 2


def test_folder_source_errors(tmp_path):
  with pytest.raises(ValueError, match="no images found"):
    P.FolderImageSource(str(tmp_path))
  (tmp_path / "sub").mkdir()
  (tmp_path / "sub" / "readme.txt").write_text("x")
  with pytest.raises(ValueError, match="no images found"):
    P.FolderImageSource(str(tmp_path))
  with pytest.raises(FileNotFoundError, match="does not exist"):
    P.FolderImageSource(str(tmp_path / "missing"))
  # Only unreadable files: reading fails loudly instead of looping.
  (tmp_path / "bad.jpg").write_bytes(b"garbage")
  with pytest.raises(RuntimeError, match="None of the 1 images can be read"):
    P.FolderImageSource(str(tmp_path))[0]


def test_demo_source_and_make_source(demo_source, tmp_path):
  assert len(demo_source) == 1352
  element = demo_source[3]
  assert element["image"].shape == (32, 32, 3) and element["image"].dtype == np.uint8
  assert element["label"].dtype == np.int32 and 0 <= element["label"] < 10

  made = P.make_source(ml_collections.ConfigDict(
      {"dataset": {"kind": "demo"}, "crops": {"global_size": 28}}))
  assert isinstance(made, P.DemoImageSource) and made[0]["image"].shape == (28, 28, 3)
  Image.fromarray(element["image"]).save(tmp_path / "one.png")
  made = P.make_source(ml_collections.ConfigDict(
      {"dataset": {"kind": "folder", "path": str(tmp_path)}}))
  assert isinstance(made, P.FolderImageSource) and len(made) == 1
  with pytest.raises(ValueError, match=r"config.dataset.kind='hdf5' is not one of .*'folder'"):
    P.make_source(ml_collections.ConfigDict({"dataset": {"kind": "hdf5"}}))
  with pytest.raises(ValueError, match="config.dataset.path"):
    P.make_source(ml_collections.ConfigDict({"dataset": {"kind": "folder"}}))


# ---------------------------------------------------------------------------------------------
# Batches.


def test_batch_shapes_dtypes_and_static_mask_length(demo_source):
  spec = P.train_batch_spec(4, CROPS, labels=True)
  upperbound = masking.mask_upperbound(8, GRID_TOKENS)
  assert spec["mask_indices"][0] == (upperbound,)
  for batch in _take(_iterator(demo_source), 4):
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == spec


def test_masks_agree_with_indices_weights_and_validity(demo_source):
  n_masked_seen = set()
  for batch in _take(_iterator(demo_source, global_batch_size=8), 6):
    masks, idx = batch["masks"], batch["mask_indices"]
    valid, weights = batch["mask_valid"], batch["mask_weights"]
    n = int(masks.sum())
    n_masked_seen.add(n)
    np.testing.assert_array_equal(valid, np.arange(len(valid)) < n)  # a prefix
    np.testing.assert_array_equal(idx[:n], np.flatnonzero(masks))
    assert not idx[n:].any() and not weights[n:].any()  # padding: index 0, weight 0
    per_crop = masks.sum(axis=1)
    np.testing.assert_allclose(weights[:n], 1.0 / per_crop[idx[:n] // GRID_TOKENS])
    # Each masked crop's weights sum to 1; at most int(2b * 0.5) crops are masked.
    np.testing.assert_allclose(weights.sum(), (per_crop > 0).sum(), rtol=1e-6)
    assert 0 < (per_crop > 0).sum() <= 8
  assert len(n_masked_seen) > 1  # the mask ratio varies between steps


def test_example_order_is_the_shuffled_source_and_every_epoch_is_a_permutation():
  source = _IndexedSource(10)
  batches = _take(_iterator(source, global_batch_size=5), 4)  # two epochs
  labels = np.concatenate([b["labels"] for b in batches])
  # The documented stream: source -> seed -> shuffle -> repeat, read in order.
  stream = grain.MapDataset.source(source).seed(0).shuffle().repeat()
  np.testing.assert_array_equal(labels, [stream[j]["label"] for j in range(20)])
  assert sorted(labels[:10]) == list(range(10)) and sorted(labels[10:]) == list(range(10))
  assert list(labels[:10]) != list(labels[10:])  # reshuffled each epoch


def test_crops_are_normalised_uint8_crops(demo_source):
  raw = next(_iterator(demo_source, normalize=False))
  norm = next(_iterator(demo_source))
  assert raw["global_crops"].dtype == np.uint8
  np.testing.assert_array_equal(norm["global_crops"], augment.imagenet_normalize(raw["global_crops"]))
  np.testing.assert_array_equal(norm["local_crops"], augment.imagenet_normalize(raw["local_crops"]))
  np.testing.assert_array_equal(norm["masks"], raw["masks"])


def test_same_seed_same_batches_other_seed_other_batches(demo_source):
  a = _take(_iterator(demo_source), 3)
  _assert_batches_equal(a, _take(_iterator(demo_source, prefetch_batches=2), 3))
  other = _take(_iterator(demo_source, seed=1), 3)
  assert not np.array_equal(a[0]["global_crops"], other[0]["global_crops"])
  assert not np.array_equal(a[0]["masks"], other[0]["masks"])


def test_output_does_not_depend_on_worker_count(demo_source):
  it = _iterator(demo_source, worker_count=2)
  try:
    with_workers = [{k: np.array(v) for k, v in b.items()} for b in _take(it, 4)]
  finally:
    it.close()
  _assert_batches_equal(_take(_iterator(demo_source), 4), with_workers)


def test_batches_depend_on_the_shards_not_on_the_hosts():
  # 4 data shards of 2 images: 1 host holding all 4, or 2 hosts holding 2 each, or one host asking
  # for an arbitrary subset, see exactly the same rows for every shard (crops and masks).
  source = _IndexedSource(40)
  single = _take(_iterator(source, global_batch_size=8, num_shards=4, shards=[0, 1, 2, 3]), 3)
  hosts = [_take(_iterator(source, global_batch_size=8, num_shards=4, process_index=p, process_count=2), 3)
           for p in range(2)]
  odd = _take(_iterator(source, global_batch_size=8, num_shards=4, shards=[3, 1]), 3)
  per_shard = {"global_crops": 4, "local_crops": 2 * CROPS.n_local, "masks": 4,
               "mask_indices": masking.mask_upperbound(4, GRID_TOKENS), "labels": 2}
  per_shard["mask_weights"] = per_shard["mask_valid"] = per_shard["mask_indices"]

  def shard(batch, i, key):  # rows of the i-th shard the batch holds
    n = per_shard[key]
    return batch[key][i * n:(i + 1) * n]

  stream = grain.MapDataset.source(source).seed(0).shuffle().repeat()
  for step in range(3):
    assert hosts[0][step]["global_crops"].shape == (8, 28, 28, 3)  # 2 shards x 2 crops x 2 images
    for key in per_shard:
      np.testing.assert_array_equal(single[step][key], np.concatenate([hosts[0][step][key], hosts[1][step][key]]))
      np.testing.assert_array_equal(shard(odd[step], 0, key), shard(single[step], 3, key))
      np.testing.assert_array_equal(shard(odd[step], 1, key), shard(single[step], 1, key))
    # Shard s of step k holds the stream's examples [8 k + 2 s, 8 k + 2 s + 2).
    np.testing.assert_array_equal(single[step]["labels"], [stream[8 * step + j]["label"] for j in range(8)])
    # Each shard is crop-major (Meta's per-GPU collate) and has its own masks (Meta's per-GPU draw).
    for s in range(4):
      masks = shard(single[step], s, "masks")
      assert 0 < (masks.sum(1) > 0).sum() <= 2  # int(4 * 0.5) masked crops per shard
      n = int(masks.sum())
      np.testing.assert_array_equal(shard(single[step], s, "mask_indices")[:n], np.flatnonzero(masks))
    assert not np.array_equal(shard(single[step], 0, "masks"), shard(single[step], 1, "masks"))


def test_host_slicing_errors(demo_source):
  with pytest.raises(ValueError, match="global_batch_size=5 must be a positive multiple of the 2 data shards"):
    _iterator(demo_source, global_batch_size=5, process_index=0, process_count=2)
  with pytest.raises(ValueError, match=r"shards=\[4\] must be a non-empty list of indices in \[0, 4\)"):
    _iterator(demo_source, num_shards=4, shards=[4])
  with pytest.raises(ValueError, match="process_index=2"):
    _iterator(demo_source, process_index=2, process_count=2)


# ---------------------------------------------------------------------------------------------
# Iterator state.


def test_restored_state_continues_exactly_where_the_run_was(demo_source, caplog):
  run = _iterator(demo_source, prefetch_batches=2)  # prefetching must not leak into the state
  _take(run, 3)
  state = json.loads(json.dumps(run.get_state()))
  assert state == {"step": 3, "seed": 0, "global_batch_size": 4, "num_shards": 1}
  expected = _take(run, 3)

  fresh = _iterator(demo_source)
  fresh.set_state(state)
  _assert_batches_equal(expected, _take(fresh, 3))
  # `start_step` is the same as restoring that step, and rewinding a live iterator works too.
  _assert_batches_equal(expected, _take(_iterator(demo_source, start_step=3), 3))
  run.set_state(state)
  _assert_batches_equal(expected, _take(run, 3))
  # A state from another seed is restorable, but not silently.
  with caplog.at_level(logging.WARNING):
    _iterator(demo_source, seed=1).set_state(state)
  assert any("seed=0" in r.getMessage() for r in caplog.records)


def test_orbax_checkpoint_manager_round_trip(demo_source, tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  run = _iterator(demo_source)
  _take(run, 2)
  params = {"w": np.arange(3.0)}
  with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
    manager.save(2, args=ocp.args.Composite(
        params=ocp.args.StandardSave(params), data=P.checkpoint_save_args(run)))
    manager.wait_until_finished()
  expected = _take(run, 2)

  resumed = _iterator(demo_source)
  with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
    restored = manager.restore(manager.latest_step(), args=ocp.args.Composite(
        params=ocp.args.StandardRestore(params), data=P.checkpoint_restore_args(resumed)))
  np.testing.assert_array_equal(restored["params"]["w"], params["w"])
  assert resumed.get_state()["step"] == 2
  _assert_batches_equal(expected, _take(resumed, 2))


def test_iterator_from_config(demo_source):
  # Meta's YAML names, as the project's default config uses them; unset strings mean "default".
  config = ml_collections.ConfigDict({
      "seed": 3, "batch_size": 6, "data_workers": 0,
      "dataset": {"kind": "demo", "name": "", "split": "train", "data_dir": "", "path": "",
                  "image_size": 32},
      "crops": {"global_crops_size": 28, "local_crops_size": 14, "local_crops_number": 3,
                "global_crops_scale": (0.32, 1.0), "local_crops_scale": (0.05, 0.32),
                "blur_mode": "meta"},
      "ibot": {"mask_ratio_min_max": (0.1, 0.5), "mask_sample_probability": 0.5},
  })
  it = P.make_train_iterator_from_config(config, patch_size=7, start_step=5, process_index=0,
                                         process_count=1)
  batch = next(it)
  assert batch["global_crops"].shape == (12, 28, 28, 3)
  assert batch["local_crops"].shape == (18, 14, 14, 3)
  assert batch["masks"].shape == (12, GRID_TOKENS)
  assert it.get_state() == {"step": 6, "seed": 3, "global_batch_size": 6, "num_shards": 1}
  multicrop = P.multicrop_from_config(config, 7)
  assert multicrop == augment.MultiCropConfig(global_size=28, local_size=14, n_local=3,
                                              patch_size=7, blur_mode="meta")
  _assert_batches_equal([batch], [next(_iterator(
      demo_source, global_batch_size=6, seed=3, multicrop=multicrop, start_step=5))])
  # The short aliases name the same fields.
  short = ml_collections.ConfigDict({"crops": {"global_size": 28, "local_size": 14, "n_local": 3,
                                               "blur_mode": "meta"}})
  assert P.multicrop_from_config(short, 7) == multicrop
