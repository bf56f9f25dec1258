"""Meta's depth and segmentation heads through `load_depther` / `load_segmenter`.

References are PyTorch statements of Meta's maths (tests/dense_reference.py) on a `transformers`
Dinov2 backbone; the head files are written as Meta's are (mmcv checkpoints with numpy scalars in
their metadata) from modules whose state-dict names are Meta's.
"""

import numpy as np
import pytest
import torch

import dinov2_jax
from dinov2_jax import CheckpointError
from dinov2_jax.dense import center_pad
from tests import dense_reference as ref_dense
from tests import torch_reference as ref

DIM, DEPTH = 128, 12  # 12 blocks: the 4-layer heads read Meta's ViT-S/B blocks (2, 5, 8, 11)
R = 4


@pytest.fixture(scope="module")
def depth_setup(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("depth")
  model = ref.make_hf_model(registers=False, hidden=DIM, layers=DEPTH, heads=2, image_size=56, seed=21)
  torch.save({k: v.contiguous() for k, v in model.state_dict().items()}, tmp / "backbone.bin")
  model = ref.use_meta_interpolation(model, offset=0.1)  # Meta's non-register hub setting, our default
  # 60 x 75 is padded to 70 x 84 (CenterPadding: 5 + 5 rows, 4 + 5 columns); 56 x 84 needs none.
  images = {size: torch.from_numpy(np.random.default_rng(size[0]).normal(size=(2, 3) + size).astype(np.float32))
            for size in ((60, 75), (56, 84))}
  return tmp, model, images


def _nhwc(x: torch.Tensor) -> np.ndarray:
  return x.permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("kwargs", [dict(size=(20, 33)), dict(size=(3, 4)), dict(size=(11, 13), align_corners=True),
                                    dict(scale_factor=2, align_corners=True), dict(scale_factor=2), dict(size=(5, 7))])
def test_bilinear_resize_matches_torch(kwargs):
  from dinov2_jax.models.interpolate import resize_bilinear
  x = torch.randn(2, 3, 5, 7)
  expected = torch.nn.functional.interpolate(x, mode="bilinear", **{"align_corners": False, **kwargs})
  got = resize_bilinear(_nhwc(x), kwargs.get("size"), scale_factor=kwargs.get("scale_factor"),
                        align_corners=kwargs.get("align_corners", False))
  np.testing.assert_allclose(np.asarray(got), _nhwc(expected), atol=1e-6)


def test_center_pad_matches_meta():
  x = torch.randn(1, 3, 15, 20)
  np.testing.assert_array_equal(np.asarray(center_pad(_nhwc(x), 14)), _nhwc(ref_dense.center_pad(x, 14)))
  assert center_pad(_nhwc(x), 14).shape == (1, 28, 28, 3)  # 13 rows: 6 above, 7 below; 8 columns: 4 + 4


@pytest.mark.parametrize("layers", [1, 4])
def test_linear_depth_heads(depth_setup, layers):
  tmp, model, images = depth_setup
  head = ref_dense.perturb(ref_dense.LinearDepthHead(2 * DIM * layers), seed=layers)
  path = tmp / f"dinov2_vits14_nyu_linear{'4' if layers == 4 else ''}_head.pth"
  ref_dense.save_head(head, path, backbone=model if layers == 4 else None)  # a whole-model state dict is fine
  depther = dinov2_jax.load_depther(tmp / "backbone.bin", path)
  blocks = (2, 5, 8, 11) if layers == 4 else (DEPTH - 1,)
  cfg = depther.head_config
  assert (cfg.kind, cfg.out_index, cfg.n_bins, cfg.min_depth, cfg.max_depth) == ("linear", blocks, 256, 0.001, 80.0)
  for x in images.values():
    expected = ref_dense.depther(model, head, x, blocks)
    got = np.asarray(depther(_nhwc(x)))
    assert got.shape == expected.shape == (2,) + tuple(x.shape[2:]) and got.dtype == np.float32
    assert expected.std() > 0.5  # a real depth map, not a constant
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)


