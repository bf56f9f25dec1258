"""Feature extraction for the evaluations: correctness, sharding, chunked resume, datasets."""

import io
import json
import os

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from dinov2_jax import ViTConfig, create_backbone
from dinov2_jax.api import Backbone
from dinov2_jax.data.eval_transform import eval_transform
from dinov2_jax.eval import datasets as D
from dinov2_jax.eval import devices
from dinov2_jax.eval import features as F

TINY = ViTConfig(img_size=28, patch_size=14, embed_dim=32, depth=4, num_heads=2, init_values=1.0)


@pytest.fixture(scope="module")
def backbone():
  return Backbone(create_backbone(TINY, num_register_tokens=2))


@pytest.fixture(scope="module")
def digits():
  return D.limit_examples(D.DemoDataset("train", image_size=32), 50)


class RecordingDataset:
  """Wraps a dataset and records which indices were loaded."""

  def __init__(self, dataset):
    self.dataset, self.loaded = dataset, []
    self.name, self.class_names = dataset.name, dataset.class_names

  def __len__(self):
    return len(self.dataset)

  def load(self, index):
    self.loaded.append(index)
    return self.dataset.load(index)

  def content_fingerprint(self):
    return self.dataset.content_fingerprint()


def _extract(backbone, dataset, path, **kw):
  kw = {"resolution": 28, "batch_size": 12, "chunk_size": 16, "log": None, "spec": F.FeatureSpec(4, True), **kw}
  return F.extract_features(backbone, dataset, path, **kw)


def test_features_equal_meta_api_outputs(backbone, digits, tmp_path):
  store = _extract(backbone, digits, tmp_path)
  images = np.stack([eval_transform(digits.load(i)[0], 28) for i in range(len(digits))])
  ff = backbone.forward_features(images)
  layers = backbone.get_intermediate_layers(images, n=4, return_class_token=True)
  np.testing.assert_allclose(store.load("cls"), ff["x_norm_clstoken"], atol=2e-5)
  np.testing.assert_allclose(store.load("patch_mean"), np.mean(ff["x_norm_patchtokens"], axis=1), atol=2e-5)
  np.testing.assert_allclose(store.load("registers"), ff["x_norm_regtokens"], atol=2e-5)
  np.testing.assert_allclose(store.load("cls_blocks"), np.stack([c for _, c in layers], axis=1), atol=2e-5)
  np.testing.assert_array_equal(store.labels, [digits.load(i)[1] for i in range(len(digits))])
  np.testing.assert_array_equal(store.load("index"), np.arange(len(digits)))
  assert store.complete and store.num_rows == 50 and store.manifest["num_chunks"] == 4


def test_resume_after_interruption_recomputes_nothing(backbone, digits, tmp_path):
  full = _extract(backbone, digits, tmp_path / "full")

  class Interrupted(Exception):
    pass

  def stop_after_two(chunk):
    if chunk == 1:
      raise Interrupted

  with pytest.raises(Interrupted):
    _extract(backbone, digits, tmp_path / "resumed", on_chunk=stop_after_two)
  partial = F.FeatureStore(tmp_path / "resumed")
  assert not partial.complete and sorted(partial.manifest["chunks"]) == ["0", "1"]
  with pytest.raises(RuntimeError, match="incomplete"):
    partial.load("cls")

  recording = RecordingDataset(digits)
  resumed = _extract(backbone, recording, tmp_path / "resumed")
  assert resumed.computed_chunks == [2, 3]
  assert min(recording.loaded) == 32  # chunks 0 and 1 (images 0-31) were not loaded again
  for name in full.names:
    np.testing.assert_array_equal(resumed.load(name), full.load(name))
  # A complete store is reused without loading any image.
  again = RecordingDataset(digits)
  assert _extract(backbone, again, tmp_path / "resumed").computed_chunks == [] and again.loaded == []


def test_sharded_over_8_devices_equals_single_device(backbone, digits, tmp_path):
  assert jax.device_count() == 8
  # 50 images in batches of 12 -> padded to 16 per 8-device step; trimmed afterwards.
  eight = _extract(backbone, digits, tmp_path / "eight", mesh=devices.data_mesh())
  one = _extract(backbone, digits, tmp_path / "one", mesh=devices.data_mesh(jax.devices()[:1]), batch_size=7)
  for name in ("cls", "patch_mean", "cls_blocks", "registers"):
    np.testing.assert_allclose(eight.load(name), one.load(name), atol=1e-5)
  np.testing.assert_array_equal(eight.labels, one.labels)
  assert len(eight.labels) == 50


