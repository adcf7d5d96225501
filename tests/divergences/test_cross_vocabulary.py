"""ULD with its own teacher temperature and GOLD's hybrid (kd.uld, kd.gold)
against the float64 references of reference_np, values and gradients."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from kdjax import divergences as kd
import reference_np as ref


def logits(seed: int, v_s: int, v_t: int, rows: int = 3, scale=2.0):
  rng = np.random.default_rng(seed)
  s = scale * rng.standard_normal((rows, v_s))
  t = scale * rng.standard_normal((rows, v_t))
  return s.astype(np.float32), t.astype(np.float32)


# Student entries 0, 3, 5, 8 spell what teacher entries 2, 0, 7, 4 spell.
STUDENT_M = np.asarray([0, 3, 5, 8], np.int32)
TEACHER_M = np.asarray([2, 0, 7, 4], np.int32)


def test_uld_teacher_temperature_traced():
  s, t = logits(0, 9, 13)
  f = jax.jit(lambda a, b: kd.uld(s, t, temperature=a, teacher_temperature=b))
  np.testing.assert_allclose(
      f(0.7, 2.0),
      ref.uld(s, t, temperature=0.7, teacher_temperature=2.0),
      rtol=1e-5,
  )
  # Default: the teacher at the student's temperature.
  np.testing.assert_allclose(
      kd.uld(s, t, temperature=1.5), ref.uld(s, t, 1.5, 1.5), rtol=1e-5
  )


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_gold_values_traced_hyper_parameters(beta):
  s, t = logits(1, 9, 13)
  f = jax.jit(
      lambda b, temp, t_temp: kd.gold(
          s,
          t,
          STUDENT_M,
          TEACHER_M,
          beta=b,
          temperature=temp,
          teacher_temperature=t_temp,
      )
  )
  want = ref.gold(s, t, STUDENT_M, TEACHER_M, beta, 1.3, 0.8)
  assert np.all(np.abs(want) > 1e-3)
  np.testing.assert_allclose(f(beta, 1.3, 0.8), want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_gold_grad_matches_finite_differences(beta):
  s, t = logits(2, 9, 13)
  fn = lambda x: kd.gold(x, t, STUDENT_M, TEACHER_M, beta=beta).sum()
  want = ref.central_grad(
      lambda x: ref.gold(x, t, STUDENT_M, TEACHER_M, beta).sum(),
      s.astype(np.float64),
  )
  assert np.abs(want).max() > 1e-2
  np.testing.assert_allclose(jax.grad(fn)(s), want, rtol=2e-4, atol=2e-6)
  # The teacher is a constant.
  g_t = jax.grad(
      lambda y: kd.gold(s, y, STUDENT_M, TEACHER_M, beta=beta).sum()
  )(t)
  np.testing.assert_array_equal(g_t, 0.0)


def test_gold_without_matched_entries_is_uld():
  s, t = logits(3, 9, 13)
  none = np.zeros((0,), np.int32)
  np.testing.assert_allclose(
      kd.gold(s, t, none, none, temperature=1.5),
      kd.uld(s, t, temperature=1.5),
      rtol=1e-6,
  )
  g = lambda fn: jax.grad(lambda x: fn(x).sum())(s)
  np.testing.assert_allclose(
      g(lambda x: kd.gold(x, t, none, none)),
      g(lambda x: kd.uld(x, t)),
      rtol=1e-5,
      atol=1e-7,
  )


def test_gold_fully_matched_beta_0_is_forward_kl():
  # One shared vocabulary, every entry matched: w = 1 and the matched term
  # is KL(p ‖ q) over whole distributions.
  s, t = logits(4, 11, 11)
  every = np.arange(11, dtype=np.int32)
  np.testing.assert_allclose(
      kd.gold(s, t, every, every, beta=0.0), kd.fkl(s, t), rtol=1e-5
  )


def test_gold_refuses_unpaired_index_arrays():
  s, t = logits(5, 9, 13)
  with pytest.raises(ValueError, match="must pair one teacher entry"):
    kd.gold(s, t, STUDENT_M, TEACHER_M[:2])
  with pytest.raises(ValueError, match=r"beta=1.5 is outside \[0, 1\]"):
    kd.gold(s, t, STUDENT_M, TEACHER_M, beta=1.5)
