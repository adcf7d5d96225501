"""The public divergences (kdjax.divergences.engine): every execution path
against the autodiff reference and float64 NumPy, precision at LLM vocabulary
sizes, traced hyper-parameters, ABKD's limits, the AKL weights, memory and the
fused LM-head path."""

import ast
import functools
import importlib.util
import inspect
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import divergences as kd
from kdjax.divergences import core, engine, fused
import reference_np as ref

CASES = [
    ("fkl", {}),
    ("rkl", {}),
    ("fkl_rkl", {"weight": 0.3}),
    ("skl", {"alpha": 0.1}),
    ("srkl", {"alpha": 0.1}),
    ("jsd", {"beta": 0.1}),
    ("jsd", {"beta": 0.0}),
    ("tvd", {}),
    ("akl", {}),
    ("akl", {"rule": "dskd"}),
    ("skl", {"alpha": 1.0}),
    ("srkl", {"alpha": 1.0}),
    ("abkd", {}),
    ("abkd", {"alpha": 0.0, "beta": 0.5}),
]
IDS = [f"{n}-{'-'.join(f'{k}{v}' for k, v in hp.items())}" for n, hp in CASES]
N, V = 7, 257


def _logits(kind: str):
  k_s, k_t = jax.random.split(jax.random.key(len(kind)))
  s = 3.0 * jax.random.normal(k_s, (N, V))
  t = 3.0 * jax.random.normal(k_t, (N, V))
  t = t.at[:3, 5].add(15.0)  # peaked teacher rows: AKL top-k path
  if kind == "extreme":
    s, t = 3000.0 * s, 3000.0 * t  # logits of order ±1e4
  elif kind == "neginf":
    s = s.at[:, -3:].set(-jnp.inf)
    t = t.at[:, -3:].set(-jnp.inf)
  elif kind == "bf16":
    s, t = s.astype(jnp.bfloat16), t.astype(jnp.bfloat16)
  return s, t


def _value_and_grad(per_token, s, t, weight_N):
  """Per-row values and the gradient of their ``weight_N``-weighted sum."""

  def loss(x):
    per_row = per_token(x, t)
    return jnp.sum(per_row * weight_N), per_row

  (_, per_row), grad = jax.value_and_grad(loss, has_aux=True)(s)
  return per_row, grad


# The float32 kinds share one program: their rows are stacked (each row's
# divergence depends on that row alone), so one compile covers all three.
F32_KINDS = ("random", "extreme", "neginf")


def _program(kind: str) -> str:
  return "f32" if kind in F32_KINDS else kind


def _path_sizes(program: str) -> tuple:
  """chunk_size of every path: automatic, one piece, chunked (remainder)."""
  if program == "bf16":
    return (None, 0)  # the same per-block functions; keeps the suite short
  return (None, 0, 4)  # 3·N = 21 rows = 5·4 + 1


@functools.cache
def _every_path_outputs(program: str) -> dict:
  """``{"case/path": (per_row, grad)}`` of every case and path (the autodiff
  reference is path "reference"), float64, from one compiled program per
  dtype: "f32" stacks the rows of every kind in F32_KINDS (N rows each, in
  that order), "bf16" holds the bf16 rows."""
  kinds = F32_KINDS if program == "f32" else (program,)
  s, t = (jnp.concatenate(x) for x in zip(*map(_logits, kinds)))
  n = s.shape[0]
  weight_N = jax.random.uniform(jax.random.key(3), (n,))  # any cotangent

  @jax.jit
  def run(s, t, weight_N):
    out = {}
    for i, (name, hp) in enumerate(CASES):
      fns = {"reference": kd.get(name, "reference")}
      for size in _path_sizes(program):
        fns[str(size)] = functools.partial(kd.get(name), chunk_size=size)
      for path, fn in fns.items():
        per_token = functools.partial(fn, temperature=2.0, **hp)
        out[f"{i}/{path}"] = _value_and_grad(per_token, s, t, weight_N)
    return out

  return jax.tree.map(lambda x: np.asarray(x, np.float64), run(s, t, weight_N))


