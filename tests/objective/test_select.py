"""Entropy-based token selection (objective.kd_mask) against a NumPy reference."""

import fractions
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import divergences as kd
from kdjax import objective
import reference_np as ref


def _cfg(fraction, name="fkl", temperature=None, impl="auto", **extra):
  c = dict(
      name=name,
      impl=impl,
      kd_ratio=0.5,
      chunk_size=64,
      hp={},
      select=dict(fraction=fraction, by="student_entropy"),
      **extra,
  )
  if temperature is not None:
    c["temperature"] = temperature
  return c


def _np_select(logits, mask, fraction, temperature=1.0):
  """Per row: the ceil(f·n) masked positions of highest float64 entropy.

  Ties go to the earlier position; written from the rule, not the JAX code.
  """
  log_q = ref.log_softmax(logits, temperature)
  h = -(np.exp(log_q) * log_q).sum(-1)
  keep = np.zeros(mask.shape, bool)
  f = fractions.Fraction(repr(fraction))
  for b in range(mask.shape[0]):
    pos = [i for i in range(mask.shape[1]) if mask[b, i] > 0]
    k = math.ceil(f * len(pos))
    pos.sort(key=lambda i: (-h[b, i], i))
    keep[b, pos[:k]] = True
  return keep


def _rows(seed, b=5, t=24, v=33, scale=3.0):
  rng = np.random.default_rng(seed)
  # Per-position scales spread the entropies well apart (no float32 near-ties).
  logits = rng.normal(size=(b, t, v)) * rng.uniform(0.2, scale, size=(b, t, 1))
  mask = (rng.uniform(size=(b, t)) < 0.7).astype(np.float32)
  mask[0] = 0.0  # an empty row
  mask[1] = 1.0  # a full row
  mask[2, :] = 0.0
  mask[2, 5] = 1.0  # a single position
  return logits.astype(np.float32), mask


def _teacher(logits, seed):
  """Random teacher logits of the student's shape."""
  return (
      np.random.default_rng(seed).normal(size=logits.shape).astype(np.float32)
  )


def _sums(cfg, logits, teacher, mask):
  """``objective._local_sums`` of a batch whose labels are all 0, jitted:
  one compiled program instead of each op compiled on its own."""
  labels = np.zeros(mask.shape, np.int32)
  return jax.jit(lambda *a: objective._local_sums(cfg, True, *a))(
      *map(jnp.asarray, (logits, teacher, labels, mask))
  )


@pytest.mark.parametrize("fraction", [0.2, 0.5, 0.07, 0.999])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_selects_the_reference_positions(fraction, temperature):
  logits, mask = _rows(int(fraction * 1000) + int(temperature))
  got = objective.kd_mask(
      _cfg(fraction, temperature=temperature),
      jnp.asarray(logits),
      jnp.asarray(mask),
  )
  want = _np_select(logits, mask, fraction, temperature)
  np.testing.assert_array_equal(np.asarray(got) > 0, want)
  assert got.dtype == jnp.float32
  count = objective.kd_tokens(_cfg(fraction), jnp.asarray(mask))
  assert float(count) == want.sum()


def test_counts_are_exact_ceilings():
  # 0.07 * 100 is 7.000000000000001 in floating point: the count must be 7.
  for fraction, n, k in [
      (0.07, 100, 7),
      (0.2, 5, 1),
      (0.15, 100, 15),
      (0.5, 3, 2),
      (0.01, 1, 1),
      (1 / 3, 3, 1),
  ]:
    mask = np.zeros((1, 128), np.float32)
    mask[0, :n] = 1
    assert float(objective.kd_tokens(_cfg(fraction), jnp.asarray(mask))) == k
    logits = np.random.default_rng(n).normal(size=(1, 128, 8))
    sel = objective.kd_mask(
        _cfg(fraction), jnp.asarray(logits, jnp.float32), jnp.asarray(mask)
    )
    assert float(sel.sum()) == k


