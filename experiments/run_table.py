r"""The method table: train each method × seed, evaluate, aggregate (issue 6).

    python -m experiments.run_table                          # tiny, embedded data
    python -m experiments.run_table --methods=sft,fkl,akl --seeds=10,20
    python -m experiments.run_table --scale=paper --root=workdirs/paper \
        --override=teacher.path=workdirs/gpt2_xl_sft/hf

Each (method, seed) trains with ``kdjax/configs/<method>_gpt2.py`` in
``<root>/<method>_s<seed>`` (finished runs, e.g. ``make demo``'s, are reused: the trainer resumes
at their last step) and is scored with :func:`kdjax.evaluate.run`. The table has
one row per method, one column per dataset, mean ± std over training seeds; at
the paper scale the AKL paper's published GPT-2 row (kd_losses.md 6) is printed
beside it. The tiny scale needs the tiny teacher (``make demo`` stage 1).
"""

from __future__ import annotations

import importlib
import json
import os
from typing import Sequence

from absl import app, flags
import numpy as np

from kdjax.configs import common
from kdjax import evaluate, trainer

# method -> config module (kdjax/configs/<name>.py)
METHODS = {"sft": "sft_gpt2", "seqkd": "seqkd_gpt2", "fkl": "fkl_gpt2",
           "rkl": "rkl_gpt2", "skl": "skl_gpt2", "srkl": "srkl_gpt2",
           "fkl_rkl": "fkl_rkl_gpt2", "akl": "akl_gpt2", "jsd": "jsd_gpt2",
           "tvd": "tvd_gpt2", "sinkhorn": "sinkhorn_gpt2"}

# AKL paper (arXiv 2404.02657), GPT-2 1.5B -> 120M, ROUGE-L on Dolly / S-NI / UnNI.
PAPER_GPT2 = {
    "teacher": (26.98, 27.25, 31.61), "sft": (23.01, 16.48, 18.43),
    "seqkd": (23.30, 16.35, 18.51), "fkl": (23.46, 16.63, 19.27),
    "rkl": (22.62, 17.88, 19.35), "skl": (23.47, 16.51, 18.46),
    "srkl": (23.25, 17.54, 19.31), "fkl_rkl": (23.36, 17.83, 20.37),
    "akl": (23.88, 19.15, 21.97)}
PAPER_DATASETS = ("dolly", "sni", "unni")


def config_for(method: str, scale: str, seed: int, overrides: Sequence[str] = ()):
  """``kdjax/configs/<method>_gpt2.py`` at ``scale`` with the seed and overrides."""
  if method not in METHODS:
    raise ValueError(f"method {method!r} is unknown; use some of "
                     f"{', '.join(METHODS)}.")
  module = importlib.import_module(f"kdjax.configs.{METHODS[method]}")
  c = module.get_config("tiny" if scale == "tiny" else None)
  c.seed = seed
  common.override(c, dict(item.partition("=")[::2] for item in overrides))
  return c


def run_name(method: str, seed: int) -> str:
  return f"{method}_s{seed}"


def train(config, workdir: str) -> str:
  """Trains (or finishes) the run; returns its workdir."""
  trainer.train_and_evaluate(config, workdir)
  return workdir


def score(config, workdir: str, *, datasets: str | None = None,
          limit: int | None = None, seeds: str | None = None) -> dict:
  """``{dataset: metrics}`` of the run's exported student (cached on disk)."""
  path = os.path.join(workdir, "eval", "summary.json")
  wanted = (datasets or config.eval.datasets).split(",")
  if os.path.exists(path):
    with open(path) as f:
      done = json.load(f)
    if all(d in done for d in wanted):
      return {d: done[d] for d in wanted}
  return evaluate.run(config, workdir, datasets=datasets, limit=limit,
                      seeds=seeds, progress=False)


def table(results: dict[str, list[dict]], datasets: Sequence[str], *,
          metric: str = "rougeL", paper: bool = False) -> str:
  """Markdown: a row per method, mean ± std over training seeds per dataset."""
  head = ["method"] + [f"{d} {metric}" for d in datasets]
  if paper:
    head += [f"paper {d}" for d in PAPER_DATASETS]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for method, runs in results.items():
    cells = [method]
    for d in datasets:
      values = [r[d][metric] for r in runs if d in r and metric in r[d]]
      cells.append(f"{np.mean(values):.2f} ± {np.std(values):.2f}"
                   if values else "–")
    if paper:
      cells += [f"{v:.2f}" for v in PAPER_GPT2.get(method, ("–",) * 3)] if (
          method in PAPER_GPT2) else ["–"] * 3
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def _define_flags():
  """Flags exist only when this file is the program (demo.py imports it)."""
  flags.DEFINE_string(
      "methods", "sft,seqkd,fkl,rkl,skl,srkl,fkl_rkl,akl,jsd,tvd,sinkhorn",
      "Comma-separated methods (keys of METHODS).")
  flags.DEFINE_enum("scale", "tiny", ["tiny", "paper"], "Config arg.")
  flags.DEFINE_string("seeds", "10", "Training seeds.")
  flags.DEFINE_string("root", "workdirs/tiny", "Run directories (the tiny "
                      "default shares make demo's runs).")
  flags.DEFINE_integer("limit", 0, "Evaluate on the first N examples of each "
                       "dataset (0: all).")
  flags.DEFINE_multi_string("override", [], "key=value config overrides "
                            "applied to every run.")


def main(argv):
  del argv
  f = flags.FLAGS
  methods = f.methods.split(",")
  seeds = [int(s) for s in f.seeds.split(",")]
  results: dict[str, list[dict]] = {}
  datasets: list[str] = []
  for method in methods:
    for seed in seeds:
      c = config_for(method, f.scale, seed, f.override)
      workdir = train(c, os.path.join(f.root, run_name(method, seed)))
      results.setdefault(method, []).append(
          score(c, workdir, limit=f.limit or None))
      datasets = c.eval.datasets.split(",")
  print(table(results, datasets, paper=f.scale == "paper"))


if __name__ == "__main__":
  _define_flags()
  app.run(main)