def test_dpt_depth_head_and_depth_ranges(depth_setup):
  tmp, model, images = depth_setup
  torch.manual_seed(0)
  head = ref_dense.perturb(ref_dense.DPTDepthHead(DIM, channels=32), seed=5)
  with torch.no_grad():  # depths of a few metres, some beyond NYU's 10 m
    head.conv_depth.head[4].weight.mul_(60.0)
    head.conv_depth.head[4].bias.fill_(6.0)
  x = images[(60, 75)]
  for dataset in ("nyu", "kitti"):
    ref_dense.save_head(head, tmp / f"dinov2_vits14_{dataset}_dpt_head.pth")
  depther = dinov2_jax.load_depther(tmp / "backbone.bin", tmp / "dinov2_vits14_kitti_dpt_head.pth")
  assert (depther.head_config.kind, depther.head_config.out_index) == ("dpt", (2, 5, 8, 11))
  assert depther.head_config.max_depth == 80.0  # Meta's hub: the range of the head's training set
  head.max_depth = 80.0
  expected = ref_dense.depther(model, head, x, (2, 5, 8, 11))
  assert expected.std() > 1.0 and expected.max() > 12.0  # beyond NYU's range
  np.testing.assert_allclose(np.asarray(depther(_nhwc(x))), expected, rtol=1e-5, atol=1e-4)
  # NYU's range (10 m), here with the blocks read overridden.
  depther = dinov2_jax.load_depther(tmp / "backbone.bin", tmp / "dinov2_vits14_nyu_dpt_head.pth", out_index=[1, 3, 5, 7])
  assert depther.head_config.max_depth == 10.0
  head.max_depth = 10.0
  expected = ref_dense.depther(model, head, x, (1, 3, 5, 7))
  assert expected.max() == 10.0 and expected.std() > 1.0
  np.testing.assert_allclose(np.asarray(depther(_nhwc(x))), expected, rtol=1e-5, atol=1e-4)
  depther = dinov2_jax.load_depther(tmp / "backbone.bin", tmp / "dinov2_vits14_nyu_dpt_head.pth", dataset="kitti",
                                    min_depth=0.5)
  assert (depther.head_config.min_depth, depther.head_config.max_depth) == (0.5, 80.0)


def test_depth_head_errors(depth_setup, tmp_path):
  tmp = depth_setup[0]
  ref_dense.save_head(ref_dense.LinearDepthHead(2 * 64), tmp_path / "small_linear_head.pth")
  with pytest.raises(CheckpointError, match="takes 128 input channels.*takes 256 .linear. or 1024 .linear4.*different"):
    dinov2_jax.load_depther(tmp / "backbone.bin", tmp_path / "small_linear_head.pth")
  ref_dense.save_head(ref_dense.SegmentationHead(DIM, 150), tmp_path / "seg.pth")
  with pytest.raises(CheckpointError, match="segmentation head.*use load_segmenter"):
    dinov2_jax.load_depther(tmp / "backbone.bin", tmp_path / "seg.pth")
  head = ref_dense.DPTDepthHead(DIM, channels=32)
  state = {f"decode_head.{k}": v for k, v in head.state_dict().items()}
  del state["decode_head.fusion_blocks.2.res_conv_unit1.conv2.conv.weight"]
  state["decode_head.extra.weight"] = torch.zeros(1)
  torch.save({"state_dict": state}, tmp_path / "broken_dpt_head.pth")
  with pytest.raises(CheckpointError) as err:
    dinov2_jax.load_depther(tmp / "backbone.bin", tmp_path / "broken_dpt_head.pth")
  msg = str(err.value)
  assert "broken_dpt_head.pth" in msg and "fusion_blocks.2.res_conv_unit1.conv2.conv.weight" in msg
  assert "unexpected keys (1): decode_head.extra.weight" in msg
  with pytest.raises(CheckpointError, match="missing keys"):  # strict=False ignores extras, never gaps
    dinov2_jax.load_depther(tmp / "backbone.bin", tmp_path / "broken_dpt_head.pth", strict=False)
  with pytest.raises(ValueError, match="unknown backbone fields"):
    dinov2_jax.load_depther(tmp / "backbone.bin", tmp_path / "broken_dpt_head.pth", max_dpeth=3)


