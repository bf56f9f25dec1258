"""Evaluation of frozen DINOv2 backbones with Meta's protocols: k-NN and linear probes.

  knn             Meta's weighted k-NN classifier (T = 0.07, k in {10, 20, 100, 200}), and its command
  linear          Meta's grid of 52 linear classifiers trained at once on frozen features, and its command
  linear_augment  Meta's train-time RandomResizedCrop + flip for the linear probe (features per step)
  features        batched, sharded (multi-host too), resumable feature extraction, keyed by the data's
                  content, the preprocessing and the weights
  store           the chunked on-disk feature store and its manifest
  datasets        prepared TFDS datasets, class folders and the embedded demo dataset (the shared
                  sources of dinov2_jax/data/sources.py)
  config          the fields every evaluation config has, and what they name
  command         the command line (config_flags, multi-host flags), results files, user errors
  devices, metrics, progress   meshes and host/device arrays; top-k correctness; progress lines

Commands: `python -m dinov2_jax.eval.knn` and `python -m dinov2_jax.eval.linear` (recipes
`dinov2_jax/configs/eval_knn.py` and `eval_linear.py`; `--help` lists every field).
"""
