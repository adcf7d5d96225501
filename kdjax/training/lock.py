"""One trainer per workdir: ``workdir/trainer.lock``.

Two trainers in one workdir would interleave checkpoints and metrics rows.
The first creates ``trainer.lock`` (its pid, host, start time and command)
with an exclusive create (:func:`kdjax.fs.create_exclusive`, so local and
remote workdirs alike) and removes it when it stops, however it stops short
of ``SIGKILL``. A second trainer is refused in one sentence naming the pid
and host that hold the lock.

A trainer killed outright leaves its lock behind. On the host that wrote it
a lock whose pid no longer runs is stale: the next trainer takes it over with
a warning (the restart after a preemption or a ``SIGKILL`` just works). A lock
from another host cannot be checked from here: the refusal says how to
remove it once that trainer is known to be gone.

On several processes, process 0 holds the lock for the run and tells the
others whether it got it.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import socket
import sys
from typing import Any

from absl import logging
import jax

from kdjax import fs
from kdjax.training.errors import TrainingError

LOCK = "trainer.lock"


@dataclasses.dataclass(frozen=True)
class Holder:
  """Who holds a lock: the record ``trainer.lock`` holds."""

  pid: int
  host: str
  started: str
  command: str = ""

  @classmethod
  def me(cls) -> Holder:
    return cls(
        pid=os.getpid(),
        host=socket.gethostname(),
        started=datetime.datetime.now().astimezone().isoformat("T", "seconds"),
        command=" ".join(sys.argv),
    )

  def text(self) -> str:
    return json.dumps(dataclasses.asdict(self))

  def describe(self) -> str:
    return f"pid {self.pid} on host {self.host} (started {self.started})"


class LockedError(TrainingError):
  """Another trainer holds the workdir; the message names it."""


def pid_running(pid: int) -> bool:
  """Whether process ``pid`` runs on this host (a zombie does not)."""
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # another user's process
    return True
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0] != "Z"
  except (OSError, IndexError):
    return True


def _read(path) -> tuple[str, Holder | None]:
  """The lock's text and its holder (None if unreadable)."""
  try:
    text = path.read_text()
  except FileNotFoundError:
    return "", None
  try:
    return text, Holder(**json.loads(text))
  except (ValueError, TypeError):
    return text, None


def _fix(path) -> str:
  return (
      f"if no trainer runs there any more, delete {path} and re-run the "
      "same command"
  )


def _take(path, me: Holder) -> None:
  """One attempt at the lock; raises :class:`LockedError` if it is held."""
  where = path.parent
  for _ in range(3):
    if fs.create_exclusive(path, me.text()):
      return
    text, holder = _read(path)
    if not text and holder is None:  # removed in between: try again
      continue
    if holder is None:
      raise LockedError(
          f"workdir {where} holds an unreadable lock {path}; {_fix(path)}."
      )
    if holder.host != me.host:
      raise LockedError(
          f"workdir {where} is in use by a trainer, {holder.describe()}; "
          f"wait for it to finish, or {_fix(path)}."
      )
    if pid_running(holder.pid):
      raise LockedError(
          f"workdir {where} is in use by a trainer, {holder.describe()}; "
          f"wait for it to finish or stop it (kill {holder.pid})."
      )
    logging.warning(
        "taking over %s: its trainer, %s, no longer runs",
        path,
        holder.describe(),
    )
    _remove_if(path, text)
  raise LockedError(
      f"workdir {where}: other trainers keep taking its lock {path}; start "
      "one trainer per workdir."
  )


def _remove_if(path, text: str) -> None:
  """Removes the lock if it still holds ``text`` (a stale or our own lock)."""
  current, _ = _read(path)
  if current == text:
    path.unlink(missing_ok=True)


def acquire(workdir: fs.PathLike) -> Holder:
  """Takes ``workdir``'s lock (creating the workdir); returns its holder.

  Raises:
    LockedError: another trainer holds it (the message names it).
  """
  me = Holder.me()
  path = fs.path(workdir) / LOCK
  error = None
  if jax.process_index() == 0:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
      _take(path, me)
    except LockedError as e:
      error = e
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    refused = multihost_utils.broadcast_one_to_all(int(error is not None))
    if refused and error is None:
      raise LockedError(
          f"workdir {fs.local(workdir)} is in use by another trainer "
          "(process 0 says which)."
      )
  if error is not None:
    raise error
  return me


def release(workdir: fs.PathLike, holder: Any) -> None:
  """Removes ``workdir``'s lock if ``holder`` still holds it."""
  if jax.process_index() == 0 and holder is not None:
    _remove_if(fs.path(workdir) / LOCK, holder.text())
