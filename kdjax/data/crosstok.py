"""A teacher with its own tokenizer: its token rows and the alignment.

The student's training rows come from :mod:`kdjax.data.pipeline`. For a
teacher whose tokenizer differs, each example's student tokens are spelled
back into their UTF-8 bytes, the teacher tokenizer cuts the same text, and
:mod:`kdjax.data.alignment` pairs the two sides' logit rows
(docs/cross_tokenizer.md). The teacher reads exactly the student's text,
template markup included, as plain text of its own tokens.

Byte offsets come from the vocabularies, not from the tokenizers' character
offsets: each id's bytes (:func:`token_bytes`) are known once per tokenizer,
so an example's end offsets are a cumulative sum of a table lookup, exact
where a token holds part of a multi-byte character.

:func:`matched_vocab` pairs the entries of two vocabularies that spell the
same bytes (GOLD's matched set, :func:`kdjax.divergences.gold`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from typing import Callable, Mapping, Sequence

import numpy as np

from kdjax.data import alignment
from kdjax.data import tokenizer as tokenizer_lib

# SentencePiece's word-boundary marker and byte-fallback tokens.
_SPACE_MARK = "\u2581"
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _byte_of_symbol() -> dict[str, int]:
  """GPT-2's byte-level symbol -> byte (the inverse of its table)."""
  symbols = tokenizer_lib._bytes_to_symbols()  # pylint: disable=protected-access
  return {s: b for b, s in enumerate(symbols)}


def _decoder_type(tokenizer) -> str:
  decoder = json.loads(tokenizer.to_str()).get("decoder") or {}
  return decoder.get("type", "")


def token_bytes(tokenizer) -> list[bytes]:
  """The UTF-8 bytes each id of ``tokenizer`` spells, indexed by id.

  Byte-level BPE (GPT-2, Qwen, Llama 3, kdjax's ``byte`` tokenizer): each
  symbol of a token is one byte through GPT-2's table (``Ġ`` is a space).
  Otherwise SentencePiece's conventions: ``▁`` is a space and ``<0xNN>`` the
  byte ``NN``. Added (special) tokens spell their content. Ids the
  vocabulary skips spell ``b""``.
  """
  added = {
      i: t.content.encode()
      for i, t in tokenizer.get_added_tokens_decoder().items()
  }
  size = tokenizer.get_vocab_size(with_added_tokens=True)
  size = max([size, *(i + 1 for i in added)])
  byte_level = _decoder_type(tokenizer) == "ByteLevel"
  table = _byte_of_symbol() if byte_level else None
  out = []
  for i in range(size):
    if i in added:
      out.append(added[i])
      continue
    token = tokenizer.id_to_token(i)
    if token is None:
      out.append(b"")
    elif byte_level:
      out.append(bytes(table[c] for c in token))
    elif _BYTE_FALLBACK.fullmatch(token):
      out.append(bytes([int(token[3:5], 16)]))
    else:
      out.append(token.replace(_SPACE_MARK, " ").encode())
  return out


@dataclasses.dataclass(frozen=True)
class Spelling:
  """A tokenizer's bytes per id: ``pieces[i]`` and ``lengths_V[i]``."""

  pieces: tuple[bytes, ...]
  lengths_V: np.ndarray

  @classmethod
  def of(cls, tokenizer) -> Spelling:
    pieces = tuple(token_bytes(tokenizer))
    return cls(pieces, np.asarray([len(p) for p in pieces], np.int64))

  def text(self, ids: Sequence[int]) -> bytes:
    return b"".join(self.pieces[i] for i in ids)

  def ends(
      self, ids: np.ndarray, zero_width: np.ndarray | None = None
  ) -> np.ndarray:
    """Each token's byte end offset: the cumulative byte lengths.

    Tokens where ``zero_width`` is true (those a tokenizer's post-processor
    adds, such as a BOS) spell nothing of the text.
    """
    lengths = self.lengths_V[np.asarray(ids, np.int64)]
    if zero_width is not None:
      lengths = np.where(zero_width, 0, lengths)
    return np.cumsum(lengths)


def matched_vocab(
    student_tokenizer, teacher_tokenizer
) -> tuple[np.ndarray, np.ndarray]:
  """Vocabulary entries of the two tokenizers that spell the same bytes.

  ``(student_ids_M, teacher_ids_M)``, int32, ordered by student id: student
  entry ``student_ids_M[m]`` and teacher entry ``teacher_ids_M[m]`` decode
  to the same non-empty byte string. Space markers are read as the space
  they stand for (:func:`token_bytes`), so GPT-2's ``Ġx`` matches
  SentencePiece's ``▁x``. Where one vocabulary spells a string with
  several ids, its lowest id is taken, so the pairs are one-to-one.
  """
  teacher = {}
  for i, piece in enumerate(token_bytes(teacher_tokenizer)):
    if piece:
      teacher.setdefault(piece, i)
  seen, pairs = set(), []
  for i, piece in enumerate(token_bytes(student_tokenizer)):
    if piece in teacher and piece not in seen:
      seen.add(piece)
      pairs.append((i, teacher[piece]))
  pairs_Mx2 = np.asarray(pairs, np.int32).reshape(-1, 2)
  return pairs_Mx2[:, 0], pairs_Mx2[:, 1]