@pytest.fixture(scope="module")
def seg_setup(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("seg")
  # A register model: transformers resamples its positions as Meta's register models do.
  model = ref.make_hf_model(registers=True, hidden=DIM, layers=6, heads=2, image_size=56, seed=31)
  torch.save({k: v.contiguous() for k, v in model.state_dict().items()}, tmp / "backbone.bin")
  x = torch.from_numpy(np.random.default_rng(3).normal(size=(2, 3, 45, 64)).astype(np.float32))
  return tmp, model, x


@pytest.mark.parametrize("layers,classes", [(1, 150), (4, 21)])
def test_segmentation_logits(seg_setup, layers, classes):
  tmp, model, x = seg_setup
  head = ref_dense.perturb(ref_dense.SegmentationHead(DIM * layers, classes), seed=layers)
  name = f"dinov2_vits14_{'ade20k' if classes == 150 else 'voc2012'}_{'linear' if layers == 1 else 'ms'}_head.pth"
  ref_dense.save_head(head, tmp / name)
  segmenter = dinov2_jax.load_segmenter(tmp / "backbone.bin", tmp / name)
  assert (segmenter.n_layers, segmenter.num_classes) == (layers, classes)
  expected = _nhwc(ref_dense.segment(model, head, x, layers, registers=R))
  got = np.asarray(segmenter(_nhwc(x)))
  assert got.shape == (2, 45, 64, classes) and expected.std() > 0.1
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)


def test_segmentation_slide_and_test_time_augmentation(seg_setup):
  tmp, model, x = seg_setup
  head = ref_dense.perturb(ref_dense.SegmentationHead(DIM * 4, 21), seed=9)
  ref_dense.save_head(head, tmp / "ms_head.pth")
  segmenter = dinov2_jax.load_segmenter(tmp / "backbone.bin", tmp / "ms_head.pth")
  expected = _nhwc(ref_dense.slide(model, head, x, 4, crop=32, stride=21, registers=R))  # 2 x 3 overlapping crops
  np.testing.assert_allclose(np.asarray(segmenter.slide(_nhwc(x), crop_size=32, stride=21)), expected,
                             rtol=1e-5, atol=1e-4)
  expected = _nhwc(ref_dense.test_time_augmented(model, head, x, 4, scales=(1.0, 1.32), flip=True, registers=R))
  got = np.asarray(segmenter.probabilities(_nhwc(x), scales=(1.0, 1.32), flip=True))
  np.testing.assert_allclose(got, expected, atol=2e-5)
  np.testing.assert_allclose(got.sum(-1), 1.0, rtol=1e-5)


def test_segmentation_head_errors(seg_setup, tmp_path):
  tmp = seg_setup[0]
  ref_dense.save_head(ref_dense.SegmentationHead(3 * 96, 150), tmp_path / "other_size.pth")
  with pytest.raises(CheckpointError, match="takes 288 input channels.*128 .linear. or 512 .ms.*different backbone"):
    dinov2_jax.load_segmenter(tmp / "backbone.bin", tmp_path / "other_size.pth")
  ref_dense.save_head(ref_dense.LinearDepthHead(2 * DIM), tmp_path / "depth_head.pth")
  with pytest.raises(CheckpointError, match="not a DINOv2 segmentation head.*use load_depther"):
    dinov2_jax.load_segmenter(tmp / "backbone.bin", tmp_path / "depth_head.pth")
  with pytest.raises(CheckpointError, match="not a DINOv2 depth head"):
    dinov2_jax.load_depther(tmp / "backbone.bin", tmp / "backbone.bin")
