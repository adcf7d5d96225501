"""kd.sinkhorn (SinKD) against a float64 NumPy transcription of SinKD's loop.

The reference (reference_np.sinkd_*) is docs/divergences.md "SinKD" line by
line:
Π = exp(−C/ε), 20 × (rows normalised, columns normalised), loss = Σ Π ⊙ C.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from ott.geometry import geometry
from ott.problems.linear import linear_problem
from ott.solvers.linear import sinkhorn as ott_sinkhorn
from ott.tools import sinkhorn_divergence
import pytest

from kdjax import divergences as kd
import reference_np as ref

B, T, V = 2, 4, 11


def _logits(seed, shape=(B, T, V)):
  rng = np.random.default_rng(seed)
  t = 2.0 * rng.standard_normal(shape)
  s = 0.7 * t + 1.5 * rng.standard_normal(shape)
  return s.astype(np.float32), t.astype(np.float32)


@functools.cache
def _fn(**kwargs):
  return jax.jit(functools.partial(kd.sinkhorn, **kwargs))


@functools.cache
def _grad_fn(**kwargs):
  return jax.jit(
      jax.grad(lambda s, t, m: jnp.sum(kd.sinkhorn(s, t, m, **kwargs)))
  )


@functools.cache
def _value_and_grad_fn(**kwargs):
  """``(sum of rows, rows), d/ds`` with ε and T traced arguments: one compiled
  program per solver setting serves every (ε, T)."""

  def total(s, t, epsilon, temperature):
    rows = kd.sinkhorn(s, t, epsilon=epsilon, temperature=temperature, **kwargs)
    return jnp.sum(rows), rows

  return jax.jit(jax.value_and_grad(total, has_aux=True))


@functools.cache
def _rows_and_grad_fn(**kwargs):
  """Masked rows and the gradient of their sum, in one program."""

  def total(s, t, m):
    rows = kd.sinkhorn(s, t, m, **kwargs)
    return jnp.sum(rows), rows

  @jax.jit
  def run(s, t, m):
    (_, rows), grad = jax.value_and_grad(total, has_aux=True)(s, t, m)
    return rows, grad

  return run


def sinkhorn(s, t, mask=None, **kwargs):
  return _fn(**kwargs)(s, t, mask)


def sinkhorn_grad(s, t, mask=None, **kwargs):
  return _grad_fn(**kwargs)(s, t, mask)


def _ref_rows(s, t, **kwargs):
  """Per-row reference costs of every sequence (one group per sequence)."""
  return np.stack(
      [
          ref.sinkd_rows(
              s[b].astype(np.float64), t[b].astype(np.float64), **kwargs
          )
          for b in range(s.shape[0])
      ]
  )


# ----------------------------------------------------------------------------
# Values.


def test_sinkd_mode_matches_numpy_loop():
  s, t = _logits(0)
  got = sinkhorn(s, t, solver="sinkd")
  want = _ref_rows(s, t)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  # Row costs of a group sum to SinKD's scalar loss.
  np.testing.assert_allclose(
      np.asarray(got).sum(-1),
      [ref.sinkd_loss(s[b], t[b]) for b in range(B)],
      rtol=1e-5,
  )
  # The plan differs from the converged one: 20 iterations are not converged,
  # so this comparison would catch a solver that ignored num_iters.
  assert np.abs(want - _ref_rows(s, t, num_iters=2000)).max() > 1e-4


def test_sinkd_mode_whole_batch_and_scale():
  s, t = _logits(1, (6, V))  # [N, V]: one group of all rows, as in SinKD
  got = sinkhorn(s, t, solver="sinkd", scale=1e-3)
  np.testing.assert_allclose(got, 1e-3 * ref.sinkd_rows(s, t), rtol=1e-5)
  got_5 = sinkhorn(
      s, t, solver="sinkd", num_iters=5, temperature=1.0, epsilon=0.2
  )
  np.testing.assert_allclose(
      got_5,
      ref.sinkd_rows(s, t, num_iters=5, temperature=1.0, epsilon=0.2),
      rtol=1e-5,
  )


def test_ott_converged_matches_long_numpy_loop():
  s, t = _logits(2)
  want = _ref_rows(s, t, num_iters=2000)
  np.testing.assert_allclose(
      sinkhorn(s, t, solver="ott", threshold=1e-6), want, rtol=1e-4
  )
  np.testing.assert_allclose(
      sinkhorn(s, t, solver="ott", num_iters=200), want, rtol=1e-4
  )


def test_debiased_is_zero_for_identical_rows():
  s, t = _logits(3)
  same = sinkhorn(t, t, solver="debiased", threshold=1e-6)
  np.testing.assert_allclose(same, 0.0, atol=1e-6)
  differ = np.asarray(sinkhorn(s, t, solver="debiased", threshold=1e-6))
  assert np.all(differ > 1e-2)
  # Every valid row of a group reports the group's value.
  np.testing.assert_allclose(differ, differ[:, :1] * np.ones((1, T)), rtol=1e-6)


def test_temperature_divides_logits():
  s, t = _logits(4)
  np.testing.assert_allclose(
      sinkhorn(s, t, solver="sinkd"),
      sinkhorn(s / 2, t / 2, solver="sinkd", temperature=1.0),
      rtol=1e-5,
  )


# ----------------------------------------------------------------------------
# Masks and groups.

# Three valid rows per sequence: the compacted problems share one shape.
_MASK = np.array([[1, 0, 1, 1], [0, 1, 1, 1]], bool)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(solver="sinkd"),
        dict(solver="ott", threshold=1e-6),
        dict(solver="debiased", num_iters=200),
    ],
    ids=["sinkd", "ott", "debiased"],
)
def test_masked_rows_equal_compacted_problem(kwargs):
  s, t = _logits(5)
  got, grad = map(
      np.asarray, _rows_and_grad_fn(**kwargs)(s, t, jnp.asarray(_MASK))
  )
  np.testing.assert_array_equal(got[~_MASK], 0.0)
  # The valid rows of every sequence, as [B, 3, V]: one group per sequence.
  s_c, t_c = (x[_MASK].reshape(B, -1, V) for x in (s, t))
  compact = np.asarray(sinkhorn(s_c, t_c, **kwargs))
  np.testing.assert_allclose(
      got[_MASK].reshape(B, -1), compact, rtol=2e-5, atol=1e-7
  )
  if kwargs["solver"] == "sinkd":
    np.testing.assert_allclose(
        got[_MASK].reshape(B, -1), _ref_rows(s_c, t_c), rtol=1e-5
    )
  assert np.all(np.isfinite(grad))
  np.testing.assert_array_equal(grad[~_MASK], 0.0)
  assert np.abs(grad[_MASK]).max() > 1e-3


def test_group_size():
  s, t = _logits(6, (4, V))
  halves = sinkhorn(s, t, solver="sinkd", group_size=2)
  np.testing.assert_allclose(
      halves[:2], ref.sinkd_rows(s[:2], t[:2]), rtol=1e-5
  )
  np.testing.assert_allclose(
      halves[2:], ref.sinkd_rows(s[2:], t[2:]), rtol=1e-5
  )
  # [B, T, V] defaults to one group per sequence; group_size=B*T pools them.
  s3, t3 = _logits(7)
  pooled = sinkhorn(s3, t3, solver="sinkd", group_size=B * T)
  np.testing.assert_allclose(
      np.asarray(pooled).reshape(-1),
      ref.sinkd_rows(s3.reshape(-1, V), t3.reshape(-1, V)),
      rtol=1e-5,
  )
  with pytest.raises(ValueError, match=r"group_size=3 must divide the 4 rows"):
    kd.sinkhorn(s, t, group_size=3)
  with pytest.raises(ValueError, match=r"solver='pot' is unknown"):
    kd.sinkhorn(s, t, solver="pot")
  with pytest.raises(ValueError, match=r"mask shape \(3,\) must equal"):
    kd.sinkhorn(s, t, jnp.ones(3))


# ----------------------------------------------------------------------------
# Gradients.


def test_sinkd_grad_matches_finite_differences():
  s, t = _logits(8)
  got = sinkhorn_grad(s, t, solver="sinkd")
  for b in range(B):
    want = ref.central_grad(
        lambda x: ref.sinkd_loss(x, t[b].astype(np.float64)),
        s[b].astype(np.float64),
    )
    assert np.abs(want).max() > 1e-2
    np.testing.assert_allclose(got[b], want, rtol=1e-3, atol=2e-5)


def test_ott_converged_grad_matches_finite_differences():
  # Seed 0, both groups, threshold 1e-6: implicit differentiation of the
  # converged plan against differences of the NumPy loop run to convergence.
  s, t = _logits(0)
  got = sinkhorn_grad(s, t, solver="ott", threshold=1e-6)
  for b in range(B):
    want = ref.central_grad(
        lambda x: ref.sinkd_loss(x, t[b].astype(np.float64), num_iters=2000),
        s[b].astype(np.float64),
    )
    np.testing.assert_allclose(got[b], want, rtol=1e-3, atol=2e-5)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(solver="sinkd"),
        dict(solver="ott"),
        dict(solver="ott", num_iters=30),
        dict(solver="debiased"),
        dict(solver="debiased", num_iters=30),
    ],
    ids=["sinkd", "ott", "ott_fixed", "debiased", "debiased_fixed"],
)
def test_grads_finite_under_jit(kwargs):
  # Several draws: the default convergence threshold (1e-3) included. The
  # fixed-count settings run test_fixed_count_...'s programs (same shapes).
  for seed in range(3):
    s, t = _logits(10 + seed, (1, 4, 7))
    settings = (jnp.float32(0.1), jnp.float32(2.0))  # the defaults, traced
    grad = np.asarray(_value_and_grad_fn(**kwargs)(s, t, *settings)[1])
    assert np.all(np.isfinite(grad)), seed
    assert np.abs(grad).max() > 1e-4, seed


# ----------------------------------------------------------------------------
# Values and gradients against float64 references and their finite differences.

# SinKD's setting, and a small ε at T = 1 where exp(−C/ε) underflows float32.
_EPSILONS = {
    "eps0.1": dict(epsilon=0.1, temperature=2.0),
    "eps0.01": dict(epsilon=0.01, temperature=1.0),
}


def _reference_total(s_g, t_g, solver, **kwargs):
  """float64 sum of one group's rows (the quantity whose gradient is taken)."""
  if solver == "sinkd":
    return ref.sinkd_loss(s_g, t_g, **kwargs)
  if solver == "ott":
    return ref.ott_rows(s_g, t_g, **kwargs).sum()
  # Every row of a group reports the group's divergence.
  return s_g.shape[0] * ref.sinkhorn_divergence(s_g, t_g, **kwargs)


