"""A workdir's identity: the config it was started with, in ``config.json``.

A restart with the same config resumes. A different config would silently
mix two experiments, so it is refused unless ``force_new_run`` is set, which
deletes the old run's checkpoints, metrics and exports first. Keys in
:data:`RESUMABLE_KEYS` may change between a run and its resumption.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Mapping

import jax

from kdjax.training.errors import TrainingError

RESUMABLE_KEYS = ("force_new_run", "num_steps", "num_epochs")
# What a run writes into its workdir (deleted by force_new_run).
RUN_OUTPUTS = ("ckpt", "best", "tb", "hf", "best_hf", "metrics.jsonl")


def _flat(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    if isinstance(v, Mapping):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def _config_path(workdir: str) -> str:
  return os.path.join(workdir, "config.json")


def changed_keys(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
  """Dotted keys whose values differ, resumable keys left out."""
  a, b = _flat(old), _flat(new)
  return sorted(k for k in a.keys() | b.keys()
                if k.split(".")[0] not in RESUMABLE_KEYS
                and a.get(k) != b.get(k))


def claim(workdir: str, identity: Mapping[str, Any], *,
          force_new_run: bool) -> bool:
  """Binds ``workdir`` to ``identity`` (the config as JSON).

  Returns:
    whether the workdir was fresh (no ``config.json`` before).

  Raises:
    TrainingError: it holds a run with a different config and
      ``force_new_run`` is not set.
  """
  os.makedirs(workdir, exist_ok=True)
  path = _config_path(workdir)
  fresh = not os.path.exists(path)
  if not fresh:
    with open(path) as f:
      changed = changed_keys(json.load(f), identity)
    if changed and not force_new_run:
      raise TrainingError(
          f"workdir {workdir} holds a run with a different config (changed: "
          f"{', '.join(changed)}); use another --workdir or pass "
          "--config.force_new_run=True to delete that run and start over.")
    if changed:
      _delete_run(workdir)
  if jax.process_index() == 0:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(identity, f, indent=2, sort_keys=True)
    os.replace(tmp, path)
  return fresh


def release(workdir: str) -> None:
  """Unbinds a fresh workdir in which nothing ran.

  A run that failed before its first step must not make a corrected config
  look "different".
  """
  if jax.process_index() == 0:
    os.remove(_config_path(workdir))


def _delete_run(workdir: str) -> None:
  for name in RUN_OUTPUTS:
    target = os.path.join(workdir, name)
    if os.path.isdir(target):
      shutil.rmtree(target)
    elif os.path.exists(target):
      os.remove(target)
