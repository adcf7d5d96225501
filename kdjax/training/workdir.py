"""A workdir's identity: the config it was started with, in ``config.json``.

A restart whose resume identity (:mod:`kdjax.config.identity`: what defines the run,
not its length, cadence or layout) is unchanged resumes; ``:tiny,steps=60`` on
a finished 30-step run extends it. A different identity would silently mix two
experiments, so it is refused unless ``force_new_run`` is set, which deletes
the old run's checkpoints, metrics and exports first. Paths go through
:mod:`kdjax.fs`, so the workdir may be remote (``gs://bucket/run``).
"""

from __future__ import annotations

import json
from typing import Any, Mapping

import jax

from kdjax import fs
from kdjax.config import identity as identity_lib
from kdjax.training.errors import TrainingError

# What a run writes into its workdir (deleted by force_new_run).
RUN_OUTPUTS = (
    "ckpt",
    "best",
    "tb",
    "hf",
    "best_hf",
    "metrics.jsonl",
    "best.json",
    "summary.json",
)


def changed_keys(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
  """Identity keys whose values differ (:func:`kdjax.config.identity.changed`)."""
  return identity_lib.changed(old, new)


def claim(
    workdir: fs.PathLike, identity: Mapping[str, Any], *, force_new_run: bool
) -> bool:
  """Binds ``workdir`` to ``identity`` (the config as JSON).

  Returns:
    whether the workdir was fresh (no ``config.json`` before).

  Raises:
    TrainingError: it holds a run with a different identity and
      ``force_new_run`` is not set.
  """
  root = fs.path(workdir)
  root.mkdir(parents=True, exist_ok=True)
  path = root / "config.json"
  fresh = not path.exists()
  if not fresh:
    changed = changed_keys(json.loads(path.read_text()), identity)
    if changed and not force_new_run:
      raise TrainingError(
          f"workdir {workdir} holds a run with a different config (changed: "
          f"{', '.join(changed)}); use another --workdir or pass "
          "--config.force_new_run=True to delete that run and start over."
      )
    if changed:
      _delete_run(root)
  if jax.process_index() == 0:
    fs.write_text_atomic(path, json.dumps(identity, indent=2, sort_keys=True))
  return fresh


def release(workdir: fs.PathLike, *, created: bool = False) -> None:
  """Unbinds a fresh workdir in which nothing ran.

  A run that failed before its first step must not make a corrected config
  look "different". ``created``: the workdir did not exist before
  :func:`claim`; it is removed again if nothing else was written into it.
  """
  if jax.process_index() == 0:
    root = fs.path(workdir)
    (root / "config.json").unlink(missing_ok=True)
    if created and root.is_dir() and not any(root.iterdir()):
      root.rmdir()


def _delete_run(root) -> None:
  for name in RUN_OUTPUTS:
    target = root / name
    if target.is_dir():
      target.rmtree()
    elif target.exists():
      target.unlink()
