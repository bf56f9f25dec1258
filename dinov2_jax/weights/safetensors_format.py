"""Minimal `.safetensors` reader and writer (the format is an 8-byte header length, a JSON header and
raw little-endian buffers), so that bfloat16 works through `ml_dtypes` and no extra package is needed.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping

import ml_dtypes
import numpy as np

from dinov2_jax.weights.torch_format import CheckpointError

_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


def load_safetensors(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """Returns `(tensors, metadata)`: a flat dict of numpy arrays and the header's `__metadata__`."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise CheckpointError(f"{path}: no such file")
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    raw = f.read(8)
    if len(raw) < 8:
      raise CheckpointError(f"{path}: too short to be a safetensors file (truncated?)")
    (header_len,) = struct.unpack("<Q", raw)
    if header_len > min(_MAX_HEADER, size - 8):
      raise CheckpointError(f"{path}: not a safetensors file, or truncated (header length {header_len})")
    try:
      header = json.loads(f.read(header_len))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from e
  data = np.memmap(path, np.uint8, mode="r", offset=8 + header_len) if size > 8 + header_len else np.zeros(0, np.uint8)
  metadata = header.pop("__metadata__", None) or {}
  tensors = {}
  for name, info in header.items():
    dtype = _DTYPES.get(info.get("dtype"))
    if dtype is None:
      raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {info.get('dtype')!r}")
    begin, end = info["data_offsets"]
    shape = tuple(info["shape"])
    if end > data.size or end - begin != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
      raise CheckpointError(f"{path}: tensor {name!r} lies outside the file or has the wrong size (truncated?)")
    tensors[name] = np.array(data[begin:end].view(dtype).reshape(shape))
  return tensors, metadata


def save_safetensors(tensors: Mapping[str, np.ndarray], path: str | os.PathLike,
                     metadata: Mapping[str, str] | None = None) -> None:
  """Writes a flat dict of arrays; written to a temporary name then renamed (never half-written)."""
  path = os.fspath(path)
  header, offset, arrays = {}, 0, []
  for name, array in tensors.items():
    array = np.require(np.asarray(array), requirements="C")
    if array.dtype not in _NAMES:
      raise CheckpointError(f"cannot save dtype {array.dtype} of {name!r} in safetensors")
    header[name] = {"dtype": _NAMES[array.dtype], "shape": list(array.shape),
                    "data_offsets": [offset, offset + array.nbytes]}
    offset += array.nbytes
    arrays.append(array)
  if metadata:
    header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)  # The format asks for an 8-byte aligned data section.
  tmp = f"{path}.tmp-{os.getpid()}"
  try:
    with open(tmp, "wb") as f:
      f.write(struct.pack("<Q", len(blob)) + blob)
      for array in arrays:
        f.write(array.astype(array.dtype.newbyteorder("<")).tobytes())
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
