"""kdjax.divergences (token-level) against the float64 references of reference_np.

Values and gradients are compared with independent NumPy code written from
docs/divergences.md; properties and edge cases use hand-computed
expectations. Every case runs the public path (``kd.get(name)``).
"""

from __future__ import annotations

import functools
import math

import hypothesis
import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import divergences as kd
import reference_np as ref

# (test id, registry name, static kwargs): every per-token divergence, with
# non-default hyper-parameters where the default would hide a mistake.
CASES = [
    ("fkl", "fkl", {}),
    ("rkl", "rkl", {}),
    ("fkl_rkl", "fkl_rkl", {"weight": 0.3}),
    ("skl", "skl", {"alpha": 0.1}),
    ("srkl", "srkl", {"alpha": 0.25}),
    ("jsd", "jsd", {"beta": 0.5}),
    ("jsd_0.1", "jsd", {"beta": 0.1}),
    ("tvd", "tvd", {}),
    ("akl", "akl", {}),
    ("akl_dskd", "akl", {"mu": 0.7, "rule": "dskd"}),
    ("abkd", "abkd", {"alpha": 0.2, "beta": 0.7}),
    ("abkd_a0", "abkd", {"alpha": 0.0, "beta": 0.6}),
    ("abkd_b0", "abkd", {"alpha": 0.5, "beta": 0.0}),
    ("abkd_00", "abkd", {"alpha": 0.0, "beta": 0.0}),
    ("uld", "uld", {}),
]


def _key(kwargs: dict) -> tuple:
  return tuple(sorted(kwargs.items()))


def _call(name, kwargs, s, t, **extra):
  return kd.get(name)(s, t, **kwargs, **extra)


@functools.partial(jax.jit, static_argnames="temperature")
def all_values(s, t, temperature=1.0):
  """Per-position values of every case, one compiled program per shape/dtype."""
  return {
      cid: _call(name, kw, s, t, temperature=temperature)
      for cid, name, kw in CASES
  }


@functools.partial(jax.jit, static_argnames="temperature")
def all_grads(s, t, temperature=1.0):
  """Gradient of the summed divergence w.r.t. the student logits, every case."""
  return {
      cid: jax.grad(
          lambda x, name=name, kw=kw: jnp.sum(
              _call(name, kw, x, t, temperature=temperature)
          )
      )(s)
      for cid, name, kw in CASES
  }


def reference(name, kwargs, s, t, **extra):
  return ref.DIVERGENCES[name](
      np.asarray(s, np.float64), np.asarray(t, np.float64), **kwargs, **extra
  )


def logits(seed: int, shape, scale=3.0):
  """Student and teacher f32 logits, different enough for sizeable divergences."""
  rng = np.random.default_rng(seed)
  t = scale * rng.standard_normal(shape)
  s = 0.7 * t + scale * rng.standard_normal(shape) * 0.6
  return s.astype(np.float32), t.astype(np.float32)


# ----------------------------------------------------------------------------
# Values against the float64 reference.


@pytest.mark.parametrize(
    "shape, temperature",
    [((5, 37), 1.0), ((2, 3, 1001), 2.0), ((2, 50257), 1.0)],
    ids=["Nx37", "BxTx1001_T2", "Nx50257"],
)
def test_value_matches_float64_reference(shape, temperature):
  s, t = logits(sum(shape), shape)
  values = all_values(s, t, temperature=temperature)
  for case_id, name, kwargs in CASES:
    got = values[case_id]
    want = reference(name, kwargs, s, t, temperature=temperature)
    assert got.dtype == jnp.float32 and got.shape == shape[:-1], case_id
    assert np.all(want > 1e-3), case_id  # not a comparison between near-zeros
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7, err_msg=case_id)


