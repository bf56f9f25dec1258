"""Reading and writing weights files: torch and safetensors formats, Meta layouts, bad files."""

import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file as st_load, save_file as st_save

import dinov2_jax
from dinov2_jax import CheckpointError, UnsafeCheckpointError
from dinov2_jax.weights.convert import chunk_block_keys, hf_to_meta
from dinov2_jax.weights.safetensors_format import load_safetensors, save_safetensors
from dinov2_jax.weights.torch_format import load_pth, save_pth
from tests import torch_reference as ref


@pytest.fixture(scope="module")
def hf_model():
  return ref.make_hf_model(registers=True, swiglu=True, seed=7, hidden=128, layers=2, image_size=56)


@pytest.fixture(scope="module")
def meta_sd(hf_model):
  return hf_to_meta(ref.hf_state_dict(hf_model))


def _torch_sd(sd):
  return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}


# ------------------------------------------------------------------------------- formats


def test_pth_reader_matches_torch_for_every_dtype_and_layout(tmp_path):
  original = {
      "f32": torch.randn(3, 4), "f16": torch.randn(5).half(), "bf16": torch.randn(2, 3).bfloat16(),
      "f64": torch.randn(2).double(), "i64": torch.arange(6), "bool": torch.tensor([True, False]),
      "transposed": torch.arange(12.).reshape(3, 4).t(), "view": torch.arange(10.)[2:7],
      "scalar": torch.tensor(3.5), "param": torch.nn.Parameter(torch.randn(2)),
      "nested": {"inner": torch.ones(2, 2)},
  }
  torch.save(original, tmp_path / "x.pth")
  loaded = load_pth(tmp_path / "x.pth")
  for key, tensor in original.items():
    if key == "nested":
      np.testing.assert_array_equal(loaded[key]["inner"], tensor["inner"].numpy())
      continue
    expected = tensor.detach().float().numpy() if key == "bf16" else tensor.detach().numpy()
    got = loaded[key].astype(np.float32) if key == "bf16" else loaded[key]
    assert got.shape == expected.shape, key
    np.testing.assert_array_equal(got, expected)


def test_pth_writer_is_read_by_torch_weights_only(tmp_path):
  import ml_dtypes
  arrays = {"a": np.random.rand(3, 4).astype(np.float32), "h": np.ones(3, np.float16),
            "b": np.arange(4, dtype=np.float32).astype(ml_dtypes.bfloat16), "i": np.arange(3),
            "nested": {"t": np.arange(6, dtype=np.float32).reshape(2, 3).T}}
  save_pth(arrays, tmp_path / "w.pth")
  for mmap in (False, True):
    loaded = torch.load(tmp_path / "w.pth", weights_only=True, mmap=mmap)
    np.testing.assert_array_equal(loaded["a"].numpy(), arrays["a"])
    assert loaded["b"].dtype == torch.bfloat16 and loaded["h"].dtype == torch.float16
    np.testing.assert_array_equal(loaded["b"].float().numpy(), arrays["b"].astype(np.float32))
    np.testing.assert_array_equal(loaded["nested"]["t"].numpy(), arrays["nested"]["t"])
  assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]


def test_safetensors_agrees_with_the_reference_package(tmp_path):
  arrays = {"a": np.random.rand(3, 4).astype(np.float32), "i": np.arange(5, dtype=np.int64)}
  save_safetensors(arrays, tmp_path / "ours.safetensors", {"note": "x"})
  theirs = st_load(str(tmp_path / "ours.safetensors"))
  st_save(arrays, str(tmp_path / "theirs.safetensors"))
  ours, _ = load_safetensors(tmp_path / "theirs.safetensors")
  for k in arrays:
    np.testing.assert_array_equal(theirs[k], arrays[k])
    np.testing.assert_array_equal(ours[k], arrays[k])


# ------------------------------------------------------------------------------- Meta layouts


def test_meta_hub_pth_and_export_round_trip_is_exact(tmp_path, meta_sd):
  torch.save(_torch_sd(meta_sd), tmp_path / "hub.pth")
  backbone = dinov2_jax.load_backbone(tmp_path / "hub.pth")
  for name in ("out.pth", "out.safetensors"):
    backbone.save(tmp_path / name)
    if name.endswith(".pth"):
      exported = {k: v.numpy() for k, v in torch.load(tmp_path / name, weights_only=True).items()}
    else:
      exported = st_load(str(tmp_path / name))
    assert exported.keys() == meta_sd.keys()
    for k in meta_sd:
      np.testing.assert_array_equal(exported[k], meta_sd[k], err_msg=k)
  # Our safetensors export remembers the architecture, including non-inferable fields.
  backbone2 = dinov2_jax.load_backbone(tmp_path / "out.safetensors")
  assert backbone2.config == backbone.config


