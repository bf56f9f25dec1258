"""The ImageNet class names shipped for Meta's linear heads are in the heads' class order."""

import os

from dinov2_jax.data import imagenet_classes


def test_synsets_follow_tfds_imagenet2012_label_order():
  import tensorflow_datasets as tfds
  # TFDS's own imagenet2012 labels file: the sorted synset ids that index Meta's (and torchvision's) heads.
  labels = os.path.join(os.path.dirname(tfds.__file__), "datasets", "imagenet2012", "labels.txt")
  with open(labels) as f:
    expected = f.read().split()
  assert imagenet_classes.synsets() == expected and len(expected) == 1000


def test_names():
  names = imagenet_classes.class_names()
  assert (names[0], names[1], names[281], names[285], names[999]) == (
      "tench", "goldfish", "tabby", "Egyptian cat", "toilet tissue")
  assert imagenet_classes.class_names(full=True)[281] == "tabby, tabby cat"
