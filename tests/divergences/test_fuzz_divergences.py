"""Hypothesis fuzz of every divergence in kdjax.divergences.

What is drawn, per example: a *bucket* (leading axes, vocabulary size, dtype,
temperature and one setting of every hyper-parameter; see BUCKETS) and the
logits' content: scale, student/teacher relation (independent, close, equal),
a fraction of ±1e4 entries, -inf slots and the response mask (all one, all
zero, random 0/1, fractional weights). Hyper-parameters and temperature are
concrete Python floats here (each picks its endpoint formula at trace time),
so each distinct value is one jax compile; the buckets keep the number of
compiles small (one program per bucket holds every divergence and execution
path) while still covering the endpoints (alpha, beta, weight in {0, 1}; mu in {0, 1}; both
AKL rules), V = 2 ... 301 (around AKL_TOP_K = 64), one-row and [B, T] inputs,
float32/bfloat16/float16 and T = 0.5 ... 4.

The contract tested (core.py, engine.py docstrings): values and gradients are
finite; a -inf slot *shared* by teacher and student contributes exactly 0 to
the gradient; ``masked_mean`` is finite, is 0 with gradient 0 for an all-zero
mask, and gives masked rows an exact 0 gradient. The checks that can fail on a
wrong number: the public divergence in one piece equals the autodiff
reference, and forced chunking (with a remainder) equals one piece, on the
same inputs (values and gradients, dtype-aware tolerances); both values equal
the float64 NumPy references of reference_np; non-negativity and the
JSD/TVD upper bounds; the "sinkd" Sinkhorn solver equals SinKD's loop.

-inf in only one of teacher and student is drawn with the others (same
compiled programs) and checked only for what a training step needs: no NaN in
values or gradients. -inf in the teacher alone is exact (RKL-type values +inf),
which tests/divergences/test_sparse_divergences.py checks against float64; -inf in the
student alone is outside the contract (its log-probability is finite-ised).

Run with ``--hypothesis-show-statistics`` to see the example counts; the
module-scoped fixture also prints them with the wall time (``-s``).
"""

from __future__ import annotations

import collections
import functools
import math
import time
from typing import Any, NamedTuple

import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import divergences as kd
from kdjax.divergences import core, engine, fused
import reference_np as ref

hypothesis.settings.register_profile(
    "kdjax-fuzz",
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=True,
    suppress_health_check=[hypothesis.HealthCheck.too_slow],
    # No shrinking: logits come from a drawn seed, so a "smaller" seed is no
    # simpler case, and every shrink step would recompile or rerun jax.
    phases=(
        hypothesis.Phase.explicit,
        hypothesis.Phase.reuse,
        hypothesis.Phase.generate,
    ),
)
_PROFILE = hypothesis.settings.get_profile("kdjax-fuzz")


def fuzz(max_examples: int) -> hypothesis.settings:
  """The module's profile (not loaded globally) with an example budget."""
  return hypothesis.settings(_PROFILE, max_examples=max_examples)


# Compiling dominates this module's CPU time: LLVM at -O0 halves it. The HLO
# passes (fusion, algebraic simplification), where a rewrite could change the
# numerics, still run; results differ from -O2 code by a few ulps (measured).
_jit = functools.partial(
    jax.jit, compiler_options={"xla_backend_optimization_level": 0}
)

_EXAMPLES: collections.Counter = collections.Counter()


@pytest.fixture(scope="module", autouse=True)
def _report_examples():
  start = time.perf_counter()
  yield
  print(
      f"\n[fuzz] {sum(_EXAMPLES.values())} examples "
      f"{dict(_EXAMPLES)} in {time.perf_counter() - start:.1f} s wall"
  )


# ----------------------------------------------------------------------------
# Buckets: the static part of an example (one jax compile per bucket).


class Bucket(NamedTuple):
  lead: tuple[int, ...]
  vocab: int
  dtype: Any
  temperature: float
  chunk: int  # forced chunk size; N mod chunk > 0 where N > 1
  hp: dict[str, dict[str, Any]]


