"""Independent PyTorch references for the tests: `transformers` Dinov2 and DINOv3ViT models with random weights.

`transformers` resamples positional embeddings with `size=` (no offset). Meta's code passes
`scale_factor=(h + 0.1) / M` instead; `use_meta_interpolation` re-states Meta's 10 lines in torch
so the same PyTorch model can serve as a reference for Meta's default behaviour too.
"""

import math

import numpy as np
import torch
import torch.nn.functional as F
from transformers import (DINOv3ViTConfig, DINOv3ViTModel, Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig,
                          Dinov2WithRegistersModel)


def make_hf_model(registers: bool, *, hidden=128, layers=2, heads=2, image_size=112, patch=14,
                  swiglu=False, seed=0):
  """A random, perturbed transformers Dinov2 model: LayerScale, biases, tokens, norms all non-trivial."""
  torch.manual_seed(seed)
  kw = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, image_size=image_size,
            patch_size=patch, use_swiglu_ffn=swiglu, layerscale_value=1.0, mlp_ratio=4,
            attn_implementation="eager")
  if registers:
    model = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(num_register_tokens=4, **kw))
  else:
    model = Dinov2Model(Dinov2Config(**kw))
  return _perturb(model, seed)


def _perturb(model, seed):
  with torch.no_grad():
    gen = torch.Generator().manual_seed(seed + 1)
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      if "norm" in name and name.endswith("weight"):
        p.copy_(1.0 + 0.2 * noise)       # LayerNorm gains around 1
      elif "lambda1" in name:
        p.copy_(0.5 + 0.3 * noise)       # LayerScale far from its init value
      elif name.endswith("position_embeddings") or "token" in name:
        p.copy_(0.5 * noise)             # tokens and positions clearly visible
      else:
        p.add_(0.05 * noise)             # biases non-zero, weights perturbed
  return model.eval()


def make_hf_dinov3_model(*, hidden=128, layers=2, heads=2, intermediate=None, registers=4, gated=False, seed=0,
                         **config):
  """A random, perturbed transformers DINOv3ViTModel (patch 16, RoPE base 100, no key bias, as Meta's)."""
  torch.manual_seed(seed)
  cfg = DINOv3ViTConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=intermediate or (4 * hidden if not gated else 2 * hidden),
                        num_register_tokens=registers, use_gated_mlp=gated, hidden_act="silu" if gated else "gelu",
                        layerscale_value=1e-5, attn_implementation="eager", **config)
  return _perturb(DINOv3ViTModel(cfg), seed)


def use_meta_interpolation(model, offset=0.1, antialias=False):
  """Swaps the model's positional-embedding resampling for Meta's (scale_factor with offset)."""
  emb = model.embeddings

  def interpolate(embeddings, height, width):
    pos = emb.position_embeddings
    n_patch, n_stored = embeddings.shape[1] - 1 - 0, pos.shape[1] - 1
    h0, w0 = height // emb.patch_size, width // emb.patch_size
    if h0 * w0 == n_stored and height == width:
      return pos
    m = int(math.sqrt(n_stored))
    patch = pos[:, 1:].reshape(1, m, m, -1).permute(0, 3, 1, 2).float()
    kwargs = dict(scale_factor=((h0 + offset) / m, (w0 + offset) / m)) if offset else dict(size=(h0, w0))
    patch = F.interpolate(patch, mode="bicubic", antialias=antialias, align_corners=False, **kwargs)
    assert patch.shape[-2:] == (h0, w0)
    patch = patch.permute(0, 2, 3, 1).reshape(1, -1, pos.shape[-1])
    return torch.cat([pos[:, :1], patch.to(pos.dtype)], dim=1)

  emb.interpolate_pos_encoding = interpolate
  return model


def hf_forward_features(model, images_nhwc: np.ndarray, masks: np.ndarray | None = None, registers: int = 0):
  """Meta's forward_features keys computed from a transformers model (NHWC numpy in, numpy out)."""
  x = torch.from_numpy(np.ascontiguousarray(images_nhwc.transpose(0, 3, 1, 2)))
  kw = {} if masks is None else {"bool_masked_pos": torch.from_numpy(masks)}
  with torch.no_grad():
    out = model(pixel_values=x, output_hidden_states=True, **kw)
  normed = out.last_hidden_state.numpy()
  return {
      "x_norm_clstoken": normed[:, 0],
      "x_norm_regtokens": normed[:, 1:1 + registers],
      "x_norm_patchtokens": normed[:, 1 + registers:],
      "x_prenorm": out.hidden_states[-1].numpy(),
  }


def hf_dinov3_forward(model, images_nhwc: np.ndarray, masks: np.ndarray | None = None):
  """(forward_features-like dict, hidden states) of a transformers DINOv3ViTModel (NHWC numpy in, numpy out)."""
  x = torch.from_numpy(np.ascontiguousarray(images_nhwc.transpose(0, 3, 1, 2)))
  kw = {} if masks is None else {"bool_masked_pos": torch.from_numpy(masks)}
  with torch.no_grad():
    out = model(pixel_values=x, output_hidden_states=True, **kw)
  r = model.config.num_register_tokens
  normed = out.last_hidden_state.numpy()
  features = {"x_norm_clstoken": normed[:, 0], "x_norm_regtokens": normed[:, 1:1 + r],
              "x_norm_patchtokens": normed[:, 1 + r:], "x_prenorm": out.hidden_states[-1].numpy()}
  return features, out.hidden_states


def hf_state_dict(model) -> dict[str, np.ndarray]:
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
