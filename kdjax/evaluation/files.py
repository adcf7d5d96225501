"""Where an evaluation reads its model and writes its results.

``<outdir>/<dataset>.jsonl`` holds one line per example (prompt, references,
responses and scores per seed); ``<outdir>/summary.json`` maps each dataset
to its metrics; :func:`markdown_table` renders those metrics.
"""

from __future__ import annotations

import json
from typing import Any, Mapping

from kdjax import fs
from kdjax.evaluation.harness import Result
from kdjax.evaluation.scoring import METRICS


def write(result: Result, outdir: str, dataset_name: str) -> str:
  """Writes ``<outdir>/<dataset>.jsonl`` and merges the metrics into
  ``<outdir>/summary.json``; returns the JSONL path."""
  out = fs.path(outdir)
  out.mkdir(parents=True, exist_ok=True)
  path = out / f"{dataset_name}.jsonl"
  path.write_text(
      "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in result.rows)
  )
  summary_path = out / "summary.json"
  summary = (
      json.loads(summary_path.read_text()) if summary_path.exists() else {}
  )
  summary[dataset_name] = result.metrics
  # A reader never sees half a file.
  fs.write_text_atomic(
      summary_path, json.dumps(summary, indent=2, sort_keys=True)
  )
  return str(path)


def markdown_table(summaries: Mapping[str, Mapping[str, Any]]) -> str:
  """One row per dataset: examples, seeds and mean ± std of each metric."""
  lines = [
      "| dataset | examples | seeds | ROUGE-L | EM | validity |",
      "|---|---|---|---|---|---|",
  ]
  for name, m in summaries.items():
    cells = [
        f"{m[k]:.2f} ± {m[k + '_std']:.2f}" if k in m else "–" for k in METRICS
    ]
    lines.append(
        f"| {name} | {m['num_examples']} | {len(m['seeds'])} | "
        + " | ".join(cells)
        + " |"
    )
  return "\n".join(lines)


def resolve_checkpoint(path: str) -> tuple[str, str]:
  """``(hf_dir, default_outdir)`` for a HF model dir or a training workdir.

  A workdir's model is ``best_hf`` if the trainer exported one, else ``hf``;
  outputs default to ``<workdir or model dir>/eval``.
  """
  root = fs.path(path)
  if not root.is_dir():
    raise FileNotFoundError(
        f"checkpoint {path} does not exist; pass a HF "
        "model directory or a training workdir."
    )
  # A workdir also holds a config.json (the trainer's), so its exports win.
  for hf_dir in (root / "best_hf", root / "hf", root):
    if (hf_dir / "model.safetensors.index.json").exists() or (
        hf_dir / "model.safetensors"
    ).exists():
      return str(hf_dir), str(root / "eval")
  raise FileNotFoundError(
      f"checkpoint {path} has no safetensors model, best_hf/ or hf/; pass a HF "
      "model directory or a workdir the trainer exported to."
  )


def describe_checkpoint(hf_dir: str) -> str:
  """Which student ``hf_dir`` is, from its workdir's records, in one line.

  ``.../best_hf``: the best step and its metric (``best.json``); ``.../hf``:
  the final step (``summary.json``); anything else: the directory itself.
  """
  d = fs.path(hf_dir)
  best, summary = d.parent / "best.json", d.parent / "summary.json"
  if d.name == "best_hf" and best.exists():
    r = json.loads(best.read_text())
    what = f"best checkpoint: step {r['step']}"
    if "metric" in r:
      what += f", {r['metric']} {r['value']:.4f}"
    return f"{hf_dir} ({what})"
  if d.name == "hf" and summary.exists():
    steps = json.loads(summary.read_text()).get("steps")
    return f"{hf_dir} (final checkpoint: step {steps})"
  return hf_dir
