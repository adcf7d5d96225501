"""Training checkpoints with orbax: the only module that imports orbax.

A checkpoint holds the train state (student params, optimizer state, step,
the student's RNG state), the data iterator's position (grain) and a small JSON
record. Orbax writes each step into a temporary directory and renames it on
commit, so a process killed mid-save leaves the previous step intact. Restoring
goes into an abstract target carrying the live state's shardings, so every
array lands directly on its devices.

The best-by-validation student is kept by a second manager (``best/``, params
only, one step) so ``max_to_keep`` never deletes it. Which step is best is a
:class:`BestPolicy`: one validation metric (default the validation
cross-entropy, which a near-untrained student cannot win), counted only from a
given step on, so a sampled score such as ROUGE-L cannot crown a model from
the first few steps. Both record a checksum per array with each step
(:mod:`kdjax.checksums`), compared when the step is restored.

Orbax writes in the background, so storage that refuses a write (a full disk
or bucket) shows up when the next save or :meth:`Checkpoints.close` waits for
it: the step that failed, its directory and the step still kept there are
named in one sentence (:class:`SaveFailed`), whether the refusal came from
Python's file layer (``OSError``) or from TensorStore, which writes the arrays
and reports the OS error code in a ``ValueError``.

``workdir`` may be local or a URI (``gs://bucket/run``): orbax takes it as an
``etils.epath`` path, never through ``os.path``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from typing import Any, Mapping, NoReturn

import grain
import jax
import orbax.checkpoint as ocp

from kdjax import checksums, fs


def abstract(tree: Any) -> Any:
  """``ShapeDtypeStruct`` leaves with the live arrays' shardings."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
      tree,
  )


# Validation metrics where higher is better; every other (losses) is lower.
HIGHER_IS_BETTER = ("val_rougeL", "val_validity", "val_exact_match")
SAMPLED = HIGHER_IS_BETTER  # need eval.num_examples > 0


@dataclasses.dataclass(frozen=True)
class BestPolicy:
  """The best checkpoint: the best ``metric`` among steps >= ``after_step``."""

  metric: str = "val_ce"
  after_step: int = 0

  @property
  def higher_is_better(self) -> bool:
    return self.metric in HIGHER_IS_BETTER

  def score(self, step: int, metrics: Mapping[str, float]) -> float | None:
    """Higher-is-better score of a validation, or None if it cannot compete."""
    value = metrics.get(self.metric)
    if step < self.after_step or value is None or not math.isfinite(value):
      return None
    return float(value) if self.higher_is_better else -float(value)


def best_policy(
    metric: str, after_steps: int, *, num_steps: int, warmup_steps: int
) -> BestPolicy:
  """``eval.best_metric`` / ``eval.best_after_steps`` as a policy.

  ``after_steps < 0`` (the default) means: from step 0 for a loss, and for a
  sampled score (ROUGE-L, validity, exact match) only after the learning-rate
  warm-up and the first quarter of the run.
  """
  if after_steps < 0:
    after_steps = max(warmup_steps, num_steps // 4) if metric in SAMPLED else 0
  return BestPolicy(metric, after_steps)


class CorruptCheckpoint(ValueError):
  """A checkpoint that cannot be restored whole (exit 1 on a command line)."""

  exit_code = 1


class SaveFailed(ValueError):
  """A checkpoint the storage refused (exit 1 on a command line); the message
  names the step, the directory and the step kept there."""

  exit_code = 1


def storage_error(e: BaseException) -> OSError | None:
  """The OS error behind a failed write, or None if ``e`` is another failure.

  Python's writes raise ``OSError``; TensorStore raises a ``ValueError``
  whose text carries the code (``... No space left on device
  [os_error_code='28']``). The exception's causes are searched too.
  """
  while e is not None:
    if isinstance(e, OSError):
      return e
    code = re.search(r"os_error_code='(\d+)'", str(e))
    if code:
      n = int(code.group(1))
      return OSError(n, os.strerror(n))
    e = e.__cause__ or e.__context__
  return None


def _reason(e: Exception) -> str:
  """An exception as a short single line (TensorStore errors run long)."""
  text = re.sub(r"\s+", " ", str(e)).strip()
  text = f"{type(e).__name__}: {text}" if text else type(e).__name__
  return text if len(text) <= 160 else text[:157] + "..."


def _agree_failed(failed: bool) -> bool:
  """Whether any process failed (every process gets the same answer)."""
  if jax.process_count() == 1:
    return failed
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  return bool(multihost_utils.process_allgather(int(failed)).max())


def _barriers(prefix: str) -> ocp.options.MultiprocessingOptions:
  return ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=prefix)


