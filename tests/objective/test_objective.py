"""kdjax.objective: loss.impl, loss.temperature and the fused path's sums
against float64 NumPy on a toy embedding-plus-head model.

Sums and gradients run jitted: one compiled program per case instead of
every op of the objective compiled on its own.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import objective
import reference_np as ref

B, T, V, H = 2, 5, 40, 6


class _Toy:
  """``logits = E[ids] Wᵀ``, soft-capped ``c tanh(z / c)`` when ``cap`` is
  set: hidden states, a head and a logits map, like the real models."""

  def __init__(self, seed, width, cap=None):
    k1, k2 = jax.random.split(jax.random.key(seed))
    self.embed = jax.random.normal(k1, (V, width))
    self.head = 0.7 * jax.random.normal(k2, (V, width))
    self.cap = cap

  def hidden_states(self, ids, positions, attention_mask):
    del positions, attention_mask
    return self.embed[ids]

  def head_weight(self):
    return self.head

  def logits_map(self):
    if self.cap is None:
      return None
    return lambda z: self.cap * jnp.tanh(z / self.cap)

  def __call__(self, *inputs):
    z = self.hidden_states(*inputs) @ self.head.T
    return z if self.cap is None else self.logits_map()(z)


def _batch():
  rng = np.random.default_rng(0)
  ids = rng.integers(0, V, (B, T))
  mask = np.ones((B, T), np.float32)
  mask[0, :2] = 0.0
  return {
      "input_ids": jnp.asarray(ids),
      "positions": jnp.zeros((B, T), int),
      "attention_mask": jnp.ones((B, T)),
      "labels": jnp.asarray(rng.integers(0, V, (B, T))),
      "loss_mask": jnp.asarray(mask),
  }


def _cfg(impl, name="jsd", temperature=2.0, **hp):
  return dict(
      name=name,
      impl=impl,
      kd_ratio=0.3,
      chunk_size=3,
      temperature=temperature,
      hp=dict(hp or {"beta": 0.1}),
  )


@pytest.mark.parametrize("impl", objective.IMPLS)
def test_sums_match_float64_with_temperature(impl):
  student, teacher, batch = _Toy(1, H), _Toy(2, H + 2), _batch()
  cfg = _cfg(impl)
  objective.check(cfg)
  got = jax.jit(lambda b: objective.sums(cfg, student, teacher, b))(batch)
  s = np.asarray(student(batch["input_ids"], None, None), np.float64)
  t = np.asarray(teacher(batch["input_ids"], None, None), np.float64)
  mask = np.asarray(batch["loss_mask"], np.float64)
  ce = -np.take_along_axis(
      ref.log_softmax(s), np.asarray(batch["labels"])[..., None], -1
  )[..., 0]
  kd_tok = ref.jsd(s, t, beta=0.1, temperature=2.0)
  np.testing.assert_allclose(got.ce, (ce * mask).sum(), rtol=1e-5)
  np.testing.assert_allclose(got.kd, (kd_tok * mask).sum(), rtol=1e-5)
  assert float(got.tokens) == mask.sum()


def test_fused_gradient_equals_auto():
  """The fused path's analytic gradient of (1 − r)·CE + r·KD equals the
  logits path's, through combine."""
  teacher, batch = _Toy(2, H + 2), _batch()

  def loss(head, impl):
    student = _Toy(1, H)
    student.head = head
    cfg = _cfg(impl, name="akl", mu=0.5)
    return objective.combine(cfg, objective.sums(cfg, student, teacher, batch))[
        0
    ]

  head = _Toy(1, H).head
  grad = jax.jit(jax.grad(loss), static_argnums=1)
  g_auto = grad(head, "auto")
  g_fused = grad(head, "fused")
  np.testing.assert_allclose(g_fused, g_auto, atol=1e-5 * np.abs(g_auto).max())


def test_fused_path_applies_the_models_logit_caps():
  """Soft-capped student (c = 1.5) and teacher (c = 2): the fused sums and
  their head gradient equal the logits path's, and the caps act."""
  teacher, batch = _Toy(2, H + 2, cap=2.0), _batch()
  cfg = _cfg("fused", name="akl", mu=0.5)

  def loss(head, impl, cap=1.5):
    student = _Toy(1, H, cap=cap)
    student.head = head
    c = dict(cfg, impl=impl)
    return objective.combine(c, objective.sums(c, student, teacher, batch))[0]

  head = 3.0 * _Toy(1, H).head  # logits of ~10: well into the caps
  for impl in ("auto", "fused"):
    objective.check(dict(cfg, impl=impl))
  step = jax.jit(jax.value_and_grad(loss), static_argnums=(1, 2))
  want, g_auto = step(head, "auto", 1.5)
  got, g_fused = step(head, "fused", 1.5)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  np.testing.assert_allclose(g_fused, g_auto, atol=1e-5 * np.abs(g_auto).max())
  uncapped = jax.jit(loss, static_argnums=(1, 2))(head, "auto", None)
  assert abs(float(uncapped) - float(want)) > 0.1


def test_check_names_the_fix():
  with pytest.raises(ValueError, match="loss.impl='fast' is unknown"):
    objective.check(_cfg("fast"))
  with pytest.raises(ValueError, match="loss.temperature"):
    objective.check(
        _cfg("auto", beta=0.1, temperature=1.0) | {"hp": {"temperature": 2.0}}
    )
  with pytest.raises(ValueError, match="loss.temperature=0"):
    objective.check(_cfg("auto", temperature=0.0))
  with pytest.raises(ValueError, match="no 'uld' version"):
    objective.check(_cfg("fused", name="uld"))
