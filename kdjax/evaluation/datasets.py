"""The evaluation sets by name, as random-access sources."""

from __future__ import annotations

import os

from kdjax.data import sources
from kdjax.evaluation.generation import Source

# Named evaluation sets read by instruct_jsonl from manual_dir.
JSONL_SETS = ("sinst", "vicuna", "sni", "unni", "dolly_test")
DATASETS = ("dolly", "synthetic_instruct") + JSONL_SETS


def load_dataset(
    name: str, data_dir: str, manual_dir: str | None = None
) -> tuple[Source, str]:
  """``(source, output name)`` for a dataset name of the ``--datasets`` flag."""
  if name.endswith(".jsonl"):
    path = os.path.expanduser(name)
    return (
        sources.load_source("instruct_jsonl", "test", data_dir, path=path),
        os.path.splitext(os.path.basename(path))[0],
    )
  if name == "dolly":
    return (
        sources.load_source("dolly", "test", data_dir, manual_dir=manual_dir),
        name,
    )
  if name == "synthetic_instruct":
    return sources.load_source("synthetic_instruct", "test", data_dir), name
  if name in JSONL_SETS:
    return (
        sources.load_source(
            f"instruct_jsonl/{name}", "test", data_dir, manual_dir=manual_dir
        ),
        name,
    )
  raise ValueError(
      f"unknown dataset {name!r}; use one of "
      f"{', '.join(DATASETS)} or a path ending in .jsonl."
  )