def test_uld_zero_pads_the_smaller_vocabulary():
  s, _ = logits(1, (4, 37))
  _, t = logits(2, (4, 50))
  got = kd.uld(s, t)
  np.testing.assert_allclose(got, ref.uld(s, t), rtol=1e-5)
  # The padding is really zero mass: with V_s < V_t the teacher's tail after
  # rank 37 is matched against zeros, so it adds exactly its own mass.
  p_desc = -np.sort(-np.exp(ref.log_softmax(t)), axis=-1)
  assert np.all(ref.uld(s, t) >= p_desc[:, 37:].sum(-1))
  np.testing.assert_allclose(kd.uld(t, s), ref.uld(t, s), rtol=1e-5)


# ----------------------------------------------------------------------------
# Gradients against central differences of the float64 reference.


def test_grad_matches_finite_differences():
  s, t = logits(7, (3, 13), scale=2.0)
  grads = all_grads(s, t, temperature=1.5)
  q = np.exp(ref.log_softmax(s, 1.5))
  p = np.exp(ref.log_softmax(t, 1.5))
  for case_id, name, kwargs in CASES:
    extra = {"temperature": 1.5}
    if name == "akl":
      # The AKL weights are constants: differentiate with them pinned.
      extra["weights"] = ref.akl_weights(
          p, q, kwargs.get("mu", 0.5), kwargs.get("rule", "akl")
      )
    want = ref.central_grad(
        lambda x: reference(name, kwargs, x, t, **extra).sum(),
        s.astype(np.float64),
    )
    assert np.abs(want).max() > 1e-2, case_id
    np.testing.assert_allclose(
        grads[case_id], want, rtol=2e-4, atol=2e-6, err_msg=case_id
    )


def test_uld_grad_across_vocabulary_sizes():
  s, _ = logits(3, (2, 9), scale=2.0)
  _, t = logits(4, (2, 13), scale=2.0)
  want = ref.central_grad(lambda x: ref.uld(x, t).sum(), s.astype(np.float64))
  got = jax.grad(lambda x: kd.uld(x, t).sum())(s)
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-6)


def test_teacher_gets_no_gradient():
  s, t = logits(5, (3, 13))
  # all_grads differentiates w.r.t. its first argument: pass the teacher there
  # by swapping roles through a wrapper that calls with (student, teacher).
  grads = jax.jit(
      lambda tt: {
          cid: jax.grad(
              lambda y, name=name, kw=kw: jnp.sum(_call(name, kw, s, y))
          )(tt)
          for cid, name, kw in CASES
      }
  )(t)
  for case_id, g in grads.items():
    np.testing.assert_array_equal(g, 0.0, err_msg=case_id)


# ----------------------------------------------------------------------------
# Properties.


def test_nonnegative_and_zero_at_equality():
  s, t = logits(11, (4, 37))
  values = all_values(s, t)
  same = all_values(t, t)
  # Equal distributions from different logits (a constant shift per row).
  shifted = all_values(t + np.float32(5.0), t)
  for case_id, _, _ in CASES:
    assert np.all(np.asarray(values[case_id]) > 0), case_id
    np.testing.assert_allclose(same[case_id], 0.0, atol=1e-6, err_msg=case_id)
    np.testing.assert_allclose(
        shifted[case_id], 0.0, atol=1e-6, err_msg=case_id
    )


