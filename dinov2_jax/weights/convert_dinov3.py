"""DINOv3 state dicts: Meta's `dinov3` names <-> `transformers`' `DINOv3ViTModel`, and architecture inference.

Meta's keys mirror our parameter paths (the rules of `convert.py` apply unchanged); the buffers
`rope_embed.periods` and `blocks.{i}.attn.qkv.bias_mask` are part of Meta's state dict. transformers
names the same tensors differently, splits `qkv` into `q/k/v_proj` with no key bias (Meta masks it to
zero), stores no RoPE periods (it computes them from `rope_theta`), shapes the mask token (1, 1, D)
instead of (1, D), and calls the storage tokens `register_tokens`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from dinov2_jax.models.dinov3_vit import SWIGLU_ALIGN, DINOv3Config, rope_periods
from dinov2_jax.weights.torch_format import CheckpointError

DEFAULT_HEAD_DIM = 64  # every released DINOv3 ViT but the 7B (128); Meta's files store it in the RoPE periods
_HF_LAYER = re.compile(r"^(?:model\.)?layer\.(\d+)\.(.*)$")
_HF_BLOCK_RENAMES = [
    (r"^attention\.o_proj\.", "attn.proj."),
    (r"^layer_scale([12])\.lambda1$", r"ls\1.gamma"),
    (r"^mlp\.down_proj\.", "mlp.{down}."),
    (r"^mlp\.gate_proj\.", "mlp.w1."),
]


def is_dinov3_state_dict(state_dict: Mapping[str, Any]) -> bool:
  """Meta-keyed DINOv3 backbones have no learned position embedding (DINOv2's always do)."""
  return "cls_token" in state_dict and "pos_embed" not in state_dict


def is_hf_dinov3_state_dict(state_dict: Mapping[str, Any]) -> bool:
  # DINOv3ViTModel's patch embedding is a bare Conv2d; Dinov2Model's sits under `.projection`.
  return "embeddings.patch_embeddings.weight" in state_dict


def _depth(state_dict: Mapping[str, Any]) -> int:
  return 1 + max(int(m.group(1)) for k in state_dict if (m := re.match(r"^blocks\.(\d+)\.", k)))


def _ffn(dim: int, hidden: int, swiglu: bool) -> dict[str, Any]:
  """`ffn_layer` and `ffn_ratio` reproducing an FFN width (Meta's ratios are tried first)."""
  layers = tuple(SWIGLU_ALIGN) if swiglu else ("mlp",)
  # SwiGLU keeps int(2/3 of int(dim * ratio)); the smallest such pre-width is ceil(1.5 * hidden).
  width = math.ceil(1.5 * hidden) if swiglu else hidden
  candidates = [4.0, 6.0, 3.0, width / dim, (width + 0.5) / dim]
  for layer in layers:
    for ratio in candidates:
      cfg = DINOv3Config(embed_dim=dim, num_heads=1, ffn_layer=layer, ffn_ratio=ratio, pos_embed_rope_base=100.0)
      if cfg.ffn_hidden_dim == hidden:
        return dict(ffn_layer=layer, ffn_ratio=ratio)
  raise CheckpointError(f"no ffn_ratio gives an FFN width of {hidden} for embed_dim {dim}")


def infer_dinov3_config(state_dict: Mapping[str, np.ndarray], **overrides: Any) -> DINOv3Config:
  """Reads a DINOv3 backbone's architecture from Meta-keyed tensor shapes.

  The head size comes from the stored RoPE periods (head_dim / 4 of them), or 64 without them.
  What shapes cannot tell follows Meta's hub models (img_size 224, RoPE base 100 with separate
  coordinate normalisation, LayerNorm eps 1e-5); every field can be overridden.
  """
  required = ("cls_token", "patch_embed.proj.weight", "blocks.0.norm1.weight")
  absent = [k for k in required if k not in state_dict]
  if absent:
    raise CheckpointError(f"not a DINOv3 backbone state dict: missing {', '.join(absent)} "
                          f"(first keys: {', '.join(list(state_dict)[:5])})")
  dim = int(state_dict["cls_token"].shape[-1])
  patch_w = state_dict["patch_embed.proj.weight"]
  periods = state_dict.get("rope_embed.periods")
  head_dim = 4 * int(periods.shape[0]) if periods is not None else DEFAULT_HEAD_DIM
  fields: dict[str, Any] = dict(
      patch_size=int(patch_w.shape[-1]), in_chans=int(patch_w.shape[1]), embed_dim=dim, depth=_depth(state_dict),
      num_heads=max(dim // head_dim, 1),
      n_storage_tokens=int(state_dict["storage_tokens"].shape[1]) if "storage_tokens" in state_dict else 0,
      qkv_bias="blocks.0.attn.qkv.bias" in state_dict, mask_k_bias="blocks.0.attn.qkv.bias_mask" in state_dict,
      proj_bias="blocks.0.attn.proj.bias" in state_dict,
      layerscale_init=1e-5 if "blocks.0.ls1.gamma" in state_dict else None,
      norm_layer="layernormbf16" if "norm.bias" in state_dict else "rmsnorm",
      untie_cls_and_patch_norms="cls_norm.weight" in state_dict,
      untie_global_and_local_cls_norm="local_cls_norm.weight" in state_dict)
  if "blocks.0.mlp.w1.weight" in state_dict:
    fields.update(_ffn(dim, int(state_dict["blocks.0.mlp.w1.weight"].shape[0]), swiglu=True),
                  ffn_bias="blocks.0.mlp.w1.bias" in state_dict)
  elif "blocks.0.mlp.fc1.weight" in state_dict:
    fields.update(_ffn(dim, int(state_dict["blocks.0.mlp.fc1.weight"].shape[0]), swiglu=False),
                  ffn_bias="blocks.0.mlp.fc1.bias" in state_dict)
  else:
    raise CheckpointError("DINOv3 backbone without blocks.0.mlp.fc1 / blocks.0.mlp.w1 weights")
  unknown = set(overrides) - set(DINOv3Config.__dataclass_fields__)
  if unknown:
    raise ValueError(f"unknown backbone fields {sorted(unknown)}; valid: {sorted(DINOv3Config.__dataclass_fields__)}")
  return DINOv3Config(**{**fields, **overrides})


# ---------------------------------------------------------------------------------------------
# transformers <-> Meta.


def hf_dinov3_to_meta(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """A `transformers` DINOv3ViTModel state dict (hub files or `model.state_dict()`) -> Meta's keys.

  Args:
    state_dict: `embeddings.*`, `layer.{i}.*` or `model.layer.{i}.*`, `norm.*`.

  Returns:
    Meta's DINOv3 state dict, with the key bias Meta masks (zeros, `bias_mask` zero on the keys).
    It lacks Meta's `rope_embed.periods`, which depend on the head count and RoPE base of the
    transformers config: `with_rope_periods` adds them once the architecture is known.
  """
  dim = int(state_dict["embeddings.cls_token"].shape[-1])
  out: dict[str, np.ndarray] = {}
  attention: dict[int, dict[str, np.ndarray]] = {}
  gated = any(".mlp.gate_proj." in k for k in state_dict)
  for key, value in state_dict.items():
    if key.startswith("embeddings."):
      name = key[len("embeddings."):]
      if name == "patch_embeddings.weight" or name == "patch_embeddings.bias":
        out["patch_embed.proj." + name.split(".")[-1]] = value
      elif name == "mask_token":
        out["mask_token"] = np.asarray(value).reshape(1, dim)
      elif name == "register_tokens":
        if value.shape[1]:
          out["storage_tokens"] = value
      else:
        out[name] = value
    elif m := _HF_LAYER.match(key):
      i, rest = int(m.group(1)), m.group(2)
      if qkv := re.match(r"^attention\.([qkv])_proj\.(weight|bias)$", rest):
        attention.setdefault(i, {})[f"{qkv.group(1)}.{qkv.group(2)}"] = value
        continue
      for pattern, repl in _HF_BLOCK_RENAMES:
        rest = re.sub(pattern, repl.replace("{down}", "w3" if gated else "fc2"), rest)
      rest = re.sub(r"^mlp\.up_proj\.", "mlp.w2." if gated else "mlp.fc1.", rest)
      out[f"blocks.{i}.{rest}"] = value
    elif key.startswith("rope_embeddings."):
      continue  # non-persistent in transformers; Meta's periods are added below
    else:
      out[key] = value
  for i, parts in attention.items():
    if any(f"{p}.weight" not in parts for p in "qkv"):
      raise CheckpointError(f"layer {i}: attention is missing one of q_proj / k_proj / v_proj")
    out[f"blocks.{i}.attn.qkv.weight"] = np.concatenate([parts[f"{p}.weight"] for p in "qkv"], axis=0)
    if any(f"{p}.bias" in parts for p in "qkv"):
      zeros = np.zeros(dim, parts["q.weight"].dtype)
      out[f"blocks.{i}.attn.qkv.bias"] = np.concatenate([parts.get(f"{p}.bias", zeros) for p in "qkv"])
      if "k.bias" not in parts:  # Meta's layout: the key third of the bias masked out
        out[f"blocks.{i}.attn.qkv.bias_mask"] = np.concatenate(
            [np.ones(dim, zeros.dtype) if f"{p}.bias" in parts else np.zeros(dim, zeros.dtype) for p in "qkv"])
  return out


def with_rope_periods(state_dict: Mapping[str, np.ndarray], cfg: DINOv3Config) -> dict[str, np.ndarray]:
  """Adds the RoPE periods of `cfg` to a DINOv3 state dict that has none (one converted from transformers)."""
  if "rope_embed.periods" in state_dict:
    return dict(state_dict)
  return {**state_dict, "rope_embed.periods": rope_periods(cfg)}


def hf_config_fields(hf_config: Mapping[str, Any]) -> dict[str, Any]:
  """`DINOv3Config` fields that a transformers config.json tells and the tensors do not."""
  fields = {}
  if "num_attention_heads" in hf_config:
    fields["num_heads"] = int(hf_config["num_attention_heads"])
  if "rope_theta" in hf_config:
    fields["pos_embed_rope_base"] = float(hf_config["rope_theta"])
  if "layer_norm_eps" in hf_config:
    fields["norm_layer"] = "layernorm" if hf_config["layer_norm_eps"] < 5e-6 else "layernormbf16"
  if isinstance(hf_config.get("image_size"), int):
    fields["img_size"] = hf_config["image_size"]
  return fields


def meta_dinov3_to_hf(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Meta DINOv3 keys -> the names of transformers' hub files (`layer.{i}.*`, which every version reads).

  The key bias is applied through its mask (transformers has none; a nonzero effective key bias is
  written as `k_proj.bias`, which needs `key_bias=True` in the transformers config). The RoPE periods
  must follow `base ** (4 i / head_dim)` for some base (`rope_theta` in the config); `local_cls_norm`
  (used only in training) is dropped.
  """
  cfg = infer_dinov3_config(state_dict)
  if cfg.untie_cls_and_patch_norms:
    raise CheckpointError("transformers' DINOv3ViTModel has no separate CLS norm (cls_norm.*); it cannot hold this model")
  if cfg.norm_layer == "rmsnorm":
    raise CheckpointError("transformers' DINOv3ViTModel uses LayerNorm; this model uses RMSNorm")
  periods = np.asarray(state_dict["rope_embed.periods"], np.float64)
  base = float(periods[1]) ** (cfg.head_dim / 4) if len(periods) > 1 else 100.0
  expected = rope_periods(DINOv3Config(embed_dim=cfg.embed_dim, num_heads=cfg.num_heads, pos_embed_rope_base=base))
  if not np.allclose(periods, expected, rtol=1e-4):
    raise CheckpointError("the RoPE periods do not follow base ** (4 i / head_dim): transformers cannot compute them")
  dim = cfg.embed_dim
  out = {
      "embeddings.cls_token": state_dict["cls_token"],
      "embeddings.mask_token": np.asarray(state_dict["mask_token"]).reshape(1, 1, dim),
      "embeddings.register_tokens": state_dict.get("storage_tokens", np.zeros((1, 0, dim), np.float32)),
      "embeddings.patch_embeddings.weight": state_dict["patch_embed.proj.weight"],
      "embeddings.patch_embeddings.bias": state_dict["patch_embed.proj.bias"],
      "norm.weight": state_dict["norm.weight"], "norm.bias": state_dict["norm.bias"],
  }
  down = "w3" if cfg.ffn_layer != "mlp" else "fc2"
  for i in range(cfg.depth):
    src, dst = f"blocks.{i}.", f"layer.{i}."
    for p, w in zip("qkv", np.split(state_dict[src + "attn.qkv.weight"], 3, axis=0)):
      out[f"{dst}attention.{p}_proj.weight"] = w
    if src + "attn.qkv.bias" in state_dict:
      bias = np.asarray(state_dict[src + "attn.qkv.bias"])
      bias = bias * state_dict.get(src + "attn.qkv.bias_mask", 1.0)
      q, k, v = np.split(bias.astype(state_dict[src + "attn.qkv.bias"].dtype), 3)
      out[f"{dst}attention.q_proj.bias"], out[f"{dst}attention.v_proj.bias"] = q, v
      if np.any(k):
        out[f"{dst}attention.k_proj.bias"] = k
    for name in ("attn.proj.weight", "attn.proj.bias"):
      if src + name in state_dict:
        out[dst + "attention.o_proj." + name.split(".")[-1]] = state_dict[src + name]
    for j in "12":
      out[f"{dst}norm{j}.weight"], out[f"{dst}norm{j}.bias"] = state_dict[f"{src}norm{j}.weight"], state_dict[f"{src}norm{j}.bias"]
      out[f"{dst}layer_scale{j}.lambda1"] = state_dict.get(f"{src}ls{j}.gamma", np.ones(dim, np.float32))
    names = {"w1": "gate_proj", "w2": "up_proj", "w3": "down_proj"} if down == "w3" else {"fc1": "up_proj", "fc2": "down_proj"}
    for meta, hf in names.items():
      for kind in ("weight", "bias"):
        if f"{src}mlp.{meta}.{kind}" in state_dict:
          out[f"{dst}mlp.{hf}.{kind}"] = state_dict[f"{src}mlp.{meta}.{kind}"]
  return out


def hf_dinov3_config(cfg: DINOv3Config) -> dict[str, Any]:
  """The transformers `DINOv3ViTConfig` fields describing a backbone (for a config.json)."""
  swiglu = cfg.ffn_layer != "mlp"
  return dict(model_type="dinov3_vit", hidden_size=cfg.embed_dim, num_hidden_layers=cfg.depth,
              num_attention_heads=cfg.num_heads, intermediate_size=cfg.ffn_hidden_dim, patch_size=cfg.patch_size,
              num_channels=cfg.in_chans, image_size=cfg.img_size, num_register_tokens=cfg.n_storage_tokens,
              layer_norm_eps=cfg.norm_eps, rope_theta=cfg.pos_embed_rope_base or 100.0, use_gated_mlp=swiglu,
              hidden_act="silu" if swiglu else "gelu", query_bias=cfg.qkv_bias, value_bias=cfg.qkv_bias,
              key_bias=cfg.qkv_bias and not cfg.mask_k_bias, proj_bias=cfg.proj_bias, mlp_bias=cfg.ffn_bias,
              layerscale_value=cfg.layerscale_init or 1.0)

