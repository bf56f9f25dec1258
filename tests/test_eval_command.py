"""The evaluation commands as a user meets them: --help, recipes, a labelled folder with corrupt
files, an empty class and a data change, default output folders, one-line errors."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from dinov2_jax import recipes
from dinov2_jax.eval import config as eval_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--config.model.depth=2", "--config.model.embed_dim=32", "--config.model.num_heads=2",
        "--config.model.img_size=28", "--config.resolution=28"]


def _run(args, cwd, timeout=300):
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu",
         "PYTHONPATH": REPO}
  return subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True, text=True,
                        timeout=timeout)


def labelled_folder(root, per_class=6, n_val=2):
  """root/{train,val}/<class>/*.png: crops of scikit-image photos (one class per photo) and
  faces / non-faces of its LFW subset; plus one corrupt file in train."""
  import skimage.data
  rng = np.random.default_rng(0)
  classes = {}
  for name in ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry"):
    photo = getattr(skimage.data, name)()
    crops = []
    for _ in range(per_class):
      side = int(min(photo.shape[:2]) * rng.uniform(0.5, 0.9))
      top, left = rng.integers(0, photo.shape[0] - side + 1), rng.integers(0, photo.shape[1] - side + 1)
      crops.append(photo[top:top + side, left:left + side])
    classes[name] = crops
  faces = (skimage.data.lfw_subset() * 255).round().astype(np.uint8)
  classes["face"] = list(faces[:per_class])
  classes["not_face"] = list(faces[100:100 + per_class])
  for name, images in classes.items():
    for i, image in enumerate(images):
      split = "val" if i < n_val else "train"
      folder = root / split / name
      folder.mkdir(parents=True, exist_ok=True)
      Image.fromarray(image).save(folder / f"{name}_{i}.png")
  (root / "train" / "coffee" / "broken.jpg").write_bytes(b"\xff\xd8\xff truncated jpeg")
  return classes


def test_help_lists_fields_and_recipes(tmp_path):
  for module in ("dinov2_jax.eval.knn", "dinov2_jax.eval.linear"):
    out = _run([module, "--help"], tmp_path)
    assert out.returncode == 0, out.stderr
    for text in ("--config.dataset.kind='demo'", "--config.dataset.path=''", "--config.weights=''",
                 "--config.resolution=0", "Recipes shipped with the package", "--coordinator_address"):
      assert text in out.stdout, (module, text)
  assert "--config.linear.epoch_length=1250" in out.stdout


def test_folder_walkthrough_corrupt_file_empty_class_and_data_change(tmp_path):
  data = tmp_path / "photos"
  labelled_folder(data)
  args = ["dinov2_jax.eval.knn", "--config.dataset.kind=folder", f"--config.dataset.path={data}",
          "--config.knn.ks=(1,3)", *TINY]
  out = _run(args, tmp_path)
  assert out.returncode == 0, out.stderr[-3000:]
  [results_file] = list((tmp_path / "dinov2_jax_eval").glob("folder-photos-*/*/knn/knn_results.json"))
  results = json.loads(results_file.read_text())
  assert results["splits"] == {"train": "train", "eval": "val"}  # the folder's own split names
  assert results["classes"] == sorted(["astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "face",
                                       "not_face"])
  assert results["images_per_class"]["train"]["coffee"] == 4 and results["skipped_unreadable"]["train"] == 1
  assert results["num_train"] == 28 and results["num_eval"] == 14
  assert results["results"]["1"]["top1"] > 50  # crops of one photo resemble each other even for random weights

  # The corrupt file replaced by a real image: the features are recomputed, the counts follow.
  shutil.copy(data / "val" / "coffee" / "coffee_0.png", data / "train" / "coffee" / "broken.jpg")
  out = _run(args, tmp_path)
  assert out.returncode == 0 and "stale" in out.stdout, out.stdout + out.stderr[-2000:]
  results = json.loads(results_file.read_text())
  assert results["images_per_class"]["train"]["coffee"] == 5 and results["skipped_unreadable"]["train"] == 0

  # An empty class folder: one line naming it, exit status 2, no traceback.
  (data / "train" / "empty_class").mkdir()
  out = _run(args, tmp_path)
  assert out.returncode == 2 and "Traceback" not in out.stderr
  assert "empty_class' has no images" in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr


@pytest.mark.parametrize("override, message", [
    ("--config.dataset.kind=folder", "needs --config.dataset.path"),
    ("--config.dataset.kind=folder --config.dataset.path=/no/such/folder", "does not exist"),
    ("--config.dataset.kind=imagefolder", "expected one of ('demo', 'folder', 'tfds')"),
    ("--config.weights=/no/such/weights.pth", "no such file"),
    ("--config.resolution=30", "not a multiple of the patch size=14; nearest valid sizes: 28 or 42"),
    ("--config.knn.kss=(5,)", "knn of eval_knn has no field 'kss'; did you mean 'ks'?"),
])
def test_user_errors_are_one_line(tmp_path, override, message):
  out = _run(["dinov2_jax.eval.knn", *TINY[:-1], *override.split()], tmp_path, timeout=120)
  assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr, out.stderr[-2000:]


def test_bad_recipe_name_is_one_line(tmp_path):
  out = _run(["dinov2_jax.eval.linear", "--config", "eval_linaer"], tmp_path, timeout=120)
  assert out.returncode == 2 and "recipes are demo, eval_knn" in out.stderr and "Traceback" not in out.stderr


def test_default_output_folders_and_resolution():
  def config(**dataset):
    c = recipes.get_config("eval_knn")
    c.dataset.update(**dataset)
    return c

  a = config(kind="folder", path="/data/flowers")
  b = config(kind="folder", path="/other/flowers")
  c = config(kind="tfds", name="imagenet2012")
  folders = {eval_config.output_dir(x, "knn") for x in (a, b, c, config())}
  assert len(folders) == 4
  with_weights = config(kind="folder", path="/data/flowers")
  with_weights.weights = "/w/dinov2_vits14_pretrain.pth"
  other_weights = config(kind="folder", path="/data/flowers")
  other_weights.weights = "/w/dinov2_vitb14_pretrain.pth"
  assert len({eval_config.output_dir(x, "knn") for x in (a, with_weights, other_weights)}) == 3
  assert eval_config.output_dir(a, "knn") != eval_config.output_dir(a, "linear")
  # Real data or real weights: 224 px unless told; only the demo digits with random weights get 56.
  assert eval_config.resolution(config())[0] == 56
  assert eval_config.resolution(a)[0] == 224 and eval_config.resolution(with_weights)[0] == 224
  demo_weights = config()
  demo_weights.weights = "/w/x.pth"
  assert eval_config.resolution(demo_weights)[0] == 224


def test_a_folder_of_classes_without_splits_says_how_to_lay_it_out(tmp_path):
  for name in ("cat", "dog"):
    (tmp_path / "mine" / name).mkdir(parents=True)
  out = _run(["dinov2_jax.eval.knn", "--config.dataset.kind=folder", f"--config.dataset.path={tmp_path / 'mine'}",
              *TINY], tmp_path, timeout=120)
  assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
  assert "has no split folder 'train'" in out.stderr and "if ['cat', 'dog'] are your classes" in out.stderr
