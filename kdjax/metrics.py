"""Run metrics: JSON lines in ``workdir/metrics.jsonl`` and TensorBoard events.

Only process 0 writes; other processes get a writer that does nothing. The
TensorBoard writer is tensorboardX, which needs no TensorFlow. Paths go
through :mod:`kdjax.fs`, so the workdir may be remote (``gs://...``).
"""

from __future__ import annotations

import json
import math
import os
from typing import Mapping

from kdjax import fs


class Writer:
  """Appends ``{"step": s, **scalars}`` lines and mirrors them to TensorBoard."""

  def __init__(self, workdir: fs.PathLike, *, enabled: bool = True,
               tensorboard: bool = True):
    self.enabled = enabled
    self.workdir = fs.path(workdir)
    self.path = self.workdir / "metrics.jsonl"
    self._tb = None
    if enabled:
      self.workdir.mkdir(parents=True, exist_ok=True)
    if enabled and tensorboard:
      import tensorboardX  # pylint: disable=g-import-not-at-top
      # tensorboardX writes gs:// and s3:// itself; never via os.path.
      self._tb = tensorboardX.SummaryWriter(os.fspath(self.workdir / "tb"))

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
    fs.write_text_atomic(self.path,
                         "".join(json.dumps(r) + "\n" for r in rows))

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