def _disjoint(v=8):
  """Student and teacher with (numerically) disjoint supports."""
  t = np.full((2, v), -1e4, np.float32)
  s = np.full((2, v), -1e4, np.float32)
  t[:, : v // 2] = 0.0
  s[:, v // 2 :] = 0.0
  return s, t


_BETAS = (0.1, 0.5, 0.9)


@jax.jit
def _jsd_and_tvd(s, t):
  """JSD at every beta in _BETAS, and TVD (one compiled program per shape)."""
  return [kd.jsd(s, t, beta=beta) for beta in _BETAS], kd.tvd(s, t)


def test_jsd_and_tvd_bounds():
  s, t = logits(12, (64, 37), scale=8.0)
  jsds, tvd = _jsd_and_tvd(s, t)
  for beta, jsd in zip(_BETAS, jsds):
    h_beta = -beta * math.log(beta) - (1 - beta) * math.log(1 - beta)
    assert np.all(np.asarray(jsd) <= h_beta + 1e-6)
  assert np.all(np.asarray(tvd) <= 1.0)
  # Disjoint supports reach the bounds (beta = 0.5: log 2).
  ds, dt = _disjoint()
  jsds, tvd = _jsd_and_tvd(ds, dt)
  np.testing.assert_allclose(jsds[1], math.log(2), rtol=1e-6)
  np.testing.assert_allclose(tvd, 1.0, rtol=1e-6)
  assert all(np.all(np.asarray(jsd) <= math.log(2)) for jsd in jsds)
  assert np.all(np.asarray(tvd) <= 1.0)


def test_jsd_endpoints_are_fkl_and_rkl_exactly():
  s, t = logits(13, (4, 37))
  np.testing.assert_array_equal(kd.jsd(s, t, beta=0.0), kd.fkl(s, t))
  np.testing.assert_array_equal(kd.jsd(s, t, beta=1.0), kd.rkl(s, t))
  # The interior formula tends to 0 at the endpoints, so they are special.
  assert np.all(
      np.asarray(kd.jsd(s, t, beta=1e-4)) < 1e-2 * np.asarray(kd.fkl(s, t))
  )
  g0 = jax.grad(lambda x: kd.jsd(x, t, beta=0.0).sum())(s)
  np.testing.assert_array_equal(g0, jax.grad(lambda x: kd.fkl(x, t).sum())(s))


def test_fkl_rkl_is_linear_in_weight():
  s, t = logits(14, (4, 37))
  f, r = np.asarray(kd.fkl(s, t)), np.asarray(kd.rkl(s, t))
  assert np.all(np.abs(f - r) > 1e-2)  # otherwise linearity is invisible
  for w in (0.0, 0.25, 0.5, 1.0):
    np.testing.assert_allclose(
        kd.fkl_rkl(s, t, weight=w), w * f + (1 - w) * r, rtol=1e-6
    )


def _logits_of(probs):
  return np.log(np.asarray(probs, np.float64)).astype(np.float32)


def test_akl_is_fkl_when_only_the_head_differs():
  # Head (rule akl, mu 0.96) = the top two tokens; q differs from p only there.
  t = _logits_of([[0.03, 0.6, 0.02, 0.35]])
  s = _logits_of([[0.03, 0.4, 0.02, 0.55]])
  w_head, w_tail = kd.akl_weights(jax.nn.softmax(t), jax.nn.softmax(s), mu=0.96)
  np.testing.assert_allclose(w_head, 1.0, atol=1e-6)
  np.testing.assert_allclose(w_tail, 0.0, atol=1e-6)
  f, r = kd.fkl(s, t), kd.rkl(s, t)
  assert abs(float(f[0] - r[0])) > 1e-3
  np.testing.assert_allclose(kd.akl(s, t, mu=0.96), f, rtol=1e-5)


def test_akl_is_rkl_when_only_the_tail_differs():
  # Teacher top-1 (0.6) >= mu: head = {top-1}; q differs only on the tail.
  t = _logits_of([[0.1, 0.2, 0.6, 0.1]])
  s = _logits_of([[0.15, 0.2, 0.6, 0.05]])
  for rule in kd.AKL_RULES:
    w_head, _ = kd.akl_weights(jax.nn.softmax(t), jax.nn.softmax(s), rule=rule)
    np.testing.assert_allclose(w_head, 0.0, atol=1e-6)
    f, r = kd.fkl(s, t), kd.rkl(s, t)
    assert abs(float(f[0] - r[0])) > 1e-3
    np.testing.assert_allclose(kd.akl(s, t, rule=rule), r, rtol=1e-5)


def test_akl_rules_differ_when_top1_below_mu():
  # Sorted teacher: 0.4, 0.3, 0.2, 0.1 (vocab order scrambled); S = .4 .7 .9 1.
  # mu = 0.5. Rule akl: head = {0.4}; rule dskd: head = {0.4, 0.3}.
  p = np.array([[0.2, 0.4, 0.1, 0.3]])
  q = np.array([[0.25, 0.3, 0.25, 0.2]])
  # e (sorted order) = |.4-.3|, |.3-.2|, |.2-.25|, |.1-.25| = .1, .1, .05, .15
  # akl: 0.1 / 0.4 = 0.25; dskd: 0.2 / 0.4 = 0.5.
  expected = {"akl": 0.25, "dskd": 0.5}
  for rule, w in expected.items():
    w_head, w_tail = kd.akl_weights(
        jnp.asarray(p, jnp.float32),
        jnp.asarray(q, jnp.float32),
        mu=0.5,
        rule=rule,
    )
    np.testing.assert_allclose(w_head, w, rtol=1e-6)
    np.testing.assert_allclose(w_tail, 1 - w, rtol=1e-6)
    np.testing.assert_allclose(
        ref.akl_weights(p, q, 0.5, rule)[0], w, rtol=1e-12
    )
  s, t = _logits_of(q), _logits_of(p)
  f, r = kd.fkl(s, t), kd.rkl(s, t)
  np.testing.assert_allclose(
      kd.akl(s, t, rule="akl"), 0.25 * f + 0.75 * r, rtol=1e-5
  )
  np.testing.assert_allclose(
      kd.akl(s, t, rule="dskd"), 0.5 * f + 0.5 * r, rtol=1e-5
  )


def test_akl_rules_agree_when_top1_reaches_mu():
  s, t = logits(15, (32, 37), scale=4.0)
  t[:, 5] += 20.0  # teacher top-1 mass ~1 >= mu
  p = np.exp(ref.log_softmax(t))
  assert np.all(p.max(-1) >= 0.5)

  @jax.jit
  def by_rule(s, t):
    p, q = jax.nn.softmax(t), jax.nn.softmax(s)
    return [
        (kd.akl_weights(p, q, rule=rule)[0], kd.akl(s, t, rule=rule))
        for rule in ("akl", "dskd")
    ]

  (w_akl, akl), (w_dskd, dskd) = by_rule(s, t)
  np.testing.assert_array_equal(w_akl, w_dskd)
  np.testing.assert_array_equal(akl, dskd)


def test_akl_ties_break_lower_index_first():
  # Teacher ties at indices 1, 2, 3 (0.3 each); errors there are .1, .05, .05.
  p = np.array([[0.1, 0.3, 0.3, 0.3]])
  q = np.array([[0.1, 0.2, 0.35, 0.35]])
  t = jax.nn.softmax(jnp.asarray(_logits_of(p)))
  assert t[0, 1] == t[0, 2] == t[0, 3]
  qj = jnp.asarray(q, jnp.float32)
  # mu = .35, rule akl: head = {first tied token} = index 1 -> .1 / .2.
  np.testing.assert_allclose(kd.akl_weights(t, qj, mu=0.35)[0], 0.5, rtol=1e-5)
  # rule dskd: head = first two tied tokens = indices 1, 2 -> .15 / .2.
  np.testing.assert_allclose(
      kd.akl_weights(t, qj, mu=0.35, rule="dskd")[0], 0.75, rtol=1e-5
  )
  # Reversing the vocabulary reverses the tie order: head = index 3 (err .05).
  np.testing.assert_allclose(
      kd.akl_weights(t[:, ::-1], qj[:, ::-1], mu=0.35)[0], 0.25, rtol=1e-5
  )


def test_akl_weights_zero_over_zero():
  t = jnp.asarray(_logits_of([[0.1, 0.6, 0.3]]))
  p = jax.nn.softmax(t)
  w_head, w_tail = kd.akl_weights(p, p)
  np.testing.assert_array_equal(w_head, 0.5)
  np.testing.assert_array_equal(w_tail, 0.5)
  val, g = jax.value_and_grad(lambda x: kd.akl(x, t).sum())(t)
  assert val == 0.0
  np.testing.assert_array_equal(g, 0.0)


def test_akl_weights_match_reference_on_random_rows():
  s, t = logits(16, (64, 13), scale=1.0)
  p, q = np.exp(ref.log_softmax(t)), np.exp(ref.log_softmax(s))
  settings = [(rule, mu) for rule in kd.AKL_RULES for mu in (0.3, 0.5, 0.8)]
  # Every setting in one program: one compile instead of op-by-op dispatch.
  heads = jax.jit(
      lambda p, q: [
          kd.akl_weights(p, q, mu=mu, rule=rule)[0] for rule, mu in settings
      ]
  )(jnp.asarray(p, jnp.float32), jnp.asarray(q, jnp.float32))
  for (rule, mu), got in zip(settings, heads):
    np.testing.assert_allclose(
        got,
        ref.akl_weights(p, q, mu, rule)[0],
        rtol=1e-5,
        atol=1e-6,
        err_msg=f"{rule} mu={mu}",
    )


def test_temperature_divides_logits():
  s, t = logits(17, (4, 37))
  at_t = all_values(s, t, temperature=2.5)
  scaled = all_values(s / np.float32(2.5), t / np.float32(2.5))
  plain = all_values(s, t)
  for case_id, _, _ in CASES:
    np.testing.assert_allclose(
        at_t[case_id], scaled[case_id], rtol=1e-5, atol=1e-7, err_msg=case_id
    )
    # No hidden T**2 factor, and the temperature really changes the value.
    assert np.all(np.abs(at_t[case_id] - plain[case_id]) > 1e-4), case_id


# ----------------------------------------------------------------------------
# masked_mean, registry, dtypes, bad input.


def test_masked_mean():
  per_token = jnp.array([[1.0, 2.0, 3.0], [4.0, 5.0, jnp.nan]])
  mask = jnp.array([[1, 0, 1], [1, 1, 0]])
  np.testing.assert_allclose(
      kd.masked_mean(per_token, mask), (1 + 3 + 4 + 5) / 4
  )
  weights = jnp.array([[0.5, 0.0, 1.0], [0.0, 2.0, 0.0]])
  np.testing.assert_allclose(
      kd.masked_mean(per_token, weights), (0.5 + 3.0 + 10.0) / 3.5, rtol=1e-6
  )
  assert kd.masked_mean(per_token, jnp.zeros_like(mask)) == 0.0
  np.testing.assert_allclose(kd.masked_mean(per_token[:, :2]), 3.0)
  g = jax.grad(lambda x: kd.masked_mean(x, jnp.zeros_like(mask)))(per_token)
  np.testing.assert_array_equal(g, 0.0)
  with pytest.raises(ValueError, match=r"mask shape \(3,\) does not match"):
    kd.masked_mean(per_token, jnp.ones(3))


def test_registry():
  assert kd.names() == (
      "fkl",
      "rkl",
      "fkl_rkl",
      "skl",
      "srkl",
      "jsd",
      "tvd",
      "akl",
      "abkd",
      "uld",
      "gold",
      "sinkhorn",
  )
  for name in kd.names():
    assert kd.get(name) is getattr(kd, name)
  with pytest.raises(
      ValueError, match=r"unknown divergence 'kl'; choose one of fkl, rkl"
  ):
    kd.get("kl")


def test_bf16_inputs_give_float32_results():
  s, t = logits(18, (4, 37))
  s16, t16 = jnp.asarray(s, jnp.bfloat16), jnp.asarray(t, jnp.bfloat16)
  got = all_values(s16, t16)
  upcast = all_values(s16.astype(jnp.float32), t16.astype(jnp.float32))
  unrounded = all_values(s, t)
  for case_id, name, kwargs in CASES:
    assert got[case_id].dtype == jnp.float32, case_id
    # Upcast before the softmax: the f32 computation on the same values.
    np.testing.assert_allclose(
        got[case_id], upcast[case_id], rtol=1e-6, atol=1e-7, err_msg=case_id
    )
    want = reference(
        name, kwargs, s16.astype(jnp.float32), t16.astype(jnp.float32)
    )
    np.testing.assert_allclose(got[case_id], want, rtol=1e-5, err_msg=case_id)
    # And close to the unrounded f32 logits (bf16 keeps 8 bits of mantissa).
    np.testing.assert_allclose(
        got[case_id], unrounded[case_id], rtol=5e-2, err_msg=case_id
    )


def test_bad_inputs_are_named():
  s, t = logits(19, (2, 7))
  with pytest.raises(ValueError, match=r"differ in shape"):
    kd.fkl(s, t[:, :5])
  with pytest.raises(ValueError, match=r"rule='top' is not an AKL rule"):
    kd.akl(s, t, rule="top")
  with pytest.raises(ValueError, match=r"alpha=1.5 is outside \[0, 1\]"):
    kd.skl(s, t, alpha=1.5)
  with pytest.raises(ValueError, match=r"temperature=0 must be > 0"):
    kd.tvd(s, t, temperature=0)
  with pytest.raises(ValueError, match=r"must share their leading"):
    kd.uld(s, t[:1])


# ----------------------------------------------------------------------------
# -inf vocabulary slots and extreme logits.


def _inf_slots_case():
  s, t = logits(20, (3, 13))
  masked = np.array([0, 4, 5, 12])
  s[:, masked] = -np.inf
  t[:, masked] = -np.inf
  keep = np.setdiff1d(np.arange(13), masked)
  return s, t, masked, keep


def test_inf_slots_equal_the_sliced_vocabulary():
  s, t, masked, keep = _inf_slots_case()
  # The sliced [3, 9] float32 program is test_extreme_logits_...'s.
  vals, grads, _ = _values_grads_weights(s, t)
  vals_sliced, grads_sliced, _ = _values_grads_weights(s[:, keep], t[:, keep])
  for case_id, name, kwargs in CASES:
    np.testing.assert_allclose(
        vals[case_id],
        vals_sliced[case_id],
        rtol=1e-6,
        atol=1e-7,
        err_msg=case_id,
    )
    np.testing.assert_array_equal(
        grads[case_id][:, masked], 0.0, err_msg=case_id
    )
    np.testing.assert_allclose(
        grads[case_id][:, keep],
        grads_sliced[case_id],
        rtol=1e-5,
        atol=1e-7,
        err_msg=case_id,
    )
    np.testing.assert_allclose(
        vals[case_id],
        reference(name, kwargs, s[:, keep], t[:, keep]),
        rtol=1e-5,
        err_msg=case_id,
    )


_V = 9


@jax.jit
def _values_grads_weights(s, t):
  """``all_values``, ``all_grads`` (T = 1) and the weights of every AKL case,
  in one program (one compile per shape and dtype)."""
  p = jax.nn.softmax(t.astype(jnp.float32))
  q = jax.nn.softmax(s.astype(jnp.float32))
  weights = {
      cid: kd.akl_weights(p, q, order=t, **kw)
      for cid, name, kw in CASES
      if name == "akl"
  }
  return all_values(s, t), all_grads(s, t), weights


@st.composite
def _extreme_case(draw):
  """[3, 9] logits in [-1e4, 1e4], shared -inf slots (>= 1 finite per row)."""
  elems = st.floats(-1e4, 1e4, width=32)
  s = draw(hnp.arrays(np.float32, (3, _V), elements=elems))
  t = draw(hnp.arrays(np.float32, (3, _V), elements=elems))
  inf = draw(hnp.arrays(np.bool_, (3, _V)))
  keep_one = draw(hnp.arrays(np.int64, (3,), elements=st.integers(0, _V - 1)))
  inf[np.arange(3), keep_one] = False
  s[inf] = -np.inf
  t[inf] = -np.inf
  dtype = draw(st.sampled_from([jnp.float32, jnp.bfloat16]))
  return jnp.asarray(s, dtype), jnp.asarray(t, dtype), inf


def _tie_row_case():
  """A random draw that once split AKL's head differently in kdjax and the
  reference: teacher logits within 6e-8 round to equal float32 probabilities,
  so sorting ``p`` put index 0 first while the exact order puts index 1 first.
  kdjax now ranks by the teacher logits (akl_weights(order=...))."""
  t = np.zeros((3, _V), np.float32)
  t[:, [0, 2]] = -5.96e-8
  t[:, 3:] = -np.inf
  s = np.zeros((3, _V), np.float32)
  s[:, 0] = 2.0
  s[:, 3:] = -np.inf
  return jnp.asarray(s), jnp.asarray(t), np.isinf(t)


def test_akl_tie_row_follows_the_exact_order():
  """On the tie row every implementation splits the head as float64 does
  (head = index 1 alone, w_head = 0.25), not as a float32 sort of p would."""
  s, t, inf = _tie_row_case()
  keep = ~inf[0]
  s64 = np.asarray(s[0], np.float64)[keep]
  t64 = np.asarray(t[0], np.float64)[keep]
  p64, q64 = np.exp(ref.log_softmax(t64)), np.exp(ref.log_softmax(s64))
  w64 = ref.akl_weights(p64[None], q64[None])[0][0]
  np.testing.assert_allclose(w64, 0.25, rtol=1e-6)
  want = ref.akl(s64, t64)
  paths = (
      ("reference", {}),
      ("auto", {}),
      ("auto", {"chunk_size": 1}),
      ("auto", {"chunk_size": 0}),
  )
  every_path = jax.jit(
      lambda s, t: [kd.get("akl", impl=i)(s, t, **extra) for i, extra in paths]
  )
  for (impl, extra), got in zip(paths, every_path(s, t)):
    np.testing.assert_allclose(got, want, rtol=1e-5, err_msg=f"{impl} {extra}")


# derandomize: CI sees the same 50 cases every run (plus the pinned tie row).
@hypothesis.settings(
    max_examples=50,
    deadline=None,
    derandomize=True,
    suppress_health_check=[hypothesis.HealthCheck.too_slow],
)
@hypothesis.given(case=_extreme_case())
@hypothesis.example(case=_tie_row_case())
def test_extreme_logits_and_inf_slots_are_finite(case):
  s, t, inf = case
  s64 = np.asarray(s.astype(jnp.float32), np.float64)
  t64 = np.asarray(t.astype(jnp.float32), np.float64)
  vals, grads, weights = _values_grads_weights(s, t)
  for case_id, name, kwargs in CASES:
    grad = np.asarray(grads[case_id].astype(jnp.float32))
    assert np.all(np.isfinite(vals[case_id])), case_id
    assert np.all(np.isfinite(grad)), case_id
    assert np.all(grad[inf] == 0.0), case_id
    for row in range(3):
      keep = ~inf[row]
      extra = {}
      if name == "akl":
        # The weights hinge on comparisons (S_k <= mu, sort order) that f32 may
        # round the other way at extreme logits: use the weights kdjax used.
        extra["weights"] = tuple(float(w[row]) for w in weights[case_id])
      want = reference(name, kwargs, s64[row, keep], t64[row, keep], **extra)
      np.testing.assert_allclose(
          vals[case_id][row], want, rtol=1e-4, atol=1e-3, err_msg=case_id
      )
