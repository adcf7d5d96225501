"""DistiLLM's adaptive student-generated outputs (Ko et al., ICML 2024).

The schedule (docs/on_policy.md): a threshold
``tau`` starts at ``init_threshold`` and the validation loss ``prev`` is
measured before training. After each validation with loss ``v``::

  if v >= prev + loss_eps:  tau <- min(tau + 0.1, 1),  prev <- v

(``prev`` moves only when ``tau`` is raised). At global step ``s`` (1-based)
of ``S``, the fresh-generation threshold is ``tau_s = tau * (1 - s / S)``
(``replay_ratio="decreasing"``; ``"constant"``: ``tau / 2``;
``"increasing"``: ``tau * s / S``). With ``r ~ U[0, 1)``::

  r < tau_s, or r < tau with the buffer not full  ->  GENERATE: the student
      samples responses to this batch's prompts; they are trained on and
      pushed into the replay buffer
  else r < tau                                    ->  REPLAY: a batch drawn
      uniformly without replacement from the (full) buffer
  else                                            ->  DATASET

The replay buffer holds the last ``capacity`` generated sequences (first in,
first out) as fixed-shape arrays (:class:`Buffer`), so orbax checkpoints it
like any other state. :class:`DistiLLM` is the strategy that runs both.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from kdjax.onpolicy import batches, strategy
from kdjax.onpolicy.sampler import Sampler

Array = jax.Array
DATASET, GENERATE, REPLAY = 0, 1, 2
REPLAY_RATIOS = ("decreasing", "constant", "increasing")
THRESHOLD_STEP = 0.1  # the raise of tau after a validation-loss rise


# ----------------------------------------------------------------------------
# The schedule.


class Schedule(NamedTuple):
  """``tau`` and the validation loss it was last raised at (host floats)."""

  threshold: float
  prev_loss: float


def start(init_threshold: float, initial_val_loss: float) -> Schedule:
  """The schedule before the first step (``prev`` = loss before training)."""
  return Schedule(float(init_threshold), float(initial_val_loss))


def after_validation(
    schedule: Schedule, val_loss: float, loss_eps: float
) -> Schedule:
  """Raises ``tau`` by 0.1 (capped at 1) when the loss rose by ``loss_eps``."""
  if val_loss >= schedule.prev_loss + loss_eps:
    return Schedule(
        min(schedule.threshold + THRESHOLD_STEP, 1.0), float(val_loss)
    )
  return schedule


def generate_threshold(
    threshold: Array,
    step: Array,
    total_steps: int,
    replay_ratio: str = "decreasing",
) -> Array:
  """``tau_s``: below it a batch is generated even when the buffer is full.

  ``step`` is 1-based (the update about to be made).
  """
  frac = jnp.asarray(step, jnp.float32) / total_steps
  if replay_ratio == "decreasing":
    return threshold * (1.0 - frac)
  if replay_ratio == "constant":
    return threshold * 0.5
  if replay_ratio == "increasing":
    return threshold * frac
  raise ValueError(
      f"replay_ratio={replay_ratio!r} must be one of " f"{REPLAY_RATIOS}."
  )


def action(
    r: Array,
    threshold: Array,
    gen_threshold: Array,
    count: Array,
    capacity: int,
) -> Array:
  """DATASET / GENERATE / REPLAY for the draw ``r`` (module docstring)."""
  generate = (r < gen_threshold) | ((r < threshold) & (count < capacity))
  replay = ~generate & (r < threshold)
  return jnp.where(
      generate, GENERATE, jnp.where(replay, REPLAY, DATASET)
  ).astype(jnp.int32)


# ----------------------------------------------------------------------------
# The replay buffer.


class Buffer(NamedTuple):
  """The last ``capacity`` generated rows, a ring of fixed-shape arrays.

  Attributes:
    rows: :class:`batches.Rows` with a leading ``capacity`` axis.
    count: how many slots hold a row (int32 scalar, at most ``capacity``).
    next: the slot the next row goes to (int32 scalar); once full, the
      oldest row.
  """

  rows: batches.Rows
  count: Array
  next: Array


def empty(capacity: int, max_length: int, eos_id: int) -> Buffer:
  """A buffer of ``capacity`` rows of ``max_length`` training columns."""
  rows = batches.Rows(
      jnp.full((capacity, max_length + 1), eos_id, jnp.int32),
      jnp.zeros((capacity,), jnp.int32),
      jnp.zeros((capacity,), jnp.int32),
  )
  return Buffer(rows, jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))


def push(buffer: Buffer, rows: batches.Rows) -> Buffer:
  """Appends ``B`` rows, evicting the oldest once full (``deque(maxlen=C)``)."""
  C = buffer.rows.length_B.shape[0]
  B = rows.length_B.shape[0]
  slots_B = (buffer.next + jnp.arange(B)) % C
  new = jax.tree.map(lambda old, x: old.at[slots_B].set(x), buffer.rows, rows)
  return Buffer(new, jnp.minimum(buffer.count + B, C), (buffer.next + B) % C)


def sample(buffer: Buffer, key: Array, batch_size: int) -> batches.Rows:
  """``batch_size`` distinct filled rows, uniformly (``random.sample``).

  Needs ``count >= batch_size`` (the schedule replays from a full buffer
  only): the filled slots with the largest of i.i.d. uniform scores.
  """
  C = buffer.rows.length_B.shape[0]
  scores_C = jax.random.uniform(key, (C,))
  scores_C = jnp.where(jnp.arange(C) < buffer.count, scores_C, -1.0)
  _, slots_B = jax.lax.top_k(scores_C, batch_size)
  return jax.tree.map(lambda x: x[slots_B], buffer.rows)


# ----------------------------------------------------------------------------
# The strategy.


def update_state(state: strategy.State, val_loss: float, loss_eps: float):
  """:func:`after_validation` on a strategy state's ``threshold``/``prev_loss``.

  The schedule lives in the state as float32, read and written back the same
  way whether or not the run was resumed in between.
  """
  schedule = after_validation(
      Schedule(float(state.threshold), float(state.prev_loss)),
      val_loss,
      loss_eps,
  )
  return state._replace(
      threshold=jnp.asarray(schedule.threshold, jnp.float32),
      prev_loss=jnp.asarray(schedule.prev_loss, jnp.float32),
  )


@dataclasses.dataclass(frozen=True)
class DistiLLM(strategy.Strategy):
  """The adaptive schedule choosing dataset, generated or replayed batches.

  Attributes:
    sampler: the run's sampling parts.
    total_steps: the run's length ``S``.
    capacity: the replay buffer's rows (``onpolicy.buffer_size``).
    replay_ratio: how ``tau_s`` moves over the run (:data:`REPLAY_RATIOS`).
    loss_eps: the validation-loss rise that raises ``tau``.
    init_threshold: ``tau`` before step 0 (``onpolicy.init_threshold``).
  """

  kind = "distillm"
  sampler: Sampler
  total_steps: int
  capacity: int = 0
  replay_ratio: str = "decreasing"
  loss_eps: float = 0.1
  init_threshold: float = 0.0

  def init(self, seed, threshold=None, initial_val_loss=0.0):
    """The state before step 0: ``tau`` = ``threshold`` (default
    :attr:`init_threshold`), an empty buffer."""
    if threshold is None:
      threshold = self.init_threshold
    state = super().init(seed, threshold, initial_val_loss)
    s = self.sampler
    return state._replace(buffer=empty(self.capacity, s.max_length, s.eos_id))

  def before_training(self, state, val_loss):
    """``prev`` is the validation loss before training."""
    return state._replace(prev_loss=jnp.float32(val_loss()))

  def after_validation(self, state, val_loss):
    return update_state(state, val_loss, self.loss_eps)

  def __call__(self, params, rest, teacher_state, batch, state, step):
    batch = strategy.text(batch)
    info = strategy.no_metrics()
    k_choice, k_gen, _, k_replay = strategy.step_keys(state.key, step)
    u = jax.random.uniform(k_choice)
    buffer = state.buffer
    tau = state.threshold
    gen_tau = generate_threshold(
        tau, step + 1, self.total_steps, self.replay_ratio
    )
    act = action(u, tau, gen_tau, buffer.count, self.capacity)
    B = batch["input_ids"].shape[0]
    s = self.sampler
    one = jnp.ones((), jnp.float32)

    def dataset(_):
      return batch, buffer, info

    def generate(_):
      rows = s.sample_rows(s.student(params, rest), batch, k_gen)
      stats = dict(
          info,
          onpolicy=one,
          generated=one,
          gen_len=jnp.mean(
              rows.length_B - rows.prompt_len_B, dtype=jnp.float32
          ),
      )
      return s.as_batch(rows, batch), push(buffer, rows), stats

    def replay(_):
      rows = sample(buffer, k_replay, B)
      return s.as_batch(rows, batch), buffer, dict(info, onpolicy=one)

    out, buffer, stats = jax.lax.switch(act, (dataset, generate, replay), None)
    return out, state._replace(buffer=buffer), stats
