"""Divergences against a sparse teacher (kdjax.divergences.sparse) and the
dense divergences with a teacher that is -inf where the student is not.

References: float64 NumPy transcriptions of the (K + 1)-bin formula
(docs/divergences.md, "Sparse teachers") on top of reference_np, numerical
float64 gradients, and the dense engine where the two must agree.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special

from kdjax import divergences as kd
import reference_np as ref

V = 300
N = 4  # rows of every shared program
SLOTS = 32  # kept-token slots of the shared sparse program; K < 32 pads
# (name, hp) checked everywhere; the endpoints select their own formulas.
CASES = [
    ("fkl", {}),
    ("rkl", {}),
    ("fkl_rkl", {"weight": 0.3}),
    ("skl", {"alpha": 0.1}),
    ("srkl", {"alpha": 0.1}),
    ("jsd", {"beta": 0.5}),
    ("tvd", {}),
    ("akl", {"mu": 0.5}),
    ("abkd", {"alpha": 0.2, "beta": 0.7}),
    ("abkd", {"alpha": 0.3, "beta": 0.7}),
    ("abkd", {"alpha": 0.0, "beta": 0.5}),
    ("abkd", {"alpha": 0.5, "beta": 0.0}),
    ("fkl_rkl", {"weight": 1.0}),
    ("srkl", {"alpha": 0.0}),
    ("jsd", {"beta": 1.0}),
    ("jsd", {"beta": 0.0}),
    ("abkd", {"alpha": 0.0, "beta": 0.0}),
]
CASE_IDS = [
    f"{n}-" + "-".join(f"{k}{v}" for k, v in hp.items()) for n, hp in CASES
]
# f-divergences, and ABKD with alpha + beta = 1 (an alpha-divergence).
F_DIVERGENCE = {"fkl", "rkl", "fkl_rkl", "skl", "srkl", "jsd", "tvd"}


def _lambda_one(name, hp):
  return name == "abkd" and hp["alpha"] + hp["beta"] == 1.0


def _infinite(name, hp):
  """Whether the divergence contains KL(q‖p) with a positive weight."""
  if name == "fkl_rkl":
    return hp["weight"] < 1
  if name in ("rkl", "akl"):
    return True
  if name == "srkl":
    return hp["alpha"] == 0.0
  if name == "jsd":
    return hp["beta"] == 1.0
  return name == "abkd" and hp["alpha"] == 0.0


def _logits(seed, scale=2.0):
  rng = np.random.default_rng(seed)
  s = scale * rng.normal(size=(N, V))
  t = scale * rng.normal(size=(N, V))
  t[0, 3] += 6.0  # one peaked teacher row
  return s, t


def _log_softmax64(x, temperature=1.0):
  return special.log_softmax(np.asarray(x, np.float64) / temperature, -1)


def _pad(ids, log_p):
  """Kept tokens padded to SLOTS with unused slots (-inf log-prob)."""
  ids, log_p = np.asarray(ids), np.asarray(log_p, np.float32)
  pad = SLOTS - ids.shape[-1]
  free = np.array([[v for v in range(V) if v not in row][:pad] for row in ids])
  return kd.sparse.TopK(
      jnp.asarray(
          np.concatenate([ids, free.reshape(ids.shape[0], pad)], -1), jnp.int32
      ),
      jnp.asarray(np.pad(log_p, [(0, 0), (0, pad)], constant_values=-np.inf)),
  )


def _hp_args(name, hp):
  """Every traced hyper-parameter of the shared programs, ``hp`` for
  ``name`` and defaults elsewhere."""
  return {
      n: {
          k: jnp.float32(v)
          for k, v in {**d, **(hp if n == name else {})}.items()
      }
      for n, d in kd.engine.HYPER_PARAMETERS.items()
  }


def _program(divergence):
  """jit of ``{name: (value [N], d sum(value)/ds [N, V])}`` for every
  token-level name, hyper-parameters and temperature traced: one compile
  serves every case."""

  def run(s, teacher, temperature, hps):
    def one(name):
      fn = lambda x: divergence(name, x, teacher, temperature, hps[name])
      return fn(s), jax.grad(lambda x: jnp.sum(fn(x)))(s)

    return {name: one(name) for name in kd.engine.NAMES}

  return jax.jit(run)


@functools.cache
def _sparse_program():
  return _program(
      lambda name, x, enc, temp, hp: kd.sparse.divergence(
          name, x, enc, temperature=temp, **hp
      )
  )


@functools.cache
def _dense_program():
  return _program(
      lambda name, x, t, temp, hp: kd.get(name)(x, t, temperature=temp, **hp)
  )


@jax.jit
def _reference_program(s, t):
  """``[(value, d sum(value)/ds)]`` of the autodiff reference of every entry
  of CASES (static hyper-parameters), in one program."""

  def one(name, hp):
    fn = lambda x: kd.get(name, "reference")(x, t, **hp)
    return fn(s), jax.grad(lambda x: jnp.sum(fn(x)))(s)

  return [one(name, hp) for name, hp in CASES]


def _run(kind, name, hp, s, teacher, temperature=1.0):
  """``(value, grad)`` of one case from a shared program, as float64."""
  s32 = jnp.asarray(s, jnp.float32)
  if kind == "reference":
    out = _reference_program(s32, teacher)[CASES.index((name, hp))]
  else:
    program = _sparse_program() if kind == "sparse" else _dense_program()
    out = program(s32, teacher, jnp.float32(temperature), _hp_args(name, hp))[
        name
    ]
  return tuple(np.asarray(x, np.float64) for x in out)


def _bins64(s, ids, log_p_k, temperature):
  """float64 (log Q, log P) [N, K + 1] of the coarsened pair; unused slots
  (log_p_k = -inf) are -inf on both sides and stay in the tail."""
  log_q = _log_softmax64(s, temperature)
  used = np.isfinite(log_p_k)
  tail_mask = np.ones(s.shape, bool)
  for row in range(s.shape[0]):
    tail_mask[row, ids[row][used[row]]] = False
  log_q_k = np.where(used, np.take_along_axis(log_q, ids, -1), -np.inf)
  log_q_tail = special.logsumexp(np.where(tail_mask, log_q, -np.inf), -1)
  p_tail = 1.0 - np.exp(log_p_k).sum(-1)
  with np.errstate(divide="ignore"):
    log_p_tail = np.where(p_tail > 1e-12, np.log(np.abs(p_tail)), -np.inf)
  log_q_bins = np.concatenate([log_q_k, log_q_tail[:, None]], -1)
  log_p_bins = np.concatenate([log_p_k, log_p_tail[:, None]], -1)
  return log_q_bins, log_p_bins


def _ref64(name, hp, log_q, log_p, weights=None):
  """reference_np's divergence of log-probabilities (as logits, T = 1)."""
  if name == "akl":
    return ref.akl(log_q, log_p, weights=weights, **hp)
  if name == "fkl_rkl":  # a zero weight drops its term, even +inf
    w = hp["weight"]
    rkl = ref.rkl(log_q, log_p) if w < 1 else 0.0
    return w * ref.fkl(log_q, log_p) + (1 - w) * rkl
  value = ref.DIVERGENCES[name](log_q, log_p, **hp)
  if name == "abkd" and hp["alpha"] == hp["beta"] == 0.0:
    # ½ Σ (log q − log p)² is +inf where p = 0 < q (reference_np drops it).
    off = np.isneginf(_log_softmax64(log_p)) & np.isfinite(log_q)
    value = np.where(off.any(-1), np.inf, value)
  return value


