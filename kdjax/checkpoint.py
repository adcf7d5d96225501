"""Training checkpoints with orbax: the only module that imports orbax.

A checkpoint holds the train state (student params, optimizer state, step,
the student's RNG state), the data iterator's position (grain) and a small JSON
record. Orbax writes each step into a temporary directory and renames it on
commit, so a process killed mid-save leaves the previous step intact. Restoring
goes into an abstract target carrying the live state's shardings, so every
array lands directly on its devices.

The best-by-validation student is kept by a second manager (``best/``, params
only, one step) so ``max_to_keep`` never deletes it.

``workdir`` may be local or a URI (``gs://bucket/run``): orbax takes it as an
``etils.epath`` path, never through ``os.path``.
"""

from __future__ import annotations

from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from kdjax import fs


def abstract(tree: Any) -> Any:
  """``ShapeDtypeStruct`` leaves with the live arrays' shardings."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
      tree)


class Checkpoints:
  """``workdir/ckpt`` (latest N steps) and ``workdir/best`` (best validation)."""

  def __init__(self, workdir: fs.PathLike, *, every_steps: int,
               max_to_keep: int):
    self.every_steps = every_steps
    root = fs.path(workdir)
    if not fs.is_remote(workdir):
      root = root.absolute()  # orbax wants absolute local paths
    self.latest = ocp.CheckpointManager(
        root / "ckpt",
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                             create=True))
    self.best = ocp.CheckpointManager(
        root / "best",
        options=ocp.CheckpointManagerOptions(
            max_to_keep=1, create=True, best_fn=lambda m: m["score"],
            best_mode="max"))

  def latest_step(self) -> int | None:
    return self.latest.latest_step()

  def save(self, step: int, state: Any, data_iter: Any, record: dict,
           *, force: bool = False) -> bool:
    """Saves at multiples of ``every_steps`` (or when ``force``)."""
    if not force and (self.every_steps <= 0 or step % self.every_steps):
      return False
    if step in self.latest.all_steps():
      return False
    return self.latest.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=grain.checkpoint.CheckpointSave(data_iter),
        record=ocp.args.JsonSave(record)), force=True)

  def restore(self, step: int, state: Any, data_iter: Any) -> tuple[Any, dict]:
    """``(state, record)`` of ``step``; ``data_iter`` is moved in place."""
    out = self.latest.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract(state)),
        data=grain.checkpoint.CheckpointRestore(data_iter),
        record=ocp.args.JsonRestore()))
    return out.state, out.record

  def save_best(self, step: int, params: Any, score: float) -> None:
    """Keeps ``params`` if ``score`` (higher is better) beats the best so far."""
    if step in self.best.all_steps():
      return
    self.best.save(step, args=ocp.args.StandardSave(params),
                   metrics={"score": float(score)}, force=True)

  def restore_best(self, params: Any) -> tuple[int, Any] | None:
    """``(step, params)`` of the best validation step, or None if none saved."""
    step = self.best.best_step()
    if step is None:
      return None
    return step, self.best.restore(
        step, args=ocp.args.StandardRestore(abstract(params)))

  def close(self) -> None:
    """Waits for async writes to commit, then releases the managers."""
    for m in (self.latest, self.best):
      m.wait_until_finished()
      m.close()
