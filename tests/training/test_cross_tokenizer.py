"""A teacher with its own tokenizer: the batch, the objective, a resumed run.

The tiny cross-tokenizer config (a BPE student, a byte-level teacher) shrunk
by tiny_run: the batch's alignment against the two tokenizers' spellings,
the objective's sums against float64 NumPy on the same logits, and a GOLD
run stopped and resumed against one run straight through.
"""

from __future__ import annotations

from flax import nnx
import jax
import numpy as np
import pytest

from kdjax import objective, training
from kdjax.data import crosstok
from kdjax.data import tokenizer as tokenizer_lib
import reference_np as ref
import tiny_run

NAME = "uld_xtok_gpt2"


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  return str(tmp_path_factory.mktemp("xtok"))


@pytest.fixture(scope="module", params=["uld", "gold"])
def built(request, root):
  c = tiny_run.config(NAME, root, **{"loss.name": request.param})
  run, mesh = tiny_run.built(c, root)
  return c, run, mesh


def test_paired_rows_predict_the_same_bytes_after_the_same_prefix(built):
  c, run, _ = built
  batch = run.train_data.dataset[0]
  student = crosstok.Spelling.of(run.tokenizer)
  teacher = crosstok.Spelling.of(tokenizer_lib.byte_level())
  paired = batch["loss_mask"] * batch["aligned_mask"]
  assert paired.sum() > 0.3 * batch["loss_mask"].sum()
  for b, r in zip(*np.nonzero(paired)):
    k = int(batch["teacher_row"][b, r])
    s_prefix = student.text(batch["input_ids"][b, : r + 1])
    t_prefix = teacher.text(batch["teacher_input_ids"][b, : k + 1])
    assert s_prefix == t_prefix
    label = int(batch["labels"][b, r])
    t_ids = batch["teacher_input_ids"][b]
    n_t = int(batch["teacher_attention_mask"][b].sum())
    t_label = int(t_ids[k + 1]) if k + 1 < n_t else tokenizer_lib.EOS_ID
    if label == run.eos_id:  # the EOS pair: both sides end here
      assert t_label == tokenizer_lib.EOS_ID
    else:
      assert student.pieces[label] == teacher.pieces[t_label]


def _log_softmax(x):
  return x - np.logaddexp.reduce(x, axis=-1, keepdims=True)


def test_objective_matches_a_numpy_reference(built):
  c, run, mesh = built
  batch = run.train_data.dataset[0]

  # One program for both forwards and the objective (eager ops would each
  # compile their own).
  @nnx.jit
  def forward(student, teacher, batch):
    s = student(batch["input_ids"], batch["positions"], batch["attention_mask"])
    t = teacher(
        batch["teacher_input_ids"],
        batch["teacher_positions"],
        batch["teacher_attention_mask"],
    )
    got = objective.sums(
        c.loss, student, teacher, batch, matched=run.step.matched
    )
    return s, t, got

  with jax.set_mesh(mesh):
    s, t, got = forward(
        run.student, run.teacher, training.put_batch(batch, mesh)
    )
  s, t = np.asarray(s, np.float64), np.asarray(t, np.float64)
  mask = batch["loss_mask"].astype(np.float64)
  kd_mask = mask * batch["aligned_mask"]
  ce = -np.take_along_axis(_log_softmax(s), batch["labels"][..., None], -1)
  want_kd = 0.0
  for b, r in zip(*np.nonzero(kd_mask)):
    t_row = t[b, batch["teacher_row"][b, r]]
    if c.loss.name == "gold":
      want_kd += ref.gold(s[b, r], t_row, *run.step.matched)
    else:
      want_kd += ref.uld(s[b, r], t_row)
  assert float(got.tokens) == mask.sum()
  assert float(got.kd_tokens) == kd_mask.sum()
  assert float(got.ce) == pytest.approx((ce[..., 0] * mask).sum(), rel=1e-5)
  assert float(got.kd) == pytest.approx(want_kd, rel=1e-4)


def test_gold_matches_the_shared_strings(built):
  c, run, _ = built
  if c.loss.name != "gold":
    assert run.step.matched is None
    return
  s_ids, t_ids = run.step.matched
  # Every single byte and EOS spell alike on both sides.
  assert len(s_ids) == tokenizer_lib.VOCAB_SIZE
  student = crosstok.Spelling.of(run.tokenizer)
  teacher = crosstok.Spelling.of(tokenizer_lib.byte_level())
  for i, k in zip(s_ids, t_ids):
    assert student.pieces[i] == teacher.pieces[k]


def test_gold_run_resumes_exactly(root, tmp_path):
  c = tiny_run.config(NAME, root, steps=4, **{"loss.name": "gold"})
  a, b = tiny_run.straight_and_resumed(c, str(tmp_path), stop_at=2)
  for x, y in zip(a, b):
    assert x["loss"] == y["loss"] and x["kd"] == y["kd"] > 0
    assert x["grad_norm"] == y["grad_norm"]
    assert 0 < x["aligned_fraction"] == y["aligned_fraction"] < 1


def test_build_refuses_a_same_vocabulary_loss(root):
  c = tiny_run.config(NAME, root, **{"loss.name": "fkl"})
  with pytest.raises(ValueError, match="not loss.name='fkl'"):
    tiny_run.built(c, root)