def _akl_weights64(name, hp, log_q, log_p):
  if name != "akl":
    return None
  return ref.akl_weights(np.exp(log_p), np.exp(log_q), **hp)


def _num_grad(fn, s, coords, eps=1e-6):
  """Central differences of ``sum(fn(s))`` at ``coords`` [(row, col)]."""
  out = []
  for row, col in coords:
    e = np.zeros_like(s)
    e[row, col] = eps
    out.append((np.sum(fn(s + e)) - np.sum(fn(s - e))) / (2 * eps))
  return np.array(out)


# ----------------------------------------------------------------------------
# Encoding a teacher.


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_top_k_is_the_float64_top_k(temperature):
  _, t = _logits(0)
  t[1, 100:] = -np.inf  # 100 finite tokens: a K = 120 row has 20 unused
  log_p = _log_softmax64(t, temperature)
  for k in (1, 8, 120):
    enc = kd.sparse.top_k(jnp.float32(t), k, temperature=temperature)
    ids = np.asarray(enc.ids)
    want = np.argsort(-log_p, axis=-1, kind="stable")[:, :k]
    finite = np.isfinite(np.take_along_axis(log_p, want, -1))
    np.testing.assert_array_equal(ids[finite], want[finite])
    np.testing.assert_allclose(
        np.asarray(enc.log_probs),
        np.take_along_axis(log_p, ids, -1),
        rtol=1e-6,
        atol=1e-5,
    )
    assert enc.ids.dtype == jnp.int32 and enc.log_probs.dtype == jnp.float32
    assert all(len(set(row)) == k for row in ids)  # distinct within a row


