"""Feature-extraction demo on photographs bundled with scikit-image (no download needed).

Extracts DINOv2 features for a handful of real photos, prints CLS-token similarities, and writes a
PNG with the first three PCA components of the patch features shown as RGB (the DINOv2 paper's
visualisation). With `--weights` pointing at a Meta hub file (e.g. dinov2_vits14_pretrain.pth)
the maps show object parts; with the default random weights they show the pipeline working.
"""

from __future__ import annotations

import os
import time

import numpy as np
from PIL import Image

from dinov2_jax.data.eval_transform import eval_transform

SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "horse", "camera")


def bundled_photos(names=SKIMAGE_PHOTOS) -> dict[str, np.ndarray]:
  """Real photographs shipped inside scikit-image, as RGB uint8 arrays."""
  from skimage import data
  photos = {}
  for name in names:
    image = np.asarray(getattr(data, name)())
    if image.ndim == 2:
      image = np.repeat(image[..., None], 3, axis=-1)
    if image.dtype != np.uint8:  # e.g. the boolean horse silhouette
      image = (image.astype(np.float32) / image.max() * 255).astype(np.uint8)
    photos[name] = image[..., :3]
  return photos


def pca_rgb(patch_features: np.ndarray, foreground_threshold: float | None = 0.0) -> np.ndarray:
  """(B, h, w, D) patch features -> (B, h, w, 3) uint8: first 3 PCA components as RGB.

  The PCA is fitted jointly over all images. Patches whose first component is below the threshold
  are shown black (the paper's background removal); pass None to keep every patch.
  """
  b, h, w, d = patch_features.shape
  flat = patch_features.reshape(-1, d).astype(np.float64)
  flat = flat - flat.mean(0)
  _, _, vt = np.linalg.svd(flat, full_matrices=False)
  comps = flat @ vt[:3].T
  lo, hi = np.percentile(comps, 1, axis=0), np.percentile(comps, 99, axis=0)
  rgb = np.clip((comps - lo) / np.maximum(hi - lo, 1e-8), 0, 1)
  if foreground_threshold is not None:
    rgb[comps[:, 0] < foreground_threshold] = 0
  return (rgb.reshape(b, h, w, 3) * 255).astype(np.uint8)


def run(weights: str | None, outdir: str, size: int = 448, preset: str = "dinov2_vits14") -> dict:
  import dinov2_jax

  t0 = time.perf_counter()
  if weights:
    model = dinov2_jax.load_backbone(weights)
    source = weights
  else:
    model = dinov2_jax.create_pretrained_like(preset)
    source = f"{preset} with random weights (pass --weights for Meta's)"
  print(f"backbone: {source}\n  {model.config.embed_dim}-d, {model.config.depth} blocks, "
        f"{model.config.num_register_tokens} registers ({time.perf_counter() - t0:.1f}s to build)")
  photos = bundled_photos()
  names = list(photos)
  batch = np.stack([eval_transform(photos[n], crop_size=size) for n in names])
  print(f"images: {len(names)} scikit-image photos at {size}x{size}: {', '.join(names)}")

  t0 = time.perf_counter()
  feats = model.forward_features(batch)
  feats["x_norm_clstoken"].block_until_ready()
  first = time.perf_counter() - t0
  t0 = time.perf_counter()
  feats = model.forward_features(batch)
  feats["x_norm_clstoken"].block_until_ready()
  steady = time.perf_counter() - t0
  print(f"forward_features: {first:.1f}s first call (compiles), {steady:.2f}s after "
        f"({len(names) / steady:.1f} images/s)")

  cls = np.asarray(feats["x_norm_clstoken"])
  cls = cls / np.linalg.norm(cls, axis=-1, keepdims=True)
  sims = cls @ cls.T
  print("CLS cosine similarity:")
  print("  " + " ".join(f"{n[:8]:>8}" for n in names))
  for n, row in zip(names, sims):
    print(f"  {n[:8]:>8} " + " ".join(f"{v:8.3f}" for v in row))

  grid = size // model.config.patch_size
  patches = np.asarray(feats["x_norm_patchtokens"]).reshape(len(names), grid, grid, -1)
  maps = pca_rgb(patches)
  tiles = []
  for name, m in zip(names, maps):
    photo = Image.fromarray(photos[name]).resize((size, size), Image.BICUBIC)
    pca = Image.fromarray(m).resize((size, size), Image.NEAREST)
    tiles.append(np.concatenate([np.asarray(photo), np.asarray(pca)], axis=0))
  os.makedirs(outdir, exist_ok=True)
  out_png = os.path.join(outdir, "pca_features.png")
  Image.fromarray(np.concatenate(tiles, axis=1)).save(out_png)
  np.savez(os.path.join(outdir, "features.npz"), names=np.array(names), cls=cls, patches=patches)
  print(f"wrote {out_png} (photos on top, PCA of patch features below) and features.npz")
  assert np.all(np.isfinite(cls)), "non-finite features"
  return {"names": names, "cls": cls, "patches": patches, "png": out_png}
