"""DistiLLM's adaptive schedule and replay buffer against a Python transcription."""

import collections
import random

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from kdjax.onpolicy import batches, distillm, strategy

GEN, REPLAY, DATA = distillm.GENERATE, distillm.REPLAY, distillm.DATASET


def _reference_run(
    rs,
    val_losses,
    *,
    total,
    every,
    capacity,
    batch,
    init_threshold,
    loss_eps,
    replay_ratio,
):
  """DistiLLM's training-loop logic in plain Python (float64, a deque).

  Per global step s = 1..total: the generation threshold from tau and s; the
  uniform draw decides generate (and append the batch to the deque), replay
  (random.sample of a batch) or the dataset batch; every `every` steps a
  validation loss raises tau by 0.1 (cap 1) when it is >= prev + loss_eps,
  and only then prev becomes that loss.
  """
  tau, prev = init_threshold, val_losses[0]
  buf = collections.deque(maxlen=capacity)
  acts, taus, contents = [], [], []
  losses = iter(val_losses[1:])
  for s in range(1, total + 1):
    if replay_ratio == "constant":
      samp = tau * 0.5
    elif replay_ratio == "increasing":
      samp = tau * s / total
    else:
      samp = tau * (1 - s / total)
    r = rs[s - 1]
    if r < samp or (r < tau and len(buf) < capacity):
      acts.append(GEN)
      buf.extend((s, j) for j in range(batch))
    elif r < tau:
      acts.append(REPLAY)
      random.sample(list(buf), k=batch)
    else:
      acts.append(DATA)
    contents.append(sorted(buf))
    if s % every == 0:
      cur = next(losses)
      if cur >= prev + loss_eps:
        tau = min(tau + 0.1, 1.0)
        prev = cur
    taus.append(tau)
  return acts, taus, contents


def _rows_of_step(s, batch, length=6):
  """Rows whose first two ids are (step, row), to read the buffer back."""
  ids = np.zeros((batch, length + 1), np.int32)
  ids[:, 0] = s
  ids[:, 1] = np.arange(batch)
  return batches.Rows(
      jnp.asarray(ids),
      jnp.ones(batch, jnp.int32),
      jnp.full(batch, length, jnp.int32),
  )


def _content(buffer):
  ids = np.asarray(buffer.rows.ids_BxL1)[: int(buffer.count)]
  return sorted((int(a), int(b)) for a, b in ids[:, :2])


@pytest.mark.parametrize("replay_ratio", distillm.REPLAY_RATIOS)
def test_schedule_and_buffer_equal_the_transcription(replay_ratio):
  total, every, capacity, batch = 60, 5, 10, 4
  # A validation-loss curve that falls, then rises in steps (tau goes up),
  # with rises smaller than loss_eps that must not count.
  val = [
      3.0,
      2.8,
      2.7,
      2.85,
      2.95,
      3.0,
      3.02,
      3.2,
      3.25,
      3.4,
      3.45,
      3.6,
      3.8,
      3.85,
  ]
  rs = np.asarray(jax.random.uniform(jax.random.key(0), (total,)), np.float64)
  kw = dict(
      total=total,
      every=every,
      capacity=capacity,
      batch=batch,
      init_threshold=0.2,
      loss_eps=0.1,
      replay_ratio=replay_ratio,
  )
  want_acts, want_taus, want_contents = _reference_run(rs, val, **kw)
  assert {GEN, REPLAY, DATA} <= set(want_acts)  # every branch is exercised

  schedule = distillm.start(0.2, val[0])
  buffer = distillm.empty(capacity, 6, eos_id=0)
  act_fn = jax.jit(
      lambda r, tau, s, count: distillm.action(
          r,
          tau,
          distillm.generate_threshold(tau, s, total, replay_ratio),
          count,
          capacity,
      )
  )
  losses = iter(val[1:])
  for s in range(1, total + 1):
    a = int(
        act_fn(
            jnp.float32(rs[s - 1]),
            jnp.float32(schedule.threshold),
            s,
            buffer.count,
        )
    )
    assert a == want_acts[s - 1], s
    if a == GEN:
      buffer = distillm.push(buffer, _rows_of_step(s, batch))
    elif a == REPLAY:
      got = distillm.sample(buffer, jax.random.key(s), batch)
      pairs = {(int(x), int(y)) for x, y in np.asarray(got.ids_BxL1)[:, :2]}
      assert len(pairs) == batch and pairs <= set(_content(buffer))
    assert _content(buffer) == want_contents[s - 1], s
    if s % every == 0:
      schedule = distillm.after_validation(schedule, next(losses), 0.1)
    assert schedule.threshold == pytest.approx(want_taus[s - 1], abs=1e-12)
  assert schedule.threshold > 0.5  # the curve raised tau several times