def test_sample_draws_from_the_teacher():
  n, v, num, keys = 3, 12, 8, 4000
  rng = np.random.default_rng(1)
  t = rng.normal(size=(n, v)).astype(np.float32)
  t[2, 6:] = -np.inf  # never drawn
  log_p64 = _log_softmax64(t, 2.0)
  p = np.exp(log_p64)

  def dense_weights(key):
    enc = kd.sparse.sample(key, jnp.asarray(t), num, temperature=2.0)
    rows = jnp.arange(n)[:, None]
    return enc, jnp.zeros((n, v)).at[rows, enc.ids].add(enc.weights)

  enc, dense = jax.jit(jax.vmap(dense_weights))(
      jax.random.split(jax.random.key(0), keys)
  )
  ids, w, log_p = (np.asarray(x) for x in enc)
  np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-6)
  # Weights are counts / S; padding slots are (id 0, weight 0, log-prob 0).
  np.testing.assert_allclose(w * num, np.round(w * num), atol=1e-5)
  pad = w == 0
  assert np.all(ids[pad] == 0) and np.all(log_p[pad] == 0.0)
  distinct = np.where(pad, -1 - np.arange(num), ids).reshape(-1, num)
  assert all(len(set(row)) == num for row in distinct)
  want = np.take_along_axis(np.broadcast_to(log_p64, (keys, n, v)), ids, -1)
  np.testing.assert_allclose(log_p[~pad], want[~pad], rtol=1e-5, atol=1e-5)
  # E[w_v] = p_v, Var[w_v] = p_v (1 − p_v) / S for one set of draws.
  mean = np.asarray(dense, np.float64).mean(0)
  se = np.sqrt(p * (1 - p) / (num * keys))
  assert np.all(np.abs(mean - p) <= 4.5 * se + 1e-7)
  assert np.all(mean[2, 6:] == 0.0)


# ----------------------------------------------------------------------------
# Top-k divergences.


