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

import difflib
import importlib.util
import os
import re
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


def check_overrides(config, argv: Sequence[str], value: str, flag: str = "config") -> None:
  """Raises `RecipeNotFound` naming the first `--config.FIELD=...` of `argv` that `config` does not have.

  (config_flags would raise a traceback for it while the flags are defined.)
  """
  for arg in argv:
    m = re.match(rf"^--?(?:no)?{flag}\.([^=]+)", arg)
    if not m:
      continue
    node = config
    for depth, part in enumerate(m.group(1).split(".")):
      keys = list(node.keys()) if hasattr(node, "keys") else []
      if part not in keys:
        where = ".".join(m.group(1).split(".")[:depth]) or "the config"
        close = difflib.get_close_matches(part, keys, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f"; it has {sorted(keys)}"
        raise RecipeNotFound(f"--{flag}.{m.group(1)}: {where} of {value} has no field {part!r}{hint} "
                             "(--help lists the fields)")
      node = node[part]


def resolve_config_argv(argv: Sequence[str], flag: str = "config", default: str | None = None) -> list[str]:
  """`argv` with the value of `--config` (either `--config X` or `--config=X`) resolved by `resolve`.

  The recipe (or `default` when `--config` is absent) is also built once, so that an unknown
  variant or override field is reported in one line here rather than as a traceback inside the
  flags parser.
  """
  argv = list(argv)
  value = default
  for i, arg in enumerate(argv):
    for prefix in (f"--{flag}=", f"-{flag}="):
      if arg.startswith(prefix):
        value = arg[len(prefix):]
        argv[i] = prefix + resolve(value)
    if arg in (f"--{flag}", f"-{flag}") and i + 1 < len(argv):
      value = argv[i + 1]
      argv[i + 1] = resolve(value)
  if value is not None:
    check_overrides(get_config(value), argv, value, flag)
  return argv
