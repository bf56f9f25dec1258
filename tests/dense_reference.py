"""PyTorch statements of Meta's dense-prediction maths, written for the tests from Meta's code.

Depth: `dinov2/hub/depth` (BNHead with depth bins, DPTHead, DepthEncoderDecoder.encode_decode) and
`dinov2/hub/utils.CenterPadding`. Segmentation: Meta's mmseg `BNHead` (`dinov2/eval/segmentation`) in
mmseg 0.x's `EncoderDecoder` (whole and slide inference, test-time augmentation).

The modules use the attribute names of Meta's, so their `state_dict()` has the key names and shapes
of Meta's released head files; `save_head` writes one the way Meta's files are laid out (an mmcv
checkpoint: `{"state_dict": {"decode_head.*": ...}, "meta": {...}}` with numpy scalars in the meta).
The backbone is a `transformers` Dinov2 model; its hidden states are the block outputs.
"""

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def center_pad(x: torch.Tensor, multiple: int) -> torch.Tensor:
  """(B, C, H, W) zero-padded to multiples of `multiple`, the extra pixel on the right/bottom."""
  pads = []
  for size in (x.shape[3], x.shape[2]):  # F.pad lists the last axis first
    extra = math.ceil(size / multiple) * multiple - size
    pads += [extra // 2, extra - extra // 2]
  return F.pad(x, pads)


def backbone_blocks(model, images: torch.Tensor, blocks, registers: int = 0, norm: bool = False):
  """[(patch map (B, D, h, w), cls (B, D))] of the given 0-based blocks of a transformers Dinov2 model."""
  patch = model.config.patch_size
  with torch.no_grad():
    hidden = model(pixel_values=images, output_hidden_states=True).hidden_states
  b, _, height, width = images.shape
  h, w = height // patch, width // patch
  out = []
  for i in blocks:
    tokens = model.layernorm(hidden[i + 1]) if norm else hidden[i + 1]
    patches = tokens[:, 1 + registers:].reshape(b, h, w, -1).permute(0, 3, 1, 2)
    out.append((patches, tokens[:, 0]))
  return out


# ------------------------------------------------------------------------------------------- depth


class LinearDepthHead(nn.Module):
  """BNHead(classify=True, bins "UD", norm "linear", input_transform "resize_concat", upsample 4)."""

  def __init__(self, in_channels: int, n_bins: int = 256, upsample: int = 4, min_depth=0.001, max_depth=80.0):
    super().__init__()
    self.upsample, self.min_depth, self.max_depth, self.n_bins = upsample, min_depth, max_depth, n_bins
    self.conv_depth = nn.Conv2d(in_channels, n_bins, kernel_size=1)

  def forward(self, features):
    maps = [torch.cat([p, c[:, :, None, None].expand_as(p)], dim=1) for p, c in features]
    size = [s * self.upsample for s in maps[0].shape[2:]]
    x = torch.cat([F.interpolate(m, size=size, mode="bilinear", align_corners=False) for m in maps], dim=1)
    scores = torch.relu(self.conv_depth(x)) + 0.1
    probs = scores / scores.sum(dim=1, keepdim=True)
    bins = torch.linspace(self.min_depth, self.max_depth, self.n_bins)
    return torch.einsum("bkhw,k->bhw", probs, bins).unsqueeze(1)


class ConvUnit(nn.Module):
  """Meta's ConvModule as the DPT head uses it: an optional ReLU before and/or after one `conv`."""

  def __init__(self, cin, cout, kernel, stride=1, bias=True, relu_before=False, relu_after=False):
    super().__init__()
    self.relu_before, self.relu_after = relu_before, relu_after
    self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=bias)

  def forward(self, x):
    x = self.conv(torch.relu(x) if self.relu_before else x)
    return torch.relu(x) if self.relu_after else x


class ResidualUnit(nn.Module):
  def __init__(self, c):
    super().__init__()
    self.conv1 = ConvUnit(c, c, 3, bias=False, relu_before=True)
    self.conv2 = ConvUnit(c, c, 3, bias=False, relu_before=True)

  def forward(self, x):
    return x + self.conv2(self.conv1(x))