@pytest.mark.slow
def test_exact_for_a_k_sparse_teacher():
  """p = 0 off K: the coarsened pair loses nothing (p/q is 0 throughout the
  tail), so sparse == dense engine == reference, values and gradients, +inf
  included. Rows 2, 3 have a one-token student tail (the other tail tokens
  -inf, as in the teacher): exact for every ABKD; on rows 0, 1 (full
  student) ABKD with alpha + beta < 1 is smaller (subadditive t^λ)."""
  k = 8
  s, t = _logits(2)
  keep = np.argsort(-t, -1)[:, :k]
  t_sparse = np.full_like(t, -np.inf)
  np.put_along_axis(t_sparse, keep, np.take_along_axis(t, keep, -1), -1)
  one = np.concatenate([keep, np.argsort(t, -1)[:, :1]], -1)[2:]
  s[2:] = -np.inf
  np.put_along_axis(
      s[2:], one, np.take_along_axis(_logits(2)[0][2:], one, -1), -1
  )
  t32 = jnp.float32(t_sparse)
  top = kd.sparse.top_k(t32, k)
  enc = _pad(top.ids, top.log_probs)
  for name, hp in CASES:
    value, grad = _run("sparse", name, hp, s, enc)
    assert not np.isnan(grad).any()
    exact = np.ones(N, bool)
    if name == "abkd" and not _lambda_one(name, hp) and hp["alpha"] > 0:
      exact[:2] = False
    for impl in ("dense", "reference"):
      want, want_grad = _run(impl, name, hp, s, t32)
      msg = f"{name} {hp} vs {impl}"
      assert np.all(value[~exact] < want[~exact]), msg
      np.testing.assert_allclose(
          value[exact], want[exact], rtol=2e-5, atol=1e-6, err_msg=msg
      )
      np.testing.assert_allclose(
          grad[exact], want_grad[exact], atol=2e-6, err_msg=msg
      )


@pytest.mark.slow
@pytest.mark.parametrize("k", [1, 8, 32])
def test_matches_float64_bins(k):
  """Random teachers: values and gradients equal a float64 transcription of
  the (K + 1)-bin formula (T = 1, 2); the f-divergences are at most the
  dense ones (data processing)."""
  s, t = _logits(10 + k)
  for temperature in (1.0, 2.0):
    top = kd.sparse.top_k(jnp.float32(t), k, temperature=temperature)
    ids = np.asarray(top.ids)
    log_p_k = np.take_along_axis(_log_softmax64(t, temperature), ids, -1)
    coords = [(r, int(ids[r, 0])) for r in range(N)]
    coords += [(r, c) for r in range(N) for c in (0, 299) if c not in ids[r]]
    log_q, log_p = _bins64(s, ids, log_p_k, temperature)
    for name, hp in CASES:
      msg = f"{name} {hp} K={k} T={temperature}"
      value, grad = _run(
          "sparse", name, hp, s, _pad(ids, top.log_probs), temperature
      )
      weights = _akl_weights64(name, hp, log_q, log_p)
      want = _ref64(name, hp, log_q, log_p, weights)
      np.testing.assert_allclose(value, want, rtol=1e-4, atol=2e-6, err_msg=msg)

      def f64(x):
        bins = _bins64(x, ids, log_p_k, temperature)
        return _ref64(name, hp, *bins, weights)

      np.testing.assert_allclose(
          [grad[r, c] for r, c in coords],
          _num_grad(f64, s, coords),
          rtol=1e-3,
          atol=2e-6,
          err_msg=msg,
      )
      if name in F_DIVERGENCE or _lambda_one(name, hp):
        dense = ref.DIVERGENCES[name](s, t, temperature=temperature, **hp)
        assert np.all(want <= dense + 1e-9), msg


def test_student_tail_is_stable():
  """Σ_K q_k rounds to 1 in float32, so log(1 − Σ q) would be -inf; the
  complement's log-sum-exp gives the float64 value."""
  s = np.full((1, V), -40.0)
  s[0, :4] = 0.0
  log_p = np.log(np.array([[0.4, 0.3, 0.2, 0.05]]))
  enc = kd.sparse.TopK(jnp.arange(4, dtype=jnp.int32)[None], jnp.float32(log_p))
  (_, log_q_tail), value = jax.jit(
      lambda x: (
          kd.sparse.coarsen(x, enc.ids, jnp.ones((1, 4), bool)),
          kd.sparse.fkl(x, enc),
      )
  )(jnp.float32(s))
  want = special.logsumexp(_log_softmax64(s)[0, 4:])
  np.testing.assert_allclose(float(log_q_tail[0]), want, rtol=1e-6)
  q, p = _bins64(s, np.arange(4)[None], log_p, 1.0)
  np.testing.assert_allclose(value, ref.fkl(q, p), rtol=1e-5)