def _hp(weight, skl, srkl, beta, mu, rule, ab):
  return {
      "fkl": {},
      "rkl": {},
      "tvd": {},
      "fkl_rkl": {"weight": weight},
      "skl": {"alpha": skl},
      "srkl": {"alpha": srkl},
      "jsd": {"beta": beta},
      "akl": {"mu": mu, "rule": rule},
      "abkd": {"alpha": ab[0], "beta": ab[1]},
  }


BUCKETS = (
    Bucket(
        (1,),
        2,
        jnp.float32,
        1.0,
        1,
        _hp(0.0, 0.0, 1.0, 0.0, 0.5, "akl", (0.0, 1.0)),
    ),
    Bucket(
        (6,),
        64,
        jnp.bfloat16,
        0.5,
        4,
        _hp(0.3, 0.1, 0.1, 0.5, 0.5, "dskd", (0.2, 0.7)),
    ),
    Bucket(
        (2, 3),
        301,
        jnp.float32,
        2.0,
        4,
        _hp(1.0, 1.0, 0.0, 1.0, 0.9, "akl", (0.5, 0.0)),
    ),
    Bucket(
        (3,),
        65,
        jnp.float16,
        4.0,
        2,
        _hp(0.7, 0.9, 0.5, 0.1, 0.0, "dskd", (1.0, 0.0)),
    ),
    Bucket(
        (1, 4),
        17,
        jnp.bfloat16,
        3.0,
        3,
        # ABKD at its Hellinger point: at +-1e4 bf16 logits the alpha = 0
        # limit loses ~5e-5 relative, and the alpha = beta = 0 limit
        # 1/2 sum (log q - log p)^2 weights no entry by a probability, so
        # underflowed slots have no agreed value; tests/divergences/test_divergences_engine.py
        # checks both limits on moderate logits.
        _hp(0.5, 0.5, 0.9, 0.9, 1.0, "akl", (0.5, 0.5)),
    ),
    Bucket(
        (2, 2),
        7,
        jnp.float16,
        0.5,
        3,
        _hp(0.9, 0.3, 0.25, 0.3, 0.2, "dskd", (1.3, 0.4)),
    ),
)
NAMES = engine.NAMES  # every token-level divergence


def _hp_of(bucket: int, name: str) -> dict[str, Any]:
  return BUCKETS[bucket].hp[name]


def _per_token(impl: str, bucket: int, name: str):
  """``reference`` (autodiff), ``whole`` (the public divergence in one piece)
  or ``chunked`` (the public divergence over ``bucket.chunk`` tokens)."""
  b, hp = BUCKETS[bucket], _hp_of(bucket, name)
  if impl == "reference":
    return functools.partial(
        kd.get(name, "reference"), temperature=b.temperature, **hp
    )
  return functools.partial(
      kd.get(name),
      temperature=b.temperature,
      chunk_size=b.chunk if impl == "chunked" else 0,
      **hp,
  )


IMPLS = ("reference", "whole")


def _value_grad_mean(fn, s, t, mask):
  """Per-token values, their masked mean and its gradient w.r.t. ``s``."""

  def loss(x):
    per_token = fn(x, t)
    return kd.masked_mean(per_token, mask), per_token

  (mean, per_token), grad = jax.value_and_grad(loss, has_aux=True)(s)
  return per_token, mean, grad


# Buckets whose token count leaves a remainder chunk (N mod chunk > 0); the
# chunked path is compiled and checked on these.
CHUNKED_BUCKETS = (1, 2, 5)


def _impls(bucket: int) -> tuple[str, ...]:
  return IMPLS + (("chunked",) if bucket in CHUNKED_BUCKETS else ())


@functools.partial(_jit, static_argnames="bucket")
def _token_run(s, t, mask, *, bucket: int):
  """Every divergence and implementation of a bucket in one compiled program
  (one compile per bucket; separate programs would cost one each)."""
  out = {
      f"{name}/{impl}": _value_grad_mean(
          _per_token(impl, bucket, name), s, t, mask
      )
      for name in NAMES
      for impl in _impls(bucket)
  }
  # The weights the reference AKL used, to pin them in the float64 reference.
  temperature = BUCKETS[bucket].temperature
  p, q = (jnp.exp(core.log_probs(x, temperature)) for x in (t, s))
  out["w_head"] = core.akl_weights(p, q, **_hp_of(bucket, "akl"))[0]
  return out


