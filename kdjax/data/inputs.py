"""A run's examples from its :class:`~kdjax.config.spec.DataSpec`.

``data.name`` is a registered dataset (``dolly``, ``synthetic_instruct``,
``instruct_jsonl/<name>``) or the path of one ``.jsonl`` file, which
``instruct_jsonl`` reads whole into its ``test`` split, cached under the
file's content hash (:func:`kdjax.data.sources.file_config_name`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kdjax import fs
from kdjax.data import sources

if TYPE_CHECKING:
  from kdjax.config.spec import DataSpec


def source(data: DataSpec, split: str) -> Any:
  """The random-access source (``len``, ``[i]``) of ``split``."""
  if data.name.endswith(".jsonl"):
    return sources.load_source(
        "instruct_jsonl", "test", data.data_dir, path=fs.local(data.name)
    )
  return sources.load_source(
      data.name, split, data.data_dir, manual_dir=data.manual_dir
  )


def train_source(data: DataSpec) -> Any:
  """The training split, cut to its first ``train_limit`` examples (0: all)."""
  return sources.head(source(data, data.train_split), data.train_limit)