class FusionBlock(nn.Module):
  def __init__(self, c, first: bool):
    super().__init__()
    self.project = ConvUnit(c, c, 1)
    self.res_conv_unit1 = None if first else ResidualUnit(c)
    self.res_conv_unit2 = ResidualUnit(c)

  def forward(self, x, skip=None):
    if skip is not None:
      if skip.shape != x.shape:
        skip = F.interpolate(skip, size=x.shape[2:], mode="bilinear", align_corners=False)
      x = x + self.res_conv_unit1(skip)
    x = self.res_conv_unit2(x)
    x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)
    return self.project(x)


class Upsample2x(nn.Module):
  def forward(self, x):
    return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)


class Reassemble(nn.Module):
  def __init__(self, dim, post):
    super().__init__()
    self.projects = nn.ModuleList([ConvUnit(dim, c, 1) for c in post])
    self.resize_layers = nn.ModuleList([
        nn.ConvTranspose2d(post[0], post[0], 4, stride=4), nn.ConvTranspose2d(post[1], post[1], 2, stride=2),
        nn.Identity(), nn.Conv2d(post[3], post[3], 3, stride=2, padding=1)])
    self.readout_projects = nn.ModuleList([nn.Sequential(nn.Linear(2 * dim, dim), nn.GELU()) for _ in post])

  def forward(self, features):
    out = []
    for i, (x, cls) in enumerate(features):
      b, d, h, w = x.shape
      tokens = x.flatten(2).transpose(1, 2)
      tokens = self.readout_projects[i](torch.cat([tokens, cls[:, None].expand_as(tokens)], dim=-1))
      x = tokens.transpose(1, 2).reshape(b, d, h, w)
      out.append(self.resize_layers[i](self.projects[i](x)))
    return out


