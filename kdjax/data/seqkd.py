"""The SeqKD training set: the teacher's responses to the training prompts.

Sequence-level KD (Kim & Rush 2016) trains the student with plain CE on
``(prompt, teacher response)`` pairs. The responses are generated once and
cached as ``<cache_dir>/train.jsonl`` (``{"instruction", "input", "prompt",
"output"}`` per line, the prompt as templated at generation); later runs, and
resumptions, read the cache. Training renders the prompt again from
instruction and input (:mod:`kdjax.data.instruct_jsonl` keeps a given prompt
only in the MiniLLM template), so every template, ``chat`` included, trains
on the prompt the teacher answered. The cache lives in the run's workdir,
whose resume identity covers what the responses depend on (teacher, data,
tokenizer, template, lengths).
"""

from __future__ import annotations

import json
from typing import Any, Callable, Iterable, Mapping

from kdjax import fs
from kdjax.data import sources

Responses = Iterable[Mapping[str, Any]]


def cache_path(cache_dir: fs.PathLike) -> str:
  """The cached responses of a run (``<cache_dir>/train.jsonl``)."""
  return str(fs.path(cache_dir) / "train.jsonl")


def _line(row: Mapping[str, Any]) -> str:
  fields = {k: row[k] for k in ("instruction", "input") if k in row}
  fields.update(prompt=row["prompt"], output=row["response"])
  return json.dumps(fields) + "\n"


def write(rows: Responses, path: fs.PathLike) -> None:
  """Writes ``{"instruction", "input", "prompt", "output": response}``
  lines, atomically (instruction and input when the rows have them)."""
  fs.path(path).parent.mkdir(parents=True, exist_ok=True)
  fs.write_text_atomic(path, "".join(_line(r) for r in rows))


def train_source(cache_dir: str, respond: Callable[[], Responses]) -> Any:
  """The SeqKD training source, generating it first if it is not cached.

  Args:
    cache_dir: where the responses (and their TFDS build) are kept.
    respond: returns ``[{"prompt", "response"}]`` for every training prompt
      (e.g. ``kdjax.evaluation.generate_responses`` of the teacher); called
      only when the cache is missing.
  """
  path = cache_path(cache_dir)
  if not fs.path(path).exists():
    write(respond(), path)
  return sources.load_source(
      "instruct_jsonl/seqkd_train",
      "test",
      str(fs.path(cache_dir) / "tfds"),
      path=path,
  )
