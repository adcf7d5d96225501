"""The Markdown of the method table and the files it is written to.

``README.md`` and ``docs/benchmark.md`` hold the block between
:data:`BLOCK`'s markers, which :func:`replace_block` rewrites; the full
block is also kept in :data:`RESULTS`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import os
import re

import numpy as np

from experiments.table import claims as claims_lib
from experiments.table import methods
from experiments.table.scoring import METRIC, RunResult
from experiments.table.stats import (
    Results,
    Runs,
    comparisons,
    mean_score,
    mean_std,
    values,
)

_EXPERIMENTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(_EXPERIMENTS, "results", "tiny_table.md")
FIGURE = os.path.join(_EXPERIMENTS, "figures", "tiny_table.png")
# README.md / docs/benchmark.md: the block between these markers is replaced.
BLOCK = ("<!-- tiny-table:begin -->", "<!-- tiny-table:end -->")
DOCS = ("README.md", os.path.join("docs", "benchmark.md"))


def _pm(mean: float, std: float, digits: int = 2) -> str:
  return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _cells(runs: Runs, dataset: str, spread: str) -> list[str]:
  """Seeds, the three score columns and val CE of one row."""
  out = [",".join(map(str, runs))]
  for kind, name in (
      ("sampled", METRIC),
      ("sampled", "validity"),
      ("greedy", "validity"),
  ):
    v = values(runs, kind, dataset, name)
    if not v:
      out.append("–")
    elif spread == "sampling" or len(v) == 1:
      run = next(iter(runs.values()))
      m = getattr(run, kind)[dataset]
      out.append(_pm(m[name], m.get(f"{name}_std", 0.0)))
    else:
      out.append(_pm(*mean_std(v)))
  ces = [r.val_ce for r in runs.values()]
  out.append(
      _pm(*mean_std(ces), digits=3)
      if len(ces) > 1 and spread == "training"
      else f"{np.mean(ces):.3f}"
  )
  return out


def _header(head: Sequence[str]) -> list[str]:
  return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]


def table(
    results: Results,
    dataset: str,
    *,
    teacher: RunResult | None = None,
    spread: str = "training",
    num_samples: int = 10_000,
) -> str:
  """Markdown, one row per method.

  ``spread="training"``: ± is the std over training seeds of the per-seed
  means; ``"sampling"`` (one training seed, the demo): the std over the
  sampling seeds of that run.
  """
  vs_sft = comparisons(results, "sft", num_samples=num_samples)
  vs_fkl = comparisons(results, "fkl", num_samples=num_samples)
  lines = _header(
      [
          "model",
          "seeds",
          "ROUGE-L (sampled)",
          "validity % (sampled)",
          "validity % (greedy)",
          "val CE",
          "Δ ROUGE-L vs SFT",
          "Δ ROUGE-L vs FKL",
      ]
  )
  if teacher is not None:
    cells = _cells({0: teacher}, dataset, spread)[1:]
    lines.append("| teacher | – | " + " | ".join(cells) + " | – | – |")
  for method, runs in results.items():
    row = [method] + _cells(runs, dataset, spread)
    row += [
        str(vs_sft[method]) if method in vs_sft else "–",
        str(vs_fkl[method]) if method in vs_fkl else "–",
    ]
    lines.append("| " + " | ".join(row) + " |")
  return "\n".join(lines)


def paper_table(results: Results, datasets: Sequence[str]) -> str:
  """Paper scale: sampled ROUGE-L per dataset beside the published row."""
  lines = _header(
      ["method"]
      + [f"{d} ROUGE-L" for d in datasets]
      + [f"paper {d}" for d in methods.PAPER_DATASETS]
  )
  for method, runs in results.items():
    row = [method]
    for d in datasets:
      v = values(runs, "sampled", d, METRIC)
      row.append(_pm(*mean_std(v)) if v else "–")
    row += (
        [f"{v:.2f}" for v in methods.PAPER_GPT2[method]]
        if method in methods.PAPER_GPT2
        else ["–"] * len(methods.PAPER_DATASETS)
    )
    lines.append("| " + " | ".join(row) + " |")
  return "\n".join(lines)


def _times(results: Results, seconds: float | None) -> list[str]:
  """The training time of the runs and the wall time of the command."""
  trained = [
      r.train_seconds
      for runs in results.values()
      for r in runs.values()
      if np.isfinite(r.train_seconds)
  ]
  parts = []
  if trained:
    parts += [
        "",
        (
            f"Training time summed over the {len(trained)} runs: "
            f"{sum(trained) / 60:.1f} min (each run's `summary.json`; "
            "scoring and teacher caches not included)."
        ),
    ]
  if seconds is not None:
    parts += [
        "",
        (
            f"Wall time of this command: {seconds / 60:.1f} min "
            "(finished runs and evaluations are reused)."
        ),
    ]
  return parts


def report(
    results: Results,
    dataset: str,
    *,
    teacher: RunResult | None = None,
    spread: str = "training",
    figure_path: str | None = None,
    seconds: float | None = None,
    num_samples: int = 10_000,
) -> str:
  """The Markdown block: table, significance note, claims, figure, time."""
  parts = [
      table(
          results,
          dataset,
          teacher=teacher,
          spread=spread,
          num_samples=num_samples,
      ),
      "",
      (
          "Δ: paired bootstrap over the test examples (10,000 resamples) "
          "of per-example ROUGE-L averaged over training and sampling "
          "seeds; [95 % interval], * = interval excludes 0."
      ),
      "",
  ]
  if teacher is not None and "sft" in results:
    t = teacher.sampled[dataset][METRIC]
    s = mean_score(results["sft"], dataset)
    parts += [f"Teacher − SFT student: {t - s:+.2f} ROUGE-L.", ""]
  found = claims_lib.claims(results, dataset, num_samples=num_samples)
  parts += [str(c) for c in found]
  if figure_path:
    parts += ["", f"![method table]({figure_path})"]
  return "\n".join(parts + _times(results, seconds))


def replace_block(path: str, block: str) -> bool:
  """Replaces the text between :data:`BLOCK`'s markers in ``path``; False
  when the file or the markers are missing."""
  if not os.path.exists(path):
    return False
  with open(path) as f:
    text = f.read()
  pattern = re.compile(
      re.escape(BLOCK[0]) + ".*?" + re.escape(BLOCK[1]), re.DOTALL
  )
  if not pattern.search(text):
    return False
  text = pattern.sub(lambda _: f"{BLOCK[0]}\n{block}\n{BLOCK[1]}", text)
  with open(path, "w") as f:
    f.write(text)
  return True


def write(text_in: Callable[[str], str]) -> list[str]:
  """Writes :data:`RESULTS` and the block of every file of :data:`DOCS`
  that has the markers; ``text_in(directory)`` is the block with its links
  relative to ``directory``. Returns the docs updated."""
  os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
  with open(RESULTS, "w") as out:
    out.write(text_in(os.path.dirname(RESULTS)) + "\n")
  return [
      doc
      for doc in DOCS
      if replace_block(doc, text_in(os.path.dirname(doc) or os.curdir))
  ]
