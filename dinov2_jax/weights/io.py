"""Reading any supported weights file into Meta-keyed state dicts, and writing them back.

Supported inputs (detected from the content, not only the name):
- Meta hub backbones `dinov2_vit*14[_reg4]_pretrain.pth` (flat, Meta keys);
- Meta training checkpoints `{"teacher": {"backbone.*", "dino_head.*", "ibot_head.*"}}` (block keys
  possibly chunked as `blocks.{chunk}.{i}.*`);
- Meta linear classifier heads `*_linear_head.pth` / `*_linear4_head.pth` (`{"weight", "bias"}`);
- Hugging Face `transformers` Dinov2 / Dinov2WithRegisters / DINOv3ViT state dicts (`.safetensors` or
  `.bin`; for DINOv3 the `config.json` beside the file gives the head count and the RoPE base);
- Meta DINOv3 backbones `dinov3_vit*16*_pretrain_*.pth` (flat, Meta keys, RoPE periods included);
- our own `.safetensors` exports (Meta keys, with the architecture in the header metadata).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from dinov2_jax.weights import convert, convert_dinov3
from dinov2_jax.weights.safetensors_format import load_safetensors, save_safetensors
from dinov2_jax.weights.torch_format import CheckpointError, load_pth, save_pth

CONFIG_METADATA_KEY = "dinov2_jax.backbone_config"
PTH_EXTENSIONS = (".pth", ".pt", ".bin", ".ckpt")
WRITE_EXTENSIONS = (".pth", ".safetensors")


@dataclasses.dataclass
class WeightsFile:
  """The contents of a weights file, normalised to Meta's key names.

  Attributes:
    kind: "backbone", "training_checkpoint", "huggingface" or "linear_head".
    backbone: flat Meta-keyed backbone state dict (unchunked; DINOv2 or DINOv3), or None.
    heads: Meta-keyed head state dicts by name ("dino_head", "ibot_head").
    linear_head: `{"weight": (classes, in), "bias": (classes,)}` for classifier heads, or None.
    config: backbone fields stored in our own exports' metadata, or read from a transformers
      config.json (may be empty).
  """

  kind: str
  backbone: dict[str, np.ndarray] | None = None
  heads: dict[str, dict[str, np.ndarray]] = dataclasses.field(default_factory=dict)
  linear_head: dict[str, np.ndarray] | None = None
  config: dict[str, Any] = dataclasses.field(default_factory=dict)


def _is_safetensors(path: str) -> bool:
  if path.endswith(".safetensors"):
    return True
  with open(path, "rb") as f:
    head = f.read(9)
  return len(head) == 9 and head[8:9] == b"{"


def _check_flat(tree: Mapping, path: str) -> dict[str, np.ndarray]:
  bad = [k for k, v in tree.items() if not isinstance(v, np.ndarray)]
  if bad:
    raise CheckpointError(f"{path}: expected a flat state dict of tensors, but {bad[:5]} are not tensors")
  return dict(tree)


def _sibling_hf_config(path: str) -> dict[str, Any]:
  """The transformers `config.json` of a model folder / next to a weights file, or {}."""
  folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
  config_path = os.path.join(folder, "config.json")
  try:
    with open(config_path, encoding="utf-8") as f:
      config = json.load(f)
  except (OSError, ValueError):
    return {}
  return config if isinstance(config, dict) else {}


_FOLDER_FILES = ("model.safetensors", "pytorch_model.bin")
_FOLDER_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def _weight_files(path: str) -> list[str]:
  """A file, or the weights of a transformers model folder (one file, or the shards of its index)."""
  if not os.path.isdir(path):
    return [path]
  for name in _FOLDER_FILES:
    if os.path.isfile(os.path.join(path, name)):
      return [os.path.join(path, name)]
  for name in _FOLDER_INDEXES:
    if os.path.isfile(os.path.join(path, name)):
      with open(os.path.join(path, name), encoding="utf-8") as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
      return [os.path.join(path, shard) for shard in shards]
  raise CheckpointError(f"{path}: a folder without {' or '.join(_FOLDER_FILES + _FOLDER_INDEXES)}; "
                        "pass the weights file itself")


def _load_any(path: str) -> tuple[Any, dict[str, str]]:
  if _is_safetensors(path):
    return load_safetensors(path)
  return load_pth(path), {}


def read_weights(path: str | os.PathLike) -> WeightsFile:
  """Reads and classifies a weights file (or a transformers model folder, sharded or not).

  Raises `CheckpointError` with the reason and a fix.
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise CheckpointError(f"{path}: no such file")
  files = _weight_files(path)
  obj, metadata = _load_any(files[0])
  for shard in files[1:]:  # a sharded transformers checkpoint: flat state dicts, merged
    obj = {**_check_flat(obj, path), **_check_flat(_load_any(shard)[0], shard)}
  path = files[0] if len(files) == 1 else path
  if not isinstance(obj, Mapping):
    raise CheckpointError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
  config = json.loads(metadata[CONFIG_METADATA_KEY]) if CONFIG_METADATA_KEY in metadata else {}

  if "teacher" in obj and isinstance(obj["teacher"], Mapping):
    groups = convert.split_submodules(_check_flat(obj["teacher"], path))
    if "backbone" not in groups:
      raise CheckpointError(f"{path}: the 'teacher' state dict has no backbone.* keys")
    heads = {k: v for k, v in groups.items() if k in ("dino_head", "ibot_head")}
    other = sorted(set(groups) - {"backbone", "dino_head", "ibot_head"})
    if other:
      raise CheckpointError(f"{path}: unexpected submodules in the teacher state dict: {other}")
    return WeightsFile("training_checkpoint", convert.unchunk_block_keys(groups["backbone"]), heads, config=config)
  if "model" in obj and isinstance(obj["model"], Mapping):
    raise CheckpointError(
        f"{path}: this looks like a Meta training-state checkpoint (model_*.rank_*.pth, sharded by FSDP). "
        "Use the teacher checkpoint Meta writes for evaluation (eval/training_*/teacher_checkpoint.pth).")
  flat = _check_flat(obj, path)
  if set(flat) == {"weight", "bias"} and flat["weight"].ndim == 2:
    return WeightsFile("linear_head", linear_head=flat)
  if convert.is_hf_state_dict(flat):
    hf_config = _sibling_hf_config(path)
    if hf_config.get("model_type") == "dinov3_vit":  # head count and RoPE base are in no tensor
      config = {**convert_dinov3.hf_config_fields(hf_config), **config}
    return WeightsFile("huggingface", convert.hf_to_meta(flat), config=config)
  if any(k.startswith(("backbone.", "module.backbone.")) for k in flat):
    groups = convert.split_submodules(flat)
    heads = {k: v for k, v in groups.items() if k in ("dino_head", "ibot_head")}
    return WeightsFile("training_checkpoint", convert.unchunk_block_keys(groups["backbone"]), heads, config=config)
  if "cls_token" in flat or "pos_embed" in flat:
    return WeightsFile("backbone", convert.unchunk_block_keys(flat), config=config)
  raise CheckpointError(
      f"{path}: not a recognised DINOv2 weights file (first keys: {', '.join(list(flat)[:6])}). Expected a "
      "Meta DINOv2/DINOv3 hub backbone, a Meta teacher checkpoint, a Meta linear head or a transformers "
      "Dinov2/DINOv3ViT state dict.")


