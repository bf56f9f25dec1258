"""Demo pretraining: a small ViT on the embedded demo dataset (scikit-learn digits), CPU-sized.

    python -m dinov2_jax.main --config dinov2_jax/configs/demo.py --workdir /tmp/dinov2_demo
    dinov2-jax-train --config demo --workdir /tmp/dinov2_demo      # the same recipe by name, from any folder

Runs DINOv2's full recipe (DINO + iBOT + KoLeo, EMA teacher, 2 global + 8 local crops, block
masking, Meta's schedules and optimizer) on 28-px digits with a 4-block ViT of patch 7, and prints
the teacher's k-NN accuracy on held-out digits before and after training. 600 steps of batch 64:
3 min 35 s on an idle 2-core CPU machine, pip install included (longer when the machine is busy),
ending with k-NN top-1 8.1% before -> 66.3% after (k = 20, 445 held-out digits; identical across
runs on one machine; the figure moves by a few points when the float rounding of the step changes).
"""

from dinov2_jax.train.default_config import get_default_config


def get_config(arg=None):
  del arg
  c = get_default_config()
  c.batch_size = 64
  c.epoch_length = 100
  c.student.update(arch="custom", embed_dim=128, depth=4, num_heads=2, patch_size=7, drop_path_rate=0.1,
                   layerscale=1.0e-5)
  c.crops.update(global_crops_size=28, local_crops_size=14, local_crops_number=8)
  for head in (c.dino, c.ibot):
    head.update(head_n_prototypes=1024, head_hidden_dim=512, head_bottleneck_dim=128)
  c.optim.update(epochs=6, warmup_epochs=1, base_lr=0.004, freeze_last_layer_epochs=1)
  c.teacher.update(momentum_teacher=0.99, warmup_teacher_temp_epochs=2)
  c.dataset.kind = "demo"
  c.log_every_steps = 20
  c.checkpoint_every_steps = 200
  c.knn_eval.update(enabled=True, k=20)
  return c