def test_other_resolutions_and_clear_errors(backbone, digits, tmp_path):
  store = _extract(backbone, D.limit_examples(digits, 8), tmp_path / "r42", resolution=42,
                   spec=F.FeatureSpec(0))
  assert store.load("cls").shape == (8, 32) and "cls_blocks" not in store.names
  with pytest.raises(ValueError, match="multiple of the patch size=14; nearest valid sizes: 28 or 42"):
    _extract(backbone, digits, tmp_path / "r30", resolution=30)
  other = Backbone(nnx.merge(backbone.graphdef, jax.tree.map(lambda x: x * 1.01, backbone.params)))
  with pytest.raises(F.FeatureCacheMismatch, match="the weights changed"):
    _extract(other, digits, tmp_path / "r42", resolution=42, spec=F.FeatureSpec(0))


def _png(array):
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, "PNG")
  return buf.getvalue()


def test_folder_dataset_skips_and_counts_unreadable_files(backbone, tmp_path):
  images, labels = D.DemoDataset("test", 32).images[:9], D.DemoDataset("test", 32).labels[:9]
  for i, (image, label) in enumerate(zip(images, labels)):
    folder = tmp_path / "train" / f"class_{label % 2}"
    folder.mkdir(parents=True, exist_ok=True)
    ext = ("png", "jpg", "webp")[i % 3]
    Image.fromarray(image).save(folder / f"img{i}.{ext}")
  (tmp_path / "train" / "class_0" / "broken.jpg").write_bytes(b"not a jpeg")
  (tmp_path / "train" / "class_1" / "notes.txt").write_text("ignored")
  data = D.get_dataset("folder", "train", path=str(tmp_path))
  assert data.class_names == ["class_0", "class_1"] and len(data) == 10
  store = _extract(backbone, data, tmp_path / "features", chunk_size=4)
  assert store.num_rows == 9 and len(store.skipped) == 1
  assert data.paths[store.skipped[0]].endswith("broken.jpg")
  expected = [int(p.split(os.sep)[-2][-1]) for p in data.paths if not p.endswith("broken.jpg")]
  np.testing.assert_array_equal(store.labels, expected)
  with pytest.raises(D.DatasetError, match=r"has no split folder 'val'; its sub-folders are \['features', 'train'\]"):
    D.get_dataset("folder", "val", path=str(tmp_path))
  with pytest.raises(D.DatasetError, match="does not exist"):
    D.get_dataset("folder", "train", path=str(tmp_path / "nowhere"))


