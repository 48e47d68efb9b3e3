"""Minimal numpy reader/writer for the safetensors format (bf16 included, as ml_dtypes' type).

`safetensors.numpy` has no bfloat16; the format is simple enough to handle here: an 8-byte
little-endian header length, a JSON header `{name: {dtype, shape, data_offsets}}` and the raw
little-endian tensor bytes.
"""

from __future__ import annotations

import json
import os
import struct

import jax.numpy as jnp
import numpy as np

_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
           "BF16": jnp.bfloat16, "I64": np.int64, "I32": np.int32, "I16": np.int16,
           "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}


def read_safetensors(path) -> dict[str, np.ndarray]:
  """All tensors of one `.safetensors` file, as numpy arrays (copies). Raises ValueError naming
  the file when it is not a valid safetensors file."""
  with open(path, "rb") as f:
    data = f.read()
  try:
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    header.pop("__metadata__", None)
    out = {}
    for name, info in header.items():
      dtype = np.dtype(_DTYPES[info["dtype"]])
      begin, end = (8 + n + o for o in info["data_offsets"])
      if end > len(data) or end - begin != dtype.itemsize * int(np.prod(info["shape"])):
        raise ValueError(f"tensor {name!r} has inconsistent offsets")
      out[name] = np.frombuffer(data[begin:end], dtype.newbyteorder("<")).reshape(
          info["shape"]).astype(dtype)
    return out
  except (struct.error, ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
    raise ValueError(f"{path}: not a valid safetensors file ({e})") from e


def write_safetensors(path, tensors: dict[str, np.ndarray], metadata=None) -> None:
  """Writes `tensors` (sorted by name) to one `.safetensors` file."""
  header, offset = {}, 0
  arrays = {name: np.ascontiguousarray(tensors[name]) for name in sorted(tensors)}
  for name, a in arrays.items():
    header[name] = {"dtype": _NAMES[a.dtype], "shape": list(a.shape),
                    "data_offsets": [offset, offset + a.nbytes]}
    offset += a.nbytes
  if metadata:
    header = {"__metadata__": metadata, **header}
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)
  tmp = f"{path}.tmp"
  with open(tmp, "wb") as f:
    f.write(struct.pack("<Q", len(blob)) + blob)
    for a in arrays.values():
      f.write(a.astype(a.dtype.newbyteorder("<")).tobytes())
  os.replace(tmp, path)
