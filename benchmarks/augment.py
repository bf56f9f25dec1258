"""Throughput of the DINOv2 10-crop augmentation (2 x 224 + 8 x 98), per host core.

  taskset -c 0 python benchmarks/augment.py            # single core parts
  python benchmarks/augment.py --grain_workers 2       # + grain with 2 worker processes

Input: scikit-image's bundled photos, resized and centre-cropped to 500x375 (typical ImageNet),
decoded RGB uint8 (decode is not timed).

Two designs are measured:

  host   (kept):     host: crop + resize + flip + colour jitter + grayscale + blur + solarise in
                     PIL/numpy (uint8), then crop-major collate + ImageNet normalisation in numpy.
                     device: nothing but the transfer.
  device (rejected): host: crop + resize + flip only (uint8). device: one jitted JAX function doing
                     colour jitter (random order), grayscale, blur, solarise, normalisation on the
                     whole batch. Here the "device" is this machine's CPU.

"images/s/core" divides images by the process CPU time (all threads, so XLA's thread pool counts),
which is robust to other processes on a shared machine; "images/s wall" is the plain rate. Each
figure is the best of --repeats runs.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from benchmarks.machine import print_machine  # noqa: E402

from dinov2_jax.data import augment as A  # noqa: E402


def photos(height: int = 375, width: int = 500) -> list[np.ndarray]:
  """Real photos from scikit-image, resized (shorter side) and centre-cropped to height x width."""
  import skimage.data
  from PIL import Image
  names = ["astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field",
           "camera"]
  out = []
  for name in names:
    img = A.to_pil_rgb(getattr(skimage.data, name)())
    scale = max(height / img.height, width / img.width)
    w, h = max(width, round(img.width * scale)), max(height, round(img.height * scale))
    img = img.resize((w, h), Image.Resampling.BICUBIC)
    left, top = (w - width) // 2, (h - height) // 2
    out.append(np.asarray(img.crop((left, top, left + width, top + height))))
  return out


def timed(fn, n_images: int, repeats: int) -> tuple[float, float]:
  """Best (images per CPU second, images per wall second) over `repeats` calls of fn()."""
  best_cpu, best_wall = 0.0, 0.0
  for _ in range(repeats):
    c0, w0 = time.process_time(), time.perf_counter()
    fn()
    c1, w1 = time.process_time(), time.perf_counter()
    best_cpu = max(best_cpu, n_images / (c1 - c0))
    best_wall = max(best_wall, n_images / (w1 - w0))
  return best_cpu, best_wall


# ----------------------------------------------------------------------------------------------
# The rejected designs' colour half: torchvision-tensor (float) semantics, in JAX or numpy.


def colour_fn(jnp):
  """The colour/blur/solarise/normalise half over a batch, written once for `jnp` or numpy."""

  def gray(x):
    return x[..., 0:1] * 0.299 + x[..., 1:2] * 0.587 + x[..., 2:3] * 0.114

  def blend(x, op, factors):
    """One jitter slot for ops 0..2 (brightness, contrast, saturation); op 3 is the identity."""
    f = jnp.take_along_axis(factors, jnp.minimum(op, 2)[:, None], 1)[:, 0]
    f = jnp.where(op == 3, 1.0, f)[:, None, None, None]
    g = gray(x)
    op = op[:, None, None, None]
    ref = jnp.where(op == 0, 0.0, jnp.where(op == 1, g.mean((1, 2, 3), keepdims=True), g))
    return jnp.clip(f * x + (1 - f) * ref, 0.0, 1.0)

  def hue(x, shift):
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    maxc, minc = x.max(-1), x.min(-1)
    cr = maxc - minc
    flat = cr == 0
    s = cr / jnp.where(maxc == 0, 1.0, maxc)
    crd = jnp.where(flat, 1.0, cr)
    rc, gc, bc = (maxc - r) / crd, (maxc - g) / crd, (maxc - b) / crd
    h = jnp.where(maxc == r, bc - gc, jnp.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = (jnp.where(flat, 0.0, h) / 6.0 + shift[:, None, None]) % 1.0
    i = jnp.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.astype(jnp.int32) % 6
    v = maxc
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    conds = [i == k for k in range(5)]
    return jnp.stack([jnp.select(conds, [v, q, p, p, t], v), jnp.select(conds, [t, v, v, q, p], p),
                      jnp.select(conds, [p, p, t, v, v], q)], -1)

  def colour(x, jitter, pre_ops, post_ops, factors, grayscale, sigma, blur, sol):
    """x (N, S, S, 3) uint8 -> (N, S, S, 3) float32 normalised; params are (N,) or (N, k)."""
    m = lambda a: a[:, None, None, None]  # noqa: E731
    x = x.astype(jnp.float32) / 255.0
    y = x
    # A random order of 3 blends and a hue shift == up to 3 blends, the hue, up to 3 blends.
    for k in range(3):
      y = blend(y, pre_ops[:, k], factors)
    y = hue(y, factors[:, 3])
    for k in range(3):
      y = blend(y, post_ops[:, k], factors)
    x = jnp.where(m(jitter), y, x)
    x = jnp.where(m(grayscale), gray(x), x)
    size = x.shape[1]
    taps = jnp.arange(-4, 5, dtype=jnp.float32)
    kern = jnp.exp(-0.5 * (taps[None] / sigma[:, None]) ** 2)
    kern = kern / kern.sum(1, keepdims=True)
    xp = jnp.pad(x, ((0, 0), (4, 4), (4, 4), (0, 0)), mode="reflect")
    y = sum(m(kern[:, i]) * xp[:, i:i + size] for i in range(9))
    y = sum(m(kern[:, i]) * y[:, :, i:i + size] for i in range(9))
    x = jnp.where(m(blur), y, x)
    x = jnp.where(m(sol) & (x >= 0.5), 1.0 - x, x)
    return A.imagenet_normalize(x * 255.0).astype(jnp.float32)

  return colour


def device_design_params(params: list[list[A.CropParams]], first: int, count: int):
  """Stacks the colour parameters of crops first..first+count-1 of every image, crop-major."""
  rows = [p[k] for k in range(first, first + count) for p in params]
  pre, post = np.full((len(rows), 3), 3), np.full((len(rows), 3), 3)
  for r, p in enumerate(rows):
    if p.jitter_order is not None:
      h = p.jitter_order.index(A.HUE)
      pre[r, :h] = p.jitter_order[:h]
      post[r, :3 - h] = p.jitter_order[h + 1:]
  f32 = lambda v: np.asarray(v, np.float32)  # noqa: E731
  return (np.array([p.jitter_order is not None for p in rows]), pre, post,
          f32([p.jitter_factors for p in rows]), np.array([p.grayscale for p in rows]),
          f32([p.blur_sigma or 1.0 for p in rows]),
          np.array([p.blur_sigma is not None for p in rows]),
          np.array([p.solarize for p in rows]))


def device_design_host(image: np.ndarray, rng: np.random.Generator, cfg: A.MultiCropConfig):
  """Host half of the rejected design: geometry only, plus the parameters for the device half."""
  pil = A.to_pil_rgb(image)
  params = A.sample_image_params(rng, (pil.height, pil.width), cfg)
  geo = [p._replace(jitter_order=None, grayscale=False, blur_sigma=None, solarize=False)
         for p in params]
  sizes = [cfg.global_size] * 2 + [cfg.local_size] * cfg.n_local
  crops = [A.apply_crop_params(pil, p, s) for p, s in zip(geo, sizes)]
  return {"global_crops": np.stack(crops[:2]), "local_crops": np.stack(crops[2:])}, params


# ----------------------------------------------------------------------------------------------


def _tree_cpu_seconds() -> float | None:
  """CPU seconds of this process and its children (grain's workers); None without psutil."""
  try:
    import psutil
  except ImportError:
    return None
  me = psutil.Process()
  return sum(sum(p.cpu_times()[:2]) for p in [me] + me.children(recursive=True))


def grain_rate(images, cfg, batch, workers, n_batches) -> tuple[float, float | None]:
  """(images/s wall, images per CPU second of all processes) of a grain pipeline:
  random_map(DinoMultiCrop) + batch(collate_crops), optionally mp_prefetch(workers)."""
  import grain
  from absl import flags
  if not flags.FLAGS.is_parsed():  # grain's workers read absl flags
    flags.FLAGS.mark_as_parsed()
  # No reader threads and a small buffer: the rate is then the sustained rate of the processes
  # alone, not of a buffer filled during the warm-up.
  read = grain.ReadOptions(num_threads=0, prefetch_buffer_size=2)
  ds = (grain.MapDataset.source(images).seed(0).repeat()
        .random_map(A.DinoMultiCrop(cfg)).batch(batch, batch_fn=A.collate_crops)
        .to_iter_dataset(read))
  if workers:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=2))
  it = iter(ds)
  for _ in range(2 * max(workers, 1)):  # start-up: spawn workers, fill buffers
    next(it)
  c0, t0 = _tree_cpu_seconds(), time.perf_counter()
  for _ in range(n_batches):
    next(it)
  wall, c1 = time.perf_counter() - t0, _tree_cpu_seconds()
  return n_batches * batch / wall, (n_batches * batch / (c1 - c0) if c0 is not None else None)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--blur_mode", default="paper", choices=sorted(A.BLUR_PROBS))
  parser.add_argument("--grain_workers", type=int, default=0,
                      help="also measure grain with this many worker processes (0: skip)")
  parser.add_argument("--grain_batches", type=int, default=24)
  parser.add_argument("--skip_device_design", action="store_true")
  args = parser.parse_args(argv)
  print_machine()  # before anything starts: the load average of the idle machine

  import jax
  cfg = A.MultiCropConfig(blur_mode=args.blur_mode)
  pics = photos()
  B = args.batch
  batch_imgs = [pics[i % len(pics)] for i in range(B)]
  cores = sorted(os.sched_getaffinity(0))
  rows = []

  def add(design, part, n, fn):
    cpu, wall = timed(fn, n, args.repeats)
    rows.append((design, part, cpu, wall))

  # Kept design.
  samples = [A.multi_crop(im, A.image_rng(0, i), cfg) for i, im in enumerate(batch_imgs)]
  normalize = jax.jit(A.imagenet_normalize)
  u8 = A.collate_crops(samples, normalize=False)
  jax.block_until_ready(normalize(u8["global_crops"]))
  jax.block_until_ready(normalize(u8["local_crops"]))

  def host_crops():
    for i, im in enumerate(batch_imgs):
      A.multi_crop(im, A.image_rng(1, i), cfg)

  def host_collate():
    A.collate_crops(samples)

  def e2e_host():
    s = [A.multi_crop(im, A.image_rng(2, i), cfg) for i, im in enumerate(batch_imgs)]
    jax.block_until_ready(jax.device_put(A.collate_crops(s)))

  def device_normalize():
    jax.block_until_ready([normalize(u8["global_crops"]), normalize(u8["local_crops"])])

  add("host (kept)", "host: per-image crops, uint8", B, host_crops)
  add("host (kept)", "host: collate + normalise", B, host_collate)
  add("host (kept)", "end-to-end (host + device_put)", B, e2e_host)
  add("host (kept)", "alt. device: jitted normalise of uint8 batch", B, device_normalize)

  if not args.skip_device_design:
    import jax.numpy as jnp
    colour = jax.jit(colour_fn(jnp))
    np_colour = colour_fn(np)
    outs = [device_design_host(im, A.image_rng(0, i), cfg) for i, im in enumerate(batch_imgs)]
    geo = A.collate_crops([o[0] for o in outs], normalize=False)
    params = [o[1] for o in outs]
    pg, pl = device_design_params(params, 0, 2), device_design_params(params, 2, cfg.n_local)
    jax.block_until_ready([colour(geo["global_crops"], *pg), colour(geo["local_crops"], *pl)])

    def dev_host():
      for i, im in enumerate(batch_imgs):
        device_design_host(im, A.image_rng(1, i), cfg)

    def dev_device():
      jax.block_until_ready([colour(geo["global_crops"], *pg), colour(geo["local_crops"], *pl)])

    def dev_e2e():
      o = [device_design_host(im, A.image_rng(2, i), cfg) for i, im in enumerate(batch_imgs)]
      g = A.collate_crops([x[0] for x in o], normalize=False)
      p = [x[1] for x in o]
      jax.block_until_ready([
          colour(g["global_crops"], *device_design_params(p, 0, 2)),
          colour(g["local_crops"], *device_design_params(p, 2, cfg.n_local))])

    add("device (rejected)", "host: crop + resize + flip", B, dev_host)
    add("device (rejected)", "device: jitted colour/blur/solarise/normalise (CPU)", B, dev_device)
    add("device (rejected)", "end-to-end", B, dev_e2e)

    def numpy_colour():
      np_colour(geo["global_crops"], *pg), np_colour(geo["local_crops"], *pl)

    def numpy_e2e():
      o = [device_design_host(im, A.image_rng(2, i), cfg) for i, im in enumerate(batch_imgs)]
      g = A.collate_crops([x[0] for x in o], normalize=False)
      p = [x[1] for x in o]
      b = {"global_crops": np_colour(g["global_crops"], *device_design_params(p, 0, 2)),
           "local_crops": np_colour(g["local_crops"], *device_design_params(p, 2, cfg.n_local))}
      jax.block_until_ready(jax.device_put(b))

    add("host numpy float (rejected)", "host: numpy colour/blur/solarise/normalise on the batch", B,
        numpy_colour)
    add("host numpy float (rejected)", "end-to-end (host + device_put)", B, numpy_e2e)

  print(f"command: {' '.join(['python'] + sys.argv)}  (cores in affinity: {cores})")
  print(f"recipe: 2 x {cfg.global_size} + {cfg.n_local} x {cfg.local_size},"
        f" blur_mode={cfg.blur_mode},"
        f" batch {B}, 500x375 photos, best of {args.repeats}; jax {jax.__version__}"
        f" on {jax.default_backend()}; load average {os.getloadavg()[0]:.1f}")
  print()
  print("| design | part | images/s/core (CPU time) | images/s (wall) | ms/image/core |")
  print("|---|---|---|---|---|")
  for design, part, cpu, wall in rows:
    print(f"| {design} | {part} | {cpu:.1f} | {wall:.1f} | {1e3 / cpu:.2f} |")

  if args.grain_workers:
    # Workers inherit the affinity: give them every core of the machine.
    os.sched_setaffinity(0, range(os.cpu_count()))
    print()
    print("| grain pipeline (random_map + batch(collate_crops)) | images/s (wall) |"
          " images per CPU second, all processes | load average |")
    print("|---|---|---|---|")
    for workers in (0, args.grain_workers):
      rate, per_cpu = grain_rate(pics, cfg, B, workers, args.grain_batches)
      per_cpu = f"{per_cpu:.1f}" if per_cpu else "n/a (no psutil)"
      cores = len(os.sched_getaffinity(0))
      print(f"| worker_count={workers}, {cores} cores | {rate:.1f} | {per_cpu}"
            f" | {os.getloadavg()[0]:.1f} |")


if __name__ == "__main__":
  main()