# ----------------------------------------------------------------------------
# Content: drawn by hypothesis, materialised by NumPy from a drawn seed.


class Case(NamedTuple):
  s: jax.Array
  t: jax.Array
  mask: np.ndarray  # float32, leading axes
  inf_s: np.ndarray  # bool [..., V], -inf slots of the student
  inf_t: np.ndarray  # same for the teacher
  recipe: str  # how it was drawn (hypothesis prints this)

  def __repr__(self):
    return f"Case({self.recipe})"


INF_SHARED = ("none", "shared", "padded")
INF_ONE_SIDED = ("teacher", "student")


@st.composite
def cases(draw, lead, vocab, dtype, inf_modes=INF_SHARED):
  seed = draw(st.integers(0, 2**32 - 1))
  scale = draw(st.sampled_from([0.01, 1.0, 4.0, 30.0]))
  relation = draw(st.sampled_from(["independent", "close", "equal"]))
  extreme = draw(st.sampled_from([0.0, 0.0, 0.1, 1.0]))  # share of ±1e4
  inf_mode = draw(st.sampled_from(inf_modes))
  mask_kind = draw(
      st.sampled_from(["ones", "ones", "random", "fractional", "zeros"])
  )
  rng = np.random.default_rng(seed)
  shape = tuple(lead) + (vocab,)
  t = scale * rng.standard_normal(shape)
  s = scale * rng.standard_normal(shape)
  if relation == "close":
    s = t + 0.01 * s
  for x in (s, t):
    hit = rng.random(shape) < extreme
    x[hit] = rng.choice([-1e4, 1e4], size=int(hit.sum()))
  if relation == "equal":
    s = t.copy()
  inf = _inf_slots(rng, shape, inf_mode)
  inf_s = inf if inf_mode != "teacher" else np.zeros(shape, bool)
  inf_t = inf if inf_mode != "student" else np.zeros(shape, bool)
  s[inf_s], t[inf_t] = -np.inf, -np.inf
  mask = {
      "ones": np.ones(lead),
      "zeros": np.zeros(lead),
      "random": rng.random(lead) < 0.5,
      "fractional": rng.random(lead),
  }[mask_kind].astype(np.float32)
  recipe = (
      f"shape={shape}, dtype={jnp.dtype(dtype).name}, seed={seed}, "
      f"scale={scale}, relation={relation!r}, extreme={extreme}, "
      f"inf={inf_mode!r}, mask={mask_kind!r}"
  )
  return Case(
      jnp.asarray(s, dtype), jnp.asarray(t, dtype), mask, inf_s, inf_t, recipe
  )


def _inf_slots(rng, shape, mode) -> np.ndarray:
  """-inf slots, at least one finite slot per row."""
  vocab = shape[-1]
  if mode == "none":
    return np.zeros(shape, bool)
  if mode == "padded":  # vocabulary padding: the last k slots of every row
    k = rng.integers(1, vocab)
    return np.broadcast_to(np.arange(vocab) >= vocab - k, shape).copy()
  inf = rng.random(shape) < rng.uniform(0.1, 0.9)
  keep = rng.integers(0, vocab, size=shape[:-1])
  np.put_along_axis(inf, keep[..., None], False, axis=-1)
  return inf


# ----------------------------------------------------------------------------
# Tolerances. Log-ratios of logits of size m = max|logit| / T are resolved to
# about m·eps32 in float32 (either implementation); bf16/f16 gradients are one
# rounding of a float32 gradient, so they may differ by one unit in the last
# place of the low-precision format.