@pytest.mark.parametrize("case", range(len(CASES)), ids=IDS)
@pytest.mark.parametrize("kind", ["random", "extreme", "neginf", "bf16"])
def test_every_path_matches_the_reference(case, kind):
  """Automatic, one-piece and chunked (with a remainder) execution."""
  name = CASES[case][0]
  program = _program(kind)
  start = F32_KINDS.index(kind) * N if program == "f32" else 0
  rows = slice(start, start + N)
  out = jax.tree.map(lambda x: x[rows], _every_path_outputs(program))
  ref_value, ref_grad = out[f"{case}/reference"]
  scale = max(np.max(np.abs(ref_grad)), 1e-3)  # some extreme rows have 0 grad
  if kind == "extreme":
    # Log-ratios of size ~1e4 are resolved to 1e4·eps32 ≈ 1e-3 in float32; the
    # gradient q(r − c) inherits that absolute error in either implementation.
    grad_atol = 64 * np.finfo(np.float32).eps * 3e4 * scale
  elif kind == "bf16":
    grad_atol = 2**-7 * scale  # both round one float32 gradient to bf16
  else:
    grad_atol = 1e-5 * scale
  value_atol = 1e-5 if kind != "extreme" or name != "abkd" else 1e-2
  for size in _path_sizes(program):
    value, grad = out[f"{case}/{size}"]
    msg = f"chunk_size={size}"
    np.testing.assert_allclose(
        value, ref_value, rtol=1e-5, atol=value_atol, err_msg=msg
    )
    np.testing.assert_allclose(
        grad, ref_grad, rtol=0, atol=grad_atol, err_msg=msg
    )
    assert np.all(np.isfinite(grad)), msg
    if kind == "neginf":
      assert np.all(grad[:, -3:] == 0.0), msg  # exactly 0 in -inf slots


def test_gradient_dtype_follows_student():
  s, t = _logits("bf16")
  grad = jax.grad(lambda x: jnp.sum(kd.rkl(x, t)))(s)
  assert grad.dtype == jnp.bfloat16


def test_fkl_gradient_is_q_minus_p():
  s, t = _logits("random")
  s64, t64 = np.asarray(s, np.float64), np.asarray(t, np.float64)
  softmax = lambda x: np.exp(ref.log_softmax(x))
  grad = jax.grad(lambda x: jnp.sum(kd.fkl(x, t)))(s)
  np.testing.assert_allclose(grad, softmax(s64) - softmax(t64), atol=1e-6)


def test_registry_impls():
  assert kd.get("jsd") is kd.jsd is engine.jsd
  assert kd.get("jsd", impl="reference") is kd.reference.jsd
  assert kd.get("uld", impl="reference") is kd.uld
  with pytest.raises(ValueError, match="impl='cuda'"):
    kd.get("fkl", impl="cuda")
  with pytest.raises(TypeError, match="gamma"):
    engine.divergence("jsd", *_logits("random"), gamma=1.0)
  with pytest.raises(ValueError, match="chunk_size=-1"):
    kd.fkl(*_logits("random"), chunk_size=-1)
  with pytest.raises(ValueError, match="abkd alpha=-1 must be >= 0"):
    kd.abkd(*_logits("random"), alpha=-1.0)


def test_get_docstring_names_the_impls():
  assert all(f'"{impl}"' in kd.get.__doc__ for impl in kd.IMPLS)


# ----------------------------------------------------------------------------
# One copy of the math: every path computes through engine.rows_forward and
# engine.rows_grad.


def test_every_path_calls_the_canonical_block_functions(monkeypatch):
  calls = {"forward": 0, "grad": 0}
  real_forward, real_grad = engine.rows_forward, engine.rows_grad

  def forward(*args):
    calls["forward"] += 1
    return real_forward(*args)

  def grad(*args):
    calls["grad"] += 1
    return real_grad(*args)

  monkeypatch.setattr(engine, "rows_forward", forward)
  monkeypatch.setattr(engine, "rows_grad", grad)
  s, t = _logits("random")
  for size in (None, 0, 3):
    calls.update(forward=0, grad=0)
    # Tracing alone runs every Python function of the path (no compile).
    jax.make_jaxpr(jax.grad(lambda x: jnp.sum(kd.jsd(x, t, chunk_size=size))))(
        s
    )
    assert calls["forward"] >= 1 and calls["grad"] >= 1, size
  calls.update(forward=0, grad=0)
  x = jnp.ones((5, 4))
  jax.make_jaxpr(
      jax.grad(
          lambda w: fused.fused_linear(
              "jsd", x, w, x, jnp.ones((9, 4)), chunk_size=2
          )
      )
  )(jnp.ones((9, 4)))
  assert calls["forward"] >= 1 and calls["grad"] >= 1, "fused"


def test_no_module_outside_the_engine_computes_a_divergence():
  """fused.py and the package's other modules hold no log-softmax, exp or
  log of probabilities of their own beyond CE (an AST check)."""
  source = inspect.getsource(fused)
  names = {
      node.attr
      for node in ast.walk(ast.parse(source))
      if isinstance(node, ast.Attribute)
  }
  assert "value_and_grad" in names  # the engine's per-block function
  assert not names & {"exp", "log", "logsumexp", "expm1", "log1p"} - {
      "exp"
  }, names  # exp only turns CE's log-probabilities into q


