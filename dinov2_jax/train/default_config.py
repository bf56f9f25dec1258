"""Meta's `ssl_default_config.yaml` as an ml_collections ConfigDict, plus the JAX-side settings.

Section and field names follow Meta's YAML (`dino`, `ibot`, `student`, `teacher`, `optim`, `crops`)
so a Meta config maps over field by field. Files in `dinov2_jax/configs/` start from `get_default_config()`.
"""

from __future__ import annotations

import ml_collections


def get_default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.batch_size = 1024  # global batch (Meta: batch_size_per_gpu * world size)
  c.epoch_length = 1250  # Meta's OFFICIAL_EPOCH_LENGTH: an "epoch" is this many iterations
  c.compute_dtype = "float32"  # "bfloat16": bf16 matmuls, float32 parameters and loss maths
  # Per block, what the backward pass recomputes: "none", "full", "dots_saveable", ... (ViTConfig).
  c.remat_policy = "none"
  c.scan_blocks = False  # the blocks as one lax.scan: one block in the compiled program
  # "auto": cuDNN flash attention on NVIDIA GPUs in bf16/fp16, XLA elsewhere; or "xla" / "cudnn".
  c.attention_impl = "auto"
  # On the CPU backend: reuse freed host memory between steps and keep XLA's reductions out of
  # YNNPACK, and materialise the residual gradient per block (dinov2_jax/cpu_tuning.py; ~2.5x faster
  # steps on CPU). No effect on GPU/TPU.
  c.cpu_tuning = True
  c.centering = "centering"  # or "sinkhorn_knopp"

  c.dino = ml_collections.ConfigDict(dict(
      loss_weight=1.0, head_n_prototypes=65536, head_bottleneck_dim=256, head_nlayers=3,
      head_hidden_dim=2048, koleo_loss_weight=0.1,
      # KoLeo's nearest neighbours are searched among the images of one data shard (one device),
      # as Meta computes it on each GPU's local batch; "global": over the whole global batch.
      koleo_scope="shard"))
  c.ibot = ml_collections.ConfigDict(dict(
      loss_weight=1.0, mask_sample_probability=0.5, mask_ratio_min_max=(0.1, 0.5), separate_head=False,
      head_n_prototypes=65536, head_bottleneck_dim=256, head_nlayers=3, head_hidden_dim=2048))
  c.student = ml_collections.ConfigDict(dict(
      arch="vit_large", patch_size=16, drop_path_rate=0.3, layerscale=1.0e-5, drop_path_uniform=True,
      ffn_layer="mlp", qkv_bias=True, proj_bias=True, ffn_bias=True, num_register_tokens=0,
      interpolate_antialias=False, interpolate_offset=0.1, drop_path_mode="meta",
      # Positional-embedding grid in pixels; 0 = the global crop size (Meta). Set 518 to start from
      # Meta's hub weights (37 x 37 grid); crops then resample it on the fly, as in Meta's model.
      img_size=0,
      # Only read when arch == "custom":
      embed_dim=192, depth=12, num_heads=3, mlp_ratio=4.0))
  c.teacher = ml_collections.ConfigDict(dict(
      momentum_teacher=0.992, final_momentum_teacher=1.0, warmup_teacher_temp=0.04, teacher_temp=0.07,
      warmup_teacher_temp_epochs=30.0))
  c.optim = ml_collections.ConfigDict(dict(
      epochs=100.0, weight_decay=0.04, weight_decay_end=0.4, base_lr=0.004, warmup_epochs=10.0, min_lr=1.0e-6,
      clip_grad=3.0, freeze_last_layer_epochs=1.0, scaling_rule="sqrt_wrt_1024", patch_embed_lr_mult=0.2,
      layerwise_decay=0.9, adamw_beta1=0.9, adamw_beta2=0.999))
  c.crops = ml_collections.ConfigDict(dict(
      global_crops_scale=(0.32, 1.0), local_crops_number=8, local_crops_scale=(0.05, 0.32),
      global_crops_size=224, local_crops_size=98, blur_mode="paper"))

  # Initialisation: "scratch" (Meta's init), "hub" (a Meta hub backbone .pth for student and
  # teacher, fresh heads) or "teacher_checkpoint" (Meta's {"teacher": ...} with its heads).
  c.init = ml_collections.ConfigDict(dict(kind="scratch", path="", freeze_backbone_steps=0, frozen=""))

  c.dataset = ml_collections.ConfigDict(dict(kind="demo", name="", split="train", data_dir="", path=""))
  c.data_workers = 0

  # Sharding as data: mesh axes and (regex, strategy) rules over train-state paths.
  c.mesh = (("data", -1), ("fsdp", 1))
  # Multi-slice TPU / multi-node GPU: how many of each mesh axis run across slices or nodes, e.g.
  # (("data", 4),) for 4 slices of data parallelism; () = one slice (dinov2_jax/train/sharding.py).
  c.dcn_mesh = ()
  # Logical activation axes -> mesh axes ("*": all of them): "batch", "tokens", "embed", "prototypes".
  c.logical_axis_rules = (("batch", "*"),)
  c.sharding_rules = ((".*", "fsdp"),)
  c.fsdp_min_size = 2 ** 14

  c.log_every_steps = 10
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 3
  c.export_teacher = True  # write the teacher backbone in Meta's format at the end
  c.knn_eval = ml_collections.ConfigDict(dict(enabled=False, image_size=0, k=20, temperature=0.07))
  # Collapse warnings from the health metrics (dinov2_jax/health.py) are always printed; with
  # stop_on_collapse the run also checkpoints and stops at the first one.
  c.health = ml_collections.ConfigDict(dict(stop_on_collapse=False))
  return c
