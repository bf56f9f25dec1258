"""Meta's train-time setting for the linear probe: features of freshly augmented images at every step.

`AugmentedImages` is a batch source for `linear.train_linear`: each step loads the batch's images,
applies RandomResizedCrop + flip (`random_resized_crop_flip`, Meta's linear train transform) in host
threads and runs the frozen backbone for the classifiers' input. About `epochs` x the cost of the
default precomputed features, since every image goes through the backbone once per pass.
"""

from __future__ import annotations

import concurrent.futures
import functools
import os
from collections.abc import Callable

import jax
import numpy as np

from dinov2_jax.eval import devices
from dinov2_jax.eval.features import FeatureSpec, make_feature_fn


def random_resized_crop_flip(image: np.ndarray, rng: np.random.Generator, size: int,
                             scale: tuple[float, float] = (0.08, 1.0)) -> np.ndarray:
  """Meta's linear train transform: RandomResizedCrop(size, bicubic) + flip(0.5) + ImageNet normalisation.

  (H, W, 3) uint8 -> (size, size, 3) float32. Crop boxes follow torchvision's sampling.
  """
  from PIL import Image
  from dinov2_jax.data.augment import imagenet_normalize, random_resized_crop_params
  top, left, h, w = random_resized_crop_params(rng, image.shape[0], image.shape[1], scale)
  crop = Image.fromarray(image).crop((left, top, left + w, top + h)).resize((size, size), Image.Resampling.BICUBIC)
  if rng.random() < 0.5:
    crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
  return imagenet_normalize(np.asarray(crop))


class AugmentedImages:
  """Batches whose features are computed on the fly from augmented images (Meta's train-time setting).

  Every step loads the batch's images, applies `transform(image, rng)` (default: Meta's
  RandomResizedCrop + flip at `resolution`, with a generator seeded by (seed, step, position)) in
  host threads, and runs the frozen backbone (sharded over the mesh) for the linear input features.

  Args:
    backbone: the frozen `Backbone`.
    dataset: the image dataset.
    dataset_index: (N,) the dataset index of each feature row (`FeatureStore.load("index")`), so the
      rows used for training and held-out selection refer to the same images.
    resolution: crop side (a multiple of the patch size).
    n_blocks: CLS tokens of the last n blocks to compute.
  """

  def __init__(self, backbone, dataset, dataset_index: np.ndarray, *, resolution: int = 224, n_blocks: int = 4,
               seed: int = 0, transform: Callable | None = None, num_workers: int | None = None,
               mesh: jax.sharding.Mesh | None = None):
    self.dataset, self.dataset_index, self.seed = dataset, np.asarray(dataset_index), seed
    self.transform = transform or functools.partial(random_resized_crop_flip, size=resolution)
    self.mesh = mesh or devices.local_mesh()
    self.fn = make_feature_fn(backbone, FeatureSpec(n_last_blocks=n_blocks), self.mesh)
    self.n_blocks, self.embed_dim = n_blocks, backbone.config.embed_dim
    self.pool = concurrent.futures.ThreadPoolExecutor(num_workers or os.cpu_count() or 1)

  def _image(self, row: int, step: int, position: int) -> np.ndarray:
    image, _ = self.dataset.load(int(self.dataset_index[row]))
    if image is None:
      raise ValueError(f"image {self.dataset_index[row]} of {self.dataset.name} became unreadable")
    return self.transform(image, np.random.default_rng((self.seed, step, position)))

  def batch(self, rows: np.ndarray, step: int, n_blocks: int):
    images = np.stack(list(self.pool.map(self._image, rows, [step] * len(rows), range(len(rows)))))
    out = self.fn(images)
    return out["cls_blocks"][:, -n_blocks:], out["patch_mean"]