# ----------------------------------------------------------------------------
# Precision at LLM vocabulary sizes against float64.


def _llm_logits(kind, n, vocab, seed=0):
  rng = np.random.default_rng(seed)
  s = 2.0 * rng.standard_normal((n, vocab))
  t = 2.0 * rng.standard_normal((n, vocab))
  if kind == "peaked":
    t[:, :4] += 12.0
  else:
    t *= 0.25  # flat: top-64 mass far below mu, AKL's fallback on every row
  return s.astype(np.float32), t.astype(np.float32)


def _grad64(name, s64, t64, **hp):
  """float64 ∂(Σ D)/∂s from ``q ⊙ (G − Σ q G)`` with ``G = ∂D/∂q`` written
  out per divergence (NumPy, from the definitions)."""
  log_q, log_p = ref.log_softmax(s64), ref.log_softmax(t64)
  q, p = np.exp(log_q), np.exp(log_p)
  if name == "fkl":
    return q - p
  if name == "rkl":
    qg = q * (log_q - log_p)
  elif name == "jsd":
    b = hp["beta"]
    qg = q * (1 - b) * (log_q - np.log(b * p + (1 - b) * q))
  elif name == "tvd":
    qg = 0.5 * q * np.sign(q - p)
  elif name == "akl":
    w = ref.akl_weights(p, q)[0][:, None]
    return w * (q - p) + (1 - w) * _grad64("rkl", s64, t64)
  elif name == "abkd":
    a, b = hp.get("alpha", 0.2), hp.get("beta", 0.7)
    qg = -(p**a * q**b - q ** (a + b)) / a
  return qg - q * qg.sum(-1, keepdims=True)


PRECISION = [
    ("fkl", {}),
    ("rkl", {}),
    ("jsd", {"beta": 0.1}),
    ("tvd", {}),
    ("akl", {}),
    ("abkd", {}),
]


# Gradient error bound (of max|grad|): 1e-6, except where the plain float32
# autodiff reference itself errs more on the peaked teacher at V = 50257
# (jsd 1.5e-5, abkd 6.7e-6, tvd 1.1e-6; this implementation 4.8e-6, 3.3e-6
# and 2.5e-6 with row weights, tvd's subgradient flipping where p ≈ q; jsd
# reaches 1.1e-5 at V = 128256).
_GRAD_BOUND = {"jsd": 2e-5, "abkd": 1e-5, "tvd": 5e-6}


@jax.jit
def _precision_run(s, t):
  """``{"name/size": (per_row, value, grad)}``: the forward alone and the
  value and gradient of the row-weighted sum, every PRECISION case and chunk
  size in one program (one compile per vocabulary size)."""
  out = {}
  for name, hp in PRECISION:
    for size in (None, 3):
      fn = lambda x, y, name=name, hp=hp, size=size: kd.get(name)(
          x, y, chunk_size=size, **hp
      )
      value, grad = jax.value_and_grad(
          lambda x, y, fn=fn: jnp.sum(fn(x, y) * jnp.arange(1.0, 5.0))
      )(s, t)
      out[f"{name}/{size}"] = (fn(s, t), value, grad)
  return out


@pytest.mark.slow
@pytest.mark.parametrize("vocab", [50257, 128256])
@pytest.mark.parametrize("kind", ["peaked", "flat"])
def test_precision_at_llm_vocabularies(vocab, kind):
  """Value within 1e-6 relative of float64 (as a plain float32 jnp.sum
  implementation is) and gradient within 1e-6 of max|grad|, chunked with a
  remainder row and in one piece."""
  s, t = _llm_logits(kind, 4, vocab)
  s64, t64 = s.astype(np.float64), t.astype(np.float64)
  out = jax.device_get(_precision_run(s, t))
  for name, hp in PRECISION:
    want = ref.DIVERGENCES[name](s64, t64, **hp)
    want_grad = _grad64(name, s64, t64, **hp)
    for size in (None, 3):
      per_row, _, grad = out[f"{name}/{size}"]
      np.testing.assert_allclose(
          np.asarray(per_row, np.float64),
          want,
          rtol=1e-6,
          atol=1e-9,
          err_msg=f"{name} chunk_size={size}",
      )
      grad = np.asarray(grad, np.float64)
      want_g = want_grad * np.arange(1.0, 5.0)[:, None]
      err = np.max(np.abs(grad - want_g)) / np.max(np.abs(want_g))
      assert err <= _GRAD_BOUND.get(name, 1e-6), (name, size, err)