_EPS32 = float(np.finfo(np.float32).eps)
_EPS = {jnp.float32: 0.0, jnp.bfloat16: 2.0**-7, jnp.float16: 2.0**-10}
_TINY = {
    jnp.float32: 0.0,
    jnp.bfloat16: 0.0,
    jnp.float16: float(np.finfo(np.float16).smallest_subnormal),
}


def _f64(x) -> np.ndarray:
  return np.asarray(x).astype(np.float64)  # bf16 via ml_dtypes, on the host


def _magnitude(case: Case, temperature: float) -> float:
  logits = np.concatenate([_f64(case.s).ravel(), _f64(case.t).ravel()])
  return max(1.0, np.max(np.abs(logits[np.isfinite(logits)])) / temperature)


def _value_atol(mag: float) -> float:
  return 1e-6 + 64 * _EPS32 * mag


def _assert_grad_close(got, want, dtype, mag, cotangent, temperature, err_msg):
  """Elementwise ``|got − want| ≤ atol + 2·eps_dtype·|want|``.

  Every gradient is ``cotangent · q ⊙ (O(log-ratio) terms) / T``, so its float32
  error is bounded by ``eps32 · m · max|cotangent| / T`` whatever the size of the
  (possibly cancelling) gradient itself.
  """
  atol = (
      64 * _EPS32 * mag * np.max(np.abs(cotangent), initial=0) / temperature
      + _TINY[dtype]
  )
  bound = atol + 2 * _EPS[dtype] * np.abs(want)
  excess = np.abs(got - want) - bound
  assert np.all(excess <= 0), (
      f"{err_msg}: max excess {excess.max():.3g} over a tolerance of "
      f"{atol:.3g} + {2 * _EPS[dtype]:.3g}·|grad| (max |grad| "
      f"{np.max(np.abs(want), initial=0):.3g})"
  )


def _reference(name, hp, s64, t64, temperature, w_head=None) -> np.ndarray:
  extra = {} if w_head is None else {"weights": (w_head, 1.0 - w_head)}
  return ref.DIVERGENCES[name](s64, t64, temperature=temperature, **hp, **extra)


# ----------------------------------------------------------------------------
# Token-level divergences: reference, whole and chunked.


@st.composite
def bucket_cases(draw, buckets=range(len(BUCKETS)), inf_modes=INF_SHARED):
  bucket = draw(st.sampled_from(tuple(buckets)))
  b = BUCKETS[bucket]
  return bucket, draw(cases(b.lead, b.vocab, b.dtype, inf_modes))


def _reference_hp(name: str, hp: dict) -> tuple[str, dict]:
  """The reference to compare with: the skew endpoints α = 0 are FKL/RKL
  (core docstrings). reference_np takes log(α p + (1 − α) q) of float64
  probabilities, which is log 0 at α = 0 once both underflow (|logits| ~ 1e4).
  """
  if name in ("skl", "srkl") and hp["alpha"] == 0.0:
    return ("fkl" if name == "skl" else "rkl"), {}
  return name, hp


def _check_contract(msg, case, values, mean, grad, value_atol):
  """Finite values and gradients, masked_mean, shared -inf slots, masked rows."""
  assert grad.dtype == case.s.dtype, msg
  values, grad = _f64(values), _f64(grad)
  assert np.all(np.isfinite(values)), msg
  assert np.all(np.isfinite(grad)), msg
  assert np.all(grad[case.inf_s & case.inf_t] == 0.0), msg
  want_mean = np.sum(case.mask * values) / max(
      np.sum(case.mask, dtype=np.float64), 1.0
  )
  np.testing.assert_allclose(
      float(mean), want_mean, rtol=1e-5, atol=value_atol, err_msg=msg
  )
  assert np.all(grad[case.mask == 0] == 0.0), msg
  if not case.mask.any():
    assert float(mean) == 0.0, msg
  return values, grad