def test_threshold_is_capped_at_one_and_prev_moves_only_on_a_raise():
  s = distillm.start(0.95, 1.0)
  s = distillm.after_validation(s, 1.05, 0.1)  # +0.05 < eps: nothing
  assert s == distillm.Schedule(0.95, 1.0)
  s = distillm.after_validation(s, 1.1, 0.1)
  assert s == distillm.Schedule(1.0, 1.1)
  s = distillm.after_validation(s, 5.0, 0.1)
  assert s == distillm.Schedule(1.0, 5.0)


def test_push_is_a_fifo_of_capacity_rows():
  capacity, batch = 10, 4  # batch does not divide capacity: pushes wrap
  buffer = distillm.empty(capacity, 6, eos_id=0)
  ref = collections.deque(maxlen=capacity)
  for s in range(1, 8):
    buffer = jax.jit(distillm.push)(buffer, _rows_of_step(s, batch))
    ref.extend((s, j) for j in range(batch))
    assert _content(buffer) == sorted(ref)
    assert int(buffer.count) == len(ref)


def test_sample_is_uniform_without_replacement():
  capacity, batch = 12, 5
  buffer = distillm.empty(capacity, 6, eos_id=0)
  for s in range(3):
    buffer = distillm.push(buffer, _rows_of_step(s, 4))
  keys = jax.random.split(jax.random.key(1), 3000)
  rows = jax.vmap(lambda k: distillm.sample(buffer, k, batch))(keys)
  pairs = np.asarray(rows.ids_BxL1)[:, :, :2]
  flat = pairs[..., 0] * 4 + pairs[..., 1]  # slot id 0..11
  assert all(len(set(r)) == batch for r in flat)
  freq = np.bincount(flat.ravel(), minlength=capacity) / 3000
  # Each row is in a draw with probability batch / capacity.
  np.testing.assert_allclose(freq, batch / capacity, atol=0.04)


def test_source_state_with_a_full_buffer_round_trips_through_orbax(tmp_path):
  buffer = distillm.empty(8, 6, eos_id=0)
  for s in range(3):
    buffer = distillm.push(buffer, _rows_of_step(s + 1, 4))
  state = strategy.State(
      jax.random.key_data(jax.random.key(5)),
      jnp.float32(0.3),
      jnp.float32(2.5),
      buffer,
  )
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(tmp_path / "s", state)
  ckpt.wait_until_finished()
  back = ckpt.restore(tmp_path / "s", target=state)
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(back)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert int(back.buffer.count) == 8 and int(back.buffer.next) == 4


def test_after_validation_on_the_source_state_is_the_schedule():
  state = strategy.State(
      jnp.zeros(2, jnp.uint32), jnp.float32(0.0), jnp.float32(3.0), None
  )
  for loss, want in (
      (2.9, 0.0),
      (3.05, 0.0),
      (3.1, 0.1),
      (3.15, 0.1),
      (3.3, 0.2),
  ):
    state = distillm.update_state(state, loss, 0.1)
    assert float(state.threshold) == pytest.approx(want, abs=1e-6), loss


@pytest.mark.parametrize("replay_ratio", distillm.REPLAY_RATIOS)
def test_generate_threshold_at_every_step(replay_ratio):
  total, tau = 40, 0.7
  want = {
      "decreasing": lambda s: tau * (1 - s / total),
      "constant": lambda s: tau * 0.5,
      "increasing": lambda s: tau * s / total,
  }[replay_ratio]
  got = jax.vmap(
      lambda s: distillm.generate_threshold(
          jnp.float32(tau), s, total, replay_ratio
      )
  )(jnp.arange(1, total + 1))
  np.testing.assert_allclose(
      np.asarray(got),
      [want(s) for s in range(1, total + 1)],
      rtol=1e-6,
      atol=1e-7,
  )
