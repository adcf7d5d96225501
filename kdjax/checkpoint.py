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
the first few steps.

``workdir`` may be local or a URI (``gs://bucket/run``): orbax takes it as an
``etils.epath`` path, never through ``os.path``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Mapping

import grain
import jax
import orbax.checkpoint as ocp

from kdjax import fs


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
    return self.latest.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(data_iter),
            record=ocp.args.JsonSave(record),
        ),
        force=True,
    )

  def restore(self, step: int, state: Any, data_iter: Any) -> tuple[Any, dict]:
    """``(state, record)`` of ``step``; ``data_iter`` is moved in place."""
    out = self.latest.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract(state)),
            data=grain.checkpoint.CheckpointRestore(data_iter),
            record=ocp.args.JsonRestore(),
        ),
    )
    return out.state, out.record

  def save_best(
      self,
      step: int,
      params: Any,
      score: float,
      record: Mapping[str, Any] | None = None,
  ) -> bool:
    """Keeps ``params`` if ``score`` (higher is better) beats the best so far.

    ``record`` (e.g. ``{"metric": "val_ce", "value": 3.57}``) is written with
    the step to ``best.json`` when this step becomes the best; returns whether
    it did.
    """
    if step in self.best.all_steps():
      return False
    old = self.best_record()
    self.best.save(
        step,
        args=ocp.args.StandardSave(params),
        metrics={"score": float(score)},
        force=True,
    )
    if old is not None and old.get("score", -math.inf) >= score:
      return False
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
    return json.loads(self._best_json.read_text())

  def restore_best(self, params: Any) -> tuple[int, Any] | None:
    """``(step, params)`` of the best validation step, or None if none saved."""
    step = self.best.best_step()
    if step is None:
      return None
    return step, self.best.restore(
        step, args=ocp.args.StandardRestore(abstract(params))
    )

  def close(self) -> None:
    """Waits for async writes to commit, then releases the managers."""
    for m in (self.latest, self.best):
      m.wait_until_finished()
      m.close()
