"""Every shipped config builds, validates and matches the recipe it names."""

import pytest

from dinov2_jax import recipes
from dinov2_jax.train import trainer
from dinov2_jax.train.state import backbone_config_from


def _load(name, arg=None):
  return recipes.get_config(f"{name}:{arg}" if arg else name)


@pytest.mark.parametrize("variant", ["vits14", "vitb14", "vitl16_short", "vitl14", "vitg14"])
def test_pretrain_variants_validate(variant):
  c = _load("pretrain", variant)
  trainer.validate_config(c)
  cfg = backbone_config_from(c)
  assert cfg.img_size == c.crops.global_crops_size and cfg.patch_size in (14, 16)
  assert c.crops.local_crops_size % cfg.patch_size == 0


def test_vitl14_and_vitg14_follow_meta():
  for variant, dim, depth in (("vitl14", 1024, 24), ("vitg14", 1536, 40)):
    c = _load("pretrain", variant)
    cfg = backbone_config_from(c)
    assert (cfg.embed_dim, cfg.depth, cfg.ffn_layer, cfg.ffn_hidden_dim if dim == 1536 else 0) == (
        dim, depth, "swiglufused", 4096 if dim == 1536 else 0)
    assert c.dino.head_n_prototypes == 131072 and c.dino.head_bottleneck_dim == 384
    assert c.ibot.separate_head and c.ibot.head_n_prototypes == 131072
    assert c.centering == "sinkhorn_knopp" and c.optim.layerwise_decay == 1.0
    assert c.student.drop_path_rate == 0.4 and c.teacher.momentum_teacher == 0.994


def test_unknown_variant():
  with pytest.raises(ValueError, match="unknown variant"):
    _load("pretrain", "vith14")


def test_demo_config_validates():
  trainer.validate_config(_load("demo"))


def test_recipes_are_found_by_name_or_path_from_any_folder(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # no configs/ folder here, as after `pip install`
  expected = recipes.path("pretrain") + ":vits14"
  for value in ("pretrain:vits14", "dinov2_jax/configs/pretrain.py:vits14", "configs/pretrain.py:vits14"):
    assert recipes.resolve(value) == expected
  own = tmp_path / "mine.py"
  own.write_text("def get_config():\n  return {'x': 1}\n")
  assert recipes.resolve("mine.py") == "mine.py"  # an existing file wins
  with pytest.raises(recipes.RecipeNotFound, match="recipes are demo, eval_knn, eval_linear, pretrain"):
    recipes.resolve("pretrian:vits14")
  assert recipes.resolve_config_argv(["prog", "--config", "demo", "--config.seed=1"])[2] == recipes.path("demo")
  assert recipes.resolve_config_argv(["prog", "--config=eval_knn:imagenet"])[1] == (
      "--config=" + recipes.path("eval_knn") + ":imagenet")
  with pytest.raises(recipes.RecipeNotFound, match="unknown variant 'vith14' of the pretrain recipe"):
    recipes.resolve_config_argv(["prog", "--config=pretrain:vith14"])
  with pytest.raises(recipes.RecipeNotFound, match="optim of demo has no field 'base_rl'; did you mean 'base_lr'"):
    recipes.resolve_config_argv(["prog", "--config", "demo", "--config.optim.base_rl=1"])


def test_training_entry_point_takes_a_recipe_name(tmp_path):
  import os
  import subprocess
  import sys
  repo = os.path.dirname(os.path.dirname(recipes.CONFIGS_DIR))
  env = {**os.environ, "PYTHONPATH": repo, "JAX_PLATFORMS": "cpu"}
  # A recipe name the package does not have: one line naming the recipes, no traceback.
  bad = subprocess.run([sys.executable, "-m", "dinov2_jax.main", "--config", "pretrian", "--workdir", "w"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
  assert bad.returncode != 0 and "recipes are demo" in bad.stderr and "Traceback" not in bad.stderr