def _check_value_and_grad(s, t, kwargs, ref_num_iters):
  """Group totals of kd.sinkhorn(**kwargs) and their gradients against the
  reference run for ``ref_num_iters`` and its central differences (error
  relative to the largest entry)."""
  settings = {
      k: v for k, v in kwargs.items() if k in ("epsilon", "temperature")
  }
  static = {k: v for k, v in kwargs.items() if k not in settings}
  (_, rows), grad = _value_and_grad_fn(**static)(
      s, t, *(jnp.float32(settings[k]) for k in ("epsilon", "temperature"))
  )
  got, grad = np.asarray(rows).sum(-1), np.asarray(grad)
  for b in range(s.shape[0]):
    total = functools.partial(
        _reference_total,
        t_g=t[b].astype(np.float64),
        solver=kwargs["solver"],
        num_iters=ref_num_iters,
        epsilon=kwargs["epsilon"],
        temperature=kwargs["temperature"],
    )
    x = s[b].astype(np.float64)
    np.testing.assert_allclose(got[b], total(x), rtol=1e-4)
    want = ref.central_grad(total, x)
    assert np.abs(want).max() > 1e-3
    err = np.abs(grad[b] - want).max() / np.abs(want).max()
    assert err < 1e-4, (b, err)


@pytest.mark.parametrize("eps", _EPSILONS.values(), ids=_EPSILONS.keys())
@pytest.mark.parametrize("solver", kd.ot.SOLVERS)
def test_fixed_count_value_and_grad_match_finite_differences(solver, eps):
  # 30 iterations are three of ott's blocks of 10, and not converged.
  s, t = _logits(2, (1, 4, 7))
  _check_value_and_grad(s, t, dict(solver=solver, num_iters=30, **eps), 30)


