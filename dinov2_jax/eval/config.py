"""The fields every evaluation config has (model, weights, data, extraction, output), and what they name.

Used by the recipes `dinov2_jax/configs/eval_knn.py` and `eval_linear.py` and by the commands. The
dataset section speaks training's vocabulary (`config.dataset` of `dinov2_jax/train/default_config.py`):

  dataset.kind        "demo" (the embedded digits), "folder" or "tfds"
  dataset.path        folder: the root, holding one folder per split: path/<split>/<class>/<image>
  dataset.name        tfds: the prepared dataset ("imagenet2012", "cifar10")
  dataset.data_dir    tfds: its data directory ("" = $TFDS_DATA_DIR or ~/tensorflow_datasets)
  dataset.train_split the split the features are learnt from ("train")
  dataset.eval_split  the split that is scored; "" = the first of val / validation / test it has
"""

from __future__ import annotations

import hashlib
import os

import ml_collections
from ml_collections import config_dict

from dinov2_jax.eval import datasets as ds

MODEL_OVERRIDE_FIELDS = ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "num_register_tokens",
                         "interpolate_offset", "interpolate_antialias", "dtype")
# The embedded digits are 64 px; random weights see nothing finer at 224 px, only slower.
DEMO_RANDOM_RESOLUTION = 56
DEFAULT_RESOLUTION = 224
DEFAULT_OUTPUT_ROOT = "dinov2_jax_eval"


class ConfigError(ValueError):
  """A config value that cannot work; the message names the field and what to set instead."""


def add_common_config(config: ml_collections.ConfigDict) -> None:
  """Adds the shared fields (documented inline) to an evaluation config."""
  config.weights = ""  # a weights file for load_backbone; empty: random weights of model.preset
  config.model = ml_collections.ConfigDict()
  config.model.preset = "dinov2_vits14"  # architecture of the random weights when `weights` is empty
  for field, kind in zip(MODEL_OVERRIDE_FIELDS, (int, int, int, int, int, int, float, bool, str)):
    config.model[field] = config_dict.placeholder(kind)  # ViTConfig overrides; None: keep
  config.seed = 0  # random-weights seed
  # Crop side in pixels, a multiple of the patch size. 0: 224, except 56 for the demo digits with
  # random weights (said in the output).
  config.resolution = 0
  config.resize_size = 0  # shorter side before the centre crop; 0: resolution * 256 / 224 (Meta's 256 for 224)
  config.dataset = ml_collections.ConfigDict()
  config.dataset.kind = "demo"  # "demo", "folder" or "tfds"
  config.dataset.path = ""  # folder: root with path/<split>/<class>/<image>
  config.dataset.name = ""  # tfds: a prepared dataset, e.g. "imagenet2012"
  config.dataset.data_dir = ""  # tfds: data directory ("" = $TFDS_DATA_DIR or ~/tensorflow_datasets)
  config.dataset.train_split = "train"
  config.dataset.eval_split = ""  # "": the first of val / validation / test that the dataset has
  config.dataset.image_key = "image"  # tfds feature names
  config.dataset.label_key = "label"
  config.dataset.train_limit = 0  # >0: a fixed random subset of that many images (quick runs)
  config.dataset.eval_limit = 0
  config.batch_size = 64  # images per extraction step, over all devices
  config.chunk_size = 4096  # images per feature file (the resume granularity)
  config.num_workers = 0  # decoding threads; 0 = CPU count
  config.feature_dtype = "float32"
  # "": dinov2_jax_eval/<dataset>/<weights>/<protocol>, so that runs on other data or weights never
  # share a folder.
  config.output_dir = ""


def apply_variant(config: ml_collections.ConfigDict, arg) -> None:
  """The recipe variants shared by eval_knn.py and eval_linear.py: `demo` (default) and `imagenet`."""
  if arg in (None, "", "demo"):
    return
  if arg == "imagenet":
    config.dataset.kind = "tfds"
    config.dataset.name = "imagenet2012"
    config.dataset.eval_split = "validation"
    config.batch_size = 256
    config.chunk_size = 16384
    return
  raise ConfigError(f"unknown recipe variant {arg!r}; use demo or imagenet")


def resolution(config) -> tuple[int, str]:
  """(crop side in pixels, why): the configured one, or the default for the data and weights."""
  if config.resolution:
    return int(config.resolution), "set by config.resolution"
  if config.dataset.kind == "demo" and not config.weights:
    return DEMO_RANDOM_RESOLUTION, ("the default for the demo digits with random weights; real data or weights get "
                                    f"{DEFAULT_RESOLUTION} px; set --config.resolution to change it")
  return DEFAULT_RESOLUTION, "the default; set --config.resolution to change it"


