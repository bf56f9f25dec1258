"""Mapping between our Flax parameters and Meta's (and Hugging Face's) PyTorch state dicts.

Our parameter paths mirror Meta's key names, so one rule converts every name:
`blocks/3/attn/qkv/kernel` <-> `blocks.3.attn.qkv.weight` (transposed), `norm/scale` <-> `norm.weight`,
`patch_embed/proj/kernel` (HWIO) <-> `patch_embed.proj.weight` (OIHW). The DINO head differs only in
the MLP indices (Meta's `nn.Sequential` puts GELUs between the Linears: `mlp.0`, `mlp.2`, ...) and
in the weight-norm layer (`last_layer.weight_g` (out, 1), `last_layer.weight_v` (out, in)).

Everything here works on flat `{name: numpy array}` dicts; reading files lives in `io.py`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from dinov2_jax.models.dinov3_vit import DINOv3Config
from dinov2_jax.models.vit import ViTConfig
from dinov2_jax.weights import convert_dinov3
from dinov2_jax.weights.torch_format import CheckpointError

HEAD_DIM = 64  # Every Meta DINOv2 model uses 64-dimensional attention heads.

# ---------------------------------------------------------------------------------------------
# Flat views of nested parameter dicts.


def flatten_params(tree: Mapping, prefix: tuple = ()) -> dict[tuple, Any]:
  """{'a': {'b': x}} -> {('a', 'b'): x}; keys keep their types (nnx.List indices are ints)."""
  flat = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      flat.update(flatten_params(value, prefix + (key,)))
    else:
      flat[prefix + (key,)] = value
  return flat


def unflatten_params(flat: Mapping[tuple, Any]) -> dict:
  tree: dict = {}
  for path, value in flat.items():
    node = tree
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return tree


# ---------------------------------------------------------------------------------------------
# Name and layout rules.


def _to_torch_layout(path: tuple, array: np.ndarray) -> np.ndarray:
  leaf = path[-1]
  if leaf == "kernel" and array.ndim == 2:
    return array.T
  if leaf == "kernel" and array.ndim == 4:
    return array.transpose(3, 2, 0, 1)  # HWIO -> OIHW
  if path[-2:] == ("last_layer", "v"):
    return array.T
  if path[-2:] == ("last_layer", "g"):
    return array[:, None]
  return array


def _from_torch_layout(path: tuple, array: np.ndarray) -> np.ndarray:
  leaf = path[-1]
  if leaf == "kernel" and array.ndim == 2:
    return array.T
  if leaf == "kernel" and array.ndim == 4:
    return array.transpose(2, 3, 1, 0)  # OIHW -> HWIO
  if path[-2:] == ("last_layer", "v"):
    return array.T
  if path[-2:] == ("last_layer", "g"):
    return array.reshape(-1)
  return array


def meta_name(path: tuple, head_nlayers: int | None = None) -> str:
  """Meta's state-dict key for one of our parameter paths.

  Args:
    path: e.g. ('blocks', 3, 'attn', 'qkv', 'kernel').
    head_nlayers: for DINO-head paths, the head's number of MLP layers (Meta names a 1-layer MLP
      `mlp.weight`, a deeper one `mlp.0`, `mlp.2`, ...).
  """
  parts = [str(p) for p in path]
  if parts[-2:] == ["last_layer", "g"]:
    return "last_layer.weight_g"
  if parts[-2:] == ["last_layer", "v"]:
    return "last_layer.weight_v"
  if head_nlayers is not None and parts[0] == "mlp":
    parts = ["mlp"] if head_nlayers == 1 else ["mlp", str(2 * int(parts[1]))]
    parts += [str(p) for p in path[2:]]
  leaf = {"kernel": "weight", "scale": "weight"}.get(parts[-1], parts[-1])
  return ".".join(parts[:-1] + [leaf])


def params_to_meta(params: Mapping, head_nlayers: int | None = None) -> dict[str, np.ndarray]:
  """Nested Flax params (a backbone or a head) -> flat Meta state dict in PyTorch layouts."""
  return {meta_name(path, head_nlayers): np.asarray(_to_torch_layout(path, np.asarray(v)))
          for path, v in flatten_params(params).items()}


BACKBONE_HINT = ("Check the architecture overrides (embed_dim, depth, num_heads, ffn_layer, num_register_tokens, "
                 "patch_size, img_size) or that the file is the model you meant.")


def check_state_dict(state_dict: Mapping[str, np.ndarray], expected: Mapping[str, tuple], *, strict: bool = True,
                     what: str = "backbone", hint: str = BACKBONE_HINT) -> None:
  """Compares a state dict with the names and (PyTorch-layout) shapes a model expects.

  Strict: every missing key, unexpected key and shape mismatch is listed in one `CheckpointError`.
  Non-strict: missing and unexpected keys are allowed (shape mismatches still fail), which is how
  Meta's own loaders behave minus their silent shape mismatches.
  """
  missing = sorted(set(expected) - set(state_dict))
  unexpected = sorted(set(state_dict) - set(expected))
  mismatched = [f"{name}: file {tuple(np.shape(state_dict[name]))}, model expects {tuple(shape)}"
                for name, shape in expected.items()
                if name in state_dict and tuple(np.shape(state_dict[name])) != tuple(shape)]
  problems = []
  if mismatched:
    problems.append("shape mismatches:\n  " + "\n  ".join(mismatched))
  if strict and missing:
    problems.append(f"missing keys ({len(missing)}): " + ", ".join(missing))
  if strict and unexpected:
    problems.append(f"unexpected keys ({len(unexpected)}): " + ", ".join(unexpected))
  if problems:
    raise CheckpointError(f"the weights do not match the {what} architecture:\n" + "\n".join(problems) + "\n" + hint)


def meta_to_params(
    state_dict: Mapping[str, np.ndarray],
    template: Mapping,
    *,
    head_nlayers: int | None = None,
    strict: bool = True,
    what: str = "backbone",
) -> dict:
  """Fills a nested params template (arrays or ShapeDtypeStructs) from a Meta-keyed state dict.

  Names, shapes and strictness are checked by `check_state_dict`; tensors absent from a non-strict
  load keep the template's values.
  """
  flat = flatten_params(template)
  by_name = {meta_name(path, head_nlayers): path for path in flat}
  # (a zero-memory broadcast stands in for each tensor: only its layout-converted shape is needed)
  expected = {name: _to_torch_layout(path, np.broadcast_to(np.int8(0), flat[path].shape)).shape
              for name, path in by_name.items()}
  check_state_dict(state_dict, expected, strict=strict, what=what)
  out = {}
  for name, path in by_name.items():
    if name in state_dict:
      out[path] = _from_torch_layout(path, np.asarray(state_dict[name])).astype(flat[path].dtype)
    else:
      out[path] = flat[path]
  return unflatten_params(out)


# ---------------------------------------------------------------------------------------------
# Key normalisation: chunked blocks, training checkpoints, Hugging Face names.

_CHUNKED = re.compile(r"^blocks\.(\d+)\.(\d+)\.")


def unchunk_block_keys(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """`blocks.{chunk}.{i}.*` (Meta's block_chunks > 0) -> `blocks.{i}.*`."""
  return {_CHUNKED.sub(r"blocks.\2.", k): v for k, v in state_dict.items()}


def chunk_block_keys(state_dict: Mapping[str, np.ndarray], depth: int, block_chunks: int) -> dict[str, np.ndarray]:
  """`blocks.{i}.*` -> `blocks.{i // (depth / chunks)}.{i}.*`, the layout of Meta's chunked models."""
  if block_chunks <= 0:
    return dict(state_dict)
  if depth % block_chunks:
    raise ValueError(f"depth {depth} is not divisible by block_chunks {block_chunks}")
  per_chunk = depth // block_chunks

  def rename(k):
    m = re.match(r"^blocks\.(\d+)\.", k)
    return k if m is None else f"blocks.{int(m.group(1)) // per_chunk}.{k[len('blocks.'):]}"
  return {rename(k): v for k, v in state_dict.items()}


def split_submodules(state_dict: Mapping[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
  """{'backbone.x': a, 'dino_head.y': b} -> {'backbone': {'x': a}, 'dino_head': {'y': b}}.

  Strips DDP/FSDP's `module.` prefixes, as Meta's loader does.
  """
  groups: dict[str, dict[str, np.ndarray]] = {}
  for key, value in state_dict.items():
    key = key.replace("module.", "")
    sub, _, rest = key.partition(".")
    groups.setdefault(sub, {})[rest] = value
  return groups


_HF_RENAMES = [  # (pattern, replacement), applied in order, for both generations of HF names.
    (r"^embeddings\.cls_token$", "cls_token"),
    (r"^embeddings\.mask_token$", "mask_token"),
    (r"^embeddings\.position_embeddings$", "pos_embed"),
    (r"^embeddings\.register_tokens$", "register_tokens"),
    (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"^layernorm\.", "norm."),
    (r"^encoder\.layer\.(\d+)\.", r"blocks.\1."),
    (r"\.attention\.output\.dense\.", ".attn.proj."),
    (r"\.attention\.o_proj\.", ".attn.proj."),
    (r"\.layer_scale([12])\.lambda1$", r".ls\1.gamma"),
    (r"\.mlp\.weights_in\.", ".mlp.w12."),
    (r"\.mlp\.weights_out\.", ".mlp.w3."),
    (r"\.mlp\.down_proj\.", ".mlp.w3."),
]
_HF_QKV = re.compile(r"^(blocks\.\d+)\.attention\.(?:attention\.(query|key|value)|(q|k|v)_proj)\.(weight|bias)$")
_HF_GATE_UP = re.compile(r"^(blocks\.\d+)\.mlp\.(gate|up)_proj\.(weight|bias)$")


def is_hf_state_dict(state_dict: Mapping[str, Any]) -> bool:
  return any(k.startswith(("embeddings.", "dinov2.embeddings.", "encoder.layer.")) for k in state_dict)


def hf_to_meta(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """A `transformers` Dinov2Model / Dinov2WithRegistersModel / DINOv3ViTModel state dict -> Meta's keys.

  Accepts Dinov2's older names (`attention.attention.query`, `mlp.weights_in`) and newer ones
  (`attention.q_proj`, `mlp.gate_proj`/`up_proj`), with or without the `dinov2.` prefix. DINOv3 state
  dicts go to `convert_dinov3.hf_dinov3_to_meta`.
  """
  if convert_dinov3.is_hf_dinov3_state_dict(state_dict):
    return convert_dinov3.hf_dinov3_to_meta(state_dict)
  out: dict[str, np.ndarray] = {}
  qkv: dict[tuple, dict[str, np.ndarray]] = {}
  gate_up: dict[tuple, dict[str, np.ndarray]] = {}
  for key, value in state_dict.items():
    key = key[len("dinov2."):] if key.startswith("dinov2.") else key
    for pattern, repl in _HF_RENAMES:
      key = re.sub(pattern, repl, key)
    if m := _HF_QKV.match(key):
      part = (m.group(2) or m.group(3))[0]  # query/q -> q, ...
      qkv.setdefault((m.group(1), m.group(4)), {})[part] = value
    elif m := _HF_GATE_UP.match(key):
      gate_up.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = value
    else:
      out[key] = value
  for (block, kind), parts in qkv.items():
    if set(parts) != {"q", "k", "v"}:
      raise CheckpointError(f"{block}: attention {kind} is missing one of query/key/value")
    out[f"{block}.attn.qkv.{kind}"] = np.concatenate([parts["q"], parts["k"], parts["v"]], axis=0)
  for (block, kind), parts in gate_up.items():
    if set(parts) != {"gate", "up"}:
      raise CheckpointError(f"{block}: SwiGLU {kind} is missing gate_proj or up_proj")
    out[f"{block}.mlp.w12.{kind}"] = np.concatenate([parts["gate"], parts["up"]], axis=0)  # gate first, as Meta
  return out


def meta_to_hf(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Meta backbone keys -> current `transformers` Dinov2 (or DINOv3ViT) names (tests and the converter)."""
  if convert_dinov3.is_dinov3_state_dict(state_dict):
    return convert_dinov3.meta_dinov3_to_hf(state_dict)
  out = {}
  simple = {"cls_token": "embeddings.cls_token", "mask_token": "embeddings.mask_token",
            "pos_embed": "embeddings.position_embeddings", "register_tokens": "embeddings.register_tokens"}
  for key, value in state_dict.items():
    if key in simple:
      out[simple[key]] = value
      continue
    key = re.sub(r"^patch_embed\.proj\.", "embeddings.patch_embeddings.projection.", key)
    key = re.sub(r"^norm\.", "layernorm.", key)
    m = re.match(r"^blocks\.(\d+)\.(.*)$", key)
    if m is None:
      out[key] = value
      continue
    prefix, rest = f"encoder.layer.{m.group(1)}.", m.group(2)
    if rest.startswith("attn.qkv."):
      for name, part in zip(("q", "k", "v"), np.split(value, 3, axis=0)):
        out[f"{prefix}attention.{name}_proj.{rest.split('.')[-1]}"] = part
    elif rest.startswith("mlp.w12."):
      gate, up = np.split(value, 2, axis=0)
      out[f"{prefix}mlp.gate_proj.{rest.split('.')[-1]}"] = gate
      out[f"{prefix}mlp.up_proj.{rest.split('.')[-1]}"] = up
    else:
      rest = re.sub(r"^attn\.proj\.", "attention.o_proj.", rest)
      rest = re.sub(r"^ls([12])\.gamma$", r"layer_scale\1.lambda1", rest)
      rest = re.sub(r"^mlp\.w3\.", "mlp.down_proj.", rest)
      out[prefix + rest] = value
  return out


def hf_config(cfg) -> dict:
  """The transformers `config.json` of a backbone (`ViTConfig`), for `Dinov2Model.from_pretrained(dir)`.

  Registers give `Dinov2WithRegistersModel`. Raises ValueError for what transformers' Dinov2 cannot
  express (no LayerScale, bias-free projections, an identity FFN).
  """
  problems = []
  if not cfg.init_values:
    problems.append("no LayerScale (transformers' Dinov2 always has it)")
  if not (cfg.proj_bias and cfg.ffn_bias):
    problems.append("bias-free attention output or FFN layers")
  if cfg.ffn_layer not in ("mlp", "swiglu", "swiglufused"):
    problems.append(f"ffn_layer={cfg.ffn_layer!r}")
  if problems:
    raise ValueError(f"transformers' Dinov2 cannot load this backbone: {'; '.join(problems)}")
  registers = int(cfg.num_register_tokens)
  config = {
      "architectures": ["Dinov2WithRegistersModel" if registers else "Dinov2Model"],
      "model_type": "dinov2_with_registers" if registers else "dinov2",
      "hidden_size": cfg.embed_dim, "num_hidden_layers": cfg.depth, "num_attention_heads": cfg.num_heads,
      # An int where it is one: recent transformers versions check the type.
      "mlp_ratio": int(cfg.mlp_ratio) if float(cfg.mlp_ratio).is_integer() else cfg.mlp_ratio, "hidden_act": "gelu", "layer_norm_eps": 1e-6, "image_size": cfg.img_size,
      "patch_size": cfg.patch_size, "num_channels": cfg.in_chans, "qkv_bias": cfg.qkv_bias,
      "layerscale_value": float(cfg.init_values), "use_swiglu_ffn": cfg.ffn_layer != "mlp", "drop_path_rate": 0.0,
      "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "initializer_range": 0.02,
      "use_mask_token": True,
  }
  if registers:
    config["num_register_tokens"] = registers
  return config


# ---------------------------------------------------------------------------------------------
# Architecture inference.


def backbone_config_class(state_dict: Mapping[str, Any]) -> type:
  """`DINOv3Config` for Meta-keyed DINOv3 state dicts (no learned position embedding), else `ViTConfig`."""
  return DINOv3Config if convert_dinov3.is_dinov3_state_dict(state_dict) else ViTConfig


def infer_backbone_config(state_dict: Mapping[str, np.ndarray], **overrides: Any) -> ViTConfig | DINOv3Config:
  """Reads a backbone's architecture from Meta-keyed tensor shapes (head dim 64, as all Meta DINOv2 models).

  Fields that shapes cannot tell follow Meta's hub convention: register models use antialiased
  resampling without offset, the others the 0.1 offset. Every field can be overridden. DINOv3 state
  dicts are read by `convert_dinov3.infer_dinov3_config`.
  """
  if backbone_config_class(state_dict) is DINOv3Config:
    return convert_dinov3.infer_dinov3_config(state_dict, **overrides)
  required = ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.norm1.weight")
  absent = [k for k in required if k not in state_dict]
  if absent:
    raise CheckpointError(
        f"not a DINOv2 backbone state dict: missing {', '.join(absent)} "
        f"(first keys: {', '.join(list(state_dict)[:5])})")
  dim = int(state_dict["cls_token"].shape[-1])
  patch_w = state_dict["patch_embed.proj.weight"]
  patch = int(patch_w.shape[-1])
  n_pos = int(state_dict["pos_embed"].shape[1]) - 1
  grid = math.isqrt(n_pos)
  if grid * grid != n_pos:
    raise CheckpointError(f"pos_embed holds {n_pos} patch positions, not a square grid")
  depth = 1 + max(int(m.group(1)) for k in state_dict if (m := re.match(r"^blocks\.(\d+)\.", k)))
  registers = int(state_dict["register_tokens"].shape[1]) if "register_tokens" in state_dict else 0
  fields: dict[str, Any] = dict(
      img_size=grid * patch, patch_size=patch, in_chans=int(patch_w.shape[1]), embed_dim=dim, depth=depth,
      num_heads=max(dim // HEAD_DIM, 1), num_register_tokens=registers,
      qkv_bias="blocks.0.attn.qkv.bias" in state_dict, proj_bias="blocks.0.attn.proj.bias" in state_dict,
      init_values=1.0 if "blocks.0.ls1.gamma" in state_dict else None,
      interpolate_antialias=registers > 0, interpolate_offset=0.0 if registers else 0.1)
  if "blocks.0.mlp.w12.weight" in state_dict:
    hidden = int(state_dict["blocks.0.mlp.w3.weight"].shape[1])
    fields.update(ffn_layer="swiglufused", ffn_bias="blocks.0.mlp.w12.bias" in state_dict,
                  mlp_ratio=_swiglu_mlp_ratio(dim, hidden))
  elif "blocks.0.mlp.fc1.weight" in state_dict:
    fields.update(ffn_layer="mlp", ffn_bias="blocks.0.mlp.fc1.bias" in state_dict,
                  mlp_ratio=state_dict["blocks.0.mlp.fc1.weight"].shape[0] / dim)
  else:
    fields.update(ffn_layer="identity")
  unknown = set(overrides) - set(ViTConfig.__dataclass_fields__)
  if unknown:
    raise ValueError(f"unknown backbone fields {sorted(unknown)}; valid: {sorted(ViTConfig.__dataclass_fields__)}")
  fields.update(overrides)
  return ViTConfig(**fields)


def _swiglu_mlp_ratio(dim: int, hidden: int) -> float:
  # Meta's rounding maps several ratios to one width; prefer 4.0 (all Meta models), else solve.
  for ratio in (4.0, hidden * 1.5 / dim):
    if ViTConfig(embed_dim=dim, num_heads=1, mlp_ratio=ratio, ffn_layer="swiglu").ffn_hidden_dim == hidden:
      return ratio
  raise CheckpointError(f"no mlp_ratio gives a SwiGLU hidden size of {hidden} for embed_dim {dim}")


def infer_head_config(state_dict: Mapping[str, np.ndarray]) -> dict[str, Any]:
  """DINOHead constructor arguments from Meta-keyed head tensors (`mlp.*`, `last_layer.*`)."""
  if "last_layer.weight_v" not in state_dict:
    raise CheckpointError("not a DINO head state dict: `last_layer.weight_v` is missing")
  if "mlp.weight" in state_dict:
    weights = [state_dict["mlp.weight"]]
  else:
    indices = sorted(int(m.group(1)) for k in state_dict if (m := re.match(r"^mlp\.(\d+)\.weight$", k)))
    weights = [state_dict[f"mlp.{i}.weight"] for i in indices]
  if not weights:
    raise CheckpointError("not a DINO head state dict: no `mlp.*.weight` keys")
  out_dim, bottleneck = state_dict["last_layer.weight_v"].shape
  has_bias = "mlp.bias" in state_dict or "mlp.0.bias" in state_dict
  return dict(in_dim=int(weights[0].shape[1]), out_dim=int(out_dim), nlayers=len(weights),
              hidden_dim=int(weights[0].shape[0]) if len(weights) > 1 else 2048,
              bottleneck_dim=int(bottleneck), mlp_bias=has_bias)
