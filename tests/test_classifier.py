"""Meta's released linear heads (`*_linear_head.pth`, `*_linear4_head.pth`) through `load_classifier`."""

import numpy as np
import pytest
import torch

import dinov2_jax
from dinov2_jax import CheckpointError
from tests import torch_reference as ref

R = 4  # register tokens: Meta's classifiers never include them in the patch mean


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("cls")
  model = ref.make_hf_model(registers=True, swiglu=False, seed=11, hidden=128, layers=4, image_size=56)
  torch.save({k: v.contiguous() for k, v in model.state_dict().items()}, tmp / "backbone.bin")
  x = np.random.default_rng(0).normal(size=(3, 56, 70, 3)).astype(np.float32)
  with torch.no_grad():
    out = model(pixel_values=torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), output_hidden_states=True)
    normed = [model.layernorm(h) for h in out.hidden_states[-4:]]
  return tmp, x, out, normed


def _head(tmp, name, in_dim, seed):
  g = torch.Generator().manual_seed(seed)
  head = {"weight": 0.05 * torch.randn(1000, in_dim, generator=g), "bias": 0.1 * torch.randn(1000, generator=g)}
  torch.save(head, tmp / name)
  return head


def test_linear_head_logits(setup):
  tmp, x, out, _ = setup
  head = _head(tmp, "linear_head.pth", 2 * 128, seed=1)
  hidden = out.last_hidden_state
  features = torch.cat([hidden[:, 0], hidden[:, 1 + R:].mean(1)], dim=-1)
  expected = (features @ head["weight"].T + head["bias"]).numpy()
  classifier = dinov2_jax.load_classifier(tmp / "backbone.bin", tmp / "linear_head.pth")
  assert classifier.n_layers == 1
  np.testing.assert_allclose(np.asarray(classifier(x)), expected, atol=1e-4)


def test_linear4_head_logits(setup):
  tmp, x, _, normed = setup
  head = _head(tmp, "linear4_head.pth", 5 * 128, seed=2)
  features = torch.cat([n[:, 0] for n in normed] + [normed[-1][:, 1 + R:].mean(1)], dim=-1)
  expected = (features @ head["weight"].T + head["bias"]).numpy()
  classifier = dinov2_jax.load_classifier(tmp / "backbone.bin", tmp / "linear4_head.pth")
  assert classifier.n_layers == 4
  np.testing.assert_allclose(np.asarray(classifier(x)), expected, atol=1e-4)


def test_wrong_head_for_the_backbone(setup):
  tmp = setup[0]
  _head(tmp, "vitl_head.pth", 2 * 1024, seed=3)  # a ViT-L/14 head on a 128-d backbone
  with pytest.raises(CheckpointError, match="expects 2048-dimensional inputs.*takes 256 .* or 640 .*different backbone"):
    dinov2_jax.load_classifier(tmp / "backbone.bin", tmp / "vitl_head.pth")
  with pytest.raises(CheckpointError, match="not a linear classifier head"):
    dinov2_jax.load_classifier(tmp / "backbone.bin", tmp / "backbone.bin")
