"""The SSL model (student and EMA teacher: backbone + DINO head [+ iBOT head]) as one train-state pytree.

Module structure lives in static `nnx.GraphDef`s (`SSLArch`); everything that changes during
training is a plain nested dict of arrays in `TrainState`, so that jit, sharding and orbax see an
ordinary pytree.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from dinov2_jax import losses
from dinov2_jax.models.dino_head import DINOHead
from dinov2_jax.models.vit import ARCH_SIZES, DinoVisionTransformer, ViTConfig

@dataclasses.dataclass(frozen=True)
class HeadConfig:
  out_dim: int = 65536
  nlayers: int = 3
  hidden_dim: int = 2048
  bottleneck_dim: int = 256


@dataclasses.dataclass(frozen=True)
class SSLArch:
  """Static description of the student/teacher networks and the loss recipe (hashable)."""

  backbone: nnx.GraphDef
  dino_head: nnx.GraphDef
  ibot_head: nnx.GraphDef | None  # None: iBOT shares the DINO head (Meta's default)
  backbone_config: ViTConfig
  n_local_crops: int
  centering: str = "centering"  # or "sinkhorn_knopp"
  dino_loss_weight: float = 1.0
  koleo_loss_weight: float = 0.1
  koleo_per_shard: bool = True  # KoLeo over each data shard's images (Meta: per GPU), else the global batch
  ibot_loss_weight: float = 1.0
  student_temp: float = 0.1
  center_momentum: float = 0.9


@flax.struct.dataclass
class TrainState:
  """Everything a training run changes. `student`/`teacher` are `{"backbone", "dino_head"[, "ibot_head"]}`."""

  step: jax.Array
  student: dict
  teacher: dict
  opt_state: Any
  dino_center: losses.CenterState
  ibot_center: losses.CenterState
  rng: jax.Array


def backbone_config_from(config, drop_path_groups: int = 1) -> ViTConfig:
  """`ViTConfig` from Meta-style `config.student` fields (img_size defaults to the global crop size, as Meta)."""
  s = config.student
  if s.arch not in ARCH_SIZES and s.arch != "custom":
    raise ValueError(f"config.student.arch={s.arch!r}; expected one of {sorted(ARCH_SIZES)} or 'custom'")
  sizes = ARCH_SIZES.get(s.arch) or dict(embed_dim=s.embed_dim, depth=s.depth, num_heads=s.num_heads)
  return ViTConfig(
      img_size=s.get("img_size") or config.crops.global_crops_size, patch_size=s.patch_size, **sizes,
      mlp_ratio=s.get("mlp_ratio", 4.0), qkv_bias=s.qkv_bias, proj_bias=s.proj_bias, ffn_bias=s.ffn_bias,
      drop_path_rate=s.drop_path_rate, drop_path_uniform=s.drop_path_uniform, init_values=s.layerscale,
      ffn_layer=s.ffn_layer, num_register_tokens=s.num_register_tokens,
      interpolate_antialias=s.interpolate_antialias, interpolate_offset=s.interpolate_offset,
      dtype=config.compute_dtype, remat_policy=config.remat_policy,
      scan_blocks=config.get("scan_blocks", False), attention_impl=config.get("attention_impl", "auto"), drop_path_mode=s.get("drop_path_mode", "meta"),
      drop_path_groups=drop_path_groups, grad_barrier=None if config.get("cpu_tuning", True) else False)


def _head_config(section) -> HeadConfig:
  return HeadConfig(out_dim=section.head_n_prototypes, nlayers=section.head_nlayers,
                    hidden_dim=section.head_hidden_dim, bottleneck_dim=section.head_bottleneck_dim)


def _split_pure(module: nnx.Module) -> tuple[nnx.GraphDef, dict]:
  graphdef, state = nnx.split(module)
  return graphdef, nnx.to_pure_dict(state)


def build_modules(config, seed: int, drop_path_groups: int = 1) -> tuple[dict[str, nnx.Module], ViTConfig]:
  """Randomly initialised student modules with Meta's init, as configured."""
  cfg = backbone_config_from(config, drop_path_groups)
  rngs = nnx.Rngs(seed)
  compute = jnp.dtype(config.compute_dtype)
  modules = {"backbone": DinoVisionTransformer(cfg, rngs=rngs)}
  dino = _head_config(config.dino)
  modules["dino_head"] = DINOHead(cfg.embed_dim, dino.out_dim, nlayers=dino.nlayers, hidden_dim=dino.hidden_dim,
                                  bottleneck_dim=dino.bottleneck_dim, dtype=compute, rngs=rngs)
  if config.ibot.separate_head:
    ibot = _head_config(config.ibot)
    modules["ibot_head"] = DINOHead(cfg.embed_dim, ibot.out_dim, nlayers=ibot.nlayers, hidden_dim=ibot.hidden_dim,
                                    bottleneck_dim=ibot.bottleneck_dim, dtype=compute, rngs=rngs)
  return modules, cfg


