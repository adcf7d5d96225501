"""A trained student scored by the papers' protocol, twice, on the test split.

* **sampled** (the headline, the MiniLLM / AKL protocol): temperature 1,
  top-k and top-p off, ``no_repeat_ngram_size=6``, sampling seeds 10, 20, 30,
  40, 50; ROUGE-L and validity are means over the sampling seeds;
* **greedy**: one argmax decode, its validity a secondary column.

A finished evaluation is read back from its ``summary.json``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from typing import Any

import numpy as np

from kdjax import evaluation, metrics
from kdjax.config import recipe

SAMPLING_SEEDS = "10,20,30,40,50"
METRIC = "rougeL"


def protocol_config(config, kind: str):
  """``config`` with the evaluation protocol ``kind``: "sampled" (temperature
  1, seeds 10-50) or "greedy" (argmax, one seed)."""
  if kind not in ("sampled", "greedy"):
    raise ValueError(f"protocol {kind!r} is unknown; use sampled or greedy.")
  c = copy.deepcopy(config)
  recipe.override(
      c,
      {
          "eval.greedy": kind == "greedy",
          "eval.seeds": SAMPLING_SEEDS if kind == "sampled" else "10",
      },
  )
  return c


def score(
    config,
    checkpoint: str,
    *,
    kind: str = "sampled",
    outdir: str | None = None,
    limit: int | None = None,
) -> dict:
  """``{dataset: metrics}`` of ``checkpoint`` (a workdir or HF dir) under
  protocol ``kind``; cached in ``<outdir>`` (default
  ``<checkpoint>/eval_<kind>``) with one JSONL of responses per dataset."""
  c = protocol_config(config, kind)
  outdir = outdir or os.path.join(checkpoint, f"eval_{kind}")
  path = os.path.join(outdir, "summary.json")
  wanted = c.eval.datasets.split(",")
  if os.path.exists(path):
    with open(path) as f:
      done = json.load(f)
    if all(
        d in done and os.path.exists(os.path.join(outdir, f"{d}.jsonl"))
        for d in wanted
    ):
      return {d: done[d] for d in wanted}
  return evaluation.run(
      c, checkpoint, limit=limit, outdir=outdir, progress=False
  )


def example_scores(
    outdir: str, dataset: str, metric: str = METRIC
) -> np.ndarray:
  """Per test example, ``metric`` x 100 averaged over the sampling seeds."""
  with open(os.path.join(outdir, f"{dataset}.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return np.array(
      [100.0 * np.mean([s[metric] for s in r["scores"].values()]) for r in rows]
  )


def val_curve(workdir: str) -> list[tuple[int, float]]:
  """``(step, validation CE)`` of a run's metrics log."""
  return [
      (r["step"], r["val_ce"]) for r in metrics.read(workdir) if "val_ce" in r
  ]


def train_seconds(workdir: str) -> float:
  """The trainer's own ``seconds`` in ``<workdir>/summary.json`` (NaN if none)."""
  path = os.path.join(workdir, "summary.json")
  if not os.path.exists(path):
    return float("nan")
  with open(path) as f:
    return float(json.load(f).get("seconds", float("nan")))


@dataclasses.dataclass
class RunResult:
  """One trained student: metrics per protocol and dataset, per-example
  ROUGE-L of the headline dataset (sampled), its validation-CE curve and
  its training time (``summary.json``; NaN for a model trained elsewhere)."""

  sampled: dict[str, dict[str, Any]]
  greedy: dict[str, dict[str, Any]]
  examples: np.ndarray
  curve: list[tuple[int, float]]
  train_seconds: float = float("nan")

  @property
  def val_ce(self) -> float:
    return self.curve[-1][1] if self.curve else float("nan")


def evaluate_run(
    config,
    checkpoint: str,
    *,
    outdir: str | None = None,
    limit: int | None = None,
    workdir: str | None = None,
) -> RunResult:
  """Both protocols on ``checkpoint``; ``workdir`` holds the metrics log."""
  sampled_dir = os.path.join(outdir or checkpoint, "eval_sampled")
  greedy_dir = os.path.join(outdir or checkpoint, "eval_greedy")
  sampled = score(
      config, checkpoint, kind="sampled", outdir=sampled_dir, limit=limit
  )
  greedy = score(
      config, checkpoint, kind="greedy", outdir=greedy_dir, limit=limit
  )
  first = config.eval.datasets.split(",")[0]
  return RunResult(
      sampled,
      greedy,
      example_scores(sampled_dir, first),
      val_curve(workdir or checkpoint),
      train_seconds(workdir or checkpoint),
  )
