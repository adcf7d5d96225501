"""Checks a safetensors checkpoint's files before any tensor is read.

A safetensors file is an 8-byte little-endian header length ``N``, ``N``
bytes of JSON (``{name: {"dtype", "shape", "data_offsets": [begin, end]}}``
plus an optional ``"__metadata__"`` of strings), then the tensor bytes, which
the tensors cover without gaps or overlaps. A download cut short, a file
overwritten in place or one that is not safetensors at all fails here with
one sentence naming the file and what is wrong with it (header length,
header JSON, a dtype, a shape, the declared against the actual data length),
instead of deep inside the reader. Only headers are read: a few kilobytes
per file, also for a remote path (:mod:`kdjax.fs`).

Whether each tensor's shape fits the model config is checked as the tensors
load (:func:`kdjax.models.hf.load_params`).
"""

from __future__ import annotations

import json
import math
import os
import struct

from kdjax import fs

# Bytes per element of every dtype the safetensors format defines.
ITEMSIZE = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "F8_E8M0": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
    "C64": 8,
}
MAX_HEADER = 100 << 20  # the format's limit on the header's length
INDEX = "model.safetensors.index.json"
_FIX = (
    "re-download it (an interrupted download leaves such files) or re-export "
    "it with save_pretrained(..., safe_serialization=True)"
)


def _bad(path: fs.PathLike, problem: str) -> fs.BadFileError:
  return fs.BadFileError(
      f"{path} is not a valid safetensors file: {problem}; {_FIX}."
  )


def _tensor_problem(name: str, info: object) -> str | None:
  """What is wrong with one header entry, or None."""
  if not isinstance(info, dict):
    return f"the header entry {name!r} is not an object"
  dtype, shape = info.get("dtype"), info.get("shape")
  offsets = info.get("data_offsets")
  if dtype not in ITEMSIZE:
    return f"tensor {name!r} has dtype {dtype!r}, which safetensors does not define"
  if not isinstance(shape, list) or not all(
      isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
  ):
    return f"tensor {name!r} has shape {shape!r}, not a list of sizes"
  if (
      not isinstance(offsets, list)
      or len(offsets) != 2
      or not all(isinstance(o, int) and o >= 0 for o in offsets)
      or offsets[0] > offsets[1]
  ):
    return f"tensor {name!r} has data_offsets {offsets!r}"
  size = math.prod(shape) * ITEMSIZE[dtype]
  if offsets[1] - offsets[0] != size:
    return (
        f"tensor {name!r} ({dtype} {shape}) needs {size} bytes but its "
        f"data_offsets span {offsets[1] - offsets[0]}"
    )
  return None


def check_file(path: fs.PathLike) -> dict:
  """The header of safetensors file ``path`` (tensors only), checked.

  Raises:
    kdjax.fs.BadFileError: one sentence naming ``path`` and the problem.
  """
  p = fs.path(path)
  size = p.stat().length
  with p.open("rb") as f:
    head = f.read(8)
    if len(head) < 8:
      raise _bad(
          path, f"it holds {size} bytes, fewer than the 8 of a header length"
      )
    (n,) = struct.unpack("<Q", head)
    if n > MAX_HEADER or 8 + n > size:
      raise _bad(
          path,
          f"its header length reads {n} bytes but the file holds {size}",
      )
    raw = f.read(n)
  try:
    header = json.loads(raw.decode("utf-8"))
  except (UnicodeDecodeError, ValueError) as e:
    raise _bad(path, f"its header is not JSON ({e})") from None
  if not isinstance(header, dict):
    raise _bad(path, "its header is not a JSON object")
  header.pop("__metadata__", None)
  spans = []
  for name, info in header.items():
    problem = _tensor_problem(name, info)
    if problem:
      raise _bad(path, problem)
    spans.append((*info["data_offsets"], name))
  spans.sort()
  end = 0
  for begin, stop, name in spans:
    if begin != end:
      raise _bad(
          path,
          f"tensor {name!r} starts at byte {begin} of the data, not {end} "
          "(a gap or an overlap)",
      )
    end = stop
  data = size - 8 - n
  if end != data:
    what = "truncated" if end > data else "longer than its header says"
    raise _bad(
        path,
        f"{what}: the header declares {end} bytes of tensor data and the "
        f"file holds {data}",
    )
  return header


def check_directory(directory: fs.PathLike) -> None:
  """Checks ``model.safetensors.index.json`` (if any) and every file's header.

  Raises:
    kdjax.fs.BadFileError: the index is not JSON, or names a missing or
      invalid file.
  """
  root = fs.path(directory)
  index = root / INDEX
  if index.exists():
    meta = fs.read_json(index, _FIX)
    weights = meta.get("weight_map") if isinstance(meta, dict) else None
    if not isinstance(weights, dict):
      raise fs.BadFileError(f"{index} has no weight_map; {_FIX}.")
    names = sorted(set(weights.values()))
    missing = [n for n in names if not (root / n).exists()]
    if missing:
      raise fs.BadFileError(
          f"{index} lists {missing[0]}, which {directory} does not hold; "
          f"{_FIX}."
      )
  else:
    names = (
        ["model.safetensors"] if (root / "model.safetensors").exists() else []
    )
  for name in names:
    check_file(os.path.join(os.fspath(directory), name))
