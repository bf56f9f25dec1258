"""Evaluation of frozen DINOv2 backbones with Meta's protocols: k-NN and linear probes.

  features   batched, sharded, chunked and resumable feature extraction
  knn        Meta's weighted k-NN classifier (T = 0.07, k in {10, 20, 100, 200})
  linear     Meta's grid of 52 linear classifiers trained at once on frozen features
  datasets   prepared TFDS datasets, class folders and the embedded demo dataset (the shared
             sources of dinov2_jax/data/sources.py)

Commands: `python -m dinov2_jax.eval.knn --config configs/eval_knn.py` and
`python -m dinov2_jax.eval.linear --config configs/eval_linear.py`.
"""