class DPTDepthHead(nn.Module):
  """DPTHead(channels, post_process_channels D/8..D, readout "project"), then relu + min_depth."""

  def __init__(self, dim, channels=256, min_depth=0.001, max_depth=10.0):
    super().__init__()
    post = [dim // 8, dim // 4, dim // 2, dim]
    self.min_depth, self.max_depth = min_depth, max_depth
    self.reassemble_blocks = Reassemble(dim, post)
    self.convs = nn.ModuleList([ConvUnit(c, channels, 3, bias=False) for c in post])
    self.fusion_blocks = nn.ModuleList([FusionBlock(channels, first=i == 0) for i in range(4)])
    self.project = ConvUnit(channels, channels, 3, relu_after=True)
    self.conv_depth = nn.Module()
    self.conv_depth.head = nn.Sequential(
        nn.Conv2d(channels, channels // 2, 3, padding=1), Upsample2x(), nn.Conv2d(channels // 2, 32, 3, padding=1),
        nn.ReLU(), nn.Conv2d(32, 1, 1))

  def forward(self, features):
    maps = [conv(x) for conv, x in zip(self.convs, self.reassemble_blocks(features))]
    out = self.fusion_blocks[0](maps[-1])
    for i in range(1, 4):
      out = self.fusion_blocks[i](out, maps[-(i + 1)])
    return torch.relu(self.conv_depth.head(self.project(out))) + self.min_depth


def depther(backbone, head, images: torch.Tensor, out_index, registers: int = 0) -> torch.Tensor:
  """DepthEncoderDecoder.encode_decode with CenterPadding on the backbone: (B, 3, H, W) -> (B, H, W)."""
  padded = center_pad(images, backbone.config.patch_size)
  with torch.no_grad():
    out = head(backbone_blocks(backbone, padded, out_index, registers))
    out = torch.clamp(out, head.min_depth, head.max_depth)
    out = F.interpolate(out, size=images.shape[2:], mode="bilinear", align_corners=False)
  return out[:, 0].numpy()


# ------------------------------------------------------------------------------------ segmentation


class SegmentationHead(nn.Module):
  """mmseg BNHead of Meta's linear/ms configs (resize_concat, SyncBN, 1x1 conv_seg, no dropout)."""

  def __init__(self, channels: int, num_classes: int):
    super().__init__()
    self.bn = nn.BatchNorm2d(channels)
    self.conv_seg = nn.Conv2d(channels, num_classes, kernel_size=1)

  def forward(self, features):
    size = features[0].shape[2:]
    x = torch.cat([F.interpolate(f, size=size, mode="bilinear", align_corners=False) for f in features], dim=1)
    return self.conv_seg(self.bn(x))


def segment(backbone, head, images: torch.Tensor, n_layers: int, registers: int = 0) -> torch.Tensor:
  """mmseg EncoderDecoder.encode_decode (normed last n_layers blocks, CenterPadding): NCHW logits."""
  padded = center_pad(images, backbone.config.patch_size)
  depth = backbone.config.num_hidden_layers
  blocks = backbone_blocks(backbone, padded, range(depth - n_layers, depth), registers, norm=True)
  with torch.no_grad():
    logits = head([p for p, _ in blocks])
    return F.interpolate(logits, size=images.shape[2:], mode="bilinear", align_corners=False)


def slide(backbone, head, images, n_layers, crop, stride, registers=0):
  """mmseg slide_inference: crop windows, logits summed and divided by the coverage count."""
  b, _, h, w = images.shape
  grids = [max(size - crop + stride - 1, 0) // stride + 1 for size in (h, w)]
  total = torch.zeros(b, head.conv_seg.out_channels, h, w)
  count = torch.zeros(b, 1, h, w)
  for i in range(grids[0]):
    for j in range(grids[1]):
      y1, x1 = min(i * stride + crop, h), min(j * stride + crop, w)
      y0, x0 = max(y1 - crop, 0), max(x1 - crop, 0)
      total[:, :, y0:y1, x0:x1] += segment(backbone, head, images[:, :, y0:y1, x0:x1], n_layers, registers)
      count[:, :, y0:y1, x0:x1] += 1
  return total / count


def test_time_augmented(backbone, head, images, n_layers, scales, flip, registers=0):
  """mmseg aug_test: per (scale, flip) softmax of the logits resized to the input size, averaged."""
  h, w = images.shape[2:]
  probs = []
  for scale in scales:
    size = (int(h * scale + 0.5), int(w * scale + 0.5))
    scaled = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
    for mirrored in ([False, True] if flip else [False]):
      x = scaled.flip(3) if mirrored else scaled
      logits = F.interpolate(segment(backbone, head, x, n_layers, registers), size=(h, w), mode="bilinear",
                             align_corners=False)
      p = logits.softmax(dim=1)
      probs.append(p.flip(3) if mirrored else p)
  return torch.stack(probs).mean(0)


# ------------------------------------------------------------------------------------------- files


def perturb(module: nn.Module, seed: int, scale: float = 0.05) -> nn.Module:
  """Adds noise to every parameter and BN statistic so that no tensor keeps its trivial init."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      p.add_(scale * torch.randn(p.shape, generator=gen))
    for name, buf in module.named_buffers():
      if name.endswith("running_mean"):
        buf.copy_(0.3 * torch.randn(buf.shape, generator=gen))
      elif name.endswith("running_var"):
        buf.copy_(0.5 + torch.rand(buf.shape, generator=gen))
  return module.eval()


def save_head(head: nn.Module, path, backbone: nn.Module | None = None) -> None:
  """Writes a head as Meta's released files are: an mmcv checkpoint of the EncoderDecoder's head
  (with a backbone: of the whole model, `backbone.*` keys too, as `depther.state_dict()` has them)."""
  state = {f"decode_head.{k}": v for k, v in head.state_dict().items()}
  if backbone is not None:
    state.update({f"backbone.{k}": v for k, v in backbone.state_dict().items()})
  meta = {"mmcv_version": "1.7.1", "iter": np.int64(40000), "best_score": np.float64(0.4125), "CLASSES": ("a", "b")}
  torch.save({"state_dict": state, "meta": meta}, path)
