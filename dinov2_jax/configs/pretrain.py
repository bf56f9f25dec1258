"""DINOv2 pretraining recipes following Meta's configs. Pick one with the config argument:

    python -m dinov2_jax.main --config pretrain:vitl14 --workdir $WORKDIR \
        --config.dataset.kind=tfds --config.dataset.name=imagenet2012 --config.dataset.data_dir=$TFDS_DIR

  vitl16_short  Meta's ssl_default_config.yaml + vitl16_short.yaml: ViT-L/16, 65536 prototypes, shared
                iBOT head, softmax centering, 100 epochs of 1250 iterations, base lr 4e-3 (batch 1024).
  vitl14        Meta's vitl14.yaml: ViT-L/14 SwiGLU, DINO 131072 prototypes (bottleneck 384), separate
                iBOT head (131072), Sinkhorn-Knopp, drop path 0.4, layer-wise decay 1.0, teacher
                momentum 0.994, 500 epochs, warmup 80, base lr 2e-4, weight decay to 0.2, 98 px locals.
  vitg14        Meta's vitg14.yaml: as vitl14 with ViT-g/14 (vit_giant2).
  vits14, vitb14  the default recipe at patch 14 with 98 px local crops (Meta obtained its released
                ViT-S/B by distillation from ViT-g, which this project does not implement yet).

Meta's per-GPU batch sizes (64 default, 32 for vitl14, 12 for vitg14) times its GPU count give the
global `batch_size`; set yours with --config.batch_size (the lr follows the sqrt rule around 1024).
Large models default to bf16 compute (float32 parameters and losses), per-block remat, the blocks
run as one scan (compile time independent of depth) and FSDP over all devices (`mesh = (("data", 1), ("fsdp", -1))`); change `mesh` for data + FSDP hybrids.
"""

from dinov2_jax.train.default_config import get_default_config

VARIANTS = ("vits14", "vitb14", "vitl16_short", "vitl14", "vitg14")


def get_config(arg="vitl16_short"):
  if arg not in VARIANTS:
    raise ValueError(f"unknown variant {arg!r} of the pretrain recipe; choose one of {VARIANTS}")
  c = get_default_config()
  c.dataset.update(kind="tfds", name="imagenet2012", split="train")
  c.checkpoint_every_steps = 3 * c.epoch_length  # Meta's period: 3 "epochs"

  if arg in ("vits14", "vitb14"):
    c.student.update(arch="vit_small" if arg == "vits14" else "vit_base", patch_size=14,
                     drop_path_rate=0.1 if arg == "vits14" else 0.2)
    c.crops.local_crops_size = 98
  elif arg == "vitl16_short":
    c.student.update(arch="vit_large", patch_size=16)
    c.crops.local_crops_size = 96
  else:  # vitl14, vitg14
    c.batch_size = 2048
    c.dino.update(head_n_prototypes=131072, head_bottleneck_dim=384)
    c.ibot.update(separate_head=True, head_n_prototypes=131072)
    c.centering = "sinkhorn_knopp"
    c.student.update(arch="vit_large" if arg == "vitl14" else "vit_giant2", patch_size=14, drop_path_rate=0.4,
                     ffn_layer="swiglufused")
    c.teacher.momentum_teacher = 0.994
    c.optim.update(epochs=500.0, weight_decay_end=0.2, base_lr=2.0e-4, warmup_epochs=80.0, layerwise_decay=1.0)
    c.crops.local_crops_size = 98
    c.dataset.name = "imagenet2012"  # Meta used ImageNet-22k (LVD-142M for the released models)
  if arg in ("vitl16_short", "vitl14", "vitg14"):
    c.compute_dtype = "bfloat16"
    c.remat_policy = "full"
    c.scan_blocks = True
    c.mesh = (("data", 1), ("fsdp", -1))
  return c