@fuzz(max_examples=240)
@hypothesis.given(example=bucket_cases(inf_modes=INF_SHARED + INF_ONE_SIDED))
def test_token_divergences(example):
  """reference, whole and chunked: contract, equality, float64 reference,
  bounds.

  The -inf-in-one-side cases share the compiled programs and get only the
  no-NaN check of :func:`_check_one_sided`.
  """
  bucket, case = example
  _EXAMPLES["token"] += 1
  b = BUCKETS[bucket]
  out = jax.device_get(
      _token_run(case.s, case.t, jnp.asarray(case.mask), bucket=bucket)
  )
  if np.any(case.inf_s != case.inf_t):
    _check_one_sided(out, bucket)
    return
  mag = _magnitude(case, b.temperature)
  value_atol = _value_atol(mag)
  cotangent = case.mask / max(np.sum(case.mask, dtype=np.float64), 1.0)
  s64, t64 = _f64(case.s), _f64(case.t)
  for name in NAMES:
    hp = _hp_of(bucket, name)
    values, grads = {}, {}
    for impl in _impls(bucket):
      msg = f"{impl} {name} {hp} bucket {bucket}"
      values[impl], grads[impl] = _check_contract(
          msg, case, *out[f"{name}/{impl}"], value_atol
      )
      if name == "abkd" and impl == "reference":
        continue  # its direct formula cancels to −ulp at p ≈ q; checked below
      assert np.all(values[impl] >= -value_atol), msg
      if name == "tvd":
        assert np.all(values[impl] <= 1.0 + value_atol), msg
      if name == "jsd" and 0.0 < hp["beta"] < 1.0:
        assert np.all(values[impl] <= math.log(2.0) + value_atol), msg
    # whole against the reference, chunked against whole.
    exact = (
        _akl_settled_rows(t64, b.temperature, hp["mu"], mag)
        if name == "akl"
        else np.ones(values["whole"].shape, bool)
    )
    smooth = (
        _tvd_smooth_rows(s64, t64, b.temperature, mag)
        if name == "tvd"
        else np.ones(values["whole"].shape, bool)
    )
    for impl, base in (("whole", "reference"), ("chunked", "whole")):
      if impl not in values:
        continue
      rows = exact if base == "reference" else Ellipsis
      msg = f"{impl} vs {base} {name} {hp} bucket {bucket}"
      np.testing.assert_allclose(
          values[impl][rows],
          values[base][rows],
          rtol=1e-5,
          atol=value_atol,
          err_msg=msg,
      )
      rows = exact & smooth
      _assert_grad_close(
          grads[impl][rows],
          grads[base][rows],
          b.dtype,
          mag,
          cotangent[rows],
          b.temperature,
          msg,
      )
    if name == "tvd":  # any subgradient: |∂/∂s_v| <= cotangent · q_v / T
      q = np.exp(ref.log_softmax(s64, b.temperature))
      bound = cotangent[..., None] * q / b.temperature
      for impl in values:
        assert np.all(
            np.abs(grads[impl])
            <= bound * (1 + 2 * _EPS[b.dtype]) + 1e-6 * np.max(bound)
        ), f"{impl} tvd subgradient"
    if not exact.all():  # still w·FKL + (1 − w)·RKL for some w in [0, 1]
      _assert_between(
          values["whole"][~exact],
          out,
          "fkl",
          "rkl",
          value_atol,
          ~exact,
          f"whole akl {hp} bucket {bucket}",
      )
    ref_name, ref_hp = _reference_hp(name, hp)
    w_head = _f64(out["w_head"]) if name == "akl" else None
    want = _reference(ref_name, ref_hp, s64, t64, b.temperature, w_head)
    # The reference path made w_head; where rounding may move the head
    # (AKL rows not settled), the whole path's own head differs legitimately
    # and its value was bounded above instead.
    for path, rows in (("reference", Ellipsis), ("whole", exact)):
      np.testing.assert_allclose(
          values[path][rows],
          want[rows],
          rtol=1e-4,
          atol=value_atol,
          err_msg=f"float64 {name} {hp}",
      )


def _check_one_sided(out, bucket):
  """-inf in teacher or student only: the absence of NaN, which would poison
  a training step through the optimizer state, for every implementation (the
  teacher-only values are checked in tests/divergences/test_sparse_divergences.py; the
  student-only ones are outside the contract)."""
  for key, result in out.items():
    for x in jax.tree.leaves(result):
      assert not np.any(np.isnan(_f64(x))), (key, bucket)