def check_resolution(resolution: int, patch_size: int) -> None:
  """Raises a `ConfigError` unless the crop side is a positive multiple of the model's patch size."""
  from dinov2_jax.models.vit import check_image_shape
  try:
    check_image_shape((1, resolution, resolution, 3), patch_size)
  except ValueError as e:
    raise ConfigError(f"config.resolution={resolution}: {e}") from None


def _tag(text: str) -> str:
  return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in text).strip("_") or "x"


def _short_hash(text: str) -> str:
  return hashlib.sha1(text.encode()).hexdigest()[:8]


def dataset_tag(config) -> str:
  """A folder name for the data a config names ("folder-flowers-1a2b3c4d", "tfds-imagenet2012-...")."""
  d = config.dataset
  if d.kind == "folder":
    where = os.path.abspath(os.path.expanduser(d.path or "."))
    tag = f"folder-{_tag(os.path.basename(where))}-{_short_hash(where)}"
  elif d.kind == "tfds":
    tag = f"tfds-{_tag(d.name)}-{_short_hash(os.path.abspath(os.path.expanduser(d.data_dir)) if d.data_dir else '')}"
  else:
    tag = _tag(d.kind)
  if d.train_limit or d.eval_limit:
    tag += f"-limit{d.train_limit}-{d.eval_limit}"
  return tag


def weights_tag(config) -> str:
  """A folder name for the weights a config names ("dinov2_vitb14_pretrain-1a2b3c4d", "random-dinov2_vits14-seed0")."""
  overrides = {f: config.model[f] for f in MODEL_OVERRIDE_FIELDS if config.model.get(f) is not None}
  if config.weights:
    path = os.path.abspath(os.path.expanduser(config.weights))
    tag = f"{_tag(os.path.splitext(os.path.basename(path))[0])}-{_short_hash(path)}"
  else:
    tag = f"random-{_tag(config.model.preset)}-seed{config.seed}"
  if overrides:
    tag += f"-custom{_short_hash(repr(sorted(overrides.items())))}"
  return tag


def output_dir(config, protocol: str) -> str:
  """`config.output_dir`, or dinov2_jax_eval/<dataset>/<weights>/<protocol> when it is empty."""
  if config.output_dir:
    return os.path.expanduser(config.output_dir)
  return os.path.join(DEFAULT_OUTPUT_ROOT, dataset_tag(config), weights_tag(config), protocol)


def backbone_from_config(config):
  """The `Backbone` named by `config.weights` (or random weights of `config.model.preset`)."""
  from dinov2_jax.api import create_pretrained_like, load_backbone
  overrides = {f: config.model[f] for f in MODEL_OVERRIDE_FIELDS if config.model.get(f) is not None}
  if config.weights:
    path = os.path.expanduser(config.weights)
    if not os.path.isfile(path):
      raise ConfigError(f"config.weights={config.weights!r}: no such file (a Meta .pth, a .safetensors, or a "
                        "transformers model file; leave it empty for random weights)")
    return load_backbone(path, **overrides)
  return create_pretrained_like(config.model.preset, seed=config.seed, **overrides)


def splits(config) -> tuple[str, str]:
  """(train split, evaluation split), the latter found in the dataset when `eval_split` is empty."""
  d = config.dataset
  if d.kind not in ds.KINDS:
    raise ConfigError(f"config.dataset.kind={d.kind!r}; expected one of {ds.KINDS}")
  where = _where(config)
  if d.kind == "folder":
    ds.check_folder_split(where["path"], d.train_split)  # before looking for an evaluation split
  eval_split = d.eval_split or ds.default_eval_split(d.kind, **where)
  return d.train_split, eval_split


def _where(config) -> dict:
  d = config.dataset
  path = os.path.expanduser(d.path) if d.path else None
  data_dir = os.path.expanduser(d.data_dir) if d.data_dir else None
  if d.kind == "folder" and not path:
    raise ConfigError("config.dataset.kind='folder' needs --config.dataset.path=DIR, with DIR/<split>/<class>/<image>")
  if d.kind == "tfds" and not d.name:
    raise ConfigError("config.dataset.kind='tfds' needs --config.dataset.name, e.g. imagenet2012")
  return {"path": path, "name": d.name or None, "data_dir": data_dir}


def datasets_from_config(config):
  """The (train, evaluation) `ImageDataset`s named by `config.dataset` (limits applied)."""
  d = config.dataset
  train_split, eval_split = splits(config)
  kw = dict(image_key=d.image_key, label_key=d.label_key, **_where(config))
  train = ds.get_dataset(d.kind, train_split, **kw)
  test = ds.get_dataset(d.kind, eval_split, class_names=train.class_names, **kw)
  if list(test.class_names) != list(train.class_names):
    raise ds.DatasetError(f"splits {train_split!r} and {eval_split!r} have different classes")
  return ds.limit_examples(train, d.train_limit), ds.limit_examples(test, d.eval_limit)
