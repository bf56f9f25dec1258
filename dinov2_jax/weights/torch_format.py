"""Reading and writing PyTorch `.pth` files without PyTorch and without running pickled code.

A `torch.save` file (the zip format PyTorch uses since 1.6) is a zip archive holding `data.pkl`, a
pickle that describes the object, and one raw little-endian buffer per tensor storage under `data/`.
Unpickling normally imports and calls whatever the pickle names, so a malicious file can run code.
We unpickle with an allow-list instead: the only callables a state dict needs are the tensor
rebuild functions, storage type markers and `OrderedDict` (plus plain numpy scalars, which Meta's dense
heads keep in their metadata), and we map those to our own numpy code. Anything else is refused before
it is called.

Writing goes the other way: we emit the pickle opcodes for a (nested) dict of tensors by hand, in
the subset of the format that `torch.load(weights_only=True)` accepts.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import re
import struct
import zipfile
import zlib
from collections.abc import Mapping
from typing import Any

import ml_dtypes
import numpy as np


class CheckpointError(ValueError):
  """A weights file cannot be used; the message names the problem and the fix."""


class UnsafeCheckpointError(CheckpointError):
  """The pickle references something other than tensors and plain containers."""


# torch storage class name <-> numpy dtype.
_STORAGE_DTYPES = {
    "FloatStorage": np.dtype(np.float32),
    "DoubleStorage": np.dtype(np.float64),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
    "UntypedStorage": np.dtype(np.uint8),
}
_DTYPE_STORAGES = {v: k for k, v in _STORAGE_DTYPES.items() if k != "UntypedStorage"}


class _StorageType:
  """Stands in for `torch.FloatStorage` & co. inside the unpickler."""

  def __init__(self, name: str):
    self.name, self.dtype = name, _STORAGE_DTYPES[name]


def _rebuild_tensor(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
  del requires_grad, backward_hooks, metadata
  size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
  if len(size) != len(stride) or any(s < 0 for s in size) or any(s < 0 for s in stride):
    raise CheckpointError(f"corrupt tensor record: size {size}, stride {stride}")
  if any(s == 0 for s in size):
    return np.zeros(size, storage.dtype)
  # Bounds-check before as_strided: a crafted stride must not read outside the storage buffer.
  last = storage_offset + sum((n - 1) * st for n, st in zip(size, stride))
  if storage_offset < 0 or last >= storage.size:
    raise CheckpointError(
        f"corrupt tensor record: it reads element {last} of a storage of {storage.size} elements "
        "(the file is probably truncated or damaged)")
  view = np.lib.stride_tricks.as_strided(
      storage[storage_offset:], shape=size, strides=[st * storage.itemsize for st in stride], writeable=False)
  return np.array(view)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *_):
  del requires_grad, backward_hooks
  return data


# Meta's mmcv-trained dense heads (`*_nyu_dpt_head.pth`, ...) keep numpy scalars in their "meta" entry.
# Pickle protocol 2 writes one as `numpy.core.multiarray.scalar(numpy.dtype("f8", ...), bytes)`, the dtype
# getting its byte order through BUILD, and the bytes as `_codecs.encode(text, "latin1")`. These
# stand-ins rebuild plain numeric scalars from their raw bytes and nothing else (no object dtypes).
_NUMERIC_DTYPE = re.compile(r"^[fiub]\d{1,2}$|^c\d{1,2}$")


class _DtypeStandIn:
  """Stands in for `numpy.dtype` inside the unpickler: a numeric type code plus a byte order."""

  def __init__(self, code, align=False, copy=False):
    del align, copy
    if not isinstance(code, str) or not _NUMERIC_DTYPE.match(code):
      raise UnsafeCheckpointError(f"refusing to load: numpy dtype {code!r} is not a plain numeric type")
    self.dtype = np.dtype(code)

  def __setstate__(self, state):
    order = state[1] if isinstance(state, tuple) and len(state) > 1 else "|"
    if order in ("<", ">"):
      self.dtype = self.dtype.newbyteorder(order)


def _numpy_scalar(dtype, data=None):
  if not isinstance(dtype, _DtypeStandIn) or not isinstance(data, bytes) or len(data) != dtype.dtype.itemsize:
    raise UnsafeCheckpointError("refusing to load: malformed numpy scalar record")
  return np.frombuffer(data, dtype.dtype)[0]


def _codecs_encode(text, encoding="utf-8"):
  if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
    raise UnsafeCheckpointError("refusing to load: unexpected `_codecs.encode` record")
  return text.encode("latin-1")


_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("builtins", "dict"): dict,
    ("builtins", "list"): list,
    ("builtins", "tuple"): tuple,
    ("builtins", "set"): set,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,   # numpy 1.x name
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,  # numpy 2.x name
    ("numpy", "dtype"): _DtypeStandIn,
    ("_codecs", "encode"): _codecs_encode,
}


class _SafeUnpickler(pickle.Unpickler):

  def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str, source: str):
    super().__init__(io.BytesIO(data))
    self._archive, self._prefix, self._source = archive, prefix, source
    self._storages: dict[str, np.ndarray] = {}

  def find_class(self, module: str, name: str):
    if (module, name) in _ALLOWED_GLOBALS:
      return _ALLOWED_GLOBALS[(module, name)]
    if module == "torch" and name in _STORAGE_DTYPES:
      return _StorageType(name)
    raise UnsafeCheckpointError(
        f"{self._source}: refusing to load: the pickle references `{module}.{name}`, which is not a "
        "tensor or a plain container, and unpickling it could execute arbitrary code. Only state dicts "
        "(nested dicts of tensors) are accepted; if you trust the file, re-save its tensors with "
        "`torch.save(model.state_dict(), path)`.")

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
            and isinstance(pid[1], _StorageType)):
      raise UnsafeCheckpointError(f"{self._source}: unsupported persistent record {pid!r}")
    _, storage_type, key, _location, numel = pid
    if key not in self._storages:
      member = f"{self._prefix}data/{key}"
      try:
        raw = self._archive.read(member)
      except KeyError:
        raise CheckpointError(f"{self._source}: tensor data `{member}` is missing (truncated file?)") from None
      expected = int(numel) * storage_type.dtype.itemsize
      if storage_type.name != "UntypedStorage" and len(raw) < expected:
        raise CheckpointError(f"{self._source}: tensor data `{member}` has {len(raw)} bytes, expected {expected}")
      self._storages[key] = np.frombuffer(raw, storage_type.dtype)
    return self._storages[key]


def load_pth(path: str | os.PathLike) -> Any:
  """Loads a `torch.save` zip file as nested dicts of numpy arrays, never executing pickled code.

  Returns:
    The saved object with every tensor replaced by a numpy array of the same dtype and shape
    (bfloat16 as `ml_dtypes.bfloat16`).

  Raises:
    CheckpointError: missing, truncated, legacy-format or corrupt file.
    UnsafeCheckpointError: the pickle names anything but tensors and containers.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise CheckpointError(f"{path}: no such file")
  if not zipfile.is_zipfile(path):
    with open(path, "rb") as f:
      head = f.read(2)
    if head[:1] == b"\x80":
      raise CheckpointError(
          f"{path}: this is a legacy (pre-1.6) PyTorch file, which cannot be read safely. Re-save it "
          "with a recent PyTorch: torch.save(torch.load(path, weights_only=True), new_path)")
    raise CheckpointError(f"{path}: not a PyTorch checkpoint (not a zip archive; the file may be truncated)")
  try:
    with zipfile.ZipFile(path) as archive:
      pickles = [n for n in archive.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
      if len(pickles) != 1:
        raise CheckpointError(f"{path}: a PyTorch checkpoint holds exactly one */data.pkl, found {pickles}")
      prefix = pickles[0][: -len("data.pkl")]
      byteorder = f"{prefix}byteorder"
      if byteorder in archive.namelist() and archive.read(byteorder).strip() != b"little":
        raise CheckpointError(f"{path}: big-endian checkpoints are not supported")
      return _SafeUnpickler(archive.read(pickles[0]), archive, prefix, path).load()
  except (zipfile.BadZipFile, EOFError, struct.error, zlib.error) as e:
    raise CheckpointError(f"{path}: the file is truncated or corrupt ({e}); download it again") from e
  except pickle.UnpicklingError as e:
    raise CheckpointError(f"{path}: corrupt pickle inside the checkpoint ({e})") from e
  except UnsafeCheckpointError as e:
    if str(e).startswith(path):
      raise
    raise UnsafeCheckpointError(f"{path}: {e}") from None


# ---------------------------------------------------------------------------------------------
# Writing.

def _global(module: str, name: str) -> bytes:
  return pickle.GLOBAL + f"{module}\n{name}\n".encode()


def _unicode(s: str) -> bytes:
  data = s.encode("utf-8")
  return pickle.BINUNICODE + struct.pack("<I", len(data)) + data


def _int(i: int) -> bytes:
  if 0 <= i < 256:
    return pickle.BININT1 + struct.pack("<B", i)
  if -(2 ** 31) <= i < 2 ** 31:
    return pickle.BININT + struct.pack("<i", i)
  return pickle.LONG1 + bytes([8]) + struct.pack("<q", i)


def _int_tuple(values) -> bytes:
  return pickle.MARK + b"".join(_int(int(v)) for v in values) + pickle.TUPLE


_EMPTY_ORDERED_DICT = _global("collections", "OrderedDict") + pickle.EMPTY_TUPLE + pickle.REDUCE


class _PickleWriter:

  def __init__(self):
    self.storages: list[np.ndarray] = []

  def tensor(self, array: np.ndarray) -> bytes:
    array = np.require(array, requirements="C")  # (ascontiguousarray would make 0-d arrays 1-d)
    if array.dtype not in _DTYPE_STORAGES:
      raise CheckpointError(f"cannot save dtype {array.dtype} in a .pth file")
    key = str(len(self.storages))
    self.storages.append(array)
    strides = [s // array.itemsize for s in array.strides] if array.ndim else []
    storage = (pickle.MARK + _unicode("storage") + _global("torch", _DTYPE_STORAGES[array.dtype])
               + _unicode(key) + _unicode("cpu") + _int(array.size) + pickle.TUPLE + pickle.BINPERSID)
    args = (pickle.MARK + storage + _int(0) + _int_tuple(array.shape) + _int_tuple(strides)
            + pickle.NEWFALSE + _EMPTY_ORDERED_DICT + pickle.TUPLE)
    return _global("torch._utils", "_rebuild_tensor_v2") + args + pickle.REDUCE

  def value(self, obj) -> bytes:
    if isinstance(obj, Mapping):
      items = b"".join(_unicode(str(k)) + self.value(v) for k, v in obj.items())
      return _EMPTY_ORDERED_DICT + (pickle.MARK + items + pickle.SETITEMS if obj else b"")
    if isinstance(obj, (bool, np.bool_)):
      return pickle.NEWTRUE if obj else pickle.NEWFALSE
    if isinstance(obj, (int, np.integer)):
      return _int(int(obj))
    if isinstance(obj, str):
      return _unicode(obj)
    return self.tensor(np.asarray(obj))


def save_pth(obj: Mapping[str, Any], path: str | os.PathLike) -> None:
  """Writes a (nested) dict of arrays as a file `torch.load(path, weights_only=True)` reads.

  The file is written to a temporary name and renamed, so an interrupted save leaves nothing
  half-written behind.
  """
  path = os.fspath(path)
  writer = _PickleWriter()
  data = pickle.PROTO + b"\x02" + writer.value(obj) + pickle.STOP
  root = os.path.splitext(os.path.basename(path))[0] or "archive"
  tmp = f"{path}.tmp-{os.getpid()}"
  try:
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as archive:
      archive.writestr(f"{root}/data.pkl", data)
      archive.writestr(f"{root}/byteorder", "little")
      for key, array in enumerate(writer.storages):
        archive.writestr(f"{root}/data/{key}", array.astype(array.dtype.newbyteorder("<")).tobytes())
      archive.writestr(f"{root}/version", "3\n")
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
