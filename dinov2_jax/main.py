"""DINOv2 pretraining entry point.

    python -m dinov2_jax.main --config dinov2_jax/configs/demo.py --workdir /tmp/dinov2_demo
    python -m dinov2_jax.main --config pretrain:vitl14 --workdir gs://bucket/run --config.batch_size=2048
    dinov2-jax-train --config demo --workdir /tmp/dinov2_demo        # same, installed script, recipe by name

Any config field can be overridden on the command line (`--config.optim.base_lr=1e-3`). Re-running
with the same workdir resumes from its latest complete checkpoint. Multi-host: every process runs the
same command and loads its own slice of the global batch; add `--distributed` where a cluster manager
is detected (TPU pods, SLURM), or `--coordinator_address=HOST:PORT --num_processes=N --process_id=I`
anywhere else (see `dinov2_jax/distributed.py`).
"""

from __future__ import annotations

import sys

import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from dinov2_jax import cpu_tuning, distributed, recipes

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "A config file, or a recipe name such as pretrain:vits14 (dinov2_jax/configs/).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and exports.")


def demo_knn_accuracy(backbone, config) -> dict:
  """Meta's k-NN protocol on the embedded demo dataset: train split as the bank, test split as queries."""
  from dinov2_jax.data.augment import imagenet_normalize
  from dinov2_jax.data.demo_dataset import NUM_CLASSES, load_demo_dataset
  from dinov2_jax.eval.knn import knn_evaluate

  size = config.knn_eval.image_size or config.crops.global_crops_size

  def features(split):
    images, labels = load_demo_dataset(split, image_size=size)
    feats = [np.asarray(backbone(imagenet_normalize(images[i:i + 256]))) for i in range(0, len(images), 256)]
    return np.concatenate(feats), labels

  bank, bank_labels = features("train")
  queries, query_labels = features("test")
  k = config.knn_eval.k
  result = knn_evaluate(bank, bank_labels, queries, query_labels, NUM_CLASSES, ks=(k,),
                        temperature=config.knn_eval.temperature)
  return {"k": k, "top1": float(result["k"][k]["top1"]), "num_train": len(bank), "num_test": len(queries)}


def run(config, workdir: str) -> dict:
  from dinov2_jax.train import trainer

  trainer.validate_config(config)
  knn = {}

  def knn_before(teacher):
    # The teacher at step 0 equals the student's initialisation (seeded, or loaded weights).
    knn["before"] = demo_knn_accuracy(teacher, config)
    _print(f"k-NN (k={knn['before']['k']}) top-1 of the initial teacher on the demo test split: "
           f"{knn['before']['top1']:.1f}%")

  result = trainer.train(config, workdir, on_start=knn_before if config.knn_eval.enabled else None)
  if config.knn_eval.enabled and result["step"] == trainer.total_steps(config):
    after = demo_knn_accuracy(trainer.teacher_backbone(result["state"], result["arch"]), config)
    _print(f"k-NN (k={after['k']}) top-1 of the trained teacher on the demo test split: {after['top1']:.1f}%")
    before = knn.get("before")
    if before is not None:
      _print(f"k-NN top-1: {before['top1']:.1f}% before training -> {after['top1']:.1f}% after "
             f"({after['top1'] - before['top1']:+.1f} points, {after['num_test']} held-out images)")
    result["knn"] = {"before": before, "after": after}
  return result


def _print(line: str) -> None:
  if jax.process_index() == 0:
    print(line, flush=True)


def main(argv) -> None:
  del argv
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax and grain log every save at INFO
  if _CONFIG.value is None or not _WORKDIR.value:
    raise app.UsageError("--config and --workdir are required")
  if _CONFIG.value.get("cpu_tuning", True) and cpu_tuning.backend_will_be_cpu():
    cpu_tuning.keep_freed_host_memory()  # before anything starts JAX's threads
  distributed.initialize_from_flags()
  run(_CONFIG.value, _WORKDIR.value)


def _argv() -> list[str]:
  """sys.argv with --config resolved to a file (a recipe name, or a packaged path from any folder)."""
  try:
    return recipes.resolve_config_argv(sys.argv)
  except recipes.RecipeNotFound as e:
    sys.exit(f"error: {e}")


def entry_point() -> None:
  """Console script `dinov2-jax-train`."""
  app.run(main, argv=_argv())


if __name__ == "__main__":
  app.run(main, argv=_argv())
