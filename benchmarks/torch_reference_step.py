"""An independent PyTorch re-statement of ONE DINOv2 training iteration, as Meta's code does it.

Meta's `SSLMetaArch.forward_backward` + the body of `do_train` (facebookresearch/dinov2), re-stated
from their documented semantics (see `shared/reference/dinov2_reference.md`, sections 2-4 and 6) for
a `transformers` `Dinov2Model` backbone, so that the JAX train step can be checked against a second,
independently written implementation (tests/test_train_step_parity.py) and timed against it
(benchmarks/train_step.py).

One iteration (`TorchDinov2Step.step(batch, it)`):

  1. every optimizer group gets `lr = (last_layer_lr if is_last_layer else lr) * lr_multiplier`
     and `weight_decay = wd * wd_multiplier` from this iteration's schedule values;
  2. teacher (eval mode, no grad, no masks) on the 2B global crops; its CLS chunks are swapped
     (crop 1 first) so that the global DINO term pairs student crop c with teacher crop 1-c; the
     masked patch tokens are gathered with `mask_indices` into a zero buffer of `upperbound` rows;
     the head runs on [swapped CLS; masked tokens; zero padding] (shared iBOT head) or DINO head on
     the CLS and iBOT head on the padded buffer (separate head);
  3. targets: softmax centering with Meta's LAZY centre (the centre used at step k folds in the
     batch centre of step k-1 only, momentum 0.9, fed raw logits) or Sinkhorn-Knopp (Meta's
     algorithm: exp without max-subtraction, 3 iterations, B = rows; for iBOT B = #masked tokens);
  4. student (train mode) on the masked global crops (`bool_masked_pos`) and the local crops; one
     DINO-head call on [local CLS; global CLS; padded masked tokens] (shared head) as Meta;
  5. loss = dino_local / (2 n_local + 2) + 2 * dino_global / (2 n_local + 2)
            + 0.1 * sum_c KoLeo(student backbone CLS of global crop c) + iBOT forward_masked;
  6. backward; `clip_grad_norm_(3.0)` separately for backbone, dino_head, ibot_head;
     `torch.optim.AdamW(betas=(0.9, 0.999))` step with Meta's parameter groups;
  7. EMA teacher `t = m t + (1 - m) s` with this iteration's momentum.

Choices (documented because they matter for parity):

* Positional embeddings. transformers resamples with `size=` (no offset); Meta passes
  `scale_factor=(h + 0.1) / M`, which moves the sampling grid. Both backbones here get Meta's
  resampling patched in (`interpolate_offset`, default 0.1, the same as the JAX default), so local
  crops (which need resampling) see exactly Meta's function. `interpolate_offset=0.0` gives
  transformers' own `size=` behaviour. Global crops equal to `img_size` are never resampled.
* Stochastic depth: transformers only has per-sample DropPath, Meta uses batch-subset residuals
  above a rate of 0.1. For parity and for a like-for-like benchmark use `drop_path_rate=0`.
* Loss values are returned as they are BACKPROPAGATED (Meta logs koleo/2 and ibot/2; the
  `meta_logged` flag of `step` gives those instead), under the JAX step's metric names.
* The batch is the JAX step's batch (NHWC numpy, crop-major, masks padded to the static upper
  bound with `mask_valid`); it is turned into Meta's ragged `mask_indices_list` / `masks_weight`
  here (`n_masked = mask_valid.sum()`).
* No registers (a `Dinov2Model` has none), no fp16 / grad scaler (float32 throughout).

Parameter-group rules are applied to META names (`blocks.3.attn.qkv.weight`, `last_layer.weight_g`),
obtained from the transformers names by `meta_name_of`.
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# ------------------------------------------------------------------------------------------------
# Names: transformers Dinov2Model -> Meta DinoVisionTransformer.

_RENAMES = [  # applied in order; q/k/v and gate/up all land in Meta's fused tensors
    (r"^embeddings\.cls_token$", "cls_token"),
    (r"^embeddings\.mask_token$", "mask_token"),
    (r"^embeddings\.position_embeddings$", "pos_embed"),
    (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"^layernorm\.", "norm."),
    (r"^encoder\.layer\.(\d+)\.", r"blocks.\1."),
    (r"\.attention\.(?:q|k|v)_proj\.", ".attn.qkv."),
    (r"\.attention\.o_proj\.", ".attn.proj."),
    (r"\.layer_scale([12])\.lambda1$", r".ls\1.gamma"),
    (r"\.mlp\.(?:gate|up)_proj\.", ".mlp.w12."),
    (r"\.mlp\.down_proj\.", ".mlp.w3."),
]


def meta_name_of(hf_name: str) -> str:
  """The Meta backbone key a transformers parameter belongs to (q/k/v -> `attn.qkv`, ...)."""
  for pattern, repl in _RENAMES:
    hf_name = re.sub(pattern, repl, hf_name)
  return hf_name


def _hf_state_from_meta(sd: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
  """Meta backbone keys -> transformers keys (splits the fused qkv / w12 tensors)."""
  out = {}
  for key, value in sd.items():
    value = torch.from_numpy(np.array(value, dtype=np.float32, copy=True))
    m = re.match(r"^blocks\.(\d+)\.(.*)$", key)
    if m is None:
      fixed = {"cls_token": "embeddings.cls_token", "mask_token": "embeddings.mask_token",
               "pos_embed": "embeddings.position_embeddings"}
      name = fixed.get(key) or re.sub(r"^patch_embed\.proj\.", "embeddings.patch_embeddings.projection.",
                                      re.sub(r"^norm\.", "layernorm.", key))
      out[name] = value
      continue
    prefix, rest = f"encoder.layer.{m.group(1)}.", m.group(2)
    kind = rest.rsplit(".", 1)[-1]
    if rest.startswith("attn.qkv."):
      for part, chunk in zip("qkv", value.chunk(3, dim=0)):  # rows of qkv are [q; k; v]
        out[f"{prefix}attention.{part}_proj.{kind}"] = chunk.clone()
    elif rest.startswith("mlp.w12."):
      gate, up = value.chunk(2, dim=0)  # Meta's first half is the gate
      out[f"{prefix}mlp.gate_proj.{kind}"], out[f"{prefix}mlp.up_proj.{kind}"] = gate.clone(), up.clone()
    else:
      for pattern, repl in ((r"^attn\.proj\.", "attention.o_proj."), (r"^ls([12])\.gamma$", r"layer_scale\1.lambda1"),
                            (r"^mlp\.w3\.", "mlp.down_proj.")):
        rest = re.sub(pattern, repl, rest)
      out[prefix + rest] = value
  return out


def _meta_state_from_hf(model: nn.Module, what=None) -> dict[str, np.ndarray]:
  """transformers parameters (or grads / optimizer state, see `_numpy_of`) -> Meta backbone keys.

  Fuses q/k/v and gate/up back into Meta's `attn.qkv` / `mlp.w12`.
  """
  fused: dict[str, dict[str, np.ndarray]] = {}
  out = {}
  for name, p in model.named_parameters():
    value = _numpy_of(p, what)
    m = re.search(r"\.(?:attention\.([qkv])_proj|mlp\.(gate|up)_proj)\.", name)
    if m:
      fused.setdefault(meta_name_of(name), {})[m.group(1) or m.group(2)] = value
    else:
      out[meta_name_of(name)] = value
  for key, parts in fused.items():
    order = "qkv" if ".attn.qkv." in key else ("gate", "up")
    out[key] = np.concatenate([parts[o] for o in order], axis=0)
  return out


def _numpy_of(p: torch.Tensor, what) -> np.ndarray:
  """The parameter itself (what=False/None), its `.grad` (True) or `what(p)` (e.g. optimizer state)."""
  if not what:
    return p.detach().numpy().copy()
  value = p.grad if what is True else what(p)
  return np.zeros(p.shape, np.float32) if value is None else value.detach().numpy().copy()


# ------------------------------------------------------------------------------------------------
# Modules.


def _patch_meta_interpolation(model: nn.Module, offset: float, antialias: bool = False) -> None:
  """Makes `model.embeddings` resample the patch positions as Meta's `interpolate_pos_encoding`.

  Meta: return the stored table iff the patch count matches and the input is square; otherwise
  bicubic (align_corners=False) in float32 with `scale_factor=((h0 + offset) / M, (w0 + offset) / M)`
  when offset is non-zero, else `size=(h0, w0)`; the CLS position is kept.
  """
  emb = model.embeddings

  def interpolate(embeddings, height, width):
    pos = emb.position_embeddings
    n_stored = pos.shape[1] - 1
    h0, w0 = height // emb.patch_size, width // emb.patch_size
    if embeddings.shape[1] - 1 == n_stored and height == width:
      return pos
    m = int(math.sqrt(n_stored))
    grid = pos[:, 1:].reshape(1, m, m, -1).permute(0, 3, 1, 2).float()
    how = dict(scale_factor=((h0 + offset) / m, (w0 + offset) / m)) if offset else dict(size=(h0, w0))
    grid = F.interpolate(grid, mode="bicubic", antialias=antialias, align_corners=False, **how)
    assert tuple(grid.shape[-2:]) == (h0, w0), (grid.shape, h0, w0)
    grid = grid.permute(0, 2, 3, 1).reshape(1, h0 * w0, -1).to(pos.dtype)
    return torch.cat([pos[:, :1], grid], dim=1)

  emb.interpolate_pos_encoding = interpolate


def make_backbone(*, embed_dim: int, depth: int, num_heads: int, patch_size: int, img_size: int,
                  mlp_ratio: float = 4.0, ffn_layer: str = "mlp", layerscale: float | None = 1.0,
                  drop_path_rate: float = 0.0, interpolate_offset: float = 0.1,
                  attn_implementation: str = "sdpa") -> nn.Module:
  """A transformers `Dinov2Model` shaped like Meta's `DinoVisionTransformer` (no registers)."""
  from transformers import Dinov2Config, Dinov2Model

  if not layerscale:
    raise ValueError("transformers' Dinov2Model always has LayerScale; use layerscale > 0")
  if mlp_ratio != int(mlp_ratio):
    raise ValueError(f"transformers' Dinov2Config takes an integer mlp_ratio, got {mlp_ratio}")
  cfg = Dinov2Config(
      hidden_size=embed_dim, num_hidden_layers=depth, num_attention_heads=num_heads, patch_size=patch_size,
      image_size=img_size, mlp_ratio=int(mlp_ratio), use_swiglu_ffn=ffn_layer.startswith("swiglu"),
      layerscale_value=layerscale, drop_path_rate=drop_path_rate, layer_norm_eps=1e-6, hidden_act="gelu",
      qkv_bias=True, attn_implementation=attn_implementation)
  model = Dinov2Model(cfg)
  _patch_meta_interpolation(model, interpolate_offset)
  return model