# ----------------------------------------------------------------------------
# Traced hyper-parameters.

TRACED = [
    ("fkl_rkl", {"weight": [0.0, 0.3, 1.0]}),
    ("skl", {"alpha": [0.0, 0.1, 1.0]}),
    ("srkl", {"alpha": [0.0, 0.25, 1.0]}),
    ("jsd", {"beta": [0.0, 0.1, 0.5, 1.0]}),
    ("akl", {"mu": [0.3, 0.5]}),
    (
        "abkd",
        {"alpha": [0.2, 0.0, 1.0, 0.0, 0.5], "beta": [0.7, 1.0, 0.0, 0.0, 0.0]},
    ),
]


@pytest.mark.parametrize("name,grid", TRACED, ids=[n for n, _ in TRACED])
def test_traced_hyper_parameters_match_float64(name, grid):
  """One jit over the hyper-parameter values (and the temperature), vmapped
  over them too: values against float64, gradients against the static
  reference; endpoints exact."""
  s, t = _logits("random")
  s64, t64 = np.asarray(s, np.float64), np.asarray(t, np.float64)
  keys = sorted(grid)
  columns = [jnp.asarray(grid[k], jnp.float32) for k in keys]

  @jax.jit
  def run(temperature, *values):
    hp = dict(zip(keys, values))
    fn = lambda x: kd.get(name)(x, t, temperature=temperature, **hp)
    return fn(s), jax.grad(lambda x: jnp.sum(fn(x) * jnp.arange(1.0, N + 1)))(s)

  hps = [{k: float(grid[k][i]) for k in keys} for i in range(len(columns[0]))]

  @jax.jit
  def static_run(s, t):
    """Per value, static: the public divergence and the reference's
    gradient (one program for every value)."""
    reference = lambda x, hp: jnp.sum(
        kd.get(name, "reference")(x, t, temperature=1.5, **hp)
        * jnp.arange(1.0, N + 1)
    )
    return [
        (
            kd.get(name)(s, t, temperature=1.5, **hp),
            jax.grad(functools.partial(reference, hp=hp))(s),
        )
        for hp in hps
    ]

  vmapped = jax.jit(jax.vmap(run, in_axes=(None,) + (0,) * len(keys)))
  values_v, grads_v = vmapped(jnp.float32(1.5), *columns)
  statics = static_run(s, t)
  for i, hp in enumerate(hps):
    value, grad = run(jnp.float32(1.5), *(c[i] for c in columns))
    want = ref.DIVERGENCES[name](s64, t64, temperature=1.5, **hp)
    np.testing.assert_allclose(
        value, want, rtol=2e-5, atol=1e-6, err_msg=str(hp)
    )
    np.testing.assert_allclose(values_v[i], value, rtol=1e-6, atol=1e-7)
    static, want_grad = statics[i]
    scale = max(float(np.max(np.abs(want_grad))), 1e-6)
    np.testing.assert_allclose(
        grad, want_grad, atol=1e-5 * scale, err_msg=str(hp)
    )
    np.testing.assert_allclose(grads_v[i], grad, atol=1e-5 * scale)
    if name == "jsd" and hp["beta"] in (0.0, 1.0):  # the endpoint formulas
      other = kd.fkl if hp["beta"] == 0.0 else kd.rkl  # (ulps: other program)
      np.testing.assert_allclose(
          value, jax.jit(lambda x: other(x, t, temperature=1.5))(s), rtol=1e-6
      )
    np.testing.assert_allclose(value, static, rtol=1e-6, atol=1e-7)


def test_hyper_parameters_get_no_gradient():
  s, t = _logits("random")
  g = jax.grad(
      lambda b, temp: jnp.sum(kd.jsd(s, t, beta=b, temperature=temp)), (0, 1)
  )(0.3, 2.0)
  assert g == (0.0, 0.0)


# ----------------------------------------------------------------------------
# ABKD: limits, special cases, finite differences.