def _akl_settled_rows(t64, temperature, mu, mag) -> np.ndarray:
  """Rows whose AKL head cannot depend on float32 rounding.

  The head is decided by comparing cumulative teacher mass S_k with mu; where
  some S_k (k >= 1) lies within rounding of mu, the float32 sums of
  the two implementations (sorted probabilities vs top-k of logits) may decide
  differently, and w_head jumps. Those rows get a weaker check.
  """
  p = np.exp(ref.log_softmax(t64, temperature))
  cum = np.cumsum(-np.sort(-p, axis=-1), axis=-1)
  gap = np.min(np.abs(cum - mu), axis=-1)  # S_0 = 0 is exact in float32
  return gap > 1e-4 + 8 * _EPS32 * mag


def _tvd_smooth_rows(s64, t64, temperature, mag) -> np.ndarray:
  """Rows where no |p_v − q_v| is within float32 rounding of 0.

  TVD's gradient q ⊙ (½ sign(q − p) − c) / T flips with the sign of a
  difference that rounding decides there (e.g. student = teacher: each
  implementation may round p_v and q_v apart by an ulp). Any such gradient is
  a subgradient; those rows get the subgradient bound instead.
  """
  p, q = (np.exp(ref.log_softmax(x, temperature)) for x in (t64, s64))
  near = np.abs(p - q) <= 16 * _EPS32 * mag * np.maximum(p, q)
  return ~np.any(near & (np.maximum(p, q) > 0), axis=-1)


def _assert_between(values, out, low_name, high_name, atol, rows, msg):
  a, b = (_f64(out[f"{n}/reference"][0])[rows] for n in (low_name, high_name))
  assert np.all(values >= np.minimum(a, b) - atol), msg
  assert np.all(values <= np.maximum(a, b) + atol), msg


# ----------------------------------------------------------------------------
# ULD (autodiff): teacher and student vocabularies may differ.


ULD_BUCKETS = (0, 2, 3)
ULD_VOCAB_DELTAS = (-1, 0, 7)  # teacher vocabulary minus the student's


@functools.partial(_jit, static_argnames="temperature")
def _uld_run(s, t, mask, *, temperature: float):
  return _value_grad_mean(
      functools.partial(kd.uld, temperature=temperature), s, t, mask
  )


@fuzz(max_examples=100)
@hypothesis.given(data=st.data())
def test_uld(data):
  """Finite, >= 0, <= 2, equal to the float64 reference, for any -inf slots
  (ULD sorts each distribution on its own, so one-sided -inf is well defined);
  no gradient into student -inf slots or masked rows."""
  bucket = data.draw(st.sampled_from(ULD_BUCKETS))
  b = BUCKETS[bucket]
  delta = data.draw(st.sampled_from(ULD_VOCAB_DELTAS))
  modes = INF_SHARED + INF_ONE_SIDED
  case = data.draw(cases(b.lead, b.vocab, b.dtype, modes))
  teacher = data.draw(cases(b.lead, max(b.vocab + delta, 2), b.dtype, modes))
  _EXAMPLES["uld"] += 1
  per_token, mean, grad = jax.device_get(
      _uld_run(
          case.s, teacher.t, jnp.asarray(case.mask), temperature=b.temperature
      )
  )
  mag = max(_magnitude(case, b.temperature), _magnitude(teacher, b.temperature))
  value_atol = _value_atol(mag)
  case = case._replace(inf_t=case.inf_s)  # the zero-gradient slots: student's
  values, _ = _check_contract(
      f"uld bucket {bucket}", case, per_token, mean, grad, value_atol
  )
  assert np.all(values >= -value_atol) and np.all(values <= 2 + value_atol)
  want = ref.uld(_f64(case.s), _f64(teacher.t), temperature=b.temperature)
  np.testing.assert_allclose(values, want, rtol=1e-4, atol=value_atol)


# ----------------------------------------------------------------------------
# fused_linear: hidden states and LM heads in, masked-mean loss out.

