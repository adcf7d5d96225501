r"""Evaluates a checkpoint: ``python -m kdjax.evaluate --config=FILE --checkpoint=DIR``.

A HF model directory or a training workdir (its ``best_hf/``, else ``hf/``)::

  python -m kdjax.evaluate --config=configs/akl_gpt2.py --checkpoint=WORKDIR \
      [--datasets=dolly,sinst] [--seeds=10,20] [--limit=N] [--outdir=DIR] \
      [--manual_dir=DIR]

writes ``<outdir>/<dataset>.jsonl`` (one line per example), merges the metrics
into ``<outdir>/summary.json`` and prints which checkpoint it scores (a
workdir's best step and metric) and a markdown table. Errors are one
``error: ...`` line (:mod:`kdjax.cli`). The library is
:mod:`kdjax.evaluation`::

  from kdjax import evaluation
  result = evaluation.evaluate(model, tokenizer, eos_id, source, seeds=(10,))
"""

from absl import flags
from ml_collections import config_flags

from kdjax import cli
from kdjax.evaluation import DATASETS, run


def _define_flags() -> None:
  """Defined only when run as a script: importing this module defines none."""
  config_flags.DEFINE_config_file(
      "config", None, "Experiment config file.", lock_config=True
  )
  flags.DEFINE_string(
      "checkpoint", None, "HF model dir or training workdir.", required=True
  )
  flags.DEFINE_string(
      "datasets",
      None,
      "Comma-separated dataset names "
      f"({', '.join(DATASETS)}, or *.jsonl); default: "
      "config.eval.datasets.",
  )
  flags.DEFINE_string(
      "seeds",
      None,
      "Comma-separated sampling seeds; " "default: config.eval.seeds.",
  )
  flags.DEFINE_integer("limit", None, "Evaluate the first N examples only.")
  flags.DEFINE_string("outdir", None, "Output dir; default <checkpoint>/eval.")
  flags.DEFINE_string("manual_dir", None, "Dir with the eval JSONL files.")


def main(argv: list[str]) -> int:
  f = flags.FLAGS
  if len(argv) > 1:
    raise cli.UsageError(
        f"unexpected arguments {argv[1:]}; every input is a " "--flag=value."
    )
  if f.config is None:
    raise cli.UsageError(
        "--config is required, e.g. " "--config=configs/akl_gpt2.py."
    )
  run(
      f.config,
      f.checkpoint,
      datasets=f.datasets,
      seeds=f.seeds,
      limit=f.limit,
      outdir=f.outdir,
      manual_dir=f.manual_dir,
  )
  return 0


if __name__ == "__main__":
  _define_flags()
  cli.run(main)
