"""k-NN evaluation of a frozen DINOv2 backbone with Meta's protocol (T = 0.07, k in 10/20/100/200).

Default (demo): random ViT-S/14 weights on the embedded digits (1352 train / 445 test) at 56 px,
no download needed; about 35 s on 2 CPU cores (15 s when the features are already extracted):

    python -m dinov2_jax.eval.knn --config configs/eval_knn.py

Expected (random weights, seed 0): top-1 64.9 / 62.9 / 53.7 / 50.8% and top-5 94.4 / 96.2 /
93.5 / 92.6% for k = 10 / 20 / 100 / 200; chance is 10%. The numbers only show the pipeline
working. Results go to `output_dir/knn_results.{json,md}`, features to `output_dir/features/`
(reused, and resumed after an interruption).

With real weights on a prepared ImageNet (TFDS array_record, see dinov2_jax/eval/datasets.py):

    python -m dinov2_jax.eval.knn --config configs/eval_knn.py:imagenet \
        --config.weights=dinov2_vitb14_pretrain.pth --config.dataset.data_dir=~/tensorflow_datasets

Meta's README lists ImageNet k-NN top-1 of 79.0% (ViT-S/14), 82.1% (B/14), 83.5% (L/14) and
83.5% (g/14); not reproduced here (no ImageNet or weights on this machine). Any field can be
overridden, e.g. `--config.dataset.name=folder --config.dataset.data_dir=/data/imagenet
--config.dataset.eval_split=val` (DIR/train/<class>/*.JPEG, DIR/val/<class>/*.JPEG).
"""

import ml_collections

from dinov2_jax.eval.features import add_common_config, apply_dataset_variant


def get_config(arg=None):
  config = ml_collections.ConfigDict()
  add_common_config(config, output_dir="/tmp/dinov2_jax_eval/knn")
  config.knn = ml_collections.ConfigDict()
  config.knn.ks = (10, 20, 100, 200)
  config.knn.temperature = 0.07
  config.knn.bank_chunk = 65536  # train rows per device step (streamed from disk)
  config.knn.query_block = 256  # queries per matmul, per device
  apply_dataset_variant(config, arg)
  return config
