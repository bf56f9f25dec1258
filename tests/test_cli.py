"""The `dinov2-jax` command line: convert end to end, help text, errors, and the demo."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from dinov2_jax import cli
from dinov2_jax.weights.convert import hf_to_meta
from tests import torch_reference as ref


@pytest.fixture(scope="module")
def hf_file(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("cli")
  model = ref.make_hf_model(registers=False, seed=5, hidden=64, layers=2, heads=1, image_size=28)
  sd = {k: v.contiguous() for k, v in model.state_dict().items()}
  from safetensors.torch import save_file
  save_file(sd, str(tmp / "model.safetensors"))
  return tmp, {k: v.numpy() for k, v in sd.items()}


def test_help_documents_formats():
  out = subprocess.run([sys.executable, "-m", "dinov2_jax.cli", "convert", "--help"], capture_output=True, text=True)
  assert out.returncode == 0
  for phrase in ("Meta hub backbone", "teacher checkpoint", "linear head", "transformers", ".safetensors",
                 "weights_only=True", "--block-chunks", "--layout"):
    assert phrase in out.stdout, phrase


def test_convert_hf_to_meta_pth_and_back_to_hf(hf_file, tmp_path, capsys):
  src, hf_sd = hf_file
  assert cli.main(["convert", str(src / "model.safetensors"), str(tmp_path / "meta.pth")]) == 0
  meta = {k: v.numpy() for k, v in torch.load(tmp_path / "meta.pth", weights_only=True).items()}
  expected = hf_to_meta(hf_sd)
  assert meta.keys() == expected.keys()
  for k in expected:
    np.testing.assert_array_equal(meta[k], expected[k])
  assert "embed_dim=64 depth=2" in capsys.readouterr().out
  assert cli.main(["convert", str(tmp_path / "meta.pth"), str(tmp_path / "hf.safetensors"), "--layout", "hf"]) == 0
  assert (tmp_path / "config.json").exists() and "looks for model.safetensors" in capsys.readouterr().out
  back = load_file(str(tmp_path / "hf.safetensors"))
  assert back.keys() == hf_sd.keys()
  for k in hf_sd:
    np.testing.assert_array_equal(back[k], hf_sd[k])


def test_convert_chunked_and_overrides(hf_file, tmp_path):
  src, _ = hf_file
  assert cli.main(["convert", str(src / "model.safetensors"), str(tmp_path / "c.pth"), "--block-chunks", "2",
                   "--set", "interpolate_offset=0.0"]) == 0
  keys = torch.load(tmp_path / "c.pth", weights_only=True).keys()
  assert "blocks.1.1.attn.qkv.weight" in keys and "blocks.0.0.norm1.weight" in keys


def test_convert_errors_are_reported(hf_file, tmp_path, capsys):
  src, _ = hf_file
  assert cli.main(["convert", str(src / "model.safetensors"), str(tmp_path / "x.npz")]) == 2
  assert "unknown output format" in capsys.readouterr().err
  assert not os.path.exists(tmp_path / "x.npz")
  assert cli.main(["convert", str(src / "model.safetensors"), str(tmp_path / "y.pth"), "--set", "depth=3"]) == 2
  err = capsys.readouterr().err
  assert "missing keys" in err and "blocks.2.norm1.weight" in err
  assert not os.path.exists(tmp_path / "y.pth")


def test_demo_runs_on_bundled_photos(tmp_path, capsys):
  assert cli.main(["demo", "--size", "56", "--outdir", str(tmp_path)]) == 0
  out = capsys.readouterr().out
  assert "astronaut" in out and "CLS cosine similarity" in out
  data = np.load(tmp_path / "features.npz")
  assert data["cls"].shape == (6, 384) and data["patches"].shape == (6, 4, 4, 384)
  np.testing.assert_allclose(np.linalg.norm(data["cls"], axis=-1), 1.0, rtol=1e-5)
  assert (tmp_path / "pca_features.png").stat().st_size > 1000


@pytest.mark.parametrize("registers", [False, True])
def test_convert_layout_hf_folder_loads_with_from_pretrained(registers, tmp_path):
  from transformers import AutoModel

  from dinov2_jax import load_backbone
  # Head dim 64, as in all of Meta's models: a Meta file does not store the head count.
  reference = ref.make_hf_model(registers=registers, seed=7, hidden=128, layers=2, heads=2, image_size=56,
                                swiglu=registers)
  meta = tmp_path / "meta.pth"
  torch.save({k: torch.from_numpy(np.ascontiguousarray(v))
              for k, v in hf_to_meta({k: v.numpy() for k, v in reference.state_dict().items()}).items()}, meta)
  assert cli.main(["convert", str(meta), str(tmp_path / "hf"), "--layout", "hf"]) == 0
  loaded = AutoModel.from_pretrained(tmp_path / "hf").eval()
  assert type(loaded).__name__ == ("Dinov2WithRegistersModel" if registers else "Dinov2Model")
  images = np.random.default_rng(0).normal(size=(2, 56, 56, 3)).astype(np.float32)
  with torch.no_grad():
    pixels = torch.from_numpy(images.transpose(0, 3, 1, 2))
    got = loaded(pixel_values=pixels).last_hidden_state.numpy()
    want = reference(pixel_values=pixels).last_hidden_state.numpy()
  np.testing.assert_allclose(got, want, atol=1e-5)
  # And the same numbers as our model of Meta's file (CLS token, final norm).
  ours = np.asarray(load_backbone(meta).forward_features(images)["x_norm_clstoken"])
  np.testing.assert_allclose(got[:, 0], ours, atol=1e-4)