def test_export_loads_into_pytorch_strict(tmp_path, hf_model, meta_sd):
  """The exported Meta state dict, renamed the transformers way, loads with strict=True."""
  torch.save(_torch_sd(meta_sd), tmp_path / "hub.pth")
  backbone = dinov2_jax.load_backbone(tmp_path / "hub.pth")
  from dinov2_jax.weights.convert import meta_to_hf
  fresh = ref.make_hf_model(registers=True, swiglu=True, seed=99, hidden=128, layers=2, image_size=56)
  fresh.load_state_dict(_torch_sd(meta_to_hf(backbone.state_dict())), strict=True)
  for (k, a), b in zip(fresh.state_dict().items(), hf_model.state_dict().values()):
    assert torch.equal(a, b), k


def test_training_checkpoint_with_chunked_blocks_and_heads(tmp_path, meta_sd):
  head = dinov2_jax.DINOHead(128, 32, nlayers=3, hidden_dim=48, bottleneck_dim=16, rngs=__import__("flax").nnx.Rngs(0))
  head_sd = dinov2_jax.head_state_dict(head)
  assert set(head_sd) == {"mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias", "mlp.4.weight",
                          "mlp.4.bias", "last_layer.weight_g", "last_layer.weight_v"}
  assert head_sd["last_layer.weight_g"].shape == (32, 1) and head_sd["last_layer.weight_v"].shape == (32, 16)
  teacher = {f"backbone.{k}": v for k, v in chunk_block_keys(meta_sd, depth=2, block_chunks=2).items()}
  assert "backbone.blocks.1.1.attn.qkv.weight" in teacher
  teacher.update({f"dino_head.{k}": v for k, v in head_sd.items()})
  torch.save({"teacher": _torch_sd(teacher)}, tmp_path / "teacher_checkpoint.pth")

  backbone, heads = dinov2_jax.api.load_training_checkpoint(tmp_path / "teacher_checkpoint.pth")
  assert set(heads) == {"dino_head"}
  np.testing.assert_array_equal(dinov2_jax.head_state_dict(heads["dino_head"])["mlp.2.weight"], head_sd["mlp.2.weight"])
  # load_backbone accepts the same file (heads ignored), like Meta's evaluation loader.
  x = np.random.default_rng(0).normal(size=(1, 56, 56, 3)).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(dinov2_jax.load_backbone(tmp_path / "teacher_checkpoint.pth")(x)),
                                np.asarray(backbone(x)))
  # Written back in Meta's layout, chunked like Meta's block_chunks=2 run.
  dinov2_jax.api.save_training_checkpoint(tmp_path / "again.pth", backbone, heads, block_chunks=2)
  again = torch.load(tmp_path / "again.pth", weights_only=True)["teacher"]
  assert set(again) == set(teacher)
  for k in teacher:
    np.testing.assert_array_equal(again[k].numpy(), teacher[k], err_msg=k)


# ------------------------------------------------------------------------------- bad files


def test_malicious_pickle_is_refused_without_running_it(tmp_path):
  marker = tmp_path / "pwned"

  class Exploit:
    def __reduce__(self):
      return (os.system, (f"touch {marker}",))

  torch.save({"weight": torch.zeros(2), "payload": Exploit()}, tmp_path / "evil.pth")
  with pytest.raises(UnsafeCheckpointError, match="refusing to load.*system"):
    dinov2_jax.load_backbone(tmp_path / "evil.pth")
  assert not marker.exists()
  # A bare pickle (not a torch zip) is refused too, without being unpickled.
  (tmp_path / "raw.pth").write_bytes(pickle.dumps(Exploit()))
  with pytest.raises(CheckpointError, match="legacy"):
    dinov2_jax.load_backbone(tmp_path / "raw.pth")
  assert not marker.exists()


def test_numpy_scalars_in_metadata_are_read_but_object_arrays_refused(tmp_path):
  # mmcv-trained heads (Meta's dense heads) keep numpy scalars and bytes next to the state dict.
  meta = {"best": np.float64(0.125), "iter": np.int64(40000), "half": np.float16(1.5), "flag": np.bool_(True),
          "tag": b"\x00\xffab", "nested": [np.float32(2.5), (np.int32(-3), "text")]}
  torch.save({"state_dict": {"w": torch.arange(3.0)}, "meta": meta}, tmp_path / "head.pth")
  loaded = load_pth(tmp_path / "head.pth")
  np.testing.assert_array_equal(loaded["state_dict"]["w"], [0.0, 1.0, 2.0])
  got = loaded["meta"]
  assert got["best"] == 0.125 and got["best"].dtype == np.float64
  assert got["iter"] == 40000 and got["half"] == 1.5 and bool(got["flag"]) and got["tag"] == b"\x00\xffab"
  assert got["nested"][0] == 2.5 and got["nested"][1][0] == -3 and got["nested"][1][1] == "text"
  # A numpy *array* (or an object dtype) needs numpy's reconstructor, which is not allowed.
  torch.save({"meta": {"arr": np.zeros(2)}}, tmp_path / "array.pth")
  with pytest.raises(UnsafeCheckpointError, match="array.pth: refusing to load.*_reconstruct"):
    load_pth(tmp_path / "array.pth")
  data = pickle.dumps(np.float64(1.0), protocol=2).replace(b"f8", b"O8")
  import zipfile
  with zipfile.ZipFile(tmp_path / "obj.pth", "w") as z:
    z.writestr("obj/data.pkl", data)
  with pytest.raises(UnsafeCheckpointError, match="obj.pth: refusing to load: numpy dtype 'O8'"):
    load_pth(tmp_path / "obj.pth")


