"""The 1000 ImageNet-1k classes in the order of Meta's linear heads (`dinov2_vit*14_linear*_head.pth`).

The order is the sorted WordNet synset ids, as in torchvision's and TFDS's `imagenet2012` labels.
`imagenet_classes.txt` beside this file holds, per class, its synset id and its WordNet 3.0 lemmas
("n02123045<TAB>tabby, tabby cat"); shipped with the package so that classification works offline.
"""

from __future__ import annotations

import functools
import os

_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "imagenet_classes.txt")


@functools.cache
def _rows() -> tuple[tuple[str, str], ...]:
  with open(_FILE, encoding="utf-8") as f:
    rows = tuple(tuple(line.rstrip("\n").split("\t", 1)) for line in f if line.strip())
  assert len(rows) == 1000, f"{_FILE}: {len(rows)} classes, expected 1000"
  return rows


def synsets() -> list[str]:
  """The WordNet synset id of each class index, e.g. synsets()[281] == "n02123045"."""
  return [synset for synset, _ in _rows()]


def class_names(full: bool = False) -> list[str]:
  """The name of each class index: the first WordNet lemma ("tabby"), or all of them with full=True."""
  return [names if full else names.split(", ")[0] for _, names in _rows()]