def test_tfds_array_record_dataset_without_tensorflow(backbone, tmp_path):
  import tensorflow_datasets as tfds

  class TinyDigits(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")
    # TFDS looks for a checksums file next to the builder's module, which fails for a class defined
    # in a test package without `importlib_resources`; this builder downloads nothing anyway.
    code_path = None

    def _info(self):
      return self.dataset_info_from_configs(features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(shape=(None, None, 3)),
          "label": tfds.features.ClassLabel(names=[str(c) for c in range(10)])}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples("train"), "test": self._generate_examples("test")}

    def _generate_examples(self, split):
      data = D.DemoDataset(split, 32)
      for i in range(12):
        image, label = data.load(i)
        yield i, {"image": _png(image), "label": label}  # encoded bytes: no TensorFlow needed

  TinyDigits(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
  data = D.get_dataset("tfds", "test", name="tiny_digits", data_dir=str(tmp_path))
  demo = D.DemoDataset("test", 32)
  assert len(data) == 12 and data.class_names[3] == "3"
  # TFDS shuffles records when writing: match each record to its source image.
  source = [data.load(i) for i in range(12)]
  order = [next(j for j in range(12) if np.array_equal(image, demo.images[j])) for image, _ in source]
  assert sorted(order) == list(range(12))
  assert [label for _, label in source] == [int(demo.labels[j]) for j in order]
  store = _extract(backbone, data, tmp_path / "features")
  np.testing.assert_array_equal(store.labels, demo.labels[order])
  with pytest.raises(D.DatasetError, match="has no split"):
    D.get_dataset("tfds", "validation", name="tiny_digits", data_dir=str(tmp_path))
  with pytest.raises(D.DatasetError, match=r"tfds build imagenet2012 .*downloads/manual|downloads/manual.*tfds build"):
    D.get_dataset("tfds", "train", name="imagenet2012", data_dir=str(tmp_path / "empty"))
  with pytest.raises(D.DatasetError, match="unknown and not found"):
    D.get_dataset("tfds", "train", name="no_such_dataset_xyz", data_dir=str(tmp_path / "empty"))


def test_chunked_array_gathers_across_chunk_files(backbone, digits, tmp_path):
  store = _extract(backbone, digits, tmp_path, spec=F.FeatureSpec(0))
  view = store.array("cls", in_memory=False)
  full = store.load("cls")
  idx = np.array([49, 0, 15, 16, 33, 15])
  np.testing.assert_array_equal(view[idx], full[idx])
  assert view.shape == full.shape
  manifest = json.loads((tmp_path / "manifest.json").read_text())
  assert manifest["key"]["preprocessing"]["resolution"] == 28 and manifest["features"]["cls"]["shape"] == [32]


def _digit_folder(root, n=12):
  """root/<class>/img<i>.png from the demo digits (labels 0/1 by parity), plus one corrupt file."""
  demo = D.DemoDataset("test", 32)
  for i in range(n):
    folder = root / f"class_{demo.labels[i] % 2}"
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(demo.images[i]).save(folder / f"img{i}.png")
  (root / "class_0" / "corrupt.png").write_bytes(b"\x89PNG not really")
  return demo


def test_cache_is_keyed_by_the_data_content_preprocessing_and_weights(backbone, tmp_path):
  demo = _digit_folder(tmp_path / "train")
  out = tmp_path / "features"
  first = _extract(backbone, D.get_dataset("folder", "train", path=str(tmp_path)), out)
  assert first.num_rows == 12 and len(first.skipped) == 1
  logs = []
  again = _extract(backbone, D.get_dataset("folder", "train", path=str(tmp_path)), out, log=logs.append)
  assert again.computed_chunks == [] and any("reusing" in line for line in logs)

  # Replacing the corrupt file by a readable image: same paths, same count, new content.
  Image.fromarray(demo.images[20]).save(tmp_path / "train" / "class_0" / "corrupt.png", format="PNG")
  changed = D.get_dataset("folder", "train", path=str(tmp_path))
  with pytest.raises(F.FeatureCacheMismatch, match=r"the data \(image files"):
    _extract(backbone, changed, out)
  logs = []
  fixed = _extract(backbone, changed, out, on_mismatch="recompute", log=logs.append)
  assert fixed.num_rows == 13 and fixed.skipped == [] and any("stale" in line for line in logs)
  expected = backbone.forward_features(eval_transform(demo.images[20], 28)[None])["x_norm_clstoken"]
  row = [changed.files[i] for i in fixed.load("index")].index(os.path.join("class_0", "corrupt.png"))
  np.testing.assert_allclose(fixed.load("cls")[row], np.asarray(expected)[0], atol=2e-5)

  # Moving an image to the other class: same files and sizes, new labels.
  before = fixed.class_counts()
  name = sorted(os.listdir(tmp_path / "train" / "class_1"))[0]
  os.rename(tmp_path / "train" / "class_1" / name, tmp_path / "train" / "class_0" / name)
  moved = D.get_dataset("folder", "train", path=str(tmp_path))
  relabelled = _extract(backbone, moved, out, on_mismatch="recompute")
  labels = dict(zip((moved.files[i] for i in relabelled.load("index")), relabelled.labels))
  assert labels[os.path.join("class_0", name)] == 0
  assert relabelled.class_counts() == {"class_0": before["class_0"] + 1, "class_1": before["class_1"] - 1}

  with pytest.raises(F.FeatureCacheMismatch, match="the preprocessing"):
    _extract(backbone, moved, out, resize_size=40)


def test_an_empty_class_folder_is_an_error_that_names_it(tmp_path):
  _digit_folder(tmp_path / "train")
  (tmp_path / "train" / "class_2" / "nested").mkdir(parents=True)
  (tmp_path / "train" / "class_2" / "readme.txt").write_text("no images here")
  with pytest.raises(D.DatasetError, match=r"class folder '.*class_2' has no images"):
    D.get_dataset("folder", "train", path=str(tmp_path))
