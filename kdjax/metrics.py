"""Run metrics: JSON lines in ``workdir/metrics.jsonl`` and TensorBoard events.

Only process 0 writes; other processes get a writer that does nothing. The
TensorBoard writer is tensorboardX, which needs no TensorFlow. Paths go
through :mod:`kdjax.fs`, so the workdir may be remote (``gs://...``).
"""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Any, Mapping

from kdjax import fs


def _tensorboardx():
  """tensorboardX, imported without torch.

  tensorboardX imports torch whenever it is installed, only to accept torch
  tensors as values; kdjax writes floats. Hiding torch for the import keeps
  several seconds of start-up off every run in an environment that has it.
  """
  if "tensorboardX" in sys.modules or "torch" in sys.modules:
    import tensorboardX  # pylint: disable=g-import-not-at-top

    return tensorboardX
  sys.modules["torch"] = None  # makes `import torch` raise ImportError
  try:
    import tensorboardX  # pylint: disable=g-import-not-at-top
  finally:
    del sys.modules["torch"]
  return tensorboardX


class Writer:
  """Appends ``{"step": s, **scalars}`` lines and mirrors them to TensorBoard."""

  def __init__(
      self,
      workdir: fs.PathLike,
      *,
      enabled: bool = True,
      tensorboard: bool = True,
  ):
    self.enabled = enabled
    self.workdir = fs.path(workdir)
    self.path = self.workdir / "metrics.jsonl"
    self._tb = None
    if enabled:
      self.workdir.mkdir(parents=True, exist_ok=True)
    if enabled and tensorboard:
      # tensorboardX writes gs:// and s3:// itself; never via os.path.
      self._tb = _tensorboardx().SummaryWriter(os.fspath(self.workdir / "tb"))

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    row = {"step": int(step)}
    for k, v in scalars.items():
      v = float(v)
      row[k] = v if math.isfinite(v) else str(v)
      if self._tb is not None:
        self._tb.add_scalar(k, v, int(step))
    line = json.dumps(row) + "\n"
    if fs.is_remote(self.path):  # object stores cannot append: rewrite
      old = self.path.read_text() if self.path.exists() else ""
      self.path.write_text(old + line)
    else:
      with self.path.open("a") as f:
        f.write(line)

  def truncate(self, after_step: int) -> None:
    """Drops rows past ``after_step``: a resumed run rewrites them."""
    if not self.enabled or not self.path.exists():
      return
    rows = [r for r in read(self.workdir) if r["step"] <= after_step]
    fs.write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in rows))

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def read(workdir: fs.PathLike) -> list[dict]:
  """Every row of ``workdir/metrics.jsonl`` (empty if there is none)."""
  path = fs.path(workdir) / "metrics.jsonl"
  if not path.exists():
    return []
  rows = []
  with path.open() as f:
    for line in f:
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError:  # a line cut short by a kill mid-append
        continue
  return rows


# ----------------------------------------------------------------------------
# What a run prints: one line per validation, a summary at the end.

_SHOWN = (
    "val_loss",
    "val_ce",
    "val_kd",
    "val_rougeL",
    "val_validity",
    "val_exact_match",
)


def validation_line(
    step: int, num_steps: int, val: Mapping[str, float], best_step: int | None
) -> str:
  """``"validation step 10/30: val_loss 3.9012 val_ce 4.1234 (best: step 10)"``."""
  parts = [f"{k} {val[k]:.4f}" for k in _SHOWN if k in val]
  best = f" (best: step {best_step})" if best_step is not None else ""
  return f"validation step {step}/{num_steps}: {' '.join(parts)}{best}"


def summary(
    workdir: fs.PathLike,
    *,
    steps: int,
    seconds: float,
    best: Mapping[str, Any] | None,
    last: Mapping[str, float],
    exports: Mapping[str, str],
) -> str:
  """The end-of-run summary (several lines) and ``workdir/summary.json``."""
  record = {
      "steps": steps,
      "seconds": round(seconds, 1),
      "best": best,
      "final": {k: last[k] for k in _SHOWN if k in last},
      "exports": dict(exports),
  }
  fs.write_text_atomic(
      fs.path(workdir) / "summary.json", json.dumps(record, indent=2)
  )
  lines = [f"done: {steps} steps in {seconds:.0f} s ({fs.path(workdir)})"]
  final = " ".join(f"{k} {v:.4f}" for k, v in record["final"].items())
  if final:
    lines.append(f"  final: {final}")
  if best:
    lines.append(
        f"  best: step {best['step']} by {best['metric']} = "
        f"{best['value']:.4f}"
    )
  for name, where in exports.items():
    if name.endswith("_adapter"):  # a LoRA run's adapters alone
      lines.append(
          f"  {name.removesuffix('_adapter')} adapters (peft): {where}"
      )
    else:
      lines.append(f"  {name} student (Hugging Face): {where}")
  return "\n".join(lines)
