"""TAID: the interpolated target and the adaptive schedule against references."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import divergences as kd
from kdjax import objective, taid
import reference_np as ref


class ReferenceSchedule:
  """The reference code's adaptive update, transcribed to float64 Python.

  One object per run: ``t`` starts at ``t_start``, ``prev_loss`` at +inf and
  ``momentum`` at 0; ``update(loss, step, num_steps)`` runs after each step.
  """

  def __init__(
      self, t_start=0.4, t_end=1.0, alpha=5e-4, beta=0.99, adaptive=True
  ):
    self.t_start, self.t_end = t_start, t_end
    self.alpha, self.beta, self.adaptive = alpha, beta, adaptive
    self.t, self.prev_loss, self.momentum = t_start, math.inf, 0.0

  def update(self, loss, step, num_steps):
    if math.isinf(self.prev_loss):
      self.prev_loss = loss
      return
    rel = (self.prev_loss - loss) / (self.prev_loss + 1e-15)
    self.momentum = self.beta * self.momentum + (1 - self.beta) * rel
    sig = 1.0 / (1.0 + math.exp(-self.momentum))
    target = self.t_start + (self.t_end - self.t_start) * step / num_steps
    delta = self.alpha * sig * (1 - self.t)
    self.t = (
        min(self.t_end, max(target, self.t + delta))
        if self.adaptive
        else target
    )
    self.prev_loss = loss


def _losses(n, seed=0):
  """A noisy decreasing loss curve with a plateau and a rise."""
  rng = np.random.default_rng(seed)
  base = np.concatenate(
      [
          np.linspace(3.0, 1.0, n // 2),
          np.full(n // 4, 1.0),
          np.linspace(1.0, 1.5, n - n // 2 - n // 4),
      ]
  )
  return (base * np.exp(rng.normal(0, 0.05, n))).astype(np.float32)


@pytest.mark.parametrize(
    "cfg",
    [
        {},  # the reference defaults
        dict(t_start=0.2),
        dict(alpha=0.05, beta=0.9),  # adaptive step beats the ramp
        dict(alpha=0.5, t_end=0.9),  # reaches and stays at t_end
        dict(adaptive=False),
    ],
)
def test_schedule_matches_the_transcribed_reference(cfg):
  n = 300
  losses = _losses(n)
  r = ReferenceSchedule(**cfg)
  update = jax.jit(lambda s, l, i: taid.update(s, l, i, n, cfg))
  state = taid.init(cfg)
  above_ramp = 0
  for i, loss in enumerate(losses):
    assert float(state.t) == pytest.approx(r.t, rel=1e-6, abs=1e-7), i
    state = update(state, jnp.asarray(loss), jnp.asarray(i, jnp.int32))
    r.update(float(loss), i, n)
    assert float(state.momentum) == pytest.approx(
        r.momentum, rel=1e-5, abs=1e-8
    ), i
    ramp = r.t_start + (r.t_end - r.t_start) * i / n
    above_ramp += r.t > ramp + 1e-6
  assert float(state.t) == pytest.approx(r.t, rel=1e-6)
  if cfg.get("alpha", 0) >= 0.05:
    assert above_ramp > n // 2  # the adaptive branch was the one exercised
  if "t_end" in cfg:
    assert float(state.t) == pytest.approx(cfg["t_end"], rel=1e-6)


def test_first_step_only_records_the_loss():
  s0 = taid.init({})
  s1 = taid.update(s0, jnp.float32(2.5), jnp.int32(0), 100, {})
  assert float(s1.t) == pytest.approx(0.4) and float(s1.momentum) == 0.0
  assert float(s1.prev_loss) == 2.5
  assert all(x.dtype == jnp.float32 and x.shape == () for x in s1)


def _np_target(s, z, t, temperature):
  """p_t ∝ exp((1 − t)·log q + t·log p) in float64 (log-space mixture)."""
  log = (1 - t) * ref.log_softmax(s, temperature) + t * ref.log_softmax(
      z, temperature
  )
  return np.exp(log - np.log(np.exp(log).sum(-1, keepdims=True)))


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_loss_is_kl_from_the_log_space_mixture(temperature):
  rng = np.random.default_rng(0)
  s = (rng.normal(size=(6, 50)) * 2).astype(np.float32)
  z = (rng.normal(size=(6, 50)) * 3).astype(np.float32)
  ts = np.array([0.0, 0.37, 1.0], np.float32)  # both endpoints and between

  @jax.jit
  @functools.partial(jax.vmap, in_axes=(None, 0))
  def kl_and_grad(x, t):
    kl = lambda x: kd.fkl(
        x, taid.target_logits(x, jnp.asarray(z), t), temperature=temperature
    )
    return kl(x), jax.grad(lambda x: jnp.sum(kl(x)))(x)

  vals, grads = kl_and_grad(jnp.asarray(s), jnp.asarray(ts))
  log_q = ref.log_softmax(s, temperature)
  for t, val, grad in zip(ts, vals, grads):
    p_t = _np_target(
        s.astype(np.float64), z.astype(np.float64), float(t), temperature
    )
    want = (p_t * (np.log(p_t) - log_q)).sum(-1)
    # d/ds KL(p_t ‖ q_θ) with p_t held fixed: (q − p_t) / T.
    want_grad = (np.exp(log_q) - p_t) / temperature
    np.testing.assert_allclose(
        np.asarray(val), want, rtol=1e-5, atol=1e-6, err_msg=f"t={t}"
    )
    np.testing.assert_allclose(
        np.asarray(grad), want_grad, rtol=1e-5, atol=1e-6, err_msg=f"t={t}"
    )


def test_endpoints_and_forbidden_slots():
  rng = np.random.default_rng(1)
  s = jnp.asarray(rng.normal(size=(4, 20)), jnp.float32)
  z = jnp.asarray(rng.normal(size=(4, 20)) * 2, jnp.float32)
  # t = 1 is plain forward KL to the teacher, exactly.
  np.testing.assert_array_equal(
      kd.fkl(s, taid.target_logits(s, z, 1.0)), kd.fkl(s, z)
  )
  # t = 0: the target is the student itself.
  np.testing.assert_allclose(
      kd.fkl(s, taid.target_logits(s, z, 0.0)), 0.0, atol=1e-6
  )
  # A slot the teacher rules out stays ruled out, and no nan appears at t = 0.
  z_inf = z.at[:, 3].set(-jnp.inf)
  for t in (0.0, 0.5, 1.0):
    out = taid.target_logits(s, z_inf, t)
    assert not np.isnan(np.asarray(out)).any()
    assert np.all(np.isneginf(np.asarray(out[:, 3]))) == (t > 0)


def test_target_carries_no_gradient_and_t_is_traced():
  rng = np.random.default_rng(2)
  s = jnp.asarray(rng.normal(size=(3, 10)), jnp.float32)
  z = jnp.asarray(rng.normal(size=(3, 10)), jnp.float32)
  g = jax.grad(lambda x: jnp.sum(taid.target_logits(x, z, 0.3)))(s)
  assert np.all(np.asarray(g) == 0.0)
  f = jax.jit(lambda t: kd.fkl(s, taid.target_logits(s, z, t)).sum())
  a, b = float(f(jnp.float32(0.3))), float(f(jnp.float32(0.9)))
  assert f._cache_size() == 1 and a < b  # one compilation; KL grows with t


def test_objective_taid_is_fkl_to_the_interpolated_target():
  rng = np.random.default_rng(3)
  b, t_len, v = 2, 6, 17
  s = rng.normal(size=(b, t_len, v)).astype(np.float32)
  z = (rng.normal(size=(b, t_len, v)) * 2).astype(np.float32)
  mask = np.ones((b, t_len), np.float32)
  mask[0, :2] = 0
  labels = np.zeros((b, t_len), np.int32)
  cfg = dict(
      name="taid",
      impl="auto",
      kd_ratio=0.5,
      chunk_size=64,
      hp={},
      taid=dict(taid.DEFAULTS),
  )
  objective.check(cfg)

  class Model:

    def __init__(self, out):
      self.out = jnp.asarray(out)

    def __call__(self, *args):
      return self.out

  batch = dict(
      input_ids=labels,
      positions=labels,
      attention_mask=labels,
      labels=jnp.asarray(labels),
      loss_mask=jnp.asarray(mask),
  )
  for t in (None, 0.7):
    got = objective.sums(cfg, Model(s), Model(z), batch, taid_t=t)
    tt = 0.4 if t is None else t
    p_t = _np_target(s.astype(np.float64), z.astype(np.float64), tt, 1.0)
    want = (p_t * (np.log(p_t) - ref.log_softmax(s))).sum(-1)
    assert float(got.kd) == pytest.approx((want * mask).sum(), rel=1e-5)


def test_bad_taid_config_fails_with_the_fix():
  base = dict(name="taid", impl="auto", kd_ratio=0.5, chunk_size=64, hp={})
  with pytest.raises(ValueError, match="taid_gpt2.py"):
    objective.check(base)
  with pytest.raises(ValueError, match="t_start < t_end"):
    objective.check(dict(base, taid=dict(t_start=1.0)))
  with pytest.raises(ValueError, match="unknown keys"):
    objective.check(dict(base, taid=dict(tstart=0.1)))
  with pytest.raises(ValueError, match="loss.impl=auto"):
    objective.check(dict(base, impl="fused", taid={}))


# ----------------------------------------------------------------------------
# In the trainer: t lives in the train state, moves by the rule, resumes.


@pytest.mark.slow
def test_training_moves_t_by_the_rule_and_resumes_exactly(tmp_path_factory):
  from kdjax import metrics, training
  import tiny_run

  root = str(tmp_path_factory.mktemp("taid"))
  steps = 6
  # alpha large enough that the adaptive step, not the ramp, sets t.
  c = tiny_run.config(
      "taid_gpt2",
      root,
      steps=steps,
      **{"loss.taid.alpha": 0.9, "loss.taid.beta": 0.5},
  )
  cfg = c.loss.taid.to_dict()
  workdir = str(tmp_path_factory.mktemp("straight"))
  training.train_and_evaluate(c, workdir)
  straight = metrics.read(workdir)
  assert [r["step"] for r in straight] == list(range(1, steps + 1))
  r = ReferenceSchedule(**cfg)
  above_ramp = 0
  for n, row in enumerate(straight):
    assert row["taid_t"] == pytest.approx(r.t, rel=1e-6), n
    r.update(row["kd"], n, steps)
    above_ramp += r.t > cfg["t_start"] + (1 - cfg["t_start"]) * n / steps + 1e-6
  assert above_ramp >= 2 and straight[-1]["taid_t"] > straight[0]["taid_t"]
  # Stopped after 3 steps and resumed: the same t, losses and parameters.
  resumed = str(tmp_path_factory.mktemp("resumed"))
  training.train_and_evaluate(c, resumed, stop_at=3)
  training.train_and_evaluate(c, resumed)
  rows = metrics.read(resumed)
  for a, b in zip(straight, rows, strict=True):
    assert a["taid_t"] == b["taid_t"] and a["loss"] == b["loss"], a["step"]
