"""Token alignment between two tokenisations of one text, on the host (NumPy).

Two tokenizers cut the same UTF-8 bytes into tokens; token ``i`` of a side
covers the bytes up to its *end offset* ``e_i`` (non-decreasing). A *group*
closes at every offset where both sides end a token
(``np.intersect1d`` of the two end-offset arrays): between two consecutive
common offsets each side holds one or more tokens spelling the same bytes
(docs/cross_tokenizer.md, "Alignment").

Only groups of one token on each side are paired (a 1:1 group): the two
tokens spell the same bytes after the same prefix, so the two models'
next-token distributions at that point predict the same text. A group with
several tokens on a side (a student token spanning two teacher tokens, or the
reverse, a special token one side splits into pieces) is masked out, as is
the tail after the last common offset (one side truncated).

A token is predicted by the logit row *before* it: row ``r`` of a training row
holds the distribution of label ``r``, the token at ``r + 1``
(:func:`kdjax.data.pipeline.train_row`). So a pair of tokens ``(i, k)`` pairs
student row ``i − 1`` with teacher row ``k − 1``, both of which have read
exactly the bytes before the group. :func:`paired_rows` returns that pairing
as fixed-shape arrays over the student's rows.
"""

from __future__ import annotations

import numpy as np


def _check_ends(ends: np.ndarray, side: str) -> np.ndarray:
  ends = np.asarray(ends, np.int64)
  if ends.ndim != 1 or np.any(np.diff(ends) < 0):
    raise ValueError(
        f"{side} end offsets must be a 1-D non-decreasing array of byte "
        "offsets (token i ends at byte ends[i]); pass cumulative token "
        "byte lengths."
    )
  return ends


def _groups(ends: np.ndarray, common: np.ndarray) -> np.ndarray:
  """Each token's group: the first common offset at or after its end.

  ``len(common)`` for tokens after the last common offset (no group).
  A run of tokens with equal ends (a zero-width token) falls into one group.
  """
  return np.searchsorted(common, ends, side="left")


def pair_tokens(
    student_ends_S: np.ndarray, teacher_ends_K: np.ndarray
) -> np.ndarray:
  """For each student token, the teacher token of its 1:1 group, else -1.

  Args:
    student_ends_S: byte end offset of each student token (non-decreasing).
    teacher_ends_K: the same for the teacher's tokens of the same bytes.

  Returns:
    ``partner_S`` (int64): ``k`` where student token ``i`` and teacher token
    ``k`` form a group alone (same bytes after the same prefix), -1 where
    the student token's group holds more than one token on some side or
    does not close on both sides.
  """
  s = _check_ends(student_ends_S, "student")
  t = _check_ends(teacher_ends_K, "teacher")
  common = np.intersect1d(s, t)
  n = len(common)
  group_s, group_t = _groups(s, common), _groups(t, common)
  size_s = np.bincount(group_s, minlength=n + 1)
  size_t = np.bincount(group_t, minlength=n + 1)
  one_to_one = (size_s == 1) & (size_t == 1)
  one_to_one[n] = False  # the open tail: no common end closes it
  # A 1:1 group's teacher token is the first (only) one with that group.
  first_t = np.searchsorted(group_t, np.arange(n + 1), side="left")
  return np.where(one_to_one[group_s], first_t[group_s], -1)


def paired_rows(
    student_ends_S: np.ndarray,
    teacher_ends_K: np.ndarray,
    *,
    length: int,
    teacher_length: int,
) -> tuple[np.ndarray, np.ndarray]:
  """The teacher logit row paired with each student logit row, and a mask.

  Student row ``r`` predicts student token ``r + 1``; when that token forms
  a 1:1 group with teacher token ``k`` (:func:`pair_tokens`), the teacher row
  predicting it is ``k − 1``. Rows are those of training rows of ``length``
  (student) and ``teacher_length`` (teacher) positions: token ``i`` is
  predicted by row ``i − 1 < length``.

  Returns:
    ``(teacher_row_L, paired_L)``: int32 teacher row for each of the
    ``length`` student rows (0 where unpaired, a valid gather index) and
    float32 1 where the row is paired, 0 elsewhere (no partner, the first
    token, which no row predicts, and padding).
  """
  partner_S = pair_tokens(student_ends_S, teacher_ends_K)
  rows = np.arange(1, len(partner_S)) - 1  # row i - 1 predicts token i
  partner = partner_S[1:]
  ok = (partner >= 1) & (rows < length) & (partner - 1 < teacher_length)
  teacher_row_L = np.zeros(length, np.int32)
  paired_L = np.zeros(length, np.float32)
  teacher_row_L[rows[ok]] = partner[ok] - 1
  paired_L[rows[ok]] = 1.0
  return teacher_row_L, paired_L
