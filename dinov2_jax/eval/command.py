"""What the evaluation commands (`python -m dinov2_jax.eval.knn` / `.linear`) share: the command line,
feature extraction for both splits, the results files, and one-line errors for user mistakes.

The command line is training's: an ml_collections config file given with `--config` (a path, or a
recipe name such as `eval_knn:imagenet`, see `dinov2_jax/recipes.py`) with `--config.FIELD=VALUE`
overrides, plus the multi-host flags of `dinov2_jax/distributed.py`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax

from dinov2_jax.eval import config as eval_config
from dinov2_jax.eval import features as F
from dinov2_jax.eval import store as store_lib
from dinov2_jax.eval.progress import log_print



def user_errors() -> tuple[type[BaseException], ...]:
  """Mistakes in the command line, config, data or weights: reported in one line, without a traceback.

  Anything else is a bug and keeps its traceback.
  """
  from dinov2_jax.data.sources import DatasetError
  from dinov2_jax.weights.torch_format import CheckpointError
  return (eval_config.ConfigError, DatasetError, CheckpointError, store_lib.FeatureCacheMismatch,
          FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


def features_from_config(config, backbone, spec: F.FeatureSpec, out_dir: str, resolution: int,
                         log=log_print) -> tuple[F.FeatureStore, F.FeatureStore]:
  """Extracts (or reuses) the train and evaluation split features under `out_dir/features/`.

  Features computed from other data, preprocessing or weights are recomputed (and the log says so).
  """
  train_split, eval_split = eval_config.splits(config)
  stores = []
  for split, data in zip((train_split, eval_split), eval_config.datasets_from_config(config)):
    tag = "".join(ch if ch.isalnum() else "_" for ch in split)
    stores.append(F.extract_features(
        backbone, data, os.path.join(out_dir, "features", f"{tag}_blocks{spec.n_last_blocks}"),
        resolution=resolution, resize_size=config.resize_size or None, batch_size=config.batch_size,
        chunk_size=config.chunk_size, spec=spec, dtype=config.feature_dtype, num_workers=config.num_workers or None,
        on_mismatch="recompute", log=log))
  return stores[0], stores[1]


def data_summary(train: F.FeatureStore, test: F.FeatureStore) -> dict:
  """The classes and, per split, the images used per class and the unreadable ones (for the results JSON)."""
  return {
      "classes": list(train.class_names),
      "images_per_class": {"train": train.class_counts(), "eval": test.class_counts()},
      "skipped_unreadable": {"train": len(train.skipped), "eval": len(test.skipped)},
  }


def results_digest(results: Mapping[str, Any]) -> str:
  """SHA-1 of a results dict without its timing: equal in every process of a multi-host run."""
  import hashlib
  import json
  timeless = {k: v for k, v in results.items() if k != "elapsed_s"}
  return hashlib.sha1(json.dumps(timeless, sort_keys=True, default=str).encode()).hexdigest()[:16]


def markdown_table(rows: list[Mapping[str, Any]], columns: list[str] | None = None) -> str:
  """Rows of dicts -> a GitHub markdown table (floats with 2 decimals)."""
  columns = columns or list(rows[0])
  fmt = lambda v: f"{v:.2f}" if isinstance(v, float) else str(v)  # noqa: E731
  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
  return "\n".join(lines)


def write_report(out_dir: str, name: str, results: Mapping[str, Any], table: str, log=log_print) -> None:
  """Writes `<name>.json` and `<name>.md` to `out_dir` (process 0 only) and prints the table."""
  if jax.process_index() == 0:
    os.makedirs(out_dir, exist_ok=True)
    store_lib.write_json(os.path.join(out_dir, f"{name}.json"), results)
    store_lib.write_atomic(os.path.join(out_dir, f"{name}.md"), lambda f: f.write(table + "\n"), mode="w")
  if log:
    log(table)
    log(f"results written to {os.path.join(out_dir, name)}.json and .md")


def _help_text(module_doc: str, default_recipe: str) -> str:
  from dinov2_jax import recipes
  config = recipes.get_config(default_recipe)
  fields = "\n".join(f"  --config.{k}={v!r}" for k, v in _flatten(config.to_dict()))
  return (f"{module_doc.strip()}\n\nConfig fields of the default recipe {default_recipe} (override any with "
          f"--config.FIELD=VALUE):\n{fields}\n\nRecipes shipped with the package: {', '.join(recipes.names())}.\n"
          "Multi-host: --coordinator_address=HOST:PORT --num_processes=N --process_id=I on every process, or "
          "--distributed on a cluster manager (SLURM, TPU pods). All flags: --helpfull.")


def _flatten(d: dict, prefix: str = ""):
  for k, v in d.items():
    if isinstance(v, dict):
      yield from _flatten(v, f"{prefix}{k}.")
    else:
      yield f"{prefix}{k}", v


def run_command(run: Callable[[Any], dict], module_doc: str, default_recipe: str,
                argv: Sequence[str] | None = None) -> None:
  """`python -m <command> [--config RECIPE_OR_FILE] [--config.FIELD=VALUE ...]` -> `run(config)`.

  Reads the config through ml_collections' `config_flags` on absl's global flags, as training does
  (so a process runs one command), joins a multi-host run when the distributed flags say so, and
  turns user errors into one line on stderr and exit status 2.
  """
  from absl import app, flags
  from ml_collections import config_flags

  from dinov2_jax import distributed, recipes

  argv = list(sys.argv if argv is None else argv)
  if any(a in ("-h", "--help", "-help", "--helpshort") for a in argv[1:]):
    print(_help_text(module_doc, default_recipe))
    sys.exit(0)
  try:
    argv = recipes.resolve_config_argv(argv, default=default_recipe)
  except recipes.RecipeNotFound as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  if "config" not in flags.FLAGS:
    config_flags.DEFINE_config_file("config", recipes.path(default_recipe),
                                    "A config file or recipe name (see dinov2_jax/configs/).", lock_config=True)

  def main(args):
    from absl import logging
    if not flags.FLAGS["verbosity"].present:
      logging.set_verbosity(logging.WARNING)  # JAX logs its backend search at INFO
    if len(args) > 1:
      raise app.UsageError(f"unexpected arguments {args[1:]}; config fields are set as --config.FIELD=VALUE")
    try:
      distributed.initialize_from_flags()
      if jax.process_count() > 1:
        log_print(f"{jax.process_count()} processes, {jax.device_count()} devices in all "
                  f"({jax.local_device_count()} per process)")
      results = run(flags.FLAGS.config)
      if jax.process_count() > 1:  # every process prints a digest of its results: they must agree
        print(f"process {jax.process_index()} of {jax.process_count()}: results digest {results_digest(results)}",
              flush=True)
    except user_errors() as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)

  app.run(main, argv=argv)
