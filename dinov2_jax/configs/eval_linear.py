"""Linear-probe evaluation of a frozen DINOv2 backbone: Meta's 52 classifiers trained at once.

Grid: last 1 or 4 blocks' CLS tokens x with/without the mean patch token x 13 learning rates
(1e-5 ... 0.1, scaled by batch/256); SGD momentum 0.9, cosine to 0, no weight decay, for Meta's
fixed budget of epochs x epoch_length = 10 x 1250 iterations whatever the dataset size (a small
dataset is passed over many times: the classifiers converge). The best classifier is selected on a
class-stratified 10% held out from the TRAIN split, refit on the whole train split and tested once
(`--config.linear.selection=eval` gives Meta's selection on the evaluation split). By default the
classifiers train on features precomputed with the evaluation transform;
`--config.linear.augment=True` trains with Meta's RandomResizedCrop + flip instead (a backbone
pass per image per step; see dinov2_jax/eval/linear_augment.py).

Default (`eval_linear` or `eval_linear:demo`): random ViT-S/14 weights on the embedded digits (1352
train / 445 test) at 56 px, about 2 minutes on 2 CPU cores:

    python -m dinov2_jax.eval.linear

Writes `<output_dir>/linear_results.{json,md}` and the selected head as
`<output_dir>/best_linear_head.pth` (Meta's linear-head format; with avgpool it loads with
`dinov2_jax.load_classifier(weights, head)`); the default output_dir is
dinov2_jax_eval/<dataset>/<weights>/linear.

Your own labelled images (DIR/train/<class>/*.jpg, DIR/val/<class>/*.jpg), read at 224 px:

    python -m dinov2_jax.eval.linear --config.weights=dinov2_vitb14_pretrain.pth \
        --config.dataset.kind=folder --config.dataset.path=DIR

A prepared ImageNet (TFDS array_record):

    python -m dinov2_jax.eval.linear --config eval_linear:imagenet \
        --config.weights=dinov2_vitb14_pretrain.pth --config.dataset.data_dir=~/tensorflow_datasets

Meta's README lists ImageNet linear top-1 of 81.1% (ViT-S/14), 84.5% (B/14), 86.3% (L/14) and
86.5% (g/14), selected on the validation set itself and trained with augmentation (for that
setting add `--config.linear.selection=eval --config.linear.augment=True`); not reproduced here.
"""

import ml_collections

from dinov2_jax.eval.config import add_common_config, apply_variant
from dinov2_jax.eval.linear import EPOCH_LENGTH, EPOCHS, LEARNING_RATES


def get_config(arg=None):
  config = ml_collections.ConfigDict()
  add_common_config(config)
  config.linear = ml_collections.ConfigDict()
  config.linear.n_last_blocks = (1, 4)
  config.linear.avgpool = (False, True)
  config.linear.learning_rates = LEARNING_RATES
  config.linear.batch_size = 128  # global; Meta: 128 per GPU x 8 GPUs = 1024
  # Iterations = epochs x epoch_length, fixed whatever the dataset size (Meta's 10 x 1250).
  config.linear.epochs = EPOCHS
  config.linear.epoch_length = EPOCH_LENGTH
  config.linear.selection = "heldout"  # or "eval": Meta's selection on the evaluation split
  config.linear.val_fraction = 0.1
  config.linear.refit = True  # retrain the selected classifier on the whole train split
  config.linear.seed = 0
  config.linear.save_head = True
  config.linear.features_in_memory = True  # False: sample batches from memory-mapped feature files
  # True: Meta's train-time RandomResizedCrop + flip, one backbone pass per training image per step
  # (about `epochs` x the cost of the default precomputed features).
  config.linear.augment = False
  apply_variant(config, arg)
  if arg == "imagenet":
    config.linear.batch_size = 1024
  return config