def make_arch(config, drop_path_groups: int = 1) -> SSLArch:
  """The static `SSLArch` for a config (shapes only; nothing is initialised).

  `drop_path_groups`: the number of data shards, so Meta's batch-subset stochastic depth draws its
  subset per shard (per GPU, as Meta) instead of over the whole global batch.
  """
  cfg = backbone_config_from(config, drop_path_groups)
  modules = nnx.eval_shape(lambda: build_modules(config, 0, drop_path_groups)[0])
  graphdefs = {name: nnx.split(m)[0] for name, m in modules.items()}
  if config.centering not in ("centering", "sinkhorn_knopp"):
    raise ValueError(f"config.centering={config.centering!r}; expected 'centering' or 'sinkhorn_knopp'")
  return SSLArch(
      backbone=graphdefs["backbone"], dino_head=graphdefs["dino_head"], ibot_head=graphdefs.get("ibot_head"),
      backbone_config=cfg, n_local_crops=config.crops.local_crops_number, centering=config.centering,
      dino_loss_weight=config.dino.loss_weight, koleo_loss_weight=config.dino.koleo_loss_weight,
      koleo_per_shard=koleo_per_shard(config),
      ibot_loss_weight=config.ibot.loss_weight)


KOLEO_SCOPES = ("shard", "global")


def koleo_per_shard(config) -> bool:
  """`config.dino.koleo_scope`: "shard" (Meta: each GPU's local batch) or "global" (the whole batch)."""
  scope = config.dino.get("koleo_scope", "shard")
  if scope not in KOLEO_SCOPES:
    raise ValueError(f"config.dino.koleo_scope={scope!r}; expected one of {KOLEO_SCOPES}")
  return scope == "shard"


def init_student_params(config, seed: int) -> dict:
  """Meta's random initialisation of the student, as a pure dict (jit-compiled)."""
  def init():
    modules, _ = build_modules(config, seed)
    return {name: _split_pure(m)[1] for name, m in modules.items()}
  return jax.jit(init)()


def init_train_state(student: dict, tx: optax.GradientTransformation, config, seed: int) -> TrainState:
  """The state at step 0: the teacher starts as an exact copy of the student.

  Every leaf gets its own buffer (zeros and hyper-parameters would otherwise share one), so the
  whole state can be donated to the train step.
  """
  ibot_k = config.ibot.head_n_prototypes if config.ibot.separate_head else config.dino.head_n_prototypes
  state = TrainState(
      step=jnp.zeros((), jnp.int32),
      student=student,
      teacher=jax.tree.map(jnp.copy, student),
      opt_state=tx.init(student),
      dino_center=losses.init_center_state(config.dino.head_n_prototypes),
      ibot_center=losses.init_center_state(ibot_k),
      rng=jax.random.PRNGKey(seed),
  )
  return jax.tree.map(lambda x: jnp.array(x, copy=True), state)


def merge(graphdef: nnx.GraphDef, params: dict) -> nnx.Module:
  return nnx.merge(graphdef, params)


def abstract_student(config) -> dict:
  return jax.eval_shape(lambda: init_student_params(config, 0))


def as_numpy(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))
