"""Where an evaluation reads its model and writes its results.

``<outdir>/<dataset>.jsonl`` holds one line per example (prompt, references,
responses and scores per seed); ``<outdir>/summary.json`` maps each dataset
to its metrics; :func:`markdown_table` renders those metrics.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

from kdjax.evaluation.harness import Result
from kdjax.evaluation.scoring import METRICS


def write(result: Result, outdir: str, dataset_name: str) -> str:
  """Writes ``<outdir>/<dataset>.jsonl`` and merges the metrics into
  ``<outdir>/summary.json``; returns the JSONL path."""
  os.makedirs(outdir, exist_ok=True)
  path = os.path.join(outdir, f"{dataset_name}.jsonl")
  with open(path, "w") as f:
    for row in result.rows:
      f.write(json.dumps(row, ensure_ascii=False) + "\n")
  summary_path = os.path.join(outdir, "summary.json")
  summary = {}
  if os.path.exists(summary_path):
    with open(summary_path) as f:
      summary = json.load(f)
  summary[dataset_name] = result.metrics
  tmp = summary_path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(summary, f, indent=2, sort_keys=True)
  os.replace(tmp, summary_path)  # a reader never sees half a file
  return path


def markdown_table(summaries: Mapping[str, Mapping[str, Any]]) -> str:
  """One row per dataset: examples, seeds and mean ± std of each metric."""
  lines = ["| dataset | examples | seeds | ROUGE-L | EM | validity |",
           "|---|---|---|---|---|---|"]
  for name, m in summaries.items():
    cells = [f"{m[k]:.2f} ± {m[k + '_std']:.2f}" if k in m else "–"
             for k in METRICS]
    lines.append(f"| {name} | {m['num_examples']} | {len(m['seeds'])} | "
                 + " | ".join(cells) + " |")
  return "\n".join(lines)


def resolve_checkpoint(path: str) -> tuple[str, str]:
  """``(hf_dir, default_outdir)`` for a HF model dir or a training workdir.

  A workdir's model is ``best_hf`` if the trainer exported one, else ``hf``;
  outputs default to ``<workdir or model dir>/eval``.
  """
  path = os.path.expanduser(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"checkpoint {path} does not exist; pass a HF "
                            "model directory or a training workdir.")
  # A workdir also holds a config.json (the trainer's), so its exports win.
  for hf_dir in (os.path.join(path, "best_hf"), os.path.join(path, "hf"),
                 path):
    if os.path.exists(os.path.join(hf_dir, "model.safetensors.index.json")) or (
        os.path.exists(os.path.join(hf_dir, "model.safetensors"))):
      return hf_dir, os.path.join(path, "eval")
  raise FileNotFoundError(
      f"checkpoint {path} has no safetensors model, best_hf/ or hf/; pass a HF "
      "model directory or a workdir the trainer exported to.")