def _encode_all(tokenizer, texts: Sequence[str]):
  """Each text's ids and which of them the post-processor added (a BOS),
  as the tokenizer encodes by default (with its special tokens)."""
  encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
  return [
      (np.asarray(e.ids, np.int32), np.asarray(e.special_tokens_mask, bool))
      for e in encode(list(texts), add_special_tokens=True)
  ]


@dataclasses.dataclass(frozen=True)
class TeacherTokens:
  """The teacher's tokenizer as the data pipeline needs it.

  Attributes:
    tokenizer: the teacher's tokenizer.
    eos_id: its EOS, appended where the student's row ends with its own.
    max_length: tokens per teacher row (``teacher.max_length``).
  """

  tokenizer: tokenizer_lib.Tokenizer
  eos_id: int
  max_length: int

  @functools.cached_property
  def spelling(self) -> Spelling:
    return Spelling.of(self.tokenizer)


def teacher_row(ids: np.ndarray, *, max_length: int, eos_id: int):
  """The teacher's ``input_ids``, ``attention_mask``, ``positions`` of one
  row, laid out as :func:`kdjax.data.pipeline.train_row` lays out the
  student's: inputs ``ids[:-1]`` right-padded with EOS."""
  n = len(ids)
  row = {
      "teacher_input_ids": np.full(max_length, eos_id, np.int32),
      "teacher_attention_mask": np.zeros(max_length, np.int32),
      "teacher_positions": np.arange(max_length, dtype=np.int32),
  }
  row["teacher_input_ids"][: n - 1] = ids[:-1]
  row["teacher_attention_mask"][: n - 1] = 1
  return row


def aligned_rows(
    student_ids_list: Sequence[np.ndarray],
    student_spelling: Spelling,
    student_eos_id: int,
    teacher: TeacherTokens,
    max_length: int,
) -> list[dict[str, np.ndarray]]:
  """The teacher fields of each example's row (batch keys of the step).

  The student's text is its tokens' bytes, without its final EOS; the
  teacher tokenises it as its tokenizer does by default (a BOS its
  post-processor adds spells no bytes) and appends its own EOS where the
  student had one. Each side's EOS counts as one byte after the text, so the
  two EOS tokens form a group of their own. Text that does not decode as
  UTF-8 (a truncation inside a character) loses the broken bytes.
  """
  texts, ended = [], []
  for ids in student_ids_list:
    ends_eos = len(ids) > 0 and int(ids[-1]) == student_eos_id
    ended.append(ends_eos)
    body = ids[:-1] if ends_eos else ids
    texts.append(student_spelling.text(body).decode("utf-8", errors="ignore"))
  out = []
  encoded = _encode_all(teacher.tokenizer, texts)
  for ids, text, ends_eos, (t_ids, added) in zip(
      student_ids_list, texts, ended, encoded
  ):
    if teacher.spelling.ends(t_ids, added)[-1:].sum() != len(text.encode()):
      raise ValueError(
          "the teacher tokenizer's tokens do not spell the text they encode "
          "back; cross-tokenizer alignment needs tokenizers whose tokens "
          "concatenate to the text (byte-level BPE or the byte tokenizer)."
      )
    t_ids = np.append(t_ids, [teacher.eos_id] * ends_eos).astype(np.int32)
    added = np.append(added, [False] * ends_eos)
    t_eos = ends_eos and len(t_ids) <= teacher.max_length
    t_ids, added = t_ids[: teacher.max_length], added[: teacher.max_length]
    row = teacher_row(
        t_ids, max_length=teacher.max_length, eos_id=teacher.eos_id
    )
    row["teacher_row"], row["aligned_mask"] = alignment.paired_rows(
        _ends(student_spelling.ends(ids), ends_eos),
        _ends(teacher.spelling.ends(t_ids, added), t_eos),
        length=max_length,
        teacher_length=teacher.max_length,
    )
    out.append(row)
  return out


def _ends(ends: np.ndarray, eos_last: bool) -> np.ndarray:
  """Byte end offsets with a final EOS (``eos_last``) ending one byte past
  the text, whatever it spells."""
  if eos_last:
    ends[-1] = (ends[-2] if len(ends) > 1 else 0) + 1
  return ends


def row_fields(
    student_tokenizer, student_eos_id: int, teacher: TeacherTokens
) -> Callable[[Sequence, int], Callable[[int], Mapping[str, np.ndarray]]]:
  """A :data:`kdjax.data.pipeline.RowFields` adding the teacher's fields.

  The fields (:func:`aligned_rows`) of every kept example are computed once,
  when the pipeline binds its examples; example ``i``'s row reads them.
  """
  spelling = Spelling.of(student_tokenizer)

  def bind(examples, max_length: int):
    rows = aligned_rows(
        [e.ids for e in examples], spelling, student_eos_id, teacher, max_length
    )
    return rows.__getitem__

  return bind