_FUSED = dict(n=7, h=8, k=6, vocab=33, chunk=3)  # 7 = 2·3 + 1: a padded chunk
_FUSED_BUCKET = 1  # hyper-parameters of BUCKETS[1]
_FUSED_SETTINGS = {jnp.float32: 1.5, jnp.bfloat16: 0.5}  # dtype -> temperature


@functools.partial(_jit, static_argnames="temperature")
def _fused_run(x_s, w_s, x_t, w_t, mask, *, temperature: float):
  """Per divergence: (fused loss, its grads) and (reference loss, its grads)."""
  matmul = functools.partial(jnp.matmul, preferred_element_type=jnp.float32)
  out = {}
  for name in NAMES:
    hp = _hp_of(_FUSED_BUCKET, name)

    def fused_loss(x, w, name=name, hp=hp):
      return fused.fused_linear(
          name,
          x,
          w,
          x_t,
          w_t,
          mask,
          chunk_size=_FUSED["chunk"],
          temperature=temperature,
          **hp,
      )

    def reference_loss(x, w, name=name, hp=hp):
      per_token = kd.get(name, "reference")(
          matmul(x, w.T), matmul(x_t, w_t.T), temperature=temperature, **hp
      )
      return kd.masked_mean(per_token, mask)

    out[name] = tuple(
        jax.value_and_grad(loss, (0, 1))(x_s, w_s)
        for loss in (fused_loss, reference_loss)
    )
  return out


@fuzz(max_examples=30)
@hypothesis.given(
    dtype=st.sampled_from(tuple(_FUSED_SETTINGS)),
    seed=st.integers(0, 2**32 - 1),
    scale=st.sampled_from([0.1, 1.0, 3.0, 30.0]),
    mask_kind=st.sampled_from(["ones", "random", "zeros"]),
)
def test_fused_linear_equals_reference(dtype, seed, scale, mask_kind):
  _EXAMPLES["fused_linear"] += 1
  rng = np.random.default_rng(seed)
  n, h, k, vocab = (_FUSED[key] for key in ("n", "h", "k", "vocab"))
  x_s, x_t = rng.standard_normal((n, h)), rng.standard_normal((n, k))
  w_s, w_t = (scale * rng.standard_normal((vocab, d)) for d in (h, k))
  mask = {
      "ones": np.ones(n),
      "zeros": np.zeros(n),
      "random": rng.random(n) < 0.5,
  }[mask_kind].astype(np.float32)
  temperature = _FUSED_SETTINGS[dtype]
  args = [jnp.asarray(a, dtype) for a in (x_s, w_s, x_t, w_t)]
  out = jax.device_get(
      _fused_run(*args, jnp.asarray(mask), temperature=temperature)
  )
  # Logit magnitude, for the float32 error bound of the log-ratios.
  mag = max(
      1.0,
      np.abs(_f64(args[0]) @ _f64(args[1]).T).max() / temperature,
      np.abs(_f64(args[2]) @ _f64(args[3]).T).max() / temperature,
  )
  # Logit-gradient error bound, as in _assert_grad_close, then contracted
  # over V (d/dhidden, with head rows) or over N (d/dhead, with hidden rows).
  logit_atol = 64 * _EPS32 * mag / max(mask.sum(), 1.0) / temperature
  contract = {
      "hidden": vocab * np.abs(_f64(args[1])).max(),
      "head": n * np.abs(_f64(args[0])).max(),
  }
  for name, ((value, grads), (want_value, want_grads)) in out.items():
    msg = f"fused_linear {name} {jnp.dtype(dtype).name} scale {scale}"
    assert np.isfinite(value), msg
    np.testing.assert_allclose(
        value, want_value, rtol=1e-5, atol=_value_atol(mag), err_msg=msg
    )
    if not mask.any():
      assert float(value) == 0.0, msg
    for got, want, what in zip(grads, want_grads, ("hidden", "head")):
      got, want = _f64(got), _f64(want)
      assert got.dtype == np.float64 and np.all(np.isfinite(got)), msg
      # bf16: both round the logit gradient or its contraction to bf16.
      atol = logit_atol * contract[what] + 4 * _EPS[dtype] * np.max(
          np.abs(want)
      )
      np.testing.assert_allclose(
          got, want, rtol=0, atol=atol, err_msg=f"{msg} d/d{what}"
      )
    assert np.all(_f64(grads[0])[mask == 0] == 0.0), msg  # masked tokens


