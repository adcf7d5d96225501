"""Token alignment across tokenizers (kdjax.data.alignment, .crosstok).

Hand-made end offsets with known pairings, then real tokenizers built here
(kdjax's byte tokenizer and a small byte-level BPE trained on a few
sentences) against a brute-force reference: a student token is paired
exactly when some teacher token covers the same byte span.
"""

from __future__ import annotations

import numpy as np
import pytest
from tokenizers import (
    Tokenizer,
    decoders,
    models,
    pre_tokenizers,
    processors,
    trainers,
)

from kdjax.data import alignment, crosstok
from kdjax.data import tokenizer as tokenizer_lib

EOS = "<|endoftext|>"
SENTENCES = [
    "héllo wörld, the world says héllo",
    "the cat sat on the mat",
    "naïve café owners sat in the café",
] * 4


def small_bpe(extra_special=(), vocab_size=320) -> Tokenizer:
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size,
      special_tokens=[EOS, *extra_special],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      show_progress=False,
  )
  tok.train_from_iterator(SENTENCES, trainer)
  return tok


@pytest.mark.parametrize(
    "student, teacher, want",
    [
        # identical cuts: every token pairs with its twin
        ([2, 5, 9], [2, 5, 9], [0, 1, 2]),
        # student token 1 (bytes 3..5) spans teacher tokens 1 and 2
        ([3, 5, 9], [3, 4, 5, 9], [0, -1, 3]),
        # the reverse: teacher token 0 spans student tokens 0 and 1
        ([2, 4, 6], [4, 6], [-1, -1, 1]),
        # a zero-width teacher token joins its group: 1:2, masked
        ([3, 5], [3, 3, 5], [-1, 2]),
        # teacher truncated after byte 4: the student's tail has no group
        ([2, 4, 7], [2, 4], [0, 1, -1]),
    ],
)
def test_pair_tokens_known_answers(student, teacher, want):
  got = alignment.pair_tokens(np.asarray(student), np.asarray(teacher))
  np.testing.assert_array_equal(got, want)


def test_paired_rows_use_the_row_that_predicts_the_token():
  # Tokens: student [a|bc|d], teacher [a|b|c|d]: student tokens 0 and 2
  # pair with teacher tokens 0 and 3; token 0 has no predicting row.
  row_L, mask_L = alignment.paired_rows(
      np.asarray([1, 3, 4]),
      np.asarray([1, 2, 3, 4]),
      length=5,
      teacher_length=5,
  )
  # student row 1 predicts student token 2 = teacher token 3 (row 2).
  np.testing.assert_array_equal(row_L, [0, 2, 0, 0, 0])
  np.testing.assert_array_equal(mask_L, [0, 1, 0, 0, 0])
  # A teacher row past the teacher's length is not paired.
  _, mask_L = alignment.paired_rows(
      np.asarray([1, 3, 4]),
      np.asarray([1, 2, 3, 4]),
      length=5,
      teacher_length=2,
  )
  np.testing.assert_array_equal(mask_L, 0)


def test_decreasing_offsets_are_refused():
  with pytest.raises(ValueError, match="non-decreasing"):
    alignment.pair_tokens(np.asarray([3, 2]), np.asarray([3]))


def _spans(spelling, ids):
  ends = spelling.ends(ids)
  return list(zip(np.r_[0, ends[:-1]].tolist(), ends.tolist()))


def _reference_pairs(student, teacher):
  """Brute force: student token i pairs with the teacher token of its span."""
  where = {span: k for k, span in enumerate(teacher)}
  return [where.get(span, -1) for span in student]


@pytest.mark.parametrize(
    "text",
    [
        "héllo wörld",  # multi-byte characters, whole in BPE, split in bytes
        "the cat sat on the mat",  # whitespace merged into "Ġcat"
        f"the cat{EOS}sat",  # a special token both sides keep whole
        "naïve café",
    ],
)
@pytest.mark.parametrize("teacher", ["byte", "bpe"])
def test_pairs_match_equal_byte_spans(text, teacher):
  bpe = small_bpe()
  other = (
      tokenizer_lib.byte_level()
      if teacher == "byte"
      else small_bpe(vocab_size=290)
  )
  sides = []
  for tok in (bpe, other):
    ids = np.asarray(tok.encode(text, add_special_tokens=False).ids)
    spelling = crosstok.Spelling.of(tok)
    assert spelling.text(ids) == text.encode()
    sides.append((spelling, ids))
  (s_sp, s_ids), (t_sp, t_ids) = sides
  got = alignment.pair_tokens(s_sp.ends(s_ids), t_sp.ends(t_ids))
  want = _reference_pairs(_spans(s_sp, s_ids), _spans(t_sp, t_ids))
  np.testing.assert_array_equal(got, want)