_CONVERGED = {
    # Seed, logit scale, ε and T, and the iterations "sinkd" unrolls.
    # SinKD's setting: 300 iterations converge to float64 precision.
    "eps0.1": (2, 1.0, _EPSILONS["eps0.1"], 300),
    # At ε = 0.01 Sinkhorn on such rows needs far more than ott's 2000
    # iterations; closer rows (costs within 0.27) converge in about 1000.
    "eps0.01": (2, 0.1, _EPSILONS["eps0.01"], 1000),
}


@pytest.mark.parametrize("case", _CONVERGED.values(), ids=_CONVERGED.keys())
@pytest.mark.parametrize("solver", kd.ot.SOLVERS)
def test_converged_value_and_grad_match_finite_differences(solver, case):
  # "sinkd" unrolls to convergence; "ott" and "debiased" stop at the threshold
  # and differentiate implicitly.
  seed, logit_scale, eps, sinkd_iters = case
  s, t = _logits(seed, (1, 4, 7))
  s, t = logit_scale * s, logit_scale * t
  if solver == "sinkd":
    kwargs = dict(solver=solver, num_iters=sinkd_iters, **eps)
    _check_value_and_grad(s, t, kwargs, sinkd_iters)
  else:
    kwargs = dict(solver=solver, threshold=1e-6, **eps)
    _check_value_and_grad(s, t, kwargs, None)


