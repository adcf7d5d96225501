"""The SeqKD training set: the teacher's responses to the training prompts.

Sequence-level KD (Kim & Rush 2016) trains the student with plain CE on
``(prompt, teacher response)`` pairs. The responses are generated once and
cached as ``<cache_dir>/train.jsonl`` (``{"prompt", "output"}`` per line, the
prompt already templated); later runs, and resumptions, read the cache.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Iterable, Mapping

from kdjax.data import sources

Responses = Iterable[Mapping[str, Any]]


def cache_path(cache_dir: str) -> str:
  """The cached responses of a run (``<cache_dir>/train.jsonl``)."""
  return os.path.join(cache_dir, "train.jsonl")


def write(rows: Responses, path: str) -> None:
  """Writes ``{"prompt", "output": response}`` lines, atomically."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path + ".tmp", "w") as f:
    for r in rows:
      f.write(json.dumps({"prompt": r["prompt"], "output": r["response"]})
              + "\n")
  os.replace(path + ".tmp", path)


def train_source(cache_dir: str, respond: Callable[[], Responses]) -> Any:
  """The SeqKD training source, generating it first if it is not cached.

  Args:
    cache_dir: where the responses (and their TFDS build) are kept.
    respond: returns ``[{"prompt", "response"}]`` for every training prompt
      (e.g. ``kdjax.evaluation.generate_responses`` of the teacher); called
      only when the cache is missing.
  """
  path = cache_path(cache_dir)
  if not os.path.exists(path):
    write(respond(), path)
  return sources.load_source("instruct_jsonl/seqkd_train", "test",
                             os.path.join(cache_dir, "tfds"), path=path)