def read_head_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads a dense-prediction head file (Meta's `*_head.pth`): its flat state dict, keys as stored.

  Meta's depth and segmentation heads are mmcv checkpoints, `{"state_dict": {...}, "meta": {...}}`;
  the metadata (numbers and strings) is dropped. A bare state dict is accepted too. DDP's `module.`
  prefixes are removed.
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise CheckpointError(f"{path}: no such file")
  obj = load_safetensors(path)[0] if _is_safetensors(path) else load_pth(path)
  if not isinstance(obj, Mapping):
    raise CheckpointError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
  if isinstance(obj.get("state_dict"), Mapping):
    obj = obj["state_dict"]
  return {k.replace("module.", ""): v for k, v in _check_flat(obj, path).items()}


def write_state_dict(tensors: Mapping[str, Any], path: str | os.PathLike, metadata: Mapping[str, str] | None = None):
  """Writes a (nested for .pth) state dict; the format comes from the extension (.pth or .safetensors)."""
  path = os.fspath(path)
  ext = os.path.splitext(path)[1].lower()
  if ext not in WRITE_EXTENSIONS:
    raise CheckpointError(f"{path}: unknown output format {ext!r}; use one of {', '.join(WRITE_EXTENSIONS)}")
  parent = os.path.dirname(path)
  if parent:
    os.makedirs(parent, exist_ok=True)
  if ext == ".pth":
    save_pth(tensors, path)
  else:
    save_safetensors(tensors, path, metadata)
