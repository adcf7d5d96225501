"""Strict JSONL reading shared by the file-based builders, and their base
class (:class:`Builder`).

Every malformed line (not UTF-8, not a JSON object, or a record the parser
rejects) is reported with file and line number. By default the
whole file is checked and then the build fails, naming the first bad lines; with
``skip_bad=True`` bad lines are skipped and counted instead. Nothing is dropped
without a count.
"""

from __future__ import annotations

import collections
import json
import os
from typing import Any, Callable

from absl import logging
import tensorflow_datasets as tfds

from kdjax import fs

# A parser turns one decoded JSON object into a record, or raises ValueError
# with a sentence describing what is wrong with it.
Parser = Callable[[dict[str, Any]], dict[str, Any]]

_MAX_REPORTED = 5


class BadLinesError(ValueError):
  """Raised when a JSONL file has malformed lines and skip_bad is False."""


# Named counters: read, kept, bad_line, empty_response.
Counts = collections.Counter


def read_jsonl(
    path: os.PathLike | str,
    parse: Parser,
    *,
    skip_bad: bool = False,
    counts: Counts | None = None,
) -> list[dict[str, Any]]:
  """Reads ``path`` line by line, returning ``parse(obj)`` for each good line.

  Blank lines are ignored. A line that is not a JSON object, or that ``parse``
  rejects with ``ValueError``, is bad. A record whose ``response`` is empty (or
  whose ``references`` are all empty) is dropped and counted as
  ``empty_response``.

  Raises:
    BadLinesError: naming file:line of the first bad lines, unless skip_bad.
  """
  counts = Counts() if counts is None else counts
  records, problems = [], []
  # Bytes, decoded line by line, so text that is not UTF-8 is a bad line
  # with its number rather than an error for the whole file.
  with fs.path(path).open("rb") as f:
    for lineno, raw in enumerate(f, start=1):
      if not raw.strip():
        continue
      counts["read"] += 1
      try:
        line = _decode(raw)
        obj = json.loads(line)
        if not isinstance(obj, dict):
          raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
        record = parse(obj)
      except ValueError as e:  # json.JSONDecodeError is a ValueError
        counts["bad_line"] += 1
        problems.append(f"{path}:{lineno}: {e}")
        continue
      if not record["response"].strip():
        counts["empty_response"] += 1
        continue
      counts["kept"] += 1
      records.append(record)
  if problems:
    shown = "; ".join(problems[:_MAX_REPORTED])
    more = len(problems) - _MAX_REPORTED
    shown += f"; and {more} more" if more > 0 else ""
    if not skip_bad:
      raise BadLinesError(
          f"{len(problems)} malformed line(s) in {path}: {shown}. Fix the file "
          "or build with skip_bad=True (prepare: --skip_bad) to skip and count them."
      )
    logging.warning(
        "Skipped %d malformed line(s) in %s: %s", len(problems), path, shown
    )
  logging.info("Read %s: %s", path, dict(counts))
  return records


def _decode(raw: bytes) -> str:
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise ValueError(
        f"not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1})"
    ) from None


def text_field(obj: dict[str, Any], key: str, *, required: bool = True) -> str:
  """``obj[key]`` as a string ('' if absent and not required)."""
  if key not in obj or obj[key] is None:
    if required:
      raise ValueError(f"missing field {key!r}")
    return ""
  value = obj[key]
  if not isinstance(value, str):
    raise ValueError(
        f"field {key!r} must be a string, got " f"{type(value).__name__}"
    )
  return value


def string_list(value: Any, key: str) -> list[str]:
  """A string or list of strings as a list (for multi-reference outputs)."""
  values = [value] if isinstance(value, str) else value
  if not isinstance(values, list) or not all(
      isinstance(v, str) for v in values
  ):
    raise ValueError(f"field {key!r} must be a string or a list of strings")
  return values


class Builder(tfds.core.GeneratorBasedBuilder):
  """A TFDS builder of records read from a JSONL file, one example each.

  Features: a text field per name in ``TEXT`` and a list of texts per name in
  ``TEXT_LISTS``. ``skip_bad`` as in :func:`read_jsonl`; subclasses read
  their file in ``_split_generators``.
  """

  TEXT: tuple[str, ...] = ()
  TEXT_LISTS: tuple[str, ...] = ()
  HOMEPAGE: str | None = None

  def __init__(self, *, skip_bad: bool = False, **kwargs):
    self._skip_bad = skip_bad
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    text = tfds.features.Text
    features = {name: text() for name in self.TEXT}
    features.update(
        {name: tfds.features.Sequence(text()) for name in self.TEXT_LISTS}
    )
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict(features),
        homepage=self.HOMEPAGE,
        metadata=tfds.core.MetadataDict(),
    )

  def _generate_examples(self, records):
    for i, record in enumerate(records):
      yield i, record
