"""The fast paths (analytic VJP, chunked, fused-linear, top-k AKL weights)
against the autodiff definitions and float64 NumPy references."""

import importlib.util
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import divergences as kd
from kdjax.divergences import core, fast, fused

CASES = [("fkl", {}), ("rkl", {}), ("fkl_rkl", {"weight": 0.3}),
         ("skl", {"alpha": 0.1}), ("srkl", {"alpha": 0.1}),
         ("jsd", {"beta": 0.1}), ("jsd", {"beta": 0.0}),
         ("tvd", {}), ("akl", {}), ("akl", {"rule": "dskd"}),
         ("skl", {"alpha": 1.0}), ("srkl", {"alpha": 1.0})]
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
  def loss(x):
    per_row = per_token(x, t)
    return jnp.sum(per_row * weight_N), per_row

  (_, per_row), grad = jax.jit(jax.value_and_grad(loss, has_aux=True))(s)
  return np.asarray(per_row, np.float64), np.asarray(grad, np.float64)


@pytest.mark.parametrize("name,hp", CASES, ids=IDS)
@pytest.mark.parametrize("kind", ["random", "extreme", "neginf", "bf16"])
def test_fast_and_chunked_match_autodiff(name, hp, kind):
  s, t = _logits(kind)
  weight_N = jax.random.uniform(jax.random.key(3), (N,))  # any cotangent
  temperature = 2.0 if kind == "random" else 1.0
  ref = lambda x, y: getattr(core, name)(x, y, temperature=temperature, **hp)
  impls = {
      "fast": lambda x, y: getattr(fast, name)(x, y, temperature=temperature,
                                               **hp),
      "chunked": lambda x, y: fused.chunked(name, x, y, chunk_size=3,
                                            temperature=temperature, **hp),
  }
  if kind in ("extreme", "bf16"):
    del impls["chunked"]  # the same per-chunk op as fast; keeps the suite short
  ref_value, ref_grad = _value_and_grad(ref, s, t, weight_N)
  scale = max(np.max(np.abs(ref_grad)), 1e-3)  # some extreme rows have 0 grad
  if kind == "extreme":
    # Log-ratios of size ~1e4 are resolved to 1e4·eps32 ≈ 1e-3 in float32; the
    # gradient q(r − c) inherits that absolute error in either implementation.
    grad_atol = 64 * np.finfo(np.float32).eps * 3e4 * scale
  elif kind == "bf16":
    grad_atol = 2 ** -7 * scale  # both round one float32 gradient to bf16
  else:
    grad_atol = 1e-5 * scale
  for impl, fn in impls.items():
    value, grad = _value_and_grad(fn, s, t, weight_N)
    np.testing.assert_allclose(value, ref_value, rtol=1e-5, atol=1e-5,
                               err_msg=impl)
    np.testing.assert_allclose(grad, ref_grad, rtol=0, atol=grad_atol,
                               err_msg=impl)
    assert np.all(np.isfinite(grad)), impl
    if kind == "neginf":
      assert np.all(grad[:, -3:] == 0.0), impl  # exactly 0 in -inf slots


def test_fast_gradient_dtype_follows_student():
  s, t = _logits("bf16")
  grad = jax.grad(lambda x: jnp.sum(fast.rkl(x, t)))(s)
  assert grad.dtype == jnp.bfloat16


def test_fast_fkl_gradient_is_q_minus_p():
  s, t = _logits("random")
  s64, t64 = np.asarray(s, np.float64), np.asarray(t, np.float64)
  softmax = lambda x: np.exp(x - x.max(-1, keepdims=True)) / np.exp(
      x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)
  grad = jax.grad(lambda x: jnp.sum(fast.fkl(x, t)))(s)
  np.testing.assert_allclose(grad, softmax(s64) - softmax(t64), atol=1e-6)


def test_registry_impls():
  assert kd.get("jsd", impl="fast") is fast.jsd
  assert kd.get("jsd") is core.jsd is kd.autodiff.jsd
  with pytest.raises(ValueError, match="no fast implementation"):
    kd.get("sinkhorn", impl="fast")
  with pytest.raises(ValueError, match="no chunked implementation"):
    kd.get("uld", impl="chunked")
  s, t = _logits("random")
  np.testing.assert_allclose(kd.get("jsd", impl="chunked")(s, t, chunk_size=3,
                                                          beta=0.1),
                             core.jsd(s, t, beta=0.1), rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="impl='cuda'"):
    kd.get("fkl", impl="cuda")
  with pytest.raises(TypeError, match="gamma"):
    fast.jsd(*_logits("random"), gamma=1.0)


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


@pytest.mark.parametrize("rule", core.AKL_RULES)
@pytest.mark.parametrize("kind", ["peaked", "flat", "ties", "top1"])
def test_akl_weights_match_sorted_reference(kind, rule):
  p, q = _rows(kind, 32, 3000, key=len(kind))
  w_head, w_tail = jax.jit(lambda p, q: core.akl_weights(p, q, rule=rule))(p, q)
  expected = _np_akl_weights(np.asarray(p, np.float64),
                             np.asarray(q, np.float64), 0.5, rule)
  np.testing.assert_allclose(w_head, expected, atol=2e-6)
  np.testing.assert_allclose(w_tail, 1.0 - expected, atol=2e-6)
  unresolved = fast.akl_unresolved_fraction(jnp.log(p), rule=rule)
  mass = -np.sort(-np.asarray(p, np.float64), -1)[:, :core.AKL_TOP_K].sum(-1)
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
  expected = _np_akl_weights(np.asarray(p, np.float64),
                             np.asarray(q, np.float64), 0.5, rule)
  np.testing.assert_allclose(w_head, expected, atol=2e-6)