class Checkpoints:
  """``workdir/ckpt`` (latest N steps) and ``workdir/best`` (best validation)."""

  def __init__(
      self, workdir: fs.PathLike, *, every_steps: int, max_to_keep: int
  ):
    self.every_steps = every_steps
    root = fs.path(workdir)
    if not fs.is_remote(workdir):
      root = root.absolute()  # orbax wants absolute local paths
    # Distinct barrier prefixes: both managers may save the same step, and
    # multi-process orbax names its commit barriers after the step alone.
    self.latest = ocp.CheckpointManager(
        root / "ckpt",
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            create=True,
            multiprocessing_options=_barriers("ckpt"),
        ),
    )
    self._best_json = root / "best.json"
    self.best = ocp.CheckpointManager(
        root / "best",
        options=ocp.CheckpointManagerOptions(
            max_to_keep=1,
            create=True,
            best_fn=lambda m: m["score"],
            best_mode="max",
            multiprocessing_options=_barriers("best"),
        ),
    )
    # The step each manager wrote last (in the background), by directory.
    self._writing: dict[str, int] = {}
    self._failed = False  # a refused write was reported

  def latest_step(self) -> int | None:
    return self.latest.latest_step()

  def save(
      self,
      step: int,
      state: Any,
      data_iter: Any,
      record: dict,
      *,
      force: bool = False,
  ) -> bool:
    """Saves at multiples of ``every_steps`` (or when ``force``)."""
    if not force and (self.every_steps <= 0 or step % self.every_steps):
      return False
    if step in self.latest.all_steps():
      return False
    record = dict(record, checksums=checksums.tree(state))
    return self._save(
        self.latest,
        step,
        ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(data_iter),
            record=ocp.args.JsonSave(record),
        ),
    )

  def _save(self, manager, step: int, args, metrics=None) -> bool:
    """Starts writing ``step`` once the previous write has committed.

    Raises:
      SaveFailed: the storage refused this write or the previous one.
    """
    self._wait(manager)
    try:
      saved = manager.save(step, args=args, metrics=metrics, force=True)
    except Exception as e:  # pylint: disable=broad-except
      self._refused(manager, step, e)
    self._writing[str(manager.directory)] = step
    return saved

  def _wait(self, manager) -> None:
    """Waits for ``manager``'s background write to commit.

    Raises:
      SaveFailed: the storage refused it.
    """
    try:
      manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      self._refused(manager, self._writing.get(str(manager.directory)), e)

  def _refused(self, manager, step: int | None, e: Exception) -> NoReturn:
    """Re-raises ``e``, as :class:`SaveFailed` if storage refused a write."""
    error = storage_error(e)
    if error is None:
      raise e
    self._failed = True
    manager.reload()  # the steps that committed
    good = manager.latest_step()
    kept = (
        f"the last good checkpoint there (step {good}) is kept"
        if good is not None
        else "no earlier checkpoint is there"
    )
    fix = fs.refused_fix(error, "free space there (or lower ckpt.max_to_keep)")
    raise SaveFailed(
        f"saving the step-{step} checkpoint in {manager.directory} failed "
        f"({error.strerror or _reason(error)}); {kept}; {fix} and re-run the "
        "same command to resume."
    ) from e

  def wait(self) -> None:
    """Waits for every background write to commit.

    Raises:
      SaveFailed: the storage refused one.
    """
    for m in (self.latest, self.best):
      self._wait(m)

  def restore(self, step: int, state: Any, data_iter: Any) -> tuple[Any, dict]:
    """``(state, record)`` of ``step``; ``data_iter`` is moved in place.

    Raises:
      CorruptCheckpoint: an array does not match the checksum recorded with
        it (checkpoints written before checksums were recorded are not
        checked).
    """
    out = self.latest.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract(state)),
            data=grain.checkpoint.CheckpointRestore(data_iter),
            record=ocp.args.JsonRestore(),
        ),
    )
    recorded = out.record.get("checksums")
    if recorded is not None:
      bad = checksums.mismatches(out.state, recorded)
      if bad:
        raise CorruptCheckpoint(
            f"{len(bad)} array(s) differ from their checksums, first {bad[0]}"
        )
    return out.state, out.record

  def restore_latest(
      self, state: Any, data_iter: Any
  ) -> tuple[int | None, Any, list[str]]:
    """``(step, state, notes)`` of the newest step that restores whole.

    A step that fails to restore or to verify while an older one restores is
    corrupt: it is moved aside (``ckpt/<step>.corrupt``, which orbax does not
    list) so the run saves that step again, and ``notes`` says so. ``step``
    is None (and ``state`` the given one) when there is no checkpoint. Every
    process agrees on each attempt's outcome, and process 0 moves the files.

    Raises:
      CorruptCheckpoint: no step restores; nothing is moved (a change of the
        code or the state's structure fails every step alike).
    """
    failed: list[tuple[int, str]] = []
    for step in sorted(self.latest.all_steps(), reverse=True):
      try:
        restored, _ = self.restore(step, state, data_iter)
        error = None
      except Exception as e:  # pylint: disable=broad-except
        restored, error = None, _reason(e)
      if _agree_failed(error is not None):
        failed.append((step, error or "failed on another process"))
        continue
      notes = [
          f"the step-{bad} checkpoint in {self.latest.directory} cannot be "
          f"restored ({why}); moved it to {self._move_aside(bad)}"
          for bad, why in failed
      ]
      if failed:
        self.latest.reload()
        notes.append(f"resumed from step {step}, the newest good checkpoint")
      return step, restored, notes
    if failed:
      raise CorruptCheckpoint(
          f"no checkpoint in {self.latest.directory} can be restored (step "
          f"{failed[0][0]}: {failed[0][1]}); if the code or the config "
          "changed, use the version that wrote them, else move that "
          "directory aside to start over."
      )
    return None, state, []

  def _move_aside(self, step: int) -> str:
    """Renames ``ckpt/<step>`` to an unused ``ckpt/<step>.corrupt[-n]``."""
    directory = self.latest.directory
    target, n = directory / f"{step}.corrupt", 0
    while target.exists():
      n += 1
      target = directory / f"{step}.corrupt-{n}"
    if jax.process_index() == 0:
      (directory / str(step)).rename(target)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

      multihost_utils.sync_global_devices(f"kdjax_move_aside_{step}")
    return str(target)

  def save_best(
      self,
      step: int,
      params: Any,
      score: float,
      record: Mapping[str, Any] | None = None,
  ) -> bool:
    """Keeps ``params`` if ``score`` (higher is better) beats the best so far.

    ``record`` (e.g. ``{"metric": "val_ce", "value": 3.57}``) is written with
    the step to ``best.json`` when this step becomes the best, once its
    checkpoint has committed; returns whether it did. The arrays' checksums
    go into the step's metrics, which orbax commits with the step.

    Raises:
      SaveFailed: the storage refused the write.
    """
    if step in self.best.all_steps():
      return False
    old = self.best_record()
    self._save(
        self.best,
        step,
        ocp.args.StandardSave(params),
        metrics={"score": float(score), "checksums": checksums.tree(params)},
    )
    if old is not None and old.get("score", -math.inf) >= score:
      return False
    self._wait(self.best)  # best.json never names an uncommitted step
    if jax.process_index() == 0:
      fs.write_text_atomic(
          self._best_json,
          json.dumps(
              {"step": int(step), "score": float(score), **(record or {})}
          ),
      )
    return True

  def best_record(self) -> dict | None:
    """``{"step", "score", ...}`` of the best step so far, or None."""
    if not self._best_json.exists():
      return None
    return fs.read_json(
        self._best_json, "delete it to keep the next validation's best"
    )

  def restore_best(self, params: Any) -> tuple[int, Any] | None:
    """``(step, params)`` of the best validation step, or None if none saved.

    Raises:
      CorruptCheckpoint: an array differs from the checksum recorded with
        it (best steps written before checksums were recorded are not
        checked).
    """
    step = self.best.best_step()
    if step is None:
      return None
    restored = self.best.restore(
        step, args=ocp.args.StandardRestore(abstract(params))
    )
    recorded = (self.best.metrics(step) or {}).get("checksums")
    bad = checksums.mismatches(restored, recorded) if recorded else []
    if bad:
      raise CorruptCheckpoint(
          f"the best checkpoint (step {step}) in {self.best.directory} has "
          f"{len(bad)} array(s) that differ from their checksums, first "
          f"{bad[0]}; move {self.best.directory} and {self._best_json} aside "
          "and re-run the same command to export without it."
      )
    return step, restored

  def close(self) -> None:
    """Waits for background writes to commit, then releases the managers.

    Raises:
      SaveFailed: the storage refused a write.
    """
    try:
      self.wait()
    finally:
      for m in (self.latest, self.best):
        try:
          m.close()
        except Exception as e:  # pylint: disable=broad-except
          # Orbax's writers each re-raise a refused write: report it once.
          if not (self._failed and storage_error(e)):
            self._refused(m, self._writing.get(str(m.directory)), e)