@pytest.mark.slow
def test_unused_slots_contribute_nothing():
  """Rows with fewer than K tokens (top_k's -inf slots, also padding): the
  values and gradients of the 3 real tokens, no NaN; a 3-slot encoding gives
  the same FKL."""
  s, t = _logits(3)
  t[:, 3:] = -np.inf
  t[1, 0] = 9.0
  wide = kd.sparse.top_k(jnp.float32(t), 8)
  assert np.all(np.isneginf(np.asarray(wide.log_probs)[:, 3:]))
  narrow = kd.sparse.top_k(jnp.float32(t), 3)
  ids = np.asarray(narrow.ids)
  log_p_k = np.take_along_axis(_log_softmax64(t), ids, -1)
  log_q, log_p = _bins64(s, ids, log_p_k, 1.0)
  for name, hp in CASES:
    value, grad = _run("sparse", name, hp, s, _pad(wide.ids, wide.log_probs))
    assert not np.isnan(grad).any(), name
    want = _ref64(
        name, hp, log_q, log_p, _akl_weights64(name, hp, log_q, log_p)
    )
    np.testing.assert_allclose(value, want, rtol=1e-4, err_msg=f"{name} {hp}")
  fkl = jax.jit(jax.value_and_grad(lambda x: jnp.sum(kd.sparse.fkl(x, narrow))))
  want_value, want_grad = fkl(jnp.float32(s))
  value, grad = _run("sparse", "fkl", {}, s, _pad(wide.ids, wide.log_probs))
  np.testing.assert_allclose(value.sum(), want_value, rtol=1e-6)
  np.testing.assert_allclose(grad, want_grad, atol=1e-7)


def test_jit_vmap_and_chunks():
  """vmap over a leading axis and token chunks (with a remainder) equal the
  batched call; [B, T] leading axes keep their shape."""
  s, t = _logits(4)
  s, t = jnp.float32(s).reshape(2, 2, V), jnp.float32(t).reshape(2, 2, V)
  enc = kd.sparse.top_k(t, 8, temperature=2.0)
  fkl = lambda x, e, **kw: kd.sparse.fkl(x, e, temperature=2.0, **kw)

  @jax.jit
  def run(s, enc):
    """The batched call, its vmap, and the gradient in one piece and in
    chunks of 3 (one program)."""
    grads = [
        jax.grad(lambda x, c=c: jnp.sum(fkl(x, enc, chunk_size=c)))(s)
        for c in (0, 3)
    ]
    return fkl(s, enc), jax.vmap(fkl)(s, enc), grads

  batched, vmapped, grads = run(s, enc)
  assert batched.shape == (2, 2)
  np.testing.assert_allclose(vmapped, batched, rtol=1e-6)
  np.testing.assert_allclose(grads[0], grads[1], atol=1e-7)


def test_user_errors():
  s = jnp.zeros((2, 10))
  ids = jnp.zeros((2, 4), jnp.int32)
  sampled = kd.sparse.Sampled(ids, jnp.full((2, 4), 0.25), jnp.zeros((2, 4)))
  with pytest.raises(ValueError, match="supports only fkl.*top_k"):
    kd.sparse.rkl(s, sampled)
  topk = kd.sparse.TopK(ids, jnp.zeros((2, 4)))
  with pytest.raises(ValueError, match="leading axes"):
    kd.sparse.fkl(s[:1], topk)
  with pytest.raises(TypeError, match="TopK"):
    kd.sparse.fkl(s, s)
  with pytest.raises(ValueError, match="k=0"):
    kd.sparse.top_k(s, 0)
  with pytest.raises(TypeError, match="takes no hyper-parameter"):
    kd.sparse.fkl(s, topk, alpha=0.1)