def test_abkd_special_cases_and_limits():
  s, t = _logits("random")
  s64, t64 = np.asarray(s, np.float64), np.asarray(t, np.float64)
  np.testing.assert_allclose(
      kd.abkd(s, t, alpha=1.0, beta=0.0), ref.fkl(s64, t64), rtol=1e-5
  )
  np.testing.assert_allclose(
      kd.abkd(s, t, alpha=0.0, beta=1.0), ref.rkl(s64, t64), rtol=1e-5
  )
  # The general formula tends to each limit formula (float64 reference).
  for (a, b), near in (
      ((0.0, 0.6), (1e-5, 0.6)),
      ((0.5, 0.0), (0.5, 1e-5)),
      ((0.0, 0.0), (1e-5, 1e-5)),
  ):
    limit = ref.abkd(s64, t64, alpha=a, beta=b)
    np.testing.assert_allclose(
        ref.abkd(s64, t64, alpha=near[0], beta=near[1]), limit, rtol=1e-3
    )
    np.testing.assert_allclose(kd.abkd(s, t, alpha=a, beta=b), limit, rtol=1e-5)
  # α = β = 1/2 is 2·Σ(√p − √q)², four times the squared Hellinger distance.
  p, q = np.exp(ref.log_softmax(t64)), np.exp(ref.log_softmax(s64))
  np.testing.assert_allclose(
      kd.abkd(s, t, alpha=0.5, beta=0.5),
      2 * ((np.sqrt(p) - np.sqrt(q)) ** 2).sum(-1),
      rtol=1e-5,
  )


@pytest.mark.parametrize(
    "alpha,beta", [(0.2, 0.7), (1.3, 0.4), (0.0, 0.6), (0.5, 0.0), (0.0, 0.0)]
)
def test_abkd_gradient_matches_finite_differences(alpha, beta):
  rng = np.random.default_rng(5)
  s = (2 * rng.standard_normal((2, 11))).astype(np.float32)
  t = (2 * rng.standard_normal((2, 11))).astype(np.float32)
  want = ref.central_grad(
      lambda x: ref.abkd(x, t, alpha, beta, 1.3).sum(), s.astype(np.float64)
  )
  got = jax.grad(
      lambda x: jnp.sum(kd.abkd(x, t, alpha=alpha, beta=beta, temperature=1.3))
  )(s)
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-6)


# ----------------------------------------------------------------------------
# AKL weights: top-k with verification against a float64 sorted reference.


def _np_akl_weights(p, q, mu, rule):
  order = np.argsort(-p, axis=-1, kind="stable")
  p_sorted = np.take_along_axis(p, order, -1)
  err = np.abs(p_sorted - np.take_along_axis(q, order, -1))
  cum = np.cumsum(p_sorted, -1)
  if rule == "akl":
    head = cum <= mu
    head[:, 0] = True
  else:
    head = (cum - p_sorted) < mu
  g_head, total = (err * head).sum(-1), err.sum(-1)
  return np.where(total > 0, g_head / np.where(total > 0, total, 1), 0.5)


def _rows(kind, m, vocab, key):
  k1, k2 = jax.random.split(jax.random.key(key))
  t = jax.random.normal(k1, (m, vocab))
  if kind == "peaked":
    t = 2.0 * t + 12.0 * (jnp.arange(vocab) < 3)
  elif kind == "flat":  # top-64 mass ≪ μ: every row takes the fallback
    t = 0.1 * t
  elif kind == "ties":  # few distinct values: exact ties at the boundary
    t = jnp.round(2.0 * t) + 6.0 * (jnp.arange(vocab) % 97 == 0)
  elif kind == "top1":  # π_1 ≥ μ
    t = t + 20.0 * (jnp.arange(vocab) == 11)
  s = 2.0 * jax.random.normal(k2, (m, vocab))
  return jax.nn.softmax(t), jax.nn.softmax(s)


# One compile per rule serves every kind (same shapes).
_akl_weights = jax.jit(core.akl_weights, static_argnames="rule")


@pytest.mark.parametrize("rule", core.AKL_RULES)
@pytest.mark.parametrize("kind", ["peaked", "flat", "ties", "top1"])
def test_akl_weights_match_sorted_reference(kind, rule):
  p, q = _rows(kind, 32, 3000, key=len(kind))
  w_head, w_tail = _akl_weights(p, q, rule=rule)
  expected = _np_akl_weights(
      np.asarray(p, np.float64), np.asarray(q, np.float64), 0.5, rule
  )
  np.testing.assert_allclose(w_head, expected, atol=2e-6)
  np.testing.assert_allclose(w_tail, 1.0 - expected, atol=2e-6)
  unresolved = kd.akl_unresolved_fraction(jnp.log(p), rule=rule)
  mass = -np.sort(-np.asarray(p, np.float64), -1)[:, : core.AKL_TOP_K].sum(-1)
  np.testing.assert_allclose(unresolved, np.mean(mass <= 0.5), atol=1e-6)
  if kind in ("flat", "top1"):
    assert float(unresolved) == (1.0 if kind == "flat" else 0.0)