def test_multibyte_character_split_by_one_side():
  bpe, byte = small_bpe(), tokenizer_lib.byte_level()
  text = "é"
  s_ids = bpe.encode(text, add_special_tokens=False).ids
  assert len(s_ids) == 1  # the BPE merged the two bytes of é
  t_ids = byte.encode(text, add_special_tokens=False).ids
  assert t_ids == list("é".encode())
  s_ends = crosstok.Spelling.of(bpe).ends(s_ids)
  t_ends = crosstok.Spelling.of(byte).ends(t_ids)
  np.testing.assert_array_equal(s_ends, [2])
  np.testing.assert_array_equal(t_ends, [1, 2])
  np.testing.assert_array_equal(alignment.pair_tokens(s_ends, t_ends), [-1])


def test_special_token_one_side_splits_is_masked():
  student = small_bpe(extra_special=["<|im_start|>"])
  teacher = small_bpe()
  text = "<|im_start|>the cat"
  s_ids = student.encode(text, add_special_tokens=False).ids
  t_ids = teacher.encode(text, add_special_tokens=False).ids
  s_sp, t_sp = crosstok.Spelling.of(student), crosstok.Spelling.of(teacher)
  partner = alignment.pair_tokens(s_sp.ends(s_ids), t_sp.ends(t_ids))
  assert partner[0] == -1  # one student token, many teacher pieces
  # "the" and "Ġcat" tokenise alike on both sides after it.
  assert [t_ids[k] for k in partner[1:]] == [
      teacher.token_to_id(student.id_to_token(i)) for i in s_ids[1:]
  ]


def test_token_bytes_reads_space_markers():
  bpe = small_bpe()
  pieces = crosstok.token_bytes(bpe)
  assert pieces[bpe.token_to_id("Ġcat")] == b" cat"
  assert pieces[bpe.token_to_id(EOS)] == EOS.encode()
  sp = Tokenizer(
      models.WordLevel({"\u2581cat": 0, "<0xC3>": 1, "<unk>": 2}, "<unk>")
  )
  assert crosstok.token_bytes(sp)[:2] == [b" cat", b"\xc3"]


def test_matched_vocab_pairs_equal_strings_across_marker_conventions():
  student = small_bpe()
  sp = Tokenizer(
      models.WordLevel({"<unk>": 0, "\u2581cat": 1, "at": 2, "zz": 3}, "<unk>")
  )
  s_ids, t_ids = crosstok.matched_vocab(student, sp)
  got = {student.id_to_token(int(i)): int(k) for i, k in zip(s_ids, t_ids)}
  assert got == {"Ġcat": 1, "at": 2}


@pytest.mark.parametrize("bos", [False, True])
def test_aligned_rows_pair_eos_and_shift_to_predicting_rows(bos):
  bpe, byte = small_bpe(), tokenizer_lib.byte_level()
  eos_s = bpe.token_to_id(EOS)
  text = "the cat"
  s_ids = np.asarray(bpe.encode(text).ids + [eos_s], np.int32)
  assert [bpe.id_to_token(i) for i in s_ids] == ["the", "Ġcat", EOS]
  head = []
  if bos:  # a teacher whose tokenizer adds a BOS, as Llama's do
    byte.add_special_tokens(["<s>"])
    head = [byte.token_to_id("<s>")]
    byte.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", head[0])]
    )
  teacher = crosstok.TeacherTokens(byte, tokenizer_lib.EOS_ID, max_length=12)
  (row,) = crosstok.aligned_rows(
      [s_ids], crosstok.Spelling.of(bpe), eos_s, teacher, max_length=6
  )
  # Teacher tokens: [<s>] t h e ␠ c a t EOS; inputs are all but the last.
  n = len(head) + 7
  want_ids = head + list(b"the cat") + [tokenizer_lib.EOS_ID] * (12 - n)
  np.testing.assert_array_equal(row["teacher_input_ids"], want_ids)
  np.testing.assert_array_equal(
      row["teacher_attention_mask"], [1] * n + [0] * (12 - n)
  )
  # Student row 1 predicts EOS, as the teacher's last input row does;
  # "Ġcat" spans four teacher tokens and "the" is predicted by no row.
  np.testing.assert_array_equal(row["aligned_mask"], [0, 1, 0, 0, 0, 0])
  np.testing.assert_array_equal(row["teacher_row"], [0, n - 1, 0, 0, 0, 0])
