"""Training and scoring the method x seed grid, resumable.

Each (method, seed) trains its config in ``<root>/<method>_s<seed>``. A run
whose ``hf/`` export exists is not trained again and a finished evaluation
is read back from disk (:func:`experiments.table.scoring.score`), so an
interrupted table resumes where it stopped.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import copy
import os
from typing import Any

from experiments.table import scoring
from kdjax import training

ConfigFn = Callable[[str, int], Any]


def run_name(method: str, seed: int) -> str:
  return f"{method}_s{seed}"


def _exported(workdir: str) -> bool:
  return os.path.exists(os.path.join(workdir, "hf", "model.safetensors"))


def final_export(workdir: str) -> str:
  """The model the table scores: the run's last step (``hf/``).

  Every student is scored after the same budget. The trainer's ``best_hf``
  is chosen on a few dozen greedy validation answers, too few to rank
  checkpoints (early checkpoints that repeat one frequent answer win).
  """
  return os.path.join(workdir, "hf")


def cache_dir(config, root: str) -> str:
  """Where the table keeps the teacher cache a cached-teacher run reads.

  One per encoding and size, shared by the training seeds (a sampled cache
  draws with the run's seed, so it is one per seed).
  """
  t = config.teacher.cache
  name = f"{t.encoding}{t.k if t.encoding == 'topk' else t.num_samples}"
  if t.encoding == "sampled":
    name += f"_s{config.seed}"
  return os.path.join(root, "caches", name)


def train(config, workdir: str) -> str:
  """Trains (or finishes) the run; a run with an ``hf/`` export is kept.

  A run with ``teacher.source="cache"`` and no ``teacher.cache_dir`` first
  builds (or finishes) its cache beside the runs (:func:`cache_dir`).
  """
  if _exported(workdir):
    return workdir
  if config.teacher.source == "cache" and not config.teacher.cache_dir:
    from kdjax.cache import build  # pylint: disable=g-import-not-at-top

    config = copy.deepcopy(config)
    config.teacher.cache_dir = cache_dir(config, os.path.dirname(workdir))
    build.build(config, config.teacher.cache_dir)
  training.train_and_evaluate(config, workdir)
  return workdir


def run_all(
    methods: Sequence[str],
    seeds: Sequence[int],
    root: str,
    *,
    config_fn: ConfigFn,
    limit: int | None = None,
    finished_only: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, dict[int, scoring.RunResult]]:
  """Trains and scores every (method, seed), methods outermost.

  With ``finished_only`` runs without an export are left out instead of
  trained (a table of what has finished so far).

  Returns ``{method: {seed: RunResult}}``.
  """
  results: dict[str, dict[int, scoring.RunResult]] = {}
  for method in methods:
    for seed in seeds:
      workdir = os.path.join(root, run_name(method, seed))
      if finished_only and not _exported(workdir):
        continue
      log(
          f"{run_name(method, seed)}: "
          f"{'cached' if _exported(workdir) else 'training'}"
      )
      config = config_fn(method, seed)
      train(config, workdir)
      results.setdefault(method, {})[seed] = scoring.evaluate_run(
          config,
          final_export(workdir),
          outdir=workdir,
          workdir=workdir,
          limit=limit,
      )
  return results
