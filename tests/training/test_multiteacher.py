"""Several teachers in the trainer: two copies of one teacher take that
teacher's step, and the logged KD term is FKL to the teachers mixed by hand
in float64 (docs/beyond_logits.md, "Several teachers")."""

import os

import numpy as np
import pytest
from scipy import special

from kdjax import models
from kdjax.cache import build as cache_build
from kdjax.config import checks
import reference_np as ref
import tiny_run

# Unequal prior weights, teacher.path first; both tests use them, so both
# build the same program.
WEIGHTS = "1,2"


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  return str(tmp_path_factory.mktemp("multiteacher"))


def _config(root, others):
  return tiny_run.config(
      "multiteacher_gpt2",
      root,
      **{"teacher.others": others, "teacher.weights": WEIGHTS},
  )


def _other_teacher(root) -> str:
  """A second random teacher of the first one's shape."""
  directory = os.path.join(root, "other")
  if not os.path.exists(os.path.join(directory, "config.json")):
    models.save_hf(tiny_run.gpt2(2, **tiny_run.TEACHER), directory)
  return directory


def test_two_copies_of_the_teacher_take_the_one_teacher_step(root):
  one = tiny_run.config("fkl_gpt2", root)
  ga, ma = tiny_run.first_grads(*tiny_run.built(one, root))
  two = _config(root, one.teacher.path)
  run, mesh = tiny_run.built(two, root)
  assert len(run.teacher.members) == 2 and run.teacher.combine == "confidence"
  gb, mb = tiny_run.first_grads(run, mesh)
  for k in ("loss", "ce", "kd", "tokens"):
    assert mb[k] == pytest.approx(ma[k], rel=1e-5), k
  scale = max(np.abs(g).max() for g in ga.values())
  for k in ga:
    np.testing.assert_allclose(
        gb[k], ga[k], rtol=1e-4, atol=1e-5 * scale, err_msg=k
    )


def _fkl_to_mixture(z_KxBxTxV, prior_K, s_BxTxV, labels_BxT, mask_BxT, rule):
  """Masked-mean KL(p_mix ‖ q) in float64, ``w_k ∝ π_k`` or ``π_k p_k(y)``."""
  p_KxBxTxV = np.exp(ref.log_softmax(z_KxBxTxV))
  w_KxBxT = np.broadcast_to(prior_K[:, None, None], p_KxBxTxV.shape[:-1])
  if rule == "confidence":
    py_KxBxT = np.take_along_axis(
        p_KxBxTxV, labels_BxT[None, ..., None], axis=-1
    )[..., 0]
    w_KxBxT = w_KxBxT * py_KxBxT
  w_KxBxT = w_KxBxT / w_KxBxT.sum(0)
  p_mix_BxTxV = np.einsum("kbt,kbtv->btv", w_KxBxT, p_KxBxTxV)
  log_q_BxTxV = ref.log_softmax(s_BxTxV)
  kl_BxT = np.sum(p_mix_BxTxV * (np.log(p_mix_BxTxV) - log_q_BxTxV), -1)
  return np.sum(kl_BxT * mask_BxT) / np.sum(mask_BxT)


def test_logged_kd_is_fkl_to_the_hand_mixed_teachers(root):
  c = _config(root, _other_teacher(root))
  run, mesh = tiny_run.built(c, root)
  _, m = tiny_run.first_grads(run, mesh)
  batch = run.train_data.dataset[0]
  inputs = (batch["input_ids"], batch["positions"], batch["attention_mask"])
  teachers = [models.load(p) for p in (c.teacher.path, _other_teacher(root))]
  z_KxBxTxV = np.stack([np.asarray(t(*inputs), np.float64) for t in teachers])
  s_BxTxV = np.asarray(run.student(*inputs), np.float64)
  args = (
      z_KxBxTxV,
      np.array([1.0, 2.0]),
      s_BxTxV,
      batch["labels"],
      batch["loss_mask"],
  )
  want = _fkl_to_mixture(*args, "confidence")
  assert m["kd"] == pytest.approx(want, rel=2e-5)
  # The rule matters at this tolerance: fixed weights give another value.
  assert abs(_fkl_to_mixture(*args, "fixed") - want) > 1e-3 * want
  # And the CE term is the student's own.
  log_q = special.log_softmax(s_BxTxV, -1)
  nll = -np.take_along_axis(log_q, batch["labels"][..., None], -1)[..., 0]
  mask = batch["loss_mask"]
  assert m["ce"] == pytest.approx(np.sum(nll * mask) / np.sum(mask), rel=2e-5)


def test_the_teacher_cache_refuses_several_teachers(root, tmp_path):
  c = _config(root, "preset:tiny-gpt2")
  with pytest.raises(checks.ConfigError) as e:
    cache_build.build(c, str(tmp_path / "cache"))
  assert str(e.value) == (
      "teacher.others='preset:tiny-gpt2' is set but a teacher cache holds "
      "one teacher's distributions; cache a config with one teacher "
      "(--config.teacher.others='')."
  )
  assert not os.path.exists(tmp_path / "cache")