# ----------------------------------------------------------------------------
# RS-KD.


def test_sampled_fkl_is_unbiased():
  """Mean over keys of the estimator's value and gradient equals the dense
  FKL's within 4 empirical standard errors."""
  n, v, num, keys = 2, 24, 4, 3000
  rng = np.random.default_rng(6)
  s = jnp.float32(rng.normal(size=(n, v)))
  t = jnp.float32(1.5 * rng.normal(size=(n, v)))

  def one(key):
    enc = kd.sparse.sample(key, t, num, temperature=2.0)
    return jax.value_and_grad(
        lambda x: jnp.sum(kd.sparse.fkl(x, enc, temperature=2.0))
    )(s)

  values, grads = jax.jit(jax.vmap(one))(
      jax.random.split(jax.random.key(1), keys)
  )
  q, p = (np.exp(_log_softmax64(x, 2.0)) for x in (s, t))
  dense_value = ref.fkl(s, t, temperature=2.0).sum()
  dense_grad = (q - p) / 2.0
  for got, want in ((values, dense_value), (grads, dense_grad)):
    got = np.asarray(got, np.float64)
    se = got.std(0) / np.sqrt(keys)
    assert np.all(np.abs(got.mean(0) - want) <= 4 * se + 1e-6)
  assert np.asarray(grads).std(0).max() > 1e-3  # an estimator, not exact


# ----------------------------------------------------------------------------
# Dense divergences with -inf in the teacher alone.


def _finite_part64(name, hp, s, t, weights):
  """What the gradient differentiates on a +inf row: the FKL part of
  FKL+RKL and AKL (weights pinned), 0 for a divergence that is +inf for
  every student."""
  if name == "fkl_rkl":
    return hp["weight"] * ref.fkl(s, t)
  if name == "akl":
    return weights[0] * ref.fkl(s, t)
  return np.zeros(s.shape[0])


@pytest.mark.slow
def test_dense_teacher_inf_alone():
  """Teacher -inf where the student is finite (rows 0, 1, 3): +inf exactly
  for the divergences containing KL(q‖p), the float64 value for the others;
  the gradient is the float64 gradient of the finite part. Row 1 also has
  shared -inf slots, row 2 is an ordinary row."""
  s, t = _logits(7)
  t[0, 10:] = -np.inf
  t[1, :200] = -np.inf
  t[3, 1::2] = -np.inf
  s[1, :3] = -np.inf
  off = np.array([True, True, False, True])
  q, p = (np.exp(_log_softmax64(x)) for x in (s, t))
  coords = [(0, 3), (0, 50), (1, 5), (1, 250), (2, 0), (2, 77), (3, 1)]
  for name, hp in CASES:
    weights = ref.akl_weights(p, q, **hp) if name == "akl" else None
    infinite = off & _infinite(name, hp)
    want = np.where(infinite, np.inf, _ref64(name, hp, s, t, weights))
    want_grad = _num_grad(
        lambda x: np.where(
            infinite,
            _finite_part64(name, hp, x, t, weights),
            _ref64(name, hp, x, t, weights),
        ),
        s,
        coords,
    )
    for impl in ("dense", "reference"):
      value, grad = _run(impl, name, hp, s, jnp.float32(t))
      msg = f"{impl} {name} {hp}"
      np.testing.assert_allclose(value, want, rtol=1e-5, err_msg=msg)
      assert not np.isnan(grad).any(), msg
      np.testing.assert_allclose(
          [grad[r, c] for r, c in coords],
          want_grad,
          rtol=1e-4,
          atol=1e-6,
          err_msg=msg,
      )
      assert np.all(grad[1, :3] == 0.0), msg  # the shared -inf slots
