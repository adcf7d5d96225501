"""Building and opening the kdjax TFDS datasets by name, without TensorFlow.

Names: ``dolly``, ``synthetic_instruct``, ``instruct_jsonl/<config>`` (a named
eval set read from manual_dir) or ``instruct_jsonl`` with ``path=`` (any file).

A file given by ``path=`` is identified by its content, not its name: the
builder config is ``<stem>-<first 16 hex digits of the file's SHA-256>``, so an
edited file, or another file with the same name, is built afresh instead of
being served from a stale cache. The prepared data is raw text (tokenizer and
template are applied by :mod:`kdjax.data.pipeline` at read time), so the
content alone decides it.
"""

from __future__ import annotations

import hashlib
import os
import re

import tensorflow_datasets as tfds

from kdjax import fs
from kdjax.data import dolly, instruct_jsonl, synthetic

_BUILDERS = {
    "dolly": dolly.Dolly,
    "instruct_jsonl": instruct_jsonl.InstructJsonl,
    "synthetic_instruct": synthetic.SyntheticInstruct,
}
NAMES = tuple(_BUILDERS)


DIGEST_CHARS = 16


def content_digest(path: fs.PathLike) -> str:
  """SHA-256 of a file's bytes (hex), read in 1 MiB blocks.

  Raises:
    ValueError: the file holds nothing but whitespace.
  """
  h, blank = hashlib.sha256(), True
  with fs.path(path).open("rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
      blank = blank and not block.strip()
  if blank:
    raise ValueError(
        f"data file {os.fspath(path)} is empty; put one JSON "
        "object per line in it."
    )
  return h.hexdigest()


def file_config_name(path: fs.PathLike, name: str | None = None) -> str:
  """``<name or stem>-<digest>``: the cache key of a JSONL file."""
  p = fs.path(path)
  if not p.is_file():
    raise FileNotFoundError(
        f"data file {os.fspath(path)} does not exist; "
        "pass an existing JSONL file."
    )
  stem = re.sub(r"[^A-Za-z0-9_.]", "_", name or p.stem)
  return f"{stem}-{content_digest(p)[:DIGEST_CHARS]}"


def builder(
    name: str,
    data_dir: os.PathLike | str,
    *,
    path: os.PathLike | str | None = None,
    skip_bad: bool = False,
) -> tfds.core.DatasetBuilder:
  """The array_record builder for ``name`` (see the module docstring)."""
  base, _, config = name.partition("/")
  if base not in _BUILDERS:
    raise ValueError(
        f"unknown dataset {name!r}; use one of "
        "dolly, synthetic_instruct, instruct_jsonl/<name>."
    )
  kwargs = dict(data_dir=os.fspath(data_dir), file_format="array_record")
  if base == "instruct_jsonl":
    if path is not None:
      config = instruct_jsonl.InstructJsonlConfig(
          name=file_config_name(path, config or None), path=os.fspath(path)
      )
    elif config not in instruct_jsonl.NAMED_SETS:
      raise ValueError(
          f"instruct_jsonl needs a config from {instruct_jsonl.NAMED_SETS} "
          f"(got {config!r}) or a path= to a JSONL file."
      )
    kwargs["config"] = config
  elif config or path is not None:
    raise ValueError(
        f"{base} takes no config or path (got {name!r}, {path!r})."
    )
  if base != "synthetic_instruct":
    kwargs["skip_bad"] = skip_bad
  return _BUILDERS[base](**kwargs)


def prepare(
    name: str,
    data_dir: os.PathLike | str,
    *,
    manual_dir: os.PathLike | str | None = None,
    path: os.PathLike | str | None = None,
    skip_bad: bool = False,
) -> tfds.core.DatasetBuilder:
  """Builds ``name`` under ``data_dir`` unless already built; returns the builder."""
  b = builder(name, data_dir, path=path, skip_bad=skip_bad)
  if path is not None and not fs.path(b.data_dir).exists():
    # Malformed or empty files fail here, before TFDS creates any directory.
    instruct_jsonl.check_file(path, skip_bad=skip_bad)
  b.download_and_prepare(
      download_config=tfds.download.DownloadConfig(
          manual_dir=None if manual_dir is None else os.fspath(manual_dir)
      )
  )
  return b


def load_source(
    name: str,
    split: str,
    data_dir: os.PathLike | str,
    *,
    manual_dir: os.PathLike | str | None = None,
    path: os.PathLike | str | None = None,
):
  """A random-access data source (``len``, ``[i]``) over one split.

  Prepares the dataset first if needed (cheap no-op once built). Text features
  come back as bytes; :func:`kdjax.data.pipeline.to_text` decodes them.
  """
  b = prepare(name, data_dir, manual_dir=manual_dir, path=path)
  return b.as_data_source(split=split)


class _Head:
  """The first ``n`` examples of a random-access source."""

  def __init__(self, source, n: int):
    self._source, self._n = source, min(n, len(source))

  def __len__(self) -> int:
    return self._n

  def __getitem__(self, i: int):
    if not 0 <= i < self._n:
      raise IndexError(i)
    return self._source[i]


def head(source, n: int):
  """``source`` cut to its first ``n`` examples (``n <= 0``: all of them).

  Sources are shuffled when written, so the head is a random subset that is
  the same on every machine.
  """
  return source if n <= 0 or n >= len(source) else _Head(source, n)
