"""k-NN evaluation of a frozen DINOv2 backbone with Meta's protocol (T = 0.07, k in 10/20/100/200).

Default (`eval_knn` or `eval_knn:demo`): random ViT-S/14 weights on the embedded digits (1352 train /
445 test) at 56 px, no download needed; about 35 s on 2 CPU cores (15 s when the features are
already extracted):

    python -m dinov2_jax.eval.knn

Expected (random weights, seed 0): top-1 64.9 / 62.9 / 53.7 / 50.8% and top-5 94.4 / 96.2 /
93.5 / 92.6% for k = 10 / 20 / 100 / 200; chance is 10%. The numbers only show the pipeline
working. Results go to `<output_dir>/knn_results.{json,md}`, features to `<output_dir>/features/`
(reused while the data, preprocessing and weights are unchanged, and resumed after an
interruption); the default output_dir is dinov2_jax_eval/<dataset>/<weights>/knn.

Your own labelled images, DIR/train/<class>/*.jpg and DIR/val/<class>/*.jpg (the evaluation split is
the first of val / validation / test that DIR has), read at 224 px:

    python -m dinov2_jax.eval.knn --config.weights=dinov2_vitb14_pretrain.pth \
        --config.dataset.kind=folder --config.dataset.path=DIR

A prepared ImageNet (TFDS array_record, see dinov2_jax/eval/datasets.py):

    python -m dinov2_jax.eval.knn --config eval_knn:imagenet \
        --config.weights=dinov2_vitb14_pretrain.pth --config.dataset.data_dir=~/tensorflow_datasets

Meta's README lists ImageNet k-NN top-1 of 79.0% (ViT-S/14), 82.1% (B/14), 83.5% (L/14) and
83.5% (g/14); not reproduced here (no ImageNet or weights on this machine).
"""

import ml_collections

from dinov2_jax.eval.config import add_common_config, apply_variant


def get_config(arg=None):
  config = ml_collections.ConfigDict()
  add_common_config(config)
  config.knn = ml_collections.ConfigDict()
  config.knn.ks = (10, 20, 100, 200)
  config.knn.temperature = 0.07
  config.knn.bank_chunk = 65536  # train rows per device step (streamed from disk)
  config.knn.query_block = 256  # queries per matmul, per device
  apply_variant(config, arg)
  return config
