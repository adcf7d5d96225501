"""One file-system layer for every path kdjax writes: ``etils.epath``.

Local paths, ``gs://``, ``s3://`` and the other schemes epath (and therefore
orbax and TFDS) understands go through the same calls, so a remote workdir
stays remote: ``gs://bucket/run`` is never turned into a local folder
``./gs:/bucket/run`` by ``os.path``.
"""

from __future__ import annotations

import errno
import json
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


def refused_fix(error: OSError, full: str = "free space there") -> str:
  """What to do about a write the storage refused: ``full`` when it is out
  of space or quota, else "make it writable"."""
  if error.errno in (errno.ENOSPC, errno.EDQUOT):
    return full
  return "make it writable"


def write_bytes(p: PathLike, data: bytes) -> None:
  """Writes ``data`` to the file ``p``: the one write of whole files.

  A full disk raises ``OSError`` (``ENOSPC``) naming ``p``, possibly after
  part of ``data`` was written; callers that must never leave a half file
  use :func:`write_text_atomic` or write a marker last.
  """
  with path(p).open("wb") as f:
    f.write(data)


def write_text(p: PathLike, text: str) -> None:
  """Writes ``text`` (UTF-8) to the file ``p`` (:func:`write_bytes`)."""
  write_bytes(p, text.encode("utf-8"))


def write_text_atomic(p: PathLike, text: str) -> None:
  """Writes ``text`` to ``p`` through a temporary file and a rename.

  A reader never sees half a file (on object stores the rename is a copy,
  still never a partial object).
  """
  p = path(p)
  tmp = p.parent / f"{p.name}.tmp"
  write_text(tmp, text)
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


class BadFileError(ValueError):
  """A file or directory of the wrong kind or content; the message says
  which path, what is wrong and what to do (exit 1 on a command line)."""

  exit_code = 1


def read_json(p: PathLike, fix: str) -> object:
  """``p`` parsed as JSON, or one sentence naming the path and ``fix``.

  Raises:
    BadFileError: ``p`` is not UTF-8 or not JSON (line and column named).
    FileNotFoundError: it does not exist.
  """
  data = path(p).read_bytes()
  try:
    return json.loads(data.decode("utf-8"))
  except UnicodeDecodeError as e:
    raise BadFileError(
        f"{p} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset "
        f"{e.start}); {fix}."
    ) from None
  except json.JSONDecodeError as e:
    raise BadFileError(
        f"{p} is not valid JSON ({e.msg} at line {e.lineno} column "
        f"{e.colno}); {fix}."
    ) from None


def check_kind(p: PathLike, want: str, what: str, fix: str) -> None:
  """Refuses an existing ``p`` that is not the ``want`` kind of path.

  ``want``: ``"file"``, ``"directory"`` or ``"non-empty directory"``; a
  path that does not exist is left to the caller (its own message says how
  to get it). ``what`` names the path in the sentence (``"teacher.path"``).

  Raises:
    BadFileError: naming the path, what it is instead and ``fix``.
  """
  q = path(p)
  if not q.exists():
    return
  if want == "file" and q.is_dir():
    found = "a directory, not a file"
  elif want != "file" and not q.is_dir():
    found = "a file, not a directory"
  elif want == "non-empty directory" and not any(q.iterdir()):
    found = "an empty directory"
  else:
    return
  raise BadFileError(f"{what}={os.fspath(p)!r} is {found}; {fix}.")