def test_truncated_files(tmp_path, meta_sd):
  torch.save(_torch_sd(meta_sd), tmp_path / "full.pth")
  data = (tmp_path / "full.pth").read_bytes()
  (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
  with pytest.raises(CheckpointError, match="truncated"):
    dinov2_jax.load_backbone(tmp_path / "cut.pth")
  save_safetensors(meta_sd, tmp_path / "full.safetensors")
  data = (tmp_path / "full.safetensors").read_bytes()
  (tmp_path / "cut.safetensors").write_bytes(data[: len(data) - 1000])
  with pytest.raises(CheckpointError, match="truncated"):
    dinov2_jax.load_backbone(tmp_path / "cut.safetensors")
  with pytest.raises(CheckpointError, match="no such file"):
    dinov2_jax.load_backbone(tmp_path / "missing.pth")


def test_wrong_architecture_lists_every_problem(tmp_path, meta_sd):
  torch.save(_torch_sd(meta_sd), tmp_path / "hub.pth")
  with pytest.raises(CheckpointError) as err:
    dinov2_jax.load_backbone(tmp_path / "hub.pth", depth=3, ffn_layer="mlp")
  msg = str(err.value)
  assert "missing keys" in msg and "blocks.2.attn.qkv.weight" in msg and "blocks.0.mlp.fc1.weight" in msg
  assert "unexpected keys" in msg and "blocks.0.mlp.w12.weight" in msg
  broken = dict(meta_sd)
  broken["blocks.1.attn.proj.weight"] = np.zeros((128, 64), np.float32)
  del broken["norm.bias"]
  broken["extra.thing"] = np.zeros(1, np.float32)
  torch.save(_torch_sd(broken), tmp_path / "broken.pth")
  with pytest.raises(CheckpointError) as err:
    dinov2_jax.load_backbone(tmp_path / "broken.pth")
  msg = str(err.value)
  assert "blocks.1.attn.proj.weight: file (128, 64), model expects (128, 128)" in msg
  assert "missing keys (1): norm.bias" in msg and "unexpected keys (1): extra.thing" in msg
  # Non-strict skips missing/unexpected keys but never a shape mismatch.
  del broken["blocks.1.attn.proj.weight"]
  torch.save(_torch_sd(broken), tmp_path / "lenient.pth")
  dinov2_jax.load_backbone(tmp_path / "lenient.pth", strict=False)


def test_unrecognised_and_misused_files(tmp_path, meta_sd):
  torch.save({"foo.weight": torch.zeros(2)}, tmp_path / "other.pth")
  with pytest.raises(CheckpointError, match="not a recognised DINOv2 weights file"):
    dinov2_jax.load_backbone(tmp_path / "other.pth")
  torch.save({"weight": torch.zeros(10, 256), "bias": torch.zeros(10)}, tmp_path / "head.pth")
  with pytest.raises(CheckpointError, match="linear head, not a backbone"):
    dinov2_jax.load_backbone(tmp_path / "head.pth")
  torch.save({"model": {"x": torch.zeros(1)}, "iteration": 3}, tmp_path / "model_0000099.rank_0.pth")
  with pytest.raises(CheckpointError, match="teacher_checkpoint.pth"):
    dinov2_jax.load_backbone(tmp_path / "model_0000099.rank_0.pth")
  from dinov2_jax.weights.io import write_state_dict
  with pytest.raises(CheckpointError, match="unknown output format '.npz'"):
    write_state_dict(meta_sd, tmp_path / "x.npz")


def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
  target = tmp_path / "out.pth"

  def boom(*args, **kwargs):
    raise KeyboardInterrupt

  monkeypatch.setattr("zipfile.ZipFile.writestr", boom)
  with pytest.raises(KeyboardInterrupt):
    save_pth({"a": np.zeros(3, np.float32)}, target)
  assert os.listdir(tmp_path) == []


def test_loading_never_imports_torch(tmp_path, meta_sd):
  torch.save(_torch_sd(meta_sd), tmp_path / "hub.pth")
  code = (f"import sys, dinov2_jax; b = dinov2_jax.load_backbone({str(tmp_path / 'hub.pth')!r}); "
          "assert 'torch' not in sys.modules, 'torch was imported'; print(b.config.embed_dim)")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""})
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip().endswith("128")