@pytest.mark.parametrize("vocab,fill", [(50257, "normal"), (50257, "ties"),
                                        (32000, "integers"), (128256, "ties"),
                                        (50257, "cross")])
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
  got = jax.jit(lambda x: core.top_k(x, 64))(x)
  np.testing.assert_array_equal(got[0], expected[0])
  np.testing.assert_array_equal(got[1], expected[1])


def test_akl_fallback_bounded_by_budget():
  """More unresolved rows than the budget: settled budget rows at a time,
  each row exactly (float64 sort reference)."""
  p_peak, q = _rows("peaked", 40, 3000, key=3)
  p_flat, _ = _rows("flat", 40, 3000, key=4)
  p = p_peak.at[5:35].set(p_flat[5:35])  # 30 unresolved rows, budget 8
  top_p, idx = core.top_k(p, core.AKL_TOP_K)
  w, resolved = core._akl_head_weight_topk(
      top_p, jnp.take_along_axis(q, idx, axis=-1),
      jnp.sum(jnp.abs(p - q), axis=-1), 0.5, "akl")
  assert int(jnp.sum(~resolved)) == 30
  rows = lambda i: (p[i], q[i], p[i])
  w = core._akl_fallback(w, resolved, rows, 0.5, "akl", budget=8)
  expected = _np_akl_weights(np.asarray(p, np.float64),
                             np.asarray(q, np.float64), 0.5, "akl")
  np.testing.assert_allclose(w, expected, atol=2e-6)


# ----------------------------------------------------------------------------
# Memory: chunked temporaries do not grow with N.


def _temp_bytes(fn, n):
  s = jnp.zeros((n, 512), jnp.float32)
  compiled = jax.jit(jax.grad(lambda x, y: jnp.sum(fn(x, y)))).lower(
      s, s).compile()
  return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("name", ["rkl", "akl"])
def test_chunked_temporaries_independent_of_n(name):
  chunked = lambda x, y: fused.chunked(name, x, y, chunk_size=16)
  small, large = _temp_bytes(chunked, 64), _temp_bytes(chunked, 512)
  # Between the passes only per-row statistics survive: a few floats per
  # token (here at most 16 of V = 512), never a [N, V] buffer.
  per_row = 16 * 4
  assert large <= small * 1.05 + (512 - 64) * per_row, (small, large)
  autodiff = getattr(core, name)
  assert _temp_bytes(autodiff, 512) > 4 * _temp_bytes(autodiff, 64)


# ----------------------------------------------------------------------------
# Fused linear: hidden states and heads in, masked-mean loss and its gradients.


@pytest.mark.parametrize("name,hp", [("fkl", {}), ("jsd", {"beta": 0.1}),
                                     ("akl", {}), ("tvd", {})])
def test_fused_linear_matches_autodiff(name, hp):
  keys = jax.random.split(jax.random.key(7), 5)
  n, vocab, h_s, h_t = 19, 200, 16, 24
  x_s = jax.random.normal(keys[0], (n, h_s))
  w_s = 0.5 * jax.random.normal(keys[1], (vocab, h_s))
  x_t = jax.random.normal(keys[2], (n, h_t))
  w_t = 0.5 * jax.random.normal(keys[3], (vocab, h_t))
  mask = (jax.random.uniform(keys[4], (n,)) > 0.3).astype(jnp.float32)

  def reference(x, w):
    per_token = getattr(core, name)(x @ w.T, x_t @ w_t.T, **hp)
    return 3.0 * core.masked_mean(per_token, mask)

  def fused_loss(x, w):
    return 3.0 * fused.fused_linear(name, x, w, x_t, w_t, mask, chunk_size=8,
                                    **hp)

  ref_value, (ref_gx, ref_gw) = jax.value_and_grad(reference, (0, 1))(x_s, w_s)
  value, (gx, gw) = jax.jit(jax.value_and_grad(fused_loss, (0, 1)))(x_s, w_s)
  np.testing.assert_allclose(value, ref_value, rtol=1e-5)
  np.testing.assert_allclose(gx, ref_gx, atol=1e-5 * np.abs(ref_gx).max())
  np.testing.assert_allclose(gw, ref_gw, atol=1e-5 * np.abs(ref_gw).max())
  assert np.all(np.asarray(gx)[np.asarray(mask) == 0] == 0)


def test_fused_linear_rejects_mismatched_tokens():
  x = jnp.zeros((4, 3))
  with pytest.raises(ValueError, match="same N"):
    fused.fused_linear("fkl", x, jnp.zeros((5, 3)), jnp.zeros((6, 3)),
                       jnp.zeros((5, 3)))


# ----------------------------------------------------------------------------
# The benchmark script in --quick mode.


@pytest.mark.slow
def test_benchmark_quick_writes_json(tmp_path):
  from experiments.benchmarks import divergences as bench  # pylint: disable=import-outside-toplevel
  out = tmp_path / "bench.json"
  bench.main(["--quick", "--divergences", "fkl", "akl", "--out", str(out)])
  result = json.loads(out.read_text())
  impls = {(r["divergence"], r["impl"]) for r in result["rows"]}
  assert {("fkl", "autodiff"), ("fkl", "fast"), ("akl", "chunked")} <= impls
  # The PyTorch-style rows exist whenever torch is installed (always in CI).
  if importlib.util.find_spec("torch") is not None:
    assert ("fkl", "torch") in impls
  for row in result["rows"]:
    assert row["time_s"] > 0
    if row["impl"] != "torch":
      assert row["temp_vs_nv_f32"] == pytest.approx(
          row["temp_bytes"] / (result["n"] * result["vocab"] * 4))
  assert result["n"] == 64 and "cpu" in result["device"]