def test_fixed_count_runs_exactly_num_iters():
  # Costs within 0.2 of each other converge to any threshold in a few
  # iterations; the fixed-count settings handed to ott-jax still run all 35
  # (7 blocks of 5), on the plain problem and on the Sinkhorn divergence.
  num_iters = 35
  rng = np.random.default_rng(0)
  cost = jnp.asarray(rng.uniform(0.0, 0.2, (4, 4)), jnp.float32)
  uniform = jnp.full((4,), 0.25)
  kwargs = kd.ot._solver_kwargs(num_iters, threshold=1e-3)

  @jax.jit
  def solve(cost):
    out = ott_sinkhorn.Sinkhorn(**kwargs)(
        linear_problem.LinearProblem(
            geometry.Geometry(cost_matrix=cost, epsilon=0.1), uniform, uniform
        )
    )
    _, div = sinkhorn_divergence.sinkhorn_divergence(
        geometry.Geometry,
        cost,
        cost + cost.T,
        2.0 * cost.T,
        a=uniform,
        b=uniform,
        epsilon=0.1,
        solve_kwargs=kwargs,
    )
    return out.n_iters, out.errors, div.n_iters

  n_iters, errors, div_n_iters = solve(cost)
  assert int(n_iters) == num_iters
  assert np.all(np.asarray(errors)[np.asarray(errors) != -1] < 1e-3)
  assert [int(n) for n in div_n_iters] == [num_iters] * 3


def test_sinkd_small_epsilon_rows_are_nonzero_and_finite():
  s, t = _logits(0)
  kwargs = dict(solver="sinkd", epsilon=0.01, temperature=1.0)
  # Some rows of exp(−C/ε) lie wholly below float32's smallest normal number.
  ps, pt = np.exp(ref.log_softmax(s, 1.0)), np.exp(ref.log_softmax(t, 1.0))
  kernel = np.stack(
      [np.exp(-ref.sinkd_cost(ps[b], pt[b]) / 0.01) for b in range(B)]
  )
  tiny = np.finfo(np.float32).tiny
  assert np.any(np.all(kernel < tiny, axis=-1))
  got = np.asarray(sinkhorn(s, t, **kwargs))
  assert np.all(np.isfinite(got)) and np.all(got > 0.1)
  np.testing.assert_allclose(
      got, _ref_rows(s, t, epsilon=0.01, temperature=1.0), rtol=1e-4
  )
  grad = np.asarray(sinkhorn_grad(s, t, jnp.asarray(_MASK), **kwargs))
  assert np.all(np.isfinite(grad))
  np.testing.assert_array_equal(grad[~_MASK], 0.0)
  assert np.all(np.abs(grad[_MASK]).max(-1) > 1e-3)