def test_ties_keep_the_earlier_position():
  v, t = 16, 10
  logits = np.zeros((1, t, v), np.float32)
  logits[0, :, 0] = 5.0  # every position equally peaked ...
  logits[0, [3, 6, 8], :] = 0.0  # ... but for three uniform (max-entropy) ones
  mask = np.ones((1, t), np.float32)
  sel = np.asarray(
      objective.kd_mask(_cfg(0.5), jnp.asarray(logits), jnp.asarray(mask))
  )[0]
  # 5 kept: the three uniform positions, then the two earliest of the tie.
  np.testing.assert_array_equal(np.flatnonzero(sel), [0, 1, 3, 6, 8])


def test_masked_positions_are_never_selected():
  v, t = 16, 12
  rng = np.random.default_rng(0)
  logits = (rng.normal(size=(2, t, v)) * 4).astype(np.float32)
  mask = np.ones((2, t), np.float32)
  mask[:, ::2] = 0.0
  logits[:, ::2] = 0.0  # masked positions carry the highest entropy
  sel = np.asarray(
      objective.kd_mask(_cfg(0.5), jnp.asarray(logits), jnp.asarray(mask))
  )
  assert not sel[:, ::2].any() and sel.sum() == 2 * 3


def test_fraction_one_is_the_unselected_objective_bit_for_bit():
  logits, mask = _rows(3)
  teacher = _teacher(logits, 4)
  labels = (
      np.random.default_rng(5)
      .integers(0, logits.shape[-1], mask.shape)
      .astype(np.int32)
  )
  args = (
      jnp.asarray(logits),
      jnp.asarray(teacher),
      jnp.asarray(labels),
      jnp.asarray(mask),
  )
  plain = dict(_cfg(1.0))
  del plain["select"]
  for cfg in (plain, _cfg(1.0)):
    f = jax.jit(
        lambda s, t, l, m, cfg=cfg: objective._local_sums(cfg, True, s, t, l, m)
    )
    got = f(*args)
    # The objective before selection existed: KD summed over every masked row.
    per_token = kd.get("fkl")(args[0], args[1])
    assert np.asarray(got.kd) == np.asarray(
        jax.jit(lambda p, m: jnp.sum(jnp.where(m > 0, p, 0.0)))(
            per_token, args[3]
        )
    )
    assert np.asarray(got.kd_tokens) == np.asarray(got.tokens)
    loss, m = objective.combine(cfg, got)
    assert "select_fraction" not in m
    assert np.asarray(m["kd"]) == np.asarray(
        got.kd / jnp.maximum(got.tokens, 1.0)
    )


def test_kd_value_is_the_mean_over_selected_positions():
  logits, mask = _rows(7)
  teacher = _teacher(logits, 8)
  cfg = _cfg(0.3)
  got = _sums(cfg, logits, teacher, mask)
  keep = _np_select(logits, mask, 0.3)
  want = ref.fkl(logits, teacher)[keep]
  assert float(got.kd_tokens) == keep.sum()
  assert float(got.tokens) == mask.sum()
  _, m = objective.combine(cfg, got)
  assert float(m["kd"]) == pytest.approx(want.mean(), rel=1e-5)
  assert float(m["select_fraction"]) == pytest.approx(keep.sum() / mask.sum())
  # CE still covers every masked token.
  ce = -ref.log_softmax(logits)[..., 0]  # the labels are all 0
  assert float(m["ce"]) == pytest.approx(
      (ce * mask).sum() / mask.sum(), rel=1e-5
  )


@pytest.mark.parametrize("name", ["fkl", "akl", "jsd"])
def test_kd_gradient_vanishes_off_the_selected_positions(name):
  logits, mask = _rows(11)
  teacher = _teacher(logits, 12)
  cfg = _cfg(0.25, name=name)

  keep = _np_select(logits, mask, 0.25)
  labels = jnp.zeros(mask.shape, jnp.int32)
  args = tuple(map(jnp.asarray, (logits, teacher, mask, keep)))

  @jax.jit
  def grads(s, t, m, keep):
    """The selected objective's KD gradient and, for comparison, the
    divergence's own per-token gradient on the kept positions (one program)."""
    kd_sum = lambda x: objective._local_sums(cfg, True, x, t, labels, m).kd
    per = lambda x: jnp.sum(kd.get(name)(x, t) * keep.astype(jnp.float32))
    return jax.grad(kd_sum)(s), jax.grad(per)(s)

  g, per = map(np.asarray, grads(*args))
  assert np.all(g[~keep] == 0.0)
  # On the kept positions: the divergence's own per-token gradient.
  np.testing.assert_allclose(
      g[keep], np.asarray(per)[keep], rtol=1e-6, atol=1e-7
  )
  assert np.abs(g[keep]).max() > 0


