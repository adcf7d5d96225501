"""kd.mixture.mix against a float64 NumPy mixture written from
docs/beyond_logits.md ("Several teachers"), and the divergence of the mixed
teacher against the float64 divergence of the hand-mixed distribution."""

import functools

import jax
import numpy as np
import pytest
from scipy import special

from kdjax import divergences as kd
import reference_np as ref

K, B, T, V = 3, 2, 5, 11
PRIOR = (1.0, 2.0, 5.0)
TEMPERATURE = 2.0
# Row 1's last two positions are padding, with labels no vocabulary has.
MASK_BxT = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], np.float32)


def _inputs():
  rng = np.random.default_rng(0)
  z_KxBxTxV = rng.normal(0, 3, (K, B, T, V)).astype(np.float32)
  z_KxBxTxV[0, ..., 3] = -np.inf  # teacher 0 never emits token 3
  z_KxBxTxV[:, ..., 7] = -np.inf  # no teacher emits token 7
  labels_BxT = rng.integers(0, V, (B, T))
  labels_BxT[labels_BxT == 7] = 2
  labels_BxT[MASK_BxT == 0] = -100
  return z_KxBxTxV, labels_BxT


def _np_mixture(z_KxBxTxV, labels_BxT, combine):
  """``p_mix`` and ``w`` in float64: ``w_k ∝ π_k`` (fixed) or ``π_k ·
  softmax(z_k)_y`` (confidence, prior weights off the mask)."""
  prior_K = np.asarray(PRIOR) / np.sum(PRIOR)
  w_KxBxT = np.broadcast_to(prior_K[:, None, None], (K, B, T)).copy()
  if combine == "confidence":
    p1_KxBxTxV = np.exp(ref.log_softmax(z_KxBxTxV))
    for b in range(B):
      for t in range(T):
        if MASK_BxT[b, t]:
          py_K = p1_KxBxTxV[:, b, t, labels_BxT[b, t]]
          w_KxBxT[:, b, t] = prior_K * py_K / np.sum(prior_K * py_K)
  p_KxBxTxV = np.exp(ref.log_softmax(z_KxBxTxV, TEMPERATURE))
  return np.einsum("kbt,kbtv->btv", w_KxBxT, p_KxBxTxV), w_KxBxT


@functools.cache
def _mixed():
  """Both rules, the FKL of a student to each mixture, and two copies of one
  teacher under unequal weights: one jitted program."""
  z, labels = _inputs()
  s_BxTxV = np.random.default_rng(1).normal(0, 2, (B, T, V)).astype(np.float32)

  @jax.jit
  def run(z, labels, s):
    out = {}
    for combine in kd.mixture.COMBINE:
      m = kd.mixture.mix(
          list(z),
          labels,
          MASK_BxT,
          prior=PRIOR,
          combine=combine,
          temperature=TEMPERATURE,
      )
      fkl = kd.fkl(s, m.logits_BxTxV, temperature=TEMPERATURE)
      out[combine] = (m, fkl)
    for combine in kd.mixture.COMBINE:
      out[f"copies_{combine}"] = kd.mixture.mix(
          (z[1], z[1]),
          labels,
          MASK_BxT,
          prior=(3.0, 1.0),
          combine=combine,
          temperature=TEMPERATURE,
      )
    return out

  return jax.device_get(run(z, labels, s_BxTxV)), z, labels, s_BxTxV


@pytest.mark.parametrize("combine", ["fixed", "confidence"])
def test_mixture_and_weights_match_float64(combine):
  out, z, labels, s = _mixed()
  (logits, w), fkl = out[combine]
  want_p, want_w = _np_mixture(z, labels, combine)
  np.testing.assert_allclose(w, want_w, rtol=2e-5, atol=1e-7)
  np.testing.assert_allclose(w.sum(0), 1.0, rtol=1e-6)
  # Off the mask the weights are the prior's, whatever the label there.
  np.testing.assert_allclose(
      w[:, 1, 3:], np.tile(np.asarray(PRIOR)[:, None] / 8.0, 2), rtol=1e-6
  )
  assert np.all(np.isfinite(logits[..., np.arange(V) != 7]))
  # logits / T are log-probabilities already.
  np.testing.assert_allclose(
      np.exp(logits.astype(np.float64) / TEMPERATURE).sum(-1), 1.0, rtol=1e-5
  )
  # The divergences read softmax(logits / T): the mixture itself.
  got_p = special.softmax(logits.astype(np.float64) / TEMPERATURE, axis=-1)
  np.testing.assert_allclose(got_p, want_p, rtol=1e-5, atol=1e-7)
  assert np.all(want_p[..., 7] == 0) and np.all(got_p[..., 7] == 0)
  # Teacher 0 lacks token 3; the others' share remains.
  assert np.all(want_p[..., 3] > 0)
  with np.errstate(divide="ignore"):  # token 7: log 0
    want_fkl = ref.fkl(s, np.log(want_p) * TEMPERATURE, TEMPERATURE)
  np.testing.assert_allclose(fkl, want_fkl, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("combine", ["fixed", "confidence"])
def test_copies_of_one_teacher_mix_into_that_teacher(combine):
  out, z, _, _ = _mixed()
  logits, w = out[f"copies_{combine}"]
  np.testing.assert_allclose(w[0], 0.75, rtol=1e-6)
  want = ref.log_softmax(z[1], TEMPERATURE)
  ok = np.isfinite(want)
  np.testing.assert_allclose(
      logits[ok] / TEMPERATURE, want[ok], rtol=1e-5, atol=1e-5
  )
  assert np.all(np.isneginf(logits[~ok]))


def test_one_weight_per_teacher_and_a_known_rule():
  z, labels = _inputs()
  with pytest.raises(ValueError, match="3 teachers' logits for 2 prior"):
    kd.mixture.mix(list(z), labels, MASK_BxT, prior=(1.0, 1.0))
  with pytest.raises(ValueError, match="combine='vote' is unknown"):
    kd.mixture.mix(list(z), labels, MASK_BxT, prior=PRIOR, combine="vote")
