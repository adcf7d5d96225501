"""GKD's mixture of dataset and student batches (Agarwal et al., ICLR 2024).

At each step, with probability ``lmbda`` the batch's responses are the
student's samples to its prompts, else the dataset's (``seq_kd`` first swaps
the dataset responses for the teacher's, every step, as TRL's GKDTrainer).
The choice is ``u < lmbda`` with ``u ~ U[0, 1)`` drawn from the step's choice
key (:func:`uses_generated`), so ``lmbda = 0`` never and ``lmbda = 1`` always
generates, and ``lmbda = 0`` returns the dataset batch bit for bit. SKD
(:class:`kdjax.onpolicy.skd.SKD`) is the same mixture with speculative
decoding in place of the student's samples.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from kdjax.onpolicy import batches, strategy
from kdjax.onpolicy.sampler import Sampler

Array = jax.Array


def uses_generated(key_data: Array, step: Array, lmbda: float) -> Array:
  """The choice at ``step``: ``u < lmbda``, ``u ~ U[0, 1)``."""
  return jax.random.uniform(strategy.step_keys(key_data, step)[0]) < lmbda


@dataclasses.dataclass(frozen=True)
class GKD(strategy.Strategy):
  """With probability ``lmbda`` the student's samples, else the dataset's.

  Attributes:
    sampler: the run's sampling parts.
    lmbda: probability of a generated batch (``onpolicy.lmbda``).
    seq_kd: the teacher's samples in place of the dataset's responses.
  """

  kind = "gkd"
  sampler: Sampler
  lmbda: float = 0.0
  seq_kd: bool = False

  def responses(
      self, params, rest, teacher_state, batch: dict, key: Array
  ) -> tuple[batches.Rows, Array]:
    """The generated rows and the fraction of their tokens the teacher
    replaced (0: the student's own samples)."""
    s = self.sampler
    rows = s.sample_rows(s.student(params, rest), batch, key)
    return rows, jnp.zeros((), jnp.float32)

  def __call__(self, params, rest, teacher_state, batch, state, step):
    batch = strategy.text(batch)
    info = strategy.no_metrics()
    _, k_gen, k_teacher, _ = strategy.step_keys(state.key, step)
    s = self.sampler
    base = batch
    if self.seq_kd:
      rows = s.sample_rows(s.teacher(teacher_state), batch, k_teacher)
      base = s.as_batch(rows, batch)

    def generated(_):
      rows, replaced = self.responses(params, rest, teacher_state, batch, k_gen)
      one = jnp.ones((), jnp.float32)
      stats = dict(
          onpolicy=one,
          generated=one,
          gen_len=jnp.mean(
              rows.length_B - rows.prompt_len_B, dtype=jnp.float32
          ),
          skd_replaced=replaced,
      )
      return s.as_batch(rows, batch), stats

    def offpolicy(_):
      return base, info

    if self.lmbda <= 0.0:
      return base, state, info
    if self.lmbda >= 1.0:
      out, stats = generated(None)
    else:
      out, stats = jax.lax.cond(
          uses_generated(state.key, step, self.lmbda),
          generated,
          offpolicy,
          None,
      )
    return out, state, jax.tree.map(lambda x: x.astype(jnp.float32), stats)