class DINOHead(nn.Module):
  """Meta's `DINOHead` (no BatchNorm): Linear/GELU MLP -> F.normalize -> weight-normed Linear.

  Keys: `mlp.0/2/4.{weight,bias}` (`mlp.{weight,bias}` for one layer), `last_layer.weight_g` (K, 1)
  and `last_layer.weight_v` (K, bottleneck), i.e. the old `torch.nn.utils.weight_norm(dim=0)`.
  """

  def __init__(self, in_dim: int, out_dim: int, nlayers: int = 3, hidden_dim: int = 2048,
               bottleneck_dim: int = 256):
    super().__init__()
    dims = [in_dim] + [hidden_dim] * (nlayers - 1) + [bottleneck_dim]
    layers: list[nn.Module] = []
    for i in range(nlayers):
      layers.append(nn.Linear(dims[i], dims[i + 1]))
      if i < nlayers - 1:
        layers.append(nn.GELU())
    self.mlp = layers[0] if nlayers == 1 else nn.Sequential(*layers)
    for layer in layers:
      if isinstance(layer, nn.Linear):
        nn.init.trunc_normal_(layer.weight, std=0.02)
        nn.init.zeros_(layer.bias)
    with warnings.catch_warnings():  # the old API is what Meta uses (and gives Meta's key names)
      warnings.simplefilter("ignore", FutureWarning)
      self.last_layer = nn.utils.weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
    self.last_layer.weight_g.data.fill_(1.0)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = F.normalize(self.mlp(x), dim=-1, eps=1e-12)
    return self.last_layer(x)