@pytest.mark.parametrize("rule", ["akl", "dskd"])
@pytest.mark.parametrize("n_flat", [2, 20])  # one batch of rows / several
def test_akl_fallback_branches(n_flat, rule):
  p_peak, q = _rows("peaked", 32, 3000, key=1)
  p_flat, _ = _rows("flat", 32, 3000, key=2)
  p = p_peak.at[:n_flat].set(p_flat[:n_flat])
  p = p.at[n_flat - 1, :1500].set(p[n_flat - 1, 0])  # half the row tied
  p = p / jnp.sum(p, axis=-1, keepdims=True)
  w_head, _ = core.akl_weights(p, q, mu=0.5, rule=rule)
  expected = _np_akl_weights(
      np.asarray(p, np.float64), np.asarray(q, np.float64), 0.5, rule
  )
  np.testing.assert_allclose(w_head, expected, atol=2e-6)


_top_k_64 = jax.jit(lambda x: core.top_k(x, 64))  # one compile per shape


@pytest.mark.parametrize(
    "vocab,fill",
    [
        (50257, "normal"),
        (50257, "ties"),
        (32000, "integers"),
        (128256, "ties"),
        (50257, "cross"),
    ],
)
def test_two_level_top_k_equals_lax_top_k(vocab, fill):
  """Same values, indices and tie order (lower index first) as lax.top_k,
  including rows where a third of the vocabulary ties at the maximum and
  integer rows with ties at every level."""
  assert core._top_k_block(vocab, 64) is not None  # the two-level path runs
  rng = np.random.default_rng(vocab)
  if fill == "integers":
    x = rng.integers(-4, 4, size=(5, vocab)).astype(np.float32)
  else:
    x = rng.normal(size=(5, vocab)).astype(np.float32)
  if fill == "ties":
    x[:, 7::3] = x.max()
    x[1] = 0.0  # one fully tied row
  if fill == "cross":  # the block holding the maximum also holds a late tie
    x[:] = -1.0
    x[:, ::50] = 1.0
    x[:, -2:] = (1.0, 2.0)
  expected = jax.lax.top_k(x, 64)
  got = _top_k_64(x)
  np.testing.assert_array_equal(got[0], expected[0])
  np.testing.assert_array_equal(got[1], expected[1])