# ----------------------------------------------------------------------------
# Sinkhorn (SinKD): groups of 3 rows, fixed iteration counts.

_SINKHORN_LEAD, _SINKHORN_VOCAB = (2, 3), 16
_SINKHORN_SOLVERS = {
    "ott": dict(num_iters=10),
    "debiased": dict(num_iters=10),
    "sinkd": {},
}  # sinkd: SinKD's 20 iterations


@_jit
def _sinkhorn_run(s, t, mask):
  return {
      solver: _value_grad_mean(
          lambda x, y, solver=solver, kw=kw: kd.sinkhorn(
              x, y, mask, solver=solver, **kw
          ),
          s,
          t,
          mask,
      )
      for solver, kw in _SINKHORN_SOLVERS.items()
  }


@fuzz(max_examples=45)
@hypothesis.given(case=cases(_SINKHORN_LEAD, _SINKHORN_VOCAB, jnp.float32))
def test_sinkhorn(case):
  """Finite values and gradients; masked rows get value 0 and no gradient;
  ott and sinkd rows are >= 0 (Π >= 0, C >= 0); debiased is 0 for equal
  inputs; sinkd equals SinKD's loop on the unmasked rows of each group."""
  _EXAMPLES["sinkhorn"] += 1
  out = jax.device_get(_sinkhorn_run(case.s, case.t, jnp.asarray(case.mask)))
  valid = case.mask > 0
  s64, t64 = _f64(case.s), _f64(case.t)
  for solver, (per_row, mean, grad) in out.items():
    msg = f"sinkhorn {solver}"
    per_row, grad = _check_contract(msg, case, per_row, mean, grad, 1e-5)
    assert np.all(per_row[~valid] == 0.0), msg
    if solver != "debiased":
      assert np.all(per_row >= -1e-6), msg
    elif np.array_equal(s64, t64):
      np.testing.assert_allclose(per_row, 0.0, atol=1e-4, err_msg=msg)
  for g in range(_SINKHORN_LEAD[0]):  # one OT problem per sequence
    rows = valid[g]
    if rows.any():
      want = ref.sinkd_rows(s64[g][rows], t64[g][rows])
      np.testing.assert_allclose(
          _f64(out["sinkd"][0])[g][rows],
          want,
          rtol=1e-4,
          atol=1e-6,
          err_msg="sinkd loop",
      )


# ----------------------------------------------------------------------------
# Regression tests for what the fuzz found (deterministic, cheap).


def test_log_partition_keeps_precision_at_large_logits():
  """A single float32 logsumexp at |logits / T| = 2e4 rounds to 2e-3 and
  would scale every teacher probability, making FKL wrong by ~10 at 2e4."""
  s = np.full((1, 8), 0.01, np.float32)
  t = np.zeros((1, 8), np.float32)
  t[0, 3:7] = 9984.0  # four tied teacher tokens: lse = 19968 + log 4
  s[0, 0] = 9984.0
  want = ref.fkl(s, t, temperature=0.5)
  for impl in ("reference", "auto"):
    got = kd.get("fkl", impl=impl)(s, t, temperature=0.5)
    np.testing.assert_allclose(got, want, rtol=1e-6, err_msg=impl)


def test_akl_accepts_numpy_logits():
  """NumPy logits outside jit (the top-k fallback indexes the teacher rows
  with a traced index)."""
  rng = np.random.default_rng(0)
  s, t = (rng.standard_normal((3, 70)).astype(np.float32) for _ in range(2))
  np.testing.assert_allclose(kd.akl(s, t), kd.reference.akl(s, t), rtol=1e-5)
