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


def create_exclusive(p: PathLike, text: str) -> bool:
  """Creates ``p`` holding ``text`` unless it exists; whether it did.

  Local paths use ``O_CREAT | O_EXCL``, atomic on local disks: of two
  processes racing, exactly one creates the file. Remote paths use fsspec's
  exclusive-create mode (``"xb"``), as atomic as the store's implementation
  of it; a store without it gets a check, a write and a read-back, which a
  simultaneous writer can still race.
  """
  if not is_remote(p):
    try:
      fd = os.open(os.fspath(path(p)), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
      return False
    with os.fdopen(fd, "w") as f:
      f.write(text)
    return True
  import fsspec  # pylint: disable=g-import-not-at-top

  store, where = fsspec.core.url_to_fs(os.fspath(p))
  try:
    with store.open(where, "xb") as f:
      f.write(text.encode())
    return True
  except FileExistsError:
    return False
  except (NotImplementedError, ValueError):  # no exclusive mode
    if path(p).exists():
      return False
    path(p).write_text(text)
    return path(p).read_text() == text
