"""TFDS builder for local instruction JSONL files (the MiniLLM eval sets).

Each line is ``{"prompt": ..., "output": ...}`` or
``{"instruction": ..., "input": ..., "output": ...}``; ``output`` is a string or
a list of reference strings (ROUGE-L takes the max over them). A ``prompt`` that
already starts with the template preamble is kept verbatim; any other ``prompt``
is treated as the instruction. One builder config per named set reads
``<manual_dir>/<name>.jsonl`` (or ``<manual_dir>/<name>/valid.jsonl``, the
layout of MiniLLM's processed data); a config with ``path`` reads that file
(:func:`kdjax.data.sources.builder` names it by the file's content hash).
Everything lands in one split, ``test`` by default.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from absl import logging
import tensorflow_datasets as tfds

from kdjax import fs
from kdjax.data import jsonl, template

# The evaluation sets of docs/evaluation.md "Test sets" (plus Dolly's test split
# as a file).
NAMED_SETS = ("sinst", "vicuna", "sni", "unni", "dolly_test")


def parse(obj: dict[str, Any]) -> dict[str, Any]:
  """One line -> instruction, input, prompt, response, references."""
  if "output" not in obj:
    raise ValueError("missing field 'output'")
  references = [
      r for r in jsonl.string_list(obj["output"], "output") if r.strip()
  ]
  if "instruction" in obj:
    instruction = jsonl.text_field(obj, "instruction")
    prompt = jsonl.text_field(obj, "prompt", required=False)
  elif "prompt" in obj:
    prompt = jsonl.text_field(obj, "prompt")
    instruction = "" if template.is_templated(prompt) else prompt
  else:
    raise ValueError("needs an 'instruction' or a 'prompt' field")
  if not template.is_templated(prompt):
    prompt = ""  # not a full prompt: the pipeline applies the template
  return {
      "instruction": instruction,
      "input": jsonl.text_field(obj, "input", required=False),
      "prompt": prompt,
      "response": references[0] if references else "",
      "references": references,
  }


def check_file(
    path, *, skip_bad: bool = False, counts: jsonl.Counts | None = None
) -> list[dict[str, Any]]:
  """The records of ``path``; one sentence if it is malformed or has none."""
  counts = jsonl.Counts() if counts is None else counts
  records = jsonl.read_jsonl(path, parse, skip_bad=skip_bad, counts=counts)
  if not records:
    seen = dict(counts) or "no lines"
    raise ValueError(
        f"{os.fspath(path)} has no usable example ({seen}); put one JSON "
        "object with a non-empty output per line (prompt/output or "
        "instruction/input/output)."
    )
  return records


@dataclasses.dataclass(kw_only=True)
class InstructJsonlConfig(tfds.core.BuilderConfig):
  """``path``: an explicit file; otherwise ``<manual_dir>/<name>.jsonl``."""

  path: str | None = None
  split: str = "test"


class InstructJsonl(jsonl.Builder):
  """Local instruction-following JSONL with one or more references."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "prompt/output and instruction/input/output lines."}
  BUILDER_CONFIGS = [
      InstructJsonlConfig(name=n, description=f"MiniLLM eval set {n}")
      for n in NAMED_SETS
  ]
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Put <name>.jsonl (or <name>/valid.jsonl as in MiniLLM's processed data) "
      f"in manual_dir for name in {NAMED_SETS}, or give a config with path=."
  )

  TEXT = ("instruction", "input", "prompt", "response")
  TEXT_LISTS = ("references",)

  def _split_generators(self, dl_manager):
    path = self._find_file(dl_manager)
    counts = jsonl.Counts()
    records = check_file(path, skip_bad=self._skip_bad, counts=counts)
    self.info.metadata.update(counts=dict(counts), source=os.fspath(path))
    logging.info(
        "instruct_jsonl/%s: %s", self.builder_config.name, dict(counts)
    )
    return {self.builder_config.split: self._generate_examples(records)}

  def _find_file(self, dl_manager):
    config = self.builder_config
    if config.path:
      if not fs.path(config.path).exists():
        raise FileNotFoundError(
            f"instruct_jsonl path {config.path} does not "
            "exist; pass an existing JSONL file."
        )
      return config.path
    candidates = [
        dl_manager.manual_dir / f"{config.name}.jsonl",
        dl_manager.manual_dir / config.name / "valid.jsonl",
    ]
    for path in candidates:
      if path.exists():
        return path
    raise FileNotFoundError(
        f"instruct_jsonl/{config.name}: none of {[str(p) for p in candidates]} "
        "exists; put the file there or give the config a path."
    )
