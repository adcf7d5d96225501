"""The token-level divergences as plain autodiff definitions: the oracle.

``kd.reference.<name>`` computes each divergence the direct way (float32
log-softmaxes, probability mixtures, ``jnp.sum`` over the vocabulary) and lets
``jax.grad`` differentiate it. It is the definition every fast path is tested
against, not the path to train with: autodiff keeps several ``[N, V]`` float32
residuals for the backward pass. Use the public ``kd.<name>``
(:mod:`kdjax.divergences.engine`) instead; it has the same values and
gradients. Hyper-parameters here must be static Python numbers.

The math of each is in docs/divergences.md (section named in each docstring).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from kdjax.divergences import core

Array = jax.Array


class _Dists(NamedTuple):
  """Both distributions of a position, prepared once and shared by every term."""

  log_q: Array  # student log-probs, finite everywhere (masked slots hold 0)
  log_p: Array  # teacher log-probs, constant; -inf only where the student is
  # finite (core.finite_pair)
  q: Array  # student probabilities (exactly 0 in masked slots)
  p: Array  # teacher probabilities, constant


def _dists(
    student_logits: Array, teacher_logits: Array, temperature: float
) -> _Dists:
  core.check_same_shape(student_logits, teacher_logits)
  log_q = core.log_probs(student_logits, _static("temperature", temperature))
  log_p = core.log_probs(jax.lax.stop_gradient(teacher_logits), temperature)
  safe_q, safe_p = core.finite_pair(log_q, log_p)
  return _Dists(safe_q, safe_p, jnp.exp(log_q), jnp.exp(log_p))


def _where_supported(d: _Dists, value: Array) -> Array:
  """``+inf`` on rows where the teacher is 0 at a slot the student covers.

  ``value`` must be finite there (computed with finite-ised ``log p``): the
  outer ``where`` then passes a zero gradient, not ``0 · inf``.
  """
  return jnp.where(core.off_support(d.log_p), jnp.inf, value)


def _static(name: str, value) -> float:
  static = core.static_value(value)
  if static is None:
    raise TypeError(
        f"{name} must be a static Python number for the "
        "reference divergences; the public kd.<name> takes "
        "traced values."
    )
  return static


def _unit(name: str, value) -> float:
  return _static(name, core._unit(name, value))


def _kl(w: Array, log_w: Array, log_v: Array) -> Array:
  """``Σ_v w_v (log w_v − log v_v)``, each term exactly 0 where ``w_v = 0``."""
  return jnp.sum(jnp.where(w > 0, w * (log_w - log_v), 0.0), axis=-1)


def _log_mixture(d: _Dists, weight_p: float) -> Array:
  """``log(a·p + (1−a)·q)`` as a logaddexp; mixes probabilities, not logits.

  Not detached: the gradient also flows through q inside the mixture.
  """
  log_a = math.log(weight_p) if weight_p > 0 else -jnp.inf
  log_1ma = math.log1p(-weight_p) if weight_p < 1 else -jnp.inf
  return jnp.logaddexp(log_a + d.log_p, log_1ma + d.log_q)


def _fkl(d: _Dists) -> Array:
  return _kl(d.p, d.log_p, d.log_q)


def _rkl(d: _Dists) -> Array:
  return _where_supported(d, _kl(d.q, d.log_q, core._finite(d.log_p)))


def _blend(w: float, a: Array, b: Array) -> Array:
  """``w·a + (1 − w)·b``; a zero weight drops its term, even an infinite one."""
  return jnp.where(w > 0, w * a, 0.0) + jnp.where(w < 1, (1.0 - w) * b, 0.0)


def fkl(
    student_logits: Array, teacher_logits: Array, *, temperature: float = 1.0
) -> Array:
  """``KL(p‖q)`` (docs/divergences.md, "Forward KL")."""
  return _fkl(_dists(student_logits, teacher_logits, temperature))


def rkl(
    student_logits: Array, teacher_logits: Array, *, temperature: float = 1.0
) -> Array:
  """``KL(q‖p)`` (docs/divergences.md, "Reverse KL")."""
  return _rkl(_dists(student_logits, teacher_logits, temperature))


def fkl_rkl(
    student_logits: Array,
    teacher_logits: Array,
    *,
    weight: float = 0.5,
    temperature: float = 1.0,
) -> Array:
  """``weight·KL(p‖q) + (1 − weight)·KL(q‖p)`` (docs/divergences.md,
  "FKL+RKL")."""
  weight = _unit("weight", weight)
  d = _dists(student_logits, teacher_logits, temperature)
  return _blend(weight, _fkl(d), _rkl(d))


def skl(
    student_logits: Array,
    teacher_logits: Array,
    *,
    alpha: float = 0.1,
    temperature: float = 1.0,
) -> Array:
  """``KL(p ‖ α·p + (1 − α)·q)`` (docs/divergences.md, "Skew KL and skew
  reverse KL")."""
  alpha = _unit("alpha", alpha)
  d = _dists(student_logits, teacher_logits, temperature)
  if alpha == 1.0:  # KL(p‖p); the mixture would be log(0) where p = 0 < q
    return jnp.zeros(d.p.shape[:-1])
  return _kl(d.p, d.log_p, _log_mixture(d, alpha))


def srkl(
    student_logits: Array,
    teacher_logits: Array,
    *,
    alpha: float = 0.1,
    temperature: float = 1.0,
) -> Array:
  """``KL(q ‖ (1 − α)·p + α·q)`` (docs/divergences.md, "Skew KL and skew
  reverse KL")."""
  alpha = _unit("alpha", alpha)
  d = _dists(student_logits, teacher_logits, temperature)
  if alpha == 0.0:
    return _rkl(d)
  return _kl(d.q, d.log_q, _log_mixture(d, 1.0 - alpha))


def jsd(
    student_logits: Array,
    teacher_logits: Array,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
) -> Array:
  """``β·KL(p‖m) + (1 − β)·KL(q‖m)``, ``m = β·p + (1 − β)·q``; ``β = 0`` is
  FKL and ``β = 1`` RKL (docs/divergences.md, "Generalized JSD")."""
  beta = _unit("beta", beta)
  d = _dists(student_logits, teacher_logits, temperature)
  if beta == 0.0:
    return _fkl(d)
  if beta == 1.0:
    return _rkl(d)
  log_m = _log_mixture(d, beta)
  return beta * _kl(d.p, d.log_p, log_m) + (1.0 - beta) * _kl(
      d.q, d.log_q, log_m
  )


def tvd(
    student_logits: Array, teacher_logits: Array, *, temperature: float = 1.0
) -> Array:
  """``½ Σ_v |p_v − q_v|`` (docs/divergences.md, "Total variation")."""
  d = _dists(student_logits, teacher_logits, temperature)
  return 0.5 * jnp.sum(core._abs(d.p - d.q), axis=-1)


def akl(
    student_logits: Array,
    teacher_logits: Array,
    *,
    mu: float = 0.5,
    rule: str = "akl",
    temperature: float = 1.0,
) -> Array:
  """``w_head·KL(p‖q) + w_tail·KL(q‖p)`` with the constant weights of
  :func:`kdjax.divergences.core.akl_weights` (docs/divergences.md, "AKL")."""
  d = _dists(student_logits, teacher_logits, temperature)
  w_head, w_tail = core.akl_weights(
      d.p, d.q, mu=_static("mu", mu), rule=rule, order=teacher_logits
  )
  return _blend(w_head, _fkl(d), _rkl(d))


def abkd(
    student_logits: Array,
    teacher_logits: Array,
    *,
    alpha: float = 0.2,
    beta: float = 0.7,
    temperature: float = 1.0,
) -> Array:
  """The α-β divergence ``D_AB(p‖q)`` with its limits at α = 0 or β = 0
  (docs/divergences.md, "Alpha-beta divergence (ABKD)")."""
  alpha, beta = _static("alpha", alpha), _static("beta", beta)
  d = _dists(student_logits, teacher_logits, temperature)
  both = (d.p > 0) & (d.q > 0)
  pow_p = lambda a: jnp.where(d.p > 0, jnp.exp(a * d.log_p), 0.0)
  pow_q = lambda a: jnp.where(d.q > 0, jnp.exp(a * d.log_q), 0.0)
  # 0 in shared -inf slots; finite where the teacher alone is -inf (those
  # terms vanish by their p^α factor, or the row is +inf at α = 0).
  log_ratio = d.log_q - core._finite(d.log_p)
  if alpha == 0.0 and beta == 0.0:
    terms = 0.5 * jnp.where(both, log_ratio, 0.0) ** 2
    return _where_supported(d, jnp.sum(terms, axis=-1))
  if alpha == 0.0:
    terms = (
        pow_q(beta) * log_ratio / beta - (pow_q(beta) - pow_p(beta)) / beta**2
    )
    return _where_supported(d, jnp.sum(terms, axis=-1))
  if beta == 0.0:
    terms = (
        -pow_p(alpha) * log_ratio / alpha
        - (pow_p(alpha) - pow_q(alpha)) / alpha**2
    )
  else:
    lam = alpha + beta
    mixed = jnp.where(both, jnp.exp(alpha * d.log_p + beta * d.log_q), 0.0)
    terms = -(mixed - alpha / lam * pow_p(lam) - beta / lam * pow_q(lam)) / (
        alpha * beta
    )
  return jnp.sum(terms, axis=-1)


NAMES = ("fkl", "rkl", "fkl_rkl", "skl", "srkl", "jsd", "tvd", "akl", "abkd")
