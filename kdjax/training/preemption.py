"""Stop requests from signals, agreed on by every process of a run.

``SIGINT`` (Ctrl-C) and ``SIGTERM`` (what schedulers, Kubernetes and
preemptible cloud VMs send before ``SIGKILL``) ask the training loop to stop
after the step in progress: the loop logs and saves that step, then exits
with the command that resumes (exit code ``128 + signal``: 130 for ``SIGINT``,
143 for ``SIGTERM``). A second signal abandons the wait: the loop stops at
once and saves the newest whole state on a single-process run. After it, the
signals have their default effect again, so a third one kills.

Before the first step (building the models, reading the data, restoring a
checkpoint: :func:`during_setup`) nothing is being written that a stop must
wait for, so a signal stops at once: :class:`SetupInterrupted`.

During training a handler only sets a flag, read between steps: an exception
raised at an arbitrary bytecode could land inside orbax's asynchronous save.
For the same reason a second signal that arrives while a checkpoint is being
written (:meth:`Signals.deferred`) takes effect when the write returns.

Every process of a multi-process run must save the same step (a save is
collective), but a signal may reach only some of them. With several processes
:meth:`Signals.poll` reduces the processes' flags with one small collective
per step, read one step late so the host never waits for the step it just
dispatched: all processes read the same value after the same step, and stop
together. A single process reads its own flag: no collective, no sync.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

SIGNALS = (signal.SIGINT, signal.SIGTERM)
_NAMES = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}


def exit_code(signum: int) -> int:
  """The shell's code for a process ended by ``signum``: ``128 + signum``."""
  return 128 + int(signum)


class Abandoned(KeyboardInterrupt):
  """A second stop signal: the loop stops without finishing the step."""


class SetupInterrupted(KeyboardInterrupt):
  """A stop signal before the first step; ``signum`` is the signal."""

  def __init__(self, signum: int):
    super().__init__(signum)
    self.signum = signum
    self.exit_code = exit_code(signum)
    self.kept = "interrupted before the first step; nothing was saved"


# The handlers :func:`during_setup` replaced, while it is active.
_BEFORE_SETUP: dict[int, object] = {}


def raise_setup_interrupted(signum, frame) -> None:
  """The handler of :func:`during_setup`: stop now."""
  del frame
  raise SetupInterrupted(signum)


@contextlib.contextmanager
def during_setup() -> Iterator[None]:
  """A block in which ``SIGINT``/``SIGTERM`` raise :class:`SetupInterrupted`.

  Set-up ends when :class:`Signals` are installed inside it: when they are
  restored, the handlers from before the block come back, so a signal after
  the loop (or a third one) has its usual effect. They come back on exit
  too. Outside the main thread (where handlers cannot be installed) the
  signals keep their behaviour.
  """
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  previous = {s: signal.signal(s, raise_setup_interrupted) for s in SIGNALS}
  _BEFORE_SETUP.update(previous)
  try:
    yield
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler if handler is not None else signal.SIG_DFL)
      _BEFORE_SETUP.pop(s, None)


class Signals:
  """Turns ``SIGINT``/``SIGTERM`` into a stop request the loop honours.

  Handlers can only be installed from the main thread; elsewhere (a
  notebook's worker thread) the signals keep Python's default behaviour.

  Args:
    mesh: the run's mesh; its devices carry the multi-process agreement.
    agree: reduce the flags over processes (default: when there are several).
  """

  def __init__(self, mesh: jax.sharding.Mesh, agree: bool | None = None):
    self.signum: int | None = None  # the first signal received
    self._mesh = mesh
    self._agree = jax.process_count() > 1 if agree is None else agree
    self._pending: jax.Array | None = None
    self._previous: dict[int, object] = {}
    self._deferring = False
    self._abandon = False
    self._any = None

  def install(self) -> None:
    if threading.current_thread() is not threading.main_thread():
      return
    for s in SIGNALS:
      previous = signal.signal(s, self._handle)
      if previous is raise_setup_interrupted:  # set-up ends here
        previous = _BEFORE_SETUP.get(s, signal.SIG_DFL)
      self._previous[s] = previous

  def restore(self) -> None:
    for s, previous in self._previous.items():
      signal.signal(s, previous if previous is not None else signal.SIG_DFL)
    self._previous = {}

  def _handle(self, signum, frame) -> None:
    del frame
    if self.signum is None:
      self.signum = signum
      if jax.process_index() == 0:
        tqdm.tqdm.write(
            f"{_NAMES.get(signum, signum)}: stopping after this step "
            "(again to stop at once)",
            file=sys.stderr,
        )
      return
    self.restore()  # a third signal has its default effect
    if self._deferring:
      self._abandon = True
    else:
      raise Abandoned

  @contextlib.contextmanager
  def deferred(self) -> Iterator[None]:
    """A block (a checkpoint write) that a second signal does not cut short."""
    self._deferring = True
    try:
      yield
    finally:
      self._deferring = False
    if self._abandon:
      raise Abandoned

  def poll(self) -> bool:
    """Whether every process stops after the step just dispatched.

    One process: whether a signal arrived. Several: whether one reached any
    process by the previous call, the same answer on every process.
    """
    if not self._agree:
      return self.signum is not None
    flag = self._reduce(self.signum is not None)
    agreed, self._pending = self._pending, flag
    return agreed is not None and bool(np.asarray(agreed.addressable_data(0)))

  def _reduce(self, local: bool) -> jax.Array:
    """``any`` of every process's ``local`` flag, dispatched asynchronously."""
    mesh = self._mesh
    spec = jax.sharding.PartitionSpec(tuple(mesh.axis_names))
    sharding = jax.sharding.NamedSharding(mesh, spec)
    count = sum(
        d.process_index == jax.process_index() for d in mesh.devices.flat
    )
    flags = jax.make_array_from_process_local_data(
        sharding, np.full((count,), local, np.int32), (mesh.size,)
    )
    if self._any is None:
      replicated = jax.sharding.NamedSharding(
          mesh, jax.sharding.PartitionSpec()
      )
      self._any = jax.jit(jnp.max, out_shardings=replicated)
    return self._any(flags)
