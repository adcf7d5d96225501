"""TAID: distil toward a target that moves from the student to the teacher.

Temporally Adaptive Interpolated Distillation (Shing et al., ICLR 2025); the
math is in docs/divergences.md, "TAID".

**Target.** At interpolation time ``t`` in [0, 1] the target is the geometric
mixture of the detached student ``q̄ = stop_gradient(q_θ)`` and the teacher
``p``::

    p_t ∝ exp((1 − t)·log q̄ + t·log p)

At one temperature ``T`` each row's log-partition is a constant that the
softmax removes, so ``p_t = softmax(((1 − t)·s̄ + t·z) / T)`` with ``s̄`` the
detached student logits and ``z`` the teacher's: :func:`target_logits`
interpolates logits and the loss is the canonical forward KL,
``KL(p_t ‖ q_θ) = kd.fkl(s, target_logits(s, z, t))``. At ``t = 1`` this is
plain FKL; at ``t = 0`` the target is the student itself (loss and gradient 0).

**Schedule.** ``t`` starts at ``t_start`` and rises to ``t_end``. After each
optimizer step ``n`` (0-based, of ``N``) with distillation loss ``J_n``::

    δ_n = (J_{n−1} − J_n) / (J_{n−1} + 1e-15)      relative improvement
    m_n = β·m_{n−1} + (1 − β)·δ_n                   momentum (m = 0 at start)
    t_{n+1} = min(t_end, max(t_start + (t_end − t_start)·n / N,
                             t_n + α·sigmoid(m_n)·(1 − t_n)))

so ``t`` never lags the linear ramp and moves faster while the loss improves.
The first step only records ``J_0`` (``t`` and ``m`` unchanged). With
``adaptive=False``, ``t_{n+1}`` is the linear ramp alone. Defaults are those
of the reference code: ``t_start=0.4, t_end=1.0, α=5e-4, β=0.99``.

:class:`State` is a pytree of three float32 scalars kept in the train state
(and so in every checkpoint): a resumed run continues the same ``t``.
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array

# The reference code's defaults (its TAID loss and command-line arguments).
DEFAULTS = dict(t_start=0.4, t_end=1.0, alpha=5e-4, beta=0.99, adaptive=True)
_EPS = 1e-15  # guards the relative change against a zero previous loss


class State(NamedTuple):
  """Interpolation time, momentum of the relative change, previous loss."""

  t: Array
  momentum: Array
  prev_loss: Array  # +inf until the first step has run


def check(cfg: Mapping[str, Any]) -> None:
  """Fails early, with the fix, on schedule constants that cannot work."""
  unknown = sorted(set(cfg) - set(DEFAULTS))
  if unknown:
    raise ValueError(
        f"loss.taid has unknown keys {unknown}; valid: "
        f"{', '.join(sorted(DEFAULTS))}."
    )
  c = dict(DEFAULTS, **cfg)
  if not 0.0 <= c["t_start"] < c["t_end"] <= 1.0:
    raise ValueError(
        f"loss.taid needs 0 <= t_start < t_end <= 1 (got "
        f"t_start={c['t_start']}, t_end={c['t_end']})."
    )
  if not 0.0 <= c["alpha"] <= 1.0 or not 0.0 <= c["beta"] < 1.0:
    raise ValueError(
        f"loss.taid needs alpha in [0, 1] and beta in [0, 1) "
        f"(got alpha={c['alpha']}, beta={c['beta']})."
    )


def init(cfg: Mapping[str, Any]) -> State:
  """The state before the first step: ``t = t_start``."""
  c = dict(DEFAULTS, **cfg)
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  return State(f32(c["t_start"]), f32(0.0), f32(jnp.inf))


def update(
    state: State,
    loss: Array,
    step: Array,
    num_steps: int,
    cfg: Mapping[str, Any],
) -> State:
  """The state after optimizer step ``step`` (0-based) whose KD loss was ``loss``.

  Pure and jit-safe (``loss`` and ``step`` may be traced); see the module
  docstring for the rule.
  """
  c = dict(DEFAULTS, **cfg)
  loss = jnp.asarray(loss, jnp.float32)
  first = jnp.isinf(state.prev_loss)
  rel = (state.prev_loss - loss) / (state.prev_loss + _EPS)
  momentum = c["beta"] * state.momentum + (1.0 - c["beta"]) * rel
  progress = jnp.asarray(step, jnp.float32) / max(num_steps, 1)
  ramp = c["t_start"] + (c["t_end"] - c["t_start"]) * progress
  if c["adaptive"]:
    step_up = state.t + c["alpha"] * jax.nn.sigmoid(momentum) * (1.0 - state.t)
    t = jnp.minimum(c["t_end"], jnp.maximum(ramp, step_up))
  else:
    t = ramp
  return State(
      jnp.where(first, state.t, t).astype(jnp.float32),
      jnp.where(first, state.momentum, momentum).astype(jnp.float32),
      loss,
  )


def target_logits(
    student_logits: Array, teacher_logits: Array, t: Array | float
) -> Array:
  """``(1 − t)·stop_gradient(s) + t·z`` in float32: the logits of ``p_t``.

  Feed them to :func:`kdjax.divergences.fkl` as the teacher (any temperature
  divides both terms alike). Only the student's own ``log q_θ`` in that
  divergence carries a gradient.
  """
  s = jax.lax.stop_gradient(student_logits).astype(jnp.float32)
  z = jax.lax.stop_gradient(teacher_logits).astype(jnp.float32)
  t = jnp.asarray(t, jnp.float32)
  # A weight of exactly 0 drops its term, so a -inf logit (a slot that
  # model rules out) cannot turn into 0 * -inf = nan at t = 0 or t = 1.
  return jnp.where(t < 1.0, (1.0 - t) * s, 0.0) + jnp.where(t > 0.0, t * z, 0.0)
