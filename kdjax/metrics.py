"""Run metrics: JSON lines in ``workdir/metrics.jsonl`` and TensorBoard events.

Only process 0 writes; other processes get a writer that does nothing. The
TensorBoard writer is tensorboardX, which needs no TensorFlow.
"""

from __future__ import annotations

import json
import math
import os
from typing import Mapping


class Writer:
  """Appends ``{"step": s, **scalars}`` lines and mirrors them to TensorBoard."""

  def __init__(self, workdir: str, *, enabled: bool = True):
    self.enabled = enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if enabled:
      import tensorboardX  # pylint: disable=g-import-not-at-top
      self._tb = tensorboardX.SummaryWriter(os.path.join(workdir, "tb"))

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    row = {"step": int(step)}
    for k, v in scalars.items():
      v = float(v)
      row[k] = v if math.isfinite(v) else str(v)
      self._tb.add_scalar(k, v, int(step))
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")

  def truncate(self, after_step: int) -> None:
    """Drops rows past ``after_step``: a resumed run rewrites them."""
    if not self.enabled or not os.path.exists(self.path):
      return
    rows = [r for r in read(os.path.dirname(self.path))
            if r["step"] <= after_step]
    tmp = self.path + ".tmp"
    with open(tmp, "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in rows)
    os.replace(tmp, self.path)

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def read(workdir: str) -> list[dict]:
  """Every row of ``workdir/metrics.jsonl`` (empty if there is none)."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  rows = []
  with open(path) as f:
    for line in f:
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError:  # a line cut short by a kill mid-append
        continue
  return rows
