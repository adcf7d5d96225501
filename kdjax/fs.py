"""One file-system layer for every path kdjax writes: ``etils.epath``.

Local paths, ``gs://``, ``s3://`` and the other schemes epath (and therefore
orbax and TFDS) understands go through the same calls, so a remote workdir
stays remote: ``gs://bucket/run`` is never turned into a local folder
``./gs:/bucket/run`` by ``os.path``.
"""

from __future__ import annotations

import os

from etils import epath

PathLike = str | os.PathLike


def path(p: PathLike) -> epath.Path:
  """``p`` as an ``epath.Path``, ``~`` expanded for local paths."""
  return epath.Path(p).expanduser()


def is_remote(p: PathLike) -> bool:
  """True for a URI (``gs://...``), False for a local path."""
  return "://" in os.fspath(p)


def local(p: PathLike) -> str:
  """The local path string of ``p`` (``~`` expanded); URIs are kept as is."""
  return os.fspath(path(p))


def write_text_atomic(p: PathLike, text: str) -> None:
  """Writes ``text`` to ``p`` through a temporary file and a rename.

  A reader never sees half a file (on object stores the rename is a copy,
  still never a partial object).
  """
  p = path(p)
  tmp = p.parent / f"{p.name}.tmp"
  tmp.write_text(text)
  tmp.replace(p)
