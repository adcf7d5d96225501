"""The on-policy strategy: what the training loop asks of each method.

A :class:`Strategy` is one method's answer to "what does step ``s`` train
on?" (docs/on_policy.md). Its :meth:`~Strategy.__call__` is a pure function
of ``(params, rest, teacher_state, batch, state, step)``, jitted once per run
(:class:`kdjax.onpolicy.runner.Runner`) and run between fetching the dataset
batch and the train step on the same mesh. It returns the batch to train on
(the dataset's keys, dtypes, shape and layout; MiniLLM adds its own keys),
the new :class:`State` and per-step metrics. Two host-side hooks, no-ops
unless a method needs them, let it react to validation:
:meth:`~Strategy.before_training` (given a way to measure the validation loss
before step 0) and :meth:`~Strategy.after_validation`.

The methods, one module each, built from ``config.onpolicy`` by
:func:`kdjax.onpolicy.strategies.from_spec`: :class:`Dataset` (here),
:class:`kdjax.onpolicy.gkd.GKD`, :class:`kdjax.onpolicy.distillm.DistiLLM`,
:class:`kdjax.onpolicy.skd.SKD`, :class:`kdjax.onpolicy.minillm.MiniLLM`.
What they share for sampling is :class:`kdjax.onpolicy.sampler.Sampler`.

Randomness: the step's key is ``fold_in(key, step)``, split into the choice,
generation, teacher and replay keys (:func:`step_keys`), so the batch of step
``s`` depends only on the saved state and ``s``; resuming at ``s`` replays it
exactly.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, Callable, ClassVar, NamedTuple

import jax
import jax.numpy as jnp

from kdjax.onpolicy import batches

Array = jax.Array


class State(NamedTuple):
  """What a strategy carries between steps (saved in the checkpoint).

  Every strategy's state has these fields, so a checkpoint's layout depends
  only on which fields are None.

  Attributes:
    key: raw key data (``jax.random.key_data``) of the run's strategy key.
    threshold: DistiLLM's ``tau`` (float32 scalar; 0 for other methods).
    prev_loss: the validation loss ``tau`` was last raised at (float32).
    buffer: DistiLLM's replay buffer (:class:`kdjax.onpolicy.distillm.Buffer`;
      None for other methods).
    rollout: MiniLLM's current rollout, the rows and their ``rollout_*``
      log-probs, reused for ``minillm_ppo_epochs`` updates (None otherwise).
  """

  key: Array
  threshold: Array
  prev_loss: Array
  buffer: Any
  rollout: dict[str, Array] | None = None


def step_keys(key_data: Array, step: Array) -> tuple[Array, ...]:
  """``(choice, generation, teacher, replay)`` keys of update ``step``."""
  step_key = jax.random.fold_in(jax.random.wrap_key_data(key_data), step)
  return tuple(jax.random.split(step_key, 4))


def no_metrics() -> dict[str, Array]:
  """The per-step metrics of a dataset batch (all 0)."""
  zero = jnp.zeros((), jnp.float32)
  return dict(onpolicy=zero, generated=zero, gen_len=zero, skd_replaced=zero)


def text(batch: dict) -> dict:
  """The training-row keys of ``batch`` (:data:`batches.DTYPES`)."""
  return {k: batch[k] for k in batches.DTYPES}


class Strategy(abc.ABC):
  """One on-policy method (static parts; hashable for ``jax.jit``).

  Attributes:
    kind: the ``onpolicy.source`` value that selects it.
    generates: whether its batches can differ from the dataset's; the loop
      checkpoints and runs only strategies that do.
    objective: what the train step optimises in place of the configured loss
      (MiniLLM's :class:`kdjax.onpolicy.minillm.Config`); None: the loss.
  """

  kind: ClassVar[str]
  generates: ClassVar[bool] = True
  objective: Any = None

  def init(
      self, seed: int, threshold: float = 0.0, initial_val_loss: float = 0.0
  ) -> State:
    """The state before step 0 (``threshold``, ``initial_val_loss``: its
    schedule fields, read by DistiLLM)."""
    return State(
        jax.random.key_data(jax.random.key(seed)),
        jnp.asarray(threshold, jnp.float32),
        jnp.asarray(initial_val_loss, jnp.float32),
        None,
        None,
    )

  @abc.abstractmethod
  def __call__(
      self, params, rest, teacher_state, batch: dict, state: State, step: Array
  ) -> tuple[dict, State, dict[str, Array]]:
    """``(batch, state, metrics)`` for the update ``step`` (0-based).

    Metrics (float32 scalars, :func:`no_metrics`): ``onpolicy`` 1 when the
    batch is not the dataset's, ``generated`` 1 when responses were sampled
    this step, ``gen_len`` their mean length in tokens (0 when none),
    ``skd_replaced`` the fraction of SKD tokens the teacher replaced.
    """

  def before_training(
      self, state: State, val_loss: Callable[[], float]
  ) -> State:
    """The state for step 0 of a fresh run; ``val_loss()`` measures the
    validation loss of the initial student (called only when needed)."""
    del val_loss
    return state

  def after_validation(self, state: State, val_loss: float) -> State:
    """The state after a validation with loss ``val_loss``."""
    del val_loss
    return state


@dataclasses.dataclass(frozen=True)
class Dataset(Strategy):
  """Off-policy KD: the dataset's batch unchanged (``onpolicy.source``'s
  default)."""

  kind = "dataset"
  generates = False
  sampler: Any = None

  def __call__(self, params, rest, teacher_state, batch, state, step):
    return text(batch), state, no_metrics()