def test_micro_loss_adds_up_to_combine():
  logits, mask = _rows(13)
  teacher = _teacher(logits, 14)
  cfg = _cfg(0.4)
  halves = [_sums(cfg, logits[i::2], teacher[i::2], mask[i::2]) for i in (0, 1)]
  total = jax.tree.map(jnp.add, *halves)
  tokens = jnp.sum(jnp.asarray(mask))
  kd_tokens = objective.kd_tokens(cfg, jnp.asarray(mask))
  assert float(kd_tokens) == float(total.kd_tokens)
  parts = sum(
      float(objective.micro_loss(cfg, h, tokens, kd_tokens)) for h in halves
  )
  assert parts == pytest.approx(
      float(objective.combine(cfg, total)[0]), rel=1e-6
  )


def test_bad_select_config_fails_with_the_fix():
  with pytest.raises(ValueError, match=r"fraction=0.0 must be in \(0, 1\]"):
    objective.check(_cfg(0.0))
  with pytest.raises(
      ValueError, match="select.by='teacher_entropy' is unknown"
  ):
    objective.check(
        dict(_cfg(0.5), select=dict(fraction=0.5, by="teacher_entropy"))
    )
  with pytest.raises(ValueError, match="loss.impl=auto"):
    objective.check(dict(_cfg(0.5), impl="fused"))
  objective.check(_cfg(0.5))


def test_sinkhorn_keeps_whole_sequences_and_sums_the_kept_rows():
  logits, mask = _rows(21, b=3, t=8, v=12)
  teacher = _teacher(logits, 22)
  cfg = _cfg(0.5, name="sinkhorn", impl="reference")
  labels = jnp.zeros(mask.shape, jnp.int32)

  @jax.jit
  def run(s, t, m):
    # The objective passes loss.temperature (default 1); the transport is
    # over the whole mask. One program holds both.
    sums = objective._local_sums(cfg, True, s, t, labels, m)
    return sums, kd.sinkhorn(s, t, m, temperature=1.0)

  got, per_token = run(*map(jnp.asarray, (logits, teacher, mask)))
  keep = _np_select(logits, mask, 0.5)
  assert float(got.kd) == pytest.approx(
      float(np.asarray(per_token)[keep].sum()), rel=1e-6
  )
  assert float(got.kd_tokens) == keep.sum()


# ----------------------------------------------------------------------------
# In the trainer.


@pytest.mark.slow
def test_selection_in_a_run_accumulates_exactly_and_logs_the_fraction(
    tmp_path_factory,
):
  import os

  from flax import nnx

  from kdjax import sharding, training
  import tiny_run

  root = str(tmp_path_factory.mktemp("select"))
  devices = jax.devices()[:2]

  def grads(**overrides):
    c = tiny_run.config(
        "akl_gpt2",
        root,
        **{"mesh.data": 2, "loss.select.fraction": 0.3, **overrides},
    )
    mesh = sharding.make_mesh(c.mesh.data, c.mesh.fsdp, devices=devices)
    with jax.set_mesh(mesh):
      run = training.build(c, os.path.join(root, "w"), mesh)
      batch = run.train_data.dataset[0]
      g, m, _ = jax.jit(run.step.grads)(
          run.state, training.put_batch(batch, mesh), nnx.state(run.teacher)
      )
    return jax.tree.leaves(g), {k: float(v) for k, v in m.items()}, batch

  (g1, m1, batch), (g4, m4, _) = grads(), grads(grad_accum=4)
  # The kept count is per sequence, so 4 micro-batches keep what 1 batch does.
  n_b = batch["loss_mask"].sum(-1)
  kept = sum(math.ceil(fractions.Fraction(3, 10) * int(n)) for n in n_b)
  assert m1["select_fraction"] == pytest.approx(kept / n_b.sum(), rel=1e-6)
  for k in ("loss", "ce", "kd", "select_fraction"):
    assert m4[k] == pytest.approx(m1[k], rel=1e-5), k
  scale = max(float(np.abs(x).max()) for x in g1)
  for a, b in zip(g1, g4):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * scale)
