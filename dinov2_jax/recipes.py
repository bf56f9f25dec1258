"""Config recipes shipped with the package (`dinov2_jax/configs/*.py`), found by name or path.

Every command takes `--config` as a config file path or a recipe name, with an optional variant
after a colon, as ml_collections' `config_flags` does:

  --config demo                                    dinov2_jax/configs/demo.py
  --config pretrain:vits14                         dinov2_jax/configs/pretrain.py with arg "vits14"
  --config dinov2_jax/configs/pretrain.py:vits14   the same, from a checkout or anywhere after pip install
  --config configs/eval_knn.py                     the same file, by its older path
  --config my_recipe.py                            any config file of your own

A path that exists is used as is; otherwise a name or a `[dinov2_jax/]configs/NAME.py` path is looked
up among the packaged recipes, so the commands work from any folder after `pip install`.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence

CONFIGS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


class RecipeNotFound(ValueError):
  """A --config value that names neither a file nor a packaged recipe, or a variant the recipe refuses."""


def names() -> list[str]:
  """The packaged recipe names ("demo", "eval_knn", "eval_linear", "pretrain")."""
  return sorted(f[:-3] for f in os.listdir(CONFIGS_DIR) if f.endswith(".py") and not f.startswith("_"))


def path(name: str) -> str:
  """The file of a packaged recipe, e.g. path("pretrain") -> .../dinov2_jax/configs/pretrain.py."""
  return os.path.join(CONFIGS_DIR, f"{name}.py")


def resolve(value: str) -> str:
  """A --config value -> an existing config file path, with its ":variant" kept.

  Raises `RecipeNotFound` naming the packaged recipes when `value` is neither a file nor one of them.
  """
  file, sep, arg = value.partition(":")
  if os.path.isfile(file):
    return value
  stem = os.path.basename(file)
  stem = stem[:-3] if stem.endswith(".py") else stem
  parent = os.path.dirname(os.path.normpath(file)).replace(os.sep, "/")
  if parent in ("", "configs", "dinov2_jax/configs") and stem in names():
    return path(stem) + sep + arg
  raise RecipeNotFound(f"--config {value}: no such config file or recipe; the package's recipes are "
                       f"{', '.join(names())} (e.g. --config pretrain:vits14), or give a path to your own file")


def _load_module(file: str):
  spec = importlib.util.spec_from_file_location(f"dinov2_jax_recipe_{os.path.basename(file)[:-3]}", file)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config(value: str):
  """The ConfigDict of a recipe name or config file, with its variant: get_config("pretrain:vits14")."""
  file, _, arg = resolve(value).partition(":")
  module = _load_module(file)
  try:
    return module.get_config(arg) if arg else module.get_config()
  except ValueError as e:  # the recipe refuses the variant; its message says which ones exist
    raise RecipeNotFound(f"--config {value}: {e}") from None


def resolve_config_argv(argv: Sequence[str], flag: str = "config") -> list[str]:
  """`argv` with the value of `--config` (either `--config X` or `--config=X`) resolved by `resolve`.

  The recipe is also built once, so that an unknown variant is reported in one line here rather than
  as a traceback inside the flags parser.
  """
  argv = list(argv)
  for i, arg in enumerate(argv):
    for prefix in (f"--{flag}=", f"-{flag}="):
      if arg.startswith(prefix):
        get_config(arg[len(prefix):])
        argv[i] = prefix + resolve(arg[len(prefix):])
    if arg in (f"--{flag}", f"-{flag}") and i + 1 < len(argv):
      get_config(argv[i + 1])
      argv[i + 1] = resolve(argv[i + 1])
  return argv
