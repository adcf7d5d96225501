r"""The method table: every method x training seed, scored by the papers' protocol.

    python -m experiments.run_table                       # tiny scale, every method, 3 seeds
    python -m experiments.run_table --methods=sft,fkl,rkl,akl --seeds=10,20,30
    python -m experiments.run_table --write               # + results file, README/docs block
    python -m experiments.run_table --scale=paper --root=workdirs/paper \
        --override=teacher.path=workdirs/gpt2_xl_sft/hf

Each (method, seed) trains ``configs/<method>_gpt2.py`` in
``<root>/<method>_s<seed>`` and is scored twice on the test split, sampled
(the headline) and greedy; finished runs and evaluations are reused, so an
interrupted table resumes where it stopped. Table cells are mean ± std over
training seeds; the ``Δ`` columns are paired bootstraps over test examples
against SFT and against FKL; the AKL paper's three claims are checked on the
numbers. At the paper scale the AKL paper's published GPT-2 row is printed
beside each method. The pieces live in :mod:`experiments.table`.
"""

from __future__ import annotations

import os
import time

from absl import app, flags

from experiments.table import figure, methods, report, runs, scoring
from kdjax.config import recipe


def _define_flags():
  """Flags exist only when this file is the program."""
  flags.DEFINE_string(
      "methods",
      ",".join(methods.TABLE),
      f"Comma-separated methods (of {', '.join(methods.METHODS)}); "
      "those without a config module are skipped.",
  )
  flags.DEFINE_enum("scale", "tiny", ["tiny", "paper"], "Config arg.")
  flags.DEFINE_string(
      "seeds", ",".join(map(str, methods.SEEDS)), "Training seeds."
  )
  flags.DEFINE_string(
      "root",
      recipe.TINY_ROOT,
      "Run directories (the tiny " "default shares make demo's runs).",
  )
  flags.DEFINE_integer(
      "limit",
      0,
      "Evaluate on the first N examples of each " "dataset (0: all).",
  )
  flags.DEFINE_multi_string(
      "override", [], "key=value config overrides " "applied to every run."
  )
  flags.DEFINE_bool(
      "finished_only",
      False,
      "Table the runs that have " "finished; train nothing.",
  )
  flags.DEFINE_bool(
      "write",
      False,
      f"Write {report.RESULTS}, {report.FIGURE} and the "
      "README.md / docs/benchmark.md block.",
  )


def _methods(text: str) -> list[str]:
  """The methods named on the command line that have a config."""
  wanted = [m for m in text.split(",") if m]
  for m in wanted:
    if m not in methods.METHODS:
      raise app.UsageError(
          f"method {m!r} is unknown; use some of "
          f"{', '.join(methods.METHODS)}."
      )
  found = methods.available(wanted)
  if skipped := [m for m in wanted if m not in found]:
    print(f"no config yet, skipped: {', '.join(skipped)}")
  return found


def main(argv):
  del argv
  f = flags.FLAGS
  t0 = time.perf_counter()
  names = _methods(f.methods)
  seeds = [int(s) for s in f.seeds.split(",")]
  config_fn = lambda m, s: methods.config_for(m, f.scale, s, f.override)
  results = runs.run_all(
      names,
      seeds,
      f.root,
      config_fn=config_fn,
      limit=f.limit or None,
      finished_only=f.finished_only,
  )
  if not results:
    raise app.UsageError(
        f"no finished run in {f.root}; drop --finished_only " "to train them."
    )
  datasets = config_fn(names[0], seeds[0]).eval.datasets.split(",")
  if f.scale == "paper":
    print(report.paper_table(results, datasets))
    return
  teacher = scoring.evaluate_run(
      methods.config_for("sft", "tiny", seeds[0]),
      recipe.TINY_TEACHER,
      outdir=os.path.join(f.root, "teacher_eval"),
      limit=f.limit or None,
  )
  # --finished_only trains and scores nothing: no wall time worth printing.
  seconds = None if f.finished_only else time.perf_counter() - t0
  fig = report.FIGURE if f.write else os.path.join(f.root, "tiny_table.png")
  figure.figure(results, datasets[0], fig, teacher=teacher)
  # The figure's link is relative to the file the block lands in.
  text_in = lambda where: report.report(
      results,
      datasets[0],
      teacher=teacher,
      figure_path=os.path.relpath(fig, where),
      seconds=seconds,
  )
  print(text_in(os.curdir))
  if f.write:
    for doc in report.write(text_in):
      print(f"updated {doc}")
  n_runs = sum(len(r) for r in results.values())
  print(
      f"\nwall time {time.perf_counter() - t0:.0f} s ({n_runs} runs of "
      f"{len(results)} methods)"
  )


if __name__ == "__main__":
  _define_flags()
  app.run(main)