# ------------------------------------------------------------------------------------------------
# Losses and teacher targets (Meta's `dinov2/loss/`).


class LazyCenter:
  """Meta's lazy teacher centre: `softmax_center_teacher` folds the PREVIOUS batch centre in first.

  `center` is the centre used at the latest step, `pending` that step's batch centre (the mean of
  the raw teacher logits), folded in as `0.9 * center + 0.1 * pending` at the next step.
  """

  def __init__(self, k: int, momentum: float = 0.9):
    self.center = torch.zeros(1, k)
    self.pending: torch.Tensor | None = None
    self.momentum = momentum

  @torch.no_grad()
  def softmax_center_teacher(self, t: torch.Tensor, temp: float) -> torch.Tensor:
    if self.pending is not None:
      self.center = self.center * self.momentum + self.pending * (1 - self.momentum)
      self.pending = None
    return F.softmax((t - self.center) / temp, dim=-1)

  @torch.no_grad()
  def update_center(self, t: torch.Tensor) -> None:
    self.pending = torch.sum(t, dim=0, keepdim=True) / len(t)


@torch.no_grad()
def sinkhorn_knopp_teacher(t: torch.Tensor, temp: float, n_iterations: int = 3) -> torch.Tensor:
  """Meta's Sinkhorn-Knopp (single process): B = number of rows, no max-subtraction."""
  q = torch.exp(t.float() / temp).t()  # (K, B)
  k, b = q.shape
  q /= torch.sum(q)
  for _ in range(n_iterations):
    q /= torch.sum(q, dim=1, keepdim=True)
    q /= k
    q /= torch.sum(q, dim=0, keepdim=True)
    q /= b
  q *= b
  return q.t()