def _flat_teachers(vocab):
  """Flat rows, with ties at the crossing token."""
  rng = np.random.default_rng(7)
  t = 0.1 * rng.standard_normal((6, vocab))
  t[1] = np.round(4.0 * rng.standard_normal(vocab)) / 4.0  # tie groups
  t[2] = 0.0  # one tied key: the bracket never holds <= 64 tokens
  t[3, : vocab // 2] = t[3].max()  # half the row tied at the top
  t[4, :10] = -np.inf  # masked vocabulary (student too)
  t[5] = 1.0 + (np.arange(vocab) % 2)  # two keys of vocab/2 tokens each
  s = 2.0 * rng.standard_normal((6, vocab))
  s[4, :10] = -np.inf
  return s.astype(np.float32), t.astype(np.float32)


@pytest.mark.parametrize("rule", core.AKL_RULES)
def test_akl_threshold_search_value_and_grad_match_float64(rule):
  """Flat rows settled by the threshold search: value and gradient against
  float64 NumPy, for several μ in one call (μ traced), ties included."""
  s, t = _flat_teachers(1000)
  mus = np.array([0.1234, 0.4567, 0.8765], np.float32)

  def value_grad(mu):
    value, vjp = jax.vjp(lambda s: kd.akl(s, t, mu=mu, rule=rule), s)
    return value, vjp(jnp.ones_like(value))[0]

  values, grads = jax.jit(jax.vmap(value_grad))(mus)
  assert float(kd.akl_unresolved_fraction(t, mu=mus[-1], rule=rule)) == 1.0
  s64, t64 = s.astype(np.float64), t.astype(np.float64)
  log_q, log_p = ref.log_softmax(s64), ref.log_softmax(t64)
  q, p = np.exp(log_q), np.exp(log_p)
  finite = np.isfinite(log_q)
  rkl_grad = q * np.where(finite, log_q, 0.0) - q * np.where(finite, log_p, 0.0)
  rkl_grad -= q * rkl_grad.sum(-1, keepdims=True)
  for mu, value, grad in zip(mus, values, grads):
    w = ref.akl_weights(p, q, float(mu), rule)[0][:, None]
    np.testing.assert_allclose(
        value, ref.akl(s64, t64, float(mu), rule), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(
        grad, w * (q - p) + (1 - w) * rkl_grad, atol=1e-6
    )


def test_akl_fallback_bounded_by_budget():
  """More unresolved rows than the budget: settled budget rows at a time,
  each row exactly (float64 sort reference)."""
  p_peak, q = _rows("peaked", 40, 3000, key=3)
  p_flat, _ = _rows("flat", 40, 3000, key=4)
  p = p_peak.at[5:35].set(p_flat[5:35])  # 30 unresolved rows, budget 8
  top_p, idx = core.top_k(p, core.AKL_TOP_K)
  w, resolved = core._akl_head_weight_topk(
      top_p,
      jnp.take_along_axis(q, idx, axis=-1),
      jnp.sum(jnp.abs(p - q), axis=-1),
      0.5,
      "akl",
  )
  assert int(jnp.sum(~resolved)) == 30
  rows = lambda i: (p[i], q[i], p[i])
  w = core._akl_fallback(w, resolved, rows, 0.5, "akl", budget=8)
  expected = _np_akl_weights(
      np.asarray(p, np.float64), np.asarray(q, np.float64), 0.5, "akl"
  )
  np.testing.assert_allclose(w, expected, atol=2e-6)


# ----------------------------------------------------------------------------
# Memory: chunked temporaries do not grow with N.


def _temp_bytes(fn, n):
  s = jnp.zeros((n, 512), jnp.float32)
  compiled = (
      jax.jit(jax.grad(lambda x, y: jnp.sum(fn(x, y)))).lower(s, s).compile()
  )
  return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("name", ["rkl", "akl"])
def test_chunked_temporaries_independent_of_n(name):
  chunked = lambda x, y: kd.get(name)(x, y, chunk_size=16)
  small, large = _temp_bytes(chunked, 64), _temp_bytes(chunked, 512)
  # Between the passes only per-row statistics survive: a few floats per
  # token (here at most 16 of V = 512), never a [N, V] buffer.
  per_row = 16 * 4
  assert large <= small * 1.05 + (512 - 64) * per_row, (small, large)
  autodiff = kd.get(name, "reference")
  assert _temp_bytes(autodiff, 512) > 4 * _temp_bytes(autodiff, 64)


# ----------------------------------------------------------------------------
# Fused linear: hidden states and heads in, masked-mean loss and its gradients.


@pytest.mark.parametrize(
    "name,hp",
    [
        ("fkl", {}),
        ("jsd", {"beta": 0.1}),
        ("akl", {}),
        ("tvd", {}),
        ("abkd", {}),
    ],
)
def test_fused_linear_matches_reference(name, hp):
  keys = jax.random.split(jax.random.key(7), 5)
  n, vocab, h_s, h_t = 19, 200, 16, 24
  x_s = jax.random.normal(keys[0], (n, h_s))
  w_s = 0.5 * jax.random.normal(keys[1], (vocab, h_s))
  x_t = jax.random.normal(keys[2], (n, h_t))
  w_t = 0.5 * jax.random.normal(keys[3], (vocab, h_t))
  mask = (jax.random.uniform(keys[4], (n,)) > 0.3).astype(jnp.float32)

  def reference(x, w):
    per_token = kd.get(name, "reference")(x @ w.T, x_t @ w_t.T, **hp)
    return 3.0 * core.masked_mean(per_token, mask)

  def fused_loss(x, w):
    return 3.0 * fused.fused_linear(
        name, x, w, x_t, w_t, mask, chunk_size=8, **hp
    )

  ref_value, (ref_gx, ref_gw) = jax.jit(jax.value_and_grad(reference, (0, 1)))(
      x_s, w_s
  )
  value, (gx, gw) = jax.jit(jax.value_and_grad(fused_loss, (0, 1)))(x_s, w_s)
  np.testing.assert_allclose(value, ref_value, rtol=1e-5)
  np.testing.assert_allclose(gx, ref_gx, atol=1e-5 * np.abs(ref_gx).max())
  np.testing.assert_allclose(gw, ref_gw, atol=1e-5 * np.abs(ref_gw).max())
  assert np.all(np.asarray(gx)[np.asarray(mask) == 0] == 0)


def test_fused_ce_and_kd_share_the_logits_chunk():
  """ce_kd_sums: both sums and the gradient of (1 − r)·CE + r·KD against
  the autodiff reference on the full logits (r = 0.3, fractional mask)."""
  keys = jax.random.split(jax.random.key(8), 6)
  n, vocab, h_s, h_t, r = 13, 150, 8, 12, 0.3
  x_s = jax.random.normal(keys[0], (n, h_s))
  w_s = 0.5 * jax.random.normal(keys[1], (vocab, h_s))
  x_t = jax.random.normal(keys[2], (n, h_t))
  w_t = 0.5 * jax.random.normal(keys[3], (vocab, h_t))
  mask = jax.random.uniform(keys[4], (n,)) * (jnp.arange(n) % 4 != 0)
  labels = jax.random.randint(keys[5], (n,), 0, vocab)

  def reference(x, w):
    z = x @ w.T
    nll = -jnp.take_along_axis(jax.nn.log_softmax(z), labels[:, None], -1)[:, 0]
    kd_tok = kd.reference.akl(z, x_t @ w_t.T, temperature=2.0)
    ce_sum, kd_sum = jnp.sum(mask * nll), jnp.sum(mask * kd_tok)
    return (1 - r) * ce_sum + r * kd_sum, (ce_sum, kd_sum)

  def fused_loss(x, w):
    ce_sum, kd_sum = fused.ce_kd_sums(
        "akl",
        x,
        w,
        x_t,
        w_t,
        labels,
        mask,
        kd_ratio=r,
        chunk_size=4,
        temperature=2.0,
    )
    return (1 - r) * ce_sum + r * kd_sum, (ce_sum, kd_sum)

  (_, want), want_g = jax.jit(
      jax.value_and_grad(reference, (0, 1), has_aux=True)
  )(x_s, w_s)
  (_, got), got_g = jax.jit(
      jax.value_and_grad(fused_loss, (0, 1), has_aux=True)
  )(x_s, w_s)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  for g, w in zip(got_g, want_g):
    np.testing.assert_allclose(g, w, atol=1e-5 * np.abs(w).max())
  ce = fused.cross_entropy(x_s, w_s, labels, mask, chunk_size=5)
  np.testing.assert_allclose(ce, want[0] / jnp.sum(mask), rtol=1e-5)


def test_fused_applies_each_models_logits_map():
  """Soft-capped logits ``c tanh(X Wᵀ / c)`` (Gemma 2): value and gradients
  against the autodiff reference on the capped logits."""
  keys = jax.random.split(jax.random.key(9), 5)
  n, vocab, h = 11, 60, 8
  x_s, x_t = (jax.random.normal(k, (n, h)) for k in keys[:2])
  w_s, w_t = (3.0 * jax.random.normal(k, (vocab, h)) for k in keys[2:4])
  labels = jax.random.randint(keys[4], (n,), 0, vocab)
  cap = lambda c: lambda z: c * jnp.tanh(z / c)

  def reference(x, w):
    s, t = cap(2.0)(x @ w.T), cap(5.0)(x_t @ w_t.T)
    nll = -jnp.take_along_axis(jax.nn.log_softmax(s), labels[:, None], -1)
    return 0.5 * jnp.sum(nll) + 0.5 * jnp.sum(kd.reference.fkl(s, t))

  def fused_loss(x, w):
    sums = fused.ce_kd_sums(
        "fkl",
        x,
        w,
        x_t,
        w_t,
        labels,
        chunk_size=4,
        logits_map_s=cap(2.0),
        logits_map_t=cap(5.0),
    )
    return 0.5 * sums[0] + 0.5 * sums[1]

  want, want_g = jax.jit(jax.value_and_grad(reference, (0, 1)))(x_s, w_s)
  got, got_g = jax.jit(jax.value_and_grad(fused_loss, (0, 1)))(x_s, w_s)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  for g, w in zip(got_g, want_g):
    np.testing.assert_allclose(g, w, atol=1e-5 * np.abs(w).max())


def test_fused_linear_rejects_mismatched_tokens():
  x = jnp.zeros((4, 3))
  with pytest.raises(ValueError, match="same N"):
    fused.fused_linear(
        "fkl", x, jnp.zeros((5, 3)), jnp.zeros((6, 3)), jnp.zeros((5, 3))
    )


# ----------------------------------------------------------------------------
# The benchmark script in --quick mode.


@pytest.mark.slow
def test_benchmark_quick_writes_json(tmp_path):
  from experiments.benchmarks import divergences as bench  # pylint: disable=import-outside-toplevel

  out = tmp_path / "bench.json"
  bench.main(
      [
          "--quick",
          "--with_reference",
          "--divergences",
          "fkl",
          "akl",
          "--out",
          str(out),
      ]
  )
  result = json.loads(out.read_text())
  impls = {(r["divergence"], r["impl"]) for r in result["rows"]}
  assert {("fkl", "auto"), ("fkl", "reference"), ("akl", "auto")} <= impls
  # The peers' rows exist whenever torch is installed (always in CI).
  if importlib.util.find_spec("torch") is not None:
    assert {("fkl", "distillm"), ("akl", "akl.py")} <= impls
  for row in result["rows"]:
    assert row["time_s"] > 0
    if row["temp_bytes"] is not None:
      assert row["temp_vs_nv_f32"] == pytest.approx(
          row["temp_bytes"] / (result["n"] * result["vocab"] * 4)
      )
  assert result["n"] == 64 and "cpu" in result["device"]