def dino_cross_entropy(student_list, teacher_list, student_temp: float) -> torch.Tensor:
  """Meta's `DINOLoss.forward`: -sum over (student, teacher) pairs of the row-mean CE."""
  total = 0.0
  for s in student_list:
    log_p = F.log_softmax(s / student_temp, dim=-1)
    for t in teacher_list:
      total = total - torch.sum(t * log_p, dim=-1).mean()
  return total


def ibot_forward_masked(s, t, masks, masks_weight, student_temp: float) -> torch.Tensor:
  """Meta's `iBOTPatchLoss.forward_masked`: weighted CE over masked tokens / number of ALL crops."""
  ce = torch.sum(t * F.log_softmax(s / student_temp, dim=-1), dim=-1)
  return -(ce * masks_weight).sum() / masks.shape[0]


_PDIST = nn.PairwiseDistance(2, eps=1e-8)  # ||a - b + eps||: Meta's eps placement


def koleo(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
  """Meta's `KoLeoLoss`: nearest neighbour by dot product (diagonal -1), -mean log(d + eps)."""
  x = F.normalize(x, eps=eps, p=2, dim=-1)
  with torch.no_grad():
    dots = x @ x.t()
    dots.view(-1)[:: x.shape[0] + 1].fill_(-1)
    nearest = torch.max(dots, dim=1).indices
  return -torch.log(_PDIST(x, x[nearest]) + eps).mean()


# ------------------------------------------------------------------------------------------------
# Parameter groups (Meta's `utils/param_groups.py`), on Meta names relative to a submodule.

_EMBEDDINGS = ("pos_embed", "patch_embed", "mask_token", "cls_token", "register_tokens")


def meta_param_group(name: str, n_blocks: int, layerwise_decay: float, patch_embed_lr_mult: float) -> dict:
  """`lr_multiplier`, `wd_multiplier`, `is_last_layer` of one submodule-relative Meta name."""
  layer_id = n_blocks + 1
  if n_blocks > 0:  # only backbones have per-layer ids
    if any(s in name for s in _EMBEDDINGS):
      layer_id = 0
    elif (m := re.search(r"(?:^|\.)blocks\.(\d+)\.", name)):
      layer_id = int(m.group(1)) + 1
  lr_mult = layerwise_decay ** (n_blocks + 1 - layer_id)
  if "patch_embed" in name:
    lr_mult *= patch_embed_lr_mult
  wd_mult = 0.0 if (name.endswith(".bias") or "norm" in name or "gamma" in name) else 1.0
  return dict(lr_multiplier=lr_mult, wd_multiplier=wd_mult, is_last_layer="last_layer" in name)


# ------------------------------------------------------------------------------------------------
# The step.


@dataclasses.dataclass(frozen=True)
class HeadSpec:
  n_prototypes: int = 65536
  nlayers: int = 3
  hidden_dim: int = 2048
  bottleneck_dim: int = 256


SCHEDULE_NAMES = ("lr", "wd", "last_layer_lr", "momentum", "teacher_temp")


class TorchDinov2Step:
  """Student + EMA teacher + AdamW, stepping exactly one Meta DINOv2 iteration per `step` call.

  Args:
    embed_dim, depth, num_heads, patch_size, img_size, mlp_ratio, ffn_layer, layerscale,
      drop_path_rate, interpolate_offset: backbone (Meta's `student.*`; img_size = global crop size).
    n_local_crops: Meta's `crops.local_crops_number`.
    dino_head: DINO head sizes. ibot_head: None (iBOT shares the DINO head, Meta's default) or the
      separate iBOT head sizes (`ibot.separate_head: true`).
    centering: "centering" (lazy softmax centring) or "sinkhorn_knopp".
    schedules: optional {name: 1-D array} with names in `SCHEDULE_NAMES`, indexed by iteration
      with the last entry returned past the end (e.g. `TrainSchedules.tables()` of the JAX code).
    layerwise_decay, patch_embed_lr_mult, clip_grad, betas, adamw_eps: Meta's `optim.*`.
    koleo_loss_weight, dino_loss_weight, ibot_loss_weight, student_temp, center_momentum: losses.
    attn_implementation: transformers attention kernel ("sdpa" or "eager").
    seed: torch seed of the random initialisation (replace it with `load_meta_state_dicts`).
  """

  def __init__(self, *, embed_dim: int, depth: int, num_heads: int, patch_size: int, img_size: int,
               n_local_crops: int, dino_head: HeadSpec = HeadSpec(), ibot_head: HeadSpec | None = None,
               centering: str = "centering", schedules: Mapping[str, np.ndarray] | None = None,
               mlp_ratio: float = 4.0, ffn_layer: str = "mlp", layerscale: float = 1e-5,
               drop_path_rate: float = 0.0, interpolate_offset: float = 0.1,
               layerwise_decay: float = 0.9, patch_embed_lr_mult: float = 0.2, clip_grad: float = 3.0,
               betas=(0.9, 0.999), adamw_eps: float = 1e-8, koleo_loss_weight: float = 0.1,
               dino_loss_weight: float = 1.0, ibot_loss_weight: float = 1.0, student_temp: float = 0.1,
               center_momentum: float = 0.9, attn_implementation: str = "sdpa", seed: int = 0):
    if centering not in ("centering", "sinkhorn_knopp"):
      raise ValueError(f"centering={centering!r}; expected 'centering' or 'sinkhorn_knopp'")
    torch.manual_seed(seed)
    self.n_local_crops = n_local_crops
    self.centering = centering
    self.schedules = None if schedules is None else {k: np.asarray(v) for k, v in schedules.items()}
    self.clip_grad = clip_grad
    self.koleo_loss_weight, self.dino_loss_weight, self.ibot_loss_weight = (
        koleo_loss_weight, dino_loss_weight, ibot_loss_weight)
    self.student_temp = student_temp
    self.interpolate_offset = interpolate_offset
    self.layerwise_decay, self.patch_embed_lr_mult = layerwise_decay, patch_embed_lr_mult
    self.head_nlayers = {"dino_head": dino_head.nlayers}

    def build() -> nn.ModuleDict:
      modules = {
          "backbone": make_backbone(
              embed_dim=embed_dim, depth=depth, num_heads=num_heads, patch_size=patch_size, img_size=img_size,
              mlp_ratio=mlp_ratio, ffn_layer=ffn_layer, layerscale=layerscale, drop_path_rate=drop_path_rate,
              interpolate_offset=interpolate_offset, attn_implementation=attn_implementation),
          "dino_head": DINOHead(embed_dim, dino_head.n_prototypes, dino_head.nlayers, dino_head.hidden_dim,
                                dino_head.bottleneck_dim)}
      if ibot_head is not None:
        modules["ibot_head"] = DINOHead(embed_dim, ibot_head.n_prototypes, ibot_head.nlayers, ibot_head.hidden_dim,
                                        ibot_head.bottleneck_dim)
      return nn.ModuleDict(modules)

    if ibot_head is not None:
      self.head_nlayers["ibot_head"] = ibot_head.nlayers
    self.separate_ibot_head = ibot_head is not None
    self.student = build()
    # Meta: the teacher starts as a copy of the student and is never trained by the optimizer.
    # (Built and loaded rather than deep-copied: old-style weight_norm modules cannot be deep-copied.)
    self.teacher = build()
    self.teacher.load_state_dict(self.student.state_dict())
    for p in self.teacher.parameters():
      p.requires_grad_(False)
    self.student.train()
    self.teacher.eval()

    self.dino_center = LazyCenter(dino_head.n_prototypes, center_momentum)
    ibot_k = (ibot_head or dino_head).n_prototypes
    self.ibot_center = LazyCenter(ibot_k, center_momentum)

    self.param_groups = self._param_groups()
    self.optimizer = torch.optim.AdamW(self.param_groups, lr=0.0, betas=tuple(betas), eps=adamw_eps)

  # -- parameters ---------------------------------------------------------------------------------

  def meta_names(self, module: str) -> dict[str, str]:
    """{torch parameter name: Meta key} for one submodule (heads already use Meta's keys)."""
    named = self.student[module].named_parameters()
    return {n: (meta_name_of(n) if module == "backbone" else n) for n, _ in named}

  def _param_groups(self) -> list[dict]:
    """Meta's groups per submodule, fused by (lr_multiplier, wd_multiplier, is_last_layer)."""
    fused: dict[tuple, dict] = {}
    for module in self.student:
      names = self.meta_names(module)
      n_blocks = 1 + max((int(m.group(1)) for n in names.values() if (m := re.match(r"blocks\.(\d+)\.", n))),
                         default=-1)
      for torch_name, p in self.student[module].named_parameters():
        if not p.requires_grad:
          continue
        g = meta_param_group(names[torch_name], n_blocks, self.layerwise_decay, self.patch_embed_lr_mult)
        key = (g["lr_multiplier"], g["wd_multiplier"], g["is_last_layer"])
        fused.setdefault(key, {**g, "params": [], "names": []})
        fused[key]["params"].append(p)
        fused[key]["names"].append(f"{module}.{names[torch_name]}")
    return list(fused.values())

  def load_meta_state_dicts(self, state: Mapping[str, Mapping[str, np.ndarray]], which: str = "both") -> None:
    """Loads {"backbone", "dino_head"[, "ibot_head"]} Meta-keyed numpy dicts into student/teacher.

    `which` is "student", "teacher" or "both" (the same weights in both, as Meta's start).
    """
    targets = {"student": [self.student], "teacher": [self.teacher], "both": [self.student, self.teacher]}[which]
    for model in targets:
      for module, sd in state.items():
        if module == "backbone":
          tensors = _hf_state_from_meta(sd)
        else:
          tensors = {k: torch.from_numpy(np.array(v, dtype=np.float32, copy=True)) for k, v in sd.items()}
        own = dict(model[module].named_parameters())
        if set(own) != set(tensors):
          raise KeyError(f"{module}: missing {sorted(set(own) - set(tensors))}, "
                         f"unexpected {sorted(set(tensors) - set(own))}")
        with torch.no_grad():
          for name, value in tensors.items():
            if own[name].shape != value.shape:
              raise ValueError(f"{module}.{name}: {tuple(value.shape)} vs {tuple(own[name].shape)}")
            own[name].copy_(value)

  def meta_state_dicts(self, which: str = "student") -> dict[str, dict[str, np.ndarray]]:
    """{"backbone", "dino_head"[, "ibot_head"]} -> Meta-keyed numpy dicts (copies).

    `which`: "student", "teacher", "grads" (the student's gradients of the latest step, after
    clipping, i.e. what AdamW consumed), or "exp_avg" / "exp_avg_sq" (AdamW's moments).
    """
    model = self.teacher if which == "teacher" else self.student
    grads = {"student": False, "teacher": False, "grads": True}.get(which)
    if grads is None:
      grads = lambda p: self.optimizer.state.get(p, {}).get(which)  # noqa: E731
    out = {}
    for module in model:
      if module == "backbone":
        out[module] = _meta_state_from_hf(model[module], grads)
      else:
        out[module] = {n: _numpy_of(p, grads) for n, p in model[module].named_parameters()}
    return out

  def centers(self) -> dict[str, np.ndarray]:
    """Meta's centre buffers and pending (not yet folded) batch centres, (K,) each (0 when none)."""
    out = {}
    for name, c in (("dino", self.dino_center), ("ibot", self.ibot_center)):
      out[f"{name}_center"] = c.center.reshape(-1).numpy().copy()
      pending = c.pending if c.pending is not None else c.center
      out[f"{name}_pending"] = pending.reshape(-1).numpy().copy()
    return out

  # -- one iteration ------------------------------------------------------------------------------

  def values_at(self, it: int) -> dict[str, float]:
    if self.schedules is None:
      raise ValueError("no schedules given: pass values= to step()")
    return {k: float(self.schedules[k][min(it, len(self.schedules[k]) - 1)]) for k in SCHEDULE_NAMES}

  @staticmethod
  def _to_torch_batch(batch: Mapping[str, np.ndarray]) -> dict:
    nchw = lambda x: torch.from_numpy(np.ascontiguousarray(np.asarray(x, np.float32).transpose(0, 3, 1, 2)))
    valid = np.asarray(batch["mask_valid"], bool)
    n_masked = int(valid.sum())
    return dict(
        global_crops=nchw(batch["global_crops"]),
        local_crops=nchw(batch["local_crops"]) if batch.get("local_crops") is not None else None,
        masks=torch.from_numpy(np.array(batch["masks"], bool)),
        # Meta's ragged lists: the padded tail of the static-shape batch is dropped here.
        mask_indices_list=torch.from_numpy(np.array(batch["mask_indices"][:n_masked], np.int64)),
        masks_weight=torch.from_numpy(np.array(batch["mask_weights"][:n_masked], np.float32)),
        n_masked_patches=n_masked,
        upperbound=int(valid.shape[0]),
    )

  @torch.no_grad()
  def _teacher_targets(self, b: dict, temp: float):
    global_crops, upperbound, n_masked = b["global_crops"], b["upperbound"], b["n_masked_patches"]
    out = self.teacher["backbone"](pixel_values=global_crops).last_hidden_state
    cls, patches = out[:, 0], out[:, 1:]
    c0, c1 = cls.chunk(2)
    cls = torch.cat((c1, c0))  # swapped: student crop c meets teacher crop 1-c in the global term
    dim, n_cls = cls.shape[-1], cls.shape[0]
    masked = torch.index_select(patches.flatten(0, 1), 0, b["mask_indices_list"])
    if not self.separate_ibot_head:
      buffer = patches.new_zeros(n_cls + upperbound, dim)
      buffer[:n_cls] = cls
      buffer[n_cls:n_cls + n_masked] = masked
      logits = self.teacher["dino_head"](buffer)
      cls_logits, patch_logits = logits[:n_cls], logits[n_cls:n_cls + n_masked]
    else:
      buffer = patches.new_zeros(upperbound, dim)
      buffer[:n_masked] = masked
      cls_logits = self.teacher["dino_head"](cls)
      patch_logits = self.teacher["ibot_head"](buffer)[:n_masked]
    if self.centering == "centering":
      dino_t = self.dino_center.softmax_center_teacher(cls_logits, temp).view(2, -1, cls_logits.shape[-1])
      self.dino_center.update_center(cls_logits)
      ibot_t = self.ibot_center.softmax_center_teacher(patch_logits, temp)
      self.ibot_center.update_center(patch_logits)
    else:
      dino_t = sinkhorn_knopp_teacher(cls_logits, temp).view(2, -1, cls_logits.shape[-1])
      ibot_t = sinkhorn_knopp_teacher(patch_logits, temp)  # B = n_masked (single process)
    return dino_t, ibot_t

  def forward_backward(self, b: dict, temp: float) -> dict[str, torch.Tensor]:
    """Meta's `SSLMetaArch.forward_backward` for one batch; calls `backward()` on the total loss."""
    n_local = self.n_local_crops
    upperbound, n_masked = b["upperbound"], b["n_masked_patches"]
    dino_t, ibot_t = self._teacher_targets(b, temp)

    backbone = self.student["backbone"]
    s_global = backbone(pixel_values=b["global_crops"], bool_masked_pos=b["masks"]).last_hidden_state
    global_cls, global_patches = s_global[:, 0], s_global[:, 1:]
    heads_in = []
    if n_local:
      s_local = backbone(pixel_values=b["local_crops"]).last_hidden_state
      heads_in.append(s_local[:, 0])
    heads_in.append(global_cls)
    buffer = global_patches.new_zeros(upperbound, global_patches.shape[-1])
    buffer[:n_masked] = torch.index_select(global_patches.flatten(0, 1), 0, b["mask_indices_list"])
    if not self.separate_ibot_head:
      heads_in.append(buffer)
    # One head call on the concatenation, as Meta (its xformers BlockDiagonalMask.from_tensor_list).
    sizes = [x.shape[0] for x in heads_in]
    outs = list(self.student["dino_head"](torch.cat(heads_in)).split(sizes))
    local_logits = outs.pop(0) if n_local else None
    global_logits = outs.pop(0)
    if self.separate_ibot_head:
      patch_logits = self.student["ibot_head"](buffer)[:n_masked]
    else:
      patch_logits = outs.pop(0)[:n_masked]

    n_terms = max(2 * n_local, 1) + 2  # Meta: n_local_crops_loss_terms + n_global_crops_loss_terms
    terms = {}
    if n_local:
      terms["dino_local_crops_loss"] = dino_cross_entropy(
          local_logits.chunk(n_local), list(dino_t), self.student_temp) / n_terms
    else:
      terms["dino_local_crops_loss"] = global_logits.new_zeros(())
    terms["dino_global_crops_loss"] = dino_cross_entropy(
        [global_logits], [dino_t.flatten(0, 1)], self.student_temp) * 2 / n_terms
    terms["koleo_loss"] = self.koleo_loss_weight * sum(koleo(c) for c in global_cls.chunk(2))
    # forward_masked * loss_scales (2) * ibot_loss_scale (1 / n_global_crops = 0.5)
    terms["ibot_loss"] = ibot_forward_masked(
        patch_logits, ibot_t, b["masks"], b["masks_weight"], self.student_temp) * 2 * 0.5
    total = (self.dino_loss_weight * (terms["dino_local_crops_loss"] + terms["dino_global_crops_loss"])
             + terms["koleo_loss"] + self.ibot_loss_weight * terms["ibot_loss"])
    terms["dino_local_crops_loss"] = self.dino_loss_weight * terms["dino_local_crops_loss"]
    terms["dino_global_crops_loss"] = self.dino_loss_weight * terms["dino_global_crops_loss"]
    terms["ibot_loss"] = self.ibot_loss_weight * terms["ibot_loss"]
    total.backward()
    return {**terms, "total_loss": total}

  def step(self, batch: Mapping[str, np.ndarray], it: int | None = None, values: Mapping[str, float] | None = None,
           meta_logged: bool = False) -> dict[str, float]:
    """One Meta iteration. Returns the loss terms (as backpropagated) and per-module grad norms.

    Args:
      batch: the JAX step's batch (numpy): global_crops (2B,S,S,3), local_crops (nB,s,s,3),
        masks (2B,N) bool, mask_indices / mask_weights / mask_valid (M,).
      it: iteration index into `schedules`; or pass `values` ({name: float} for `SCHEDULE_NAMES`).
      meta_logged: report koleo and ibot halved, as Meta's `loss_dict` logs them.
    """
    v = dict(values) if values is not None else self.values_at(it)
    # 1. apply_optim_scheduler
    for g in self.optimizer.param_groups:
      g["lr"] = (v["last_layer_lr"] if g["is_last_layer"] else v["lr"]) * g["lr_multiplier"]
      g["weight_decay"] = v["wd"] * g["wd_multiplier"]
    # 2-3. zero_grad, forward_backward
    self.optimizer.zero_grad(set_to_none=True)
    losses = self.forward_backward(self._to_torch_batch(batch), v["teacher_temp"])
    # 4. clip per student submodule (returns the pre-clip norm)
    norms = {f"grad_norm/{m}": torch.nn.utils.clip_grad_norm_(self.student[m].parameters(), self.clip_grad)
             for m in self.student}
    # 5. AdamW step, 6. EMA teacher
    self.optimizer.step()
    self.update_teacher(v["momentum"])
    out = {k: float(x.detach()) for k, x in losses.items()}
    if meta_logged:
      out["koleo_loss"] /= 2
      out["ibot_loss"] /= 2
    return {**out, **{k: float(x) for k, x in norms.items()}}

  @torch.no_grad()
  def update_teacher(self, m: float) -> None:
    """Meta's `update_teacher`: `t = m t + (1 - m) s` for every student/teacher parameter pair."""
    t_params, s_params = [], []
    for module in self.student:
      t_params += list(self.teacher[module].parameters())
      s_params += list(self.student[module].parameters())
    torch._foreach_mul_(t_params, m)
    torch._foreach_add_(t_params, s_params, alpha=1 - m)
