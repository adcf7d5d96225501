"""Divergences against a sparse teacher: its top-k tokens, or tokens sampled.

A cached teacher keeps a few tokens per position (docs/divergences.md,
"Sparse teachers"). Two encodings:

* :class:`TopK`: the teacher's ``K`` most probable tokens and their
  log-probabilities; the rest of its mass is one *tail* bucket,
  ``p_tail = 1 − Σ_K p_k``. Every token-level divergence of the engine is
  evaluated on the ``(K + 1)``-bin pair ``(p_K, p_tail)``,
  ``(q_K, q_tail)`` with ``q = softmax(s / T)`` the student's full softmax
  and ``q_tail = Σ_{v ∉ K} q_v``.
* :class:`Sampled`: tokens drawn i.i.d. from the teacher (RS-KD, Anshumann
  et al. 2025), with weights ``count / S``; only FKL has an unbiased
  estimator, ``Σ_i w_i (log p_i − log q_i)``.

Top-k: the coarsened log-probabilities of both sides, ``[..., K + 1]``, are
passed to :func:`kdjax.divergences.engine.divergence` at temperature 1 (the
log-softmax of normalised log-probabilities is the identity up to rounding),
so each divergence's math exists once, in the engine. The student side runs
over the vocabulary in token chunks with a closed-form backward
(:func:`coarsen`); the gradient reaches ``student_logits`` by the chain rule
through it into the engine's. Bias (docs/divergences.md, "Sparse teachers"):

* The coarsening is a deterministic map of tokens to bins applied to both
  distributions, so for every f-divergence (FKL, RKL, FKL+RKL, SKL, SRKL,
  JSD, TVD: the skew mixtures coarsen linearly) the data-processing
  inequality gives coarsened ≤ full, with equality iff ``p_v / q_v`` is
  constant over the tail. In particular it is exact for a teacher that is
  exactly K-sparse (``p_v = 0`` off K), whatever the student's tail.
* AKL is ``w_head·FKL + w_tail·RKL`` with weights recomputed on the bins,
  the tail bucket being one bin that is ranked by ``p_tail`` like any
  token. Where the head lies among the K tokens, ``g_head`` is unchanged and
  ``g_tail`` can only shrink (``|Σ (p − q)| ≤ Σ |p − q|``), so ``w_head``
  grows; each KL shrinks (above), so the coarsened AKL is at most
  ``max(FKL, RKL)`` of the full pair but has no ordering with the full
  AKL in general. For an exactly K-sparse teacher the head lies in K, the
  tail error is ``q_tail`` either way, and AKL is exact.
* ABKD with ``λ = α + β = 1`` is an α-divergence, an f-divergence: as above.
  Otherwise it is not one and no ordering holds; for an exactly K-sparse
  teacher the tail contributes ``Σ_{v∉K} q_v^λ / (αλ)`` in full and
  ``q_tail^λ / (αλ)`` coarsened, which is smaller for ``λ < 1`` (the paper's
  α = 0.2, β = 0.7) and larger for ``λ > 1`` (``t ↦ t^λ`` is subadditive
  resp. superadditive); exact when the student's tail is one token.

Temperature: the teacher's log-probabilities are stored at the temperature
they were computed with (:func:`top_k`, :func:`sample`); ``temperature`` in
the divergences applies to the student's logits only.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from kdjax.divergences import core, engine

Array = jax.Array
_F32 = jnp.float32
_EPS32 = float(jnp.finfo(jnp.float32).eps)


class TopK(NamedTuple):
  """A teacher distribution kept on ``K`` tokens per row plus a tail bucket.

  The teacher's tail mass is ``1 − Σ exp(log_probs)``, clamped at 0 (see
  :func:`teacher_tail`).
  """

  ids: Array  # [..., K] int32 token ids, distinct within a row
  log_probs: Array  # [..., K] float32 log softmax(t / T) at ids; -inf: unused


class Sampled(NamedTuple):
  """Tokens drawn from the teacher (RS-KD) with importance weights."""

  ids: Array  # [..., S] int32
  weights: Array  # [..., S] float32 >= 0, sum 1 per row, 0 in unused slots
  log_probs: Array  # [..., S] float32 teacher log-probs at ids


# ----------------------------------------------------------------------------
# Encoding a teacher.


def _teacher_log_probs(teacher_logits: Array, temperature) -> Array:
  core._check_temperature(temperature)
  return jax.nn.log_softmax(
      jnp.asarray(teacher_logits).astype(_F32) / temperature, axis=-1
  )


def top_k(teacher_logits: Array, k: int, *, temperature=1.0) -> TopK:
  """The exact top-``k`` of ``softmax(teacher_logits / T)`` per row.

  Ranked on the logits (the exact order of the probabilities; ties: lower
  token id first, as :func:`kdjax.divergences.core.top_k`). A row with fewer
  than ``k`` finite logits gets ``-inf`` log-probabilities in its unused
  slots.
  """
  logits = jax.lax.stop_gradient(jnp.asarray(teacher_logits))
  vocab = logits.shape[-1]
  if not isinstance(k, int) or not 1 <= k <= vocab:
    raise ValueError(
        f"k={k!r} must be an integer in [1, {vocab}] (the vocabulary size)."
    )
  log_p = _teacher_log_probs(logits, temperature)
  _, ids = core.top_k(logits, k)
  return TopK(ids.astype(jnp.int32), jnp.take_along_axis(log_p, ids, axis=-1))


def sample(
    key: Array, teacher_logits: Array, num_samples: int, *, temperature=1.0
) -> Sampled:
  """``num_samples`` i.i.d. draws per row from ``softmax(teacher_logits / T)``.

  The proposal is the teacher itself, so a token drawn ``c`` times gets the
  weight ``c / S`` (duplicates share one slot, sorted by id; the remaining
  slots are padding: weight 0, id 0, log-prob 0). Another proposal ``r``
  (a tempered teacher ``r ∝ p^τ``, say) would need the importance weights
  ``c·p/r``, normalised per row, which makes the estimate only consistent,
  not unbiased; not provided.
  """
  logits = jax.lax.stop_gradient(jnp.asarray(teacher_logits))
  if not isinstance(num_samples, int) or num_samples < 1:
    raise ValueError(f"num_samples={num_samples!r} must be a positive integer.")
  log_p = _teacher_log_probs(logits, temperature)
  lead = log_p.shape[:-1]
  draws = jax.random.categorical(key, log_p, shape=(num_samples,) + lead)
  draws_NxS = jnp.sort(jnp.moveaxis(draws, 0, -1).reshape(-1, num_samples), -1)
  first = jnp.concatenate(
      [
          jnp.ones_like(draws_NxS[:, :1], bool),
          draws_NxS[:, 1:] != draws_NxS[:, :-1],
      ],
      axis=-1,
  )
  slot_NxS = jnp.cumsum(first, axis=-1) - 1  # the slot of each draw's id
  rows = jnp.arange(draws_NxS.shape[0])[:, None]
  weights = (
      jnp.zeros(draws_NxS.shape, _F32).at[rows, slot_NxS].add(1.0 / num_samples)
  )
  ids = jnp.zeros_like(draws_NxS).at[rows, slot_NxS].set(draws_NxS)
  used = weights > 0
  log_p_NxS = jnp.take_along_axis(
      log_p.reshape(-1, log_p.shape[-1]), ids, axis=-1
  )
  shape = lead + (num_samples,)
  return Sampled(
      ids.astype(jnp.int32).reshape(shape),
      weights.reshape(shape),
      jnp.where(used, log_p_NxS, 0.0).reshape(shape),
  )


# ----------------------------------------------------------------------------
# The coarsened pair.


def teacher_tail(log_probs_K: Array) -> Array:
  """``log p_tail`` per row from the kept log-probabilities ``[..., K]``.

  ``p_tail = 1 − Σ_K p_k``, computed as ``log1p(−Σ_K p_k)``. A tail within
  the rounding of that sum (``16·eps·(1 + H_K)``, ``H_K = −Σ_K p_k log p_k``
  bounding the error of float32 log-probabilities) is 0: the teacher is then
  taken as exactly K-sparse (``log p_tail = −inf``).
  """
  log_p = log_probs_K.astype(_F32)
  p = jnp.exp(log_p)
  head = jnp.sum(p, axis=-1)
  entropy = -jnp.sum(jnp.where(p > 0, p * log_p, 0.0), axis=-1)
  tol = 16.0 * _EPS32 * (1.0 + entropy)
  tail = 1.0 - head
  return jnp.where(
      tail > tol, jnp.log1p(-jnp.minimum(head, 1.0 - tol)), -jnp.inf
  )


class _Partition(NamedTuple):
  """Per-row log-partitions of ``z = s / T``: all tokens and the tail."""

  all: engine.Lse
  tail: engine.Lse


def _in_tail(z_RxV: Array, ids_RxK: Array, used_RxK: Array) -> Array:
  """Tokens outside the kept ids (a per-row pass over V), finite only."""
  vocab = z_RxV.shape[-1]
  rows = jnp.arange(z_RxV.shape[0])[:, None]
  kept = (
      jnp.zeros(z_RxV.shape, bool)
      .at[rows, jnp.where(used_RxK, ids_RxK, vocab)]
      .set(True, mode="drop")
  )
  return ~kept & (z_RxV > -jnp.inf)


def _partition(z_RxV: Array, in_tail_RxV: Array) -> _Partition:
  def lse(x):
    row_max = jnp.max(x, axis=-1)
    safe = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    shifted = x - safe[:, None]
    return engine.Lse(safe, jnp.log(core._row_sum(jnp.exp(shifted))))

  return _Partition(lse(z_RxV), lse(jnp.where(in_tail_RxV, z_RxV, -jnp.inf)))


def _coarsen_rows(s_RxV, ids_RxK, used_RxK, temperature):
  z = s_RxV.astype(_F32) / temperature
  part = _partition(z, _in_tail(z, ids_RxK, used_RxK))
  z_K = jnp.take_along_axis(z, ids_RxK, axis=-1)
  log_q_K = (z_K - part.all.max[:, None]) - part.all.log_sum[:, None]
  log_q_tail = (part.tail.max - part.all.max) + (
      part.tail.log_sum - part.all.log_sum
  )
  return (jnp.where(used_RxK, log_q_K, -jnp.inf), log_q_tail), part


def _coarsen_grad_rows(s_RxV, ids_RxK, used_RxK, temperature, part, g_K, g_T):
  """``∂L/∂s`` from the cotangents of ``log q_K`` and ``log q_tail``:

  ∂L/∂z_v = Σ_k g_k [v = id_k] − q_v (Σ_k g_k + g_tail)
            + g_tail [v ∉ K] q_v / q_tail,   ∂L/∂s = ∂L/∂z / T.
  """
  z = s_RxV.astype(_F32) / temperature
  g_K = jnp.where(used_RxK, g_K.astype(_F32), 0.0)
  g_T = g_T.astype(_F32)
  q = jnp.exp(part.all.log_prob(z, 1.0))
  in_tail = _in_tail(z, ids_RxK, used_RxK)
  tail_ratio = jnp.where(in_tail, jnp.exp(part.tail.log_prob(z, 1.0)), 0.0)
  dz = g_T[:, None] * tail_ratio - q * (jnp.sum(g_K, axis=-1) + g_T)[:, None]
  rows = jnp.arange(z.shape[0])[:, None]
  dz = dz.at[rows, ids_RxK].add(g_K)
  return (dz / temperature).astype(s_RxV.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _coarsen(size, s_NxV, ids_NxK, used_NxK, temperature):
  return _coarsen_fwd(size, s_NxV, ids_NxK, used_NxK, temperature)[0]


def _coarsen_fwd(size, s_NxV, ids_NxK, used_NxK, temperature):
  out, part = engine.over_chunks(
      lambda s, i, u: _coarsen_rows(s, i, u, temperature),
      size,
      s_NxV.shape[0],
      s_NxV,
      ids_NxK,
      used_NxK,
  )
  return out, (s_NxV, ids_NxK, used_NxK, temperature, part)


def _coarsen_bwd(size, residuals, cotangents):
  s_NxV, ids_NxK, used_NxK, temperature, part = residuals
  g_K, g_T = cotangents
  grad = engine.over_chunks(
      lambda s, i, u, pt, gk, gt: _coarsen_grad_rows(
          s, i, u, temperature, pt, gk, gt
      ),
      size,
      s_NxV.shape[0],
      s_NxV,
      ids_NxK,
      used_NxK,
      part,
      g_K,
      g_T,
  )
  return grad, None, None, jnp.zeros_like(temperature)


_coarsen.defvjp(_coarsen_fwd, _coarsen_bwd)


def coarsen(
    student_logits: Array,
    ids: Array,
    used: Array,
    *,
    temperature=1.0,
    chunk_size: int | None = None,
) -> tuple[Array, Array]:
  """``(log q_K [..., K], log q_tail [...])`` of ``q = softmax(s / T)``.

  ``log q_tail = logsumexp_{v ∉ K}(s_v / T) − logsumexp_v(s_v / T)``: a
  log-sum-exp over the complement of the used ids, exact however close
  ``Σ_K q_k`` is to 1 (``log(1 − Σ_K q_k)`` would cancel). Unused slots
  give ``-inf`` and are not removed from the tail. Runs in token chunks
  (:func:`kdjax.divergences.engine.chunk_rows`) with a closed-form backward,
  so only the per-row partitions are kept between the passes.
  """
  core._check_temperature(temperature)
  s = jnp.asarray(student_logits)
  vocab = s.shape[-1]
  lead, k = ids.shape[:-1], ids.shape[-1]
  s_NxV = s.reshape(-1, vocab)
  size = engine.chunk_rows(s_NxV.shape[0], vocab, chunk_size)
  log_q_K, log_q_tail = _coarsen(
      size,
      s_NxV,
      jnp.asarray(ids, jnp.int32).reshape(-1, k),
      jnp.asarray(used, bool).reshape(-1, k),
      jax.lax.stop_gradient(jnp.asarray(temperature, _F32)),
  )
  return log_q_K.reshape(lead + (k,)), log_q_tail.reshape(lead)


# ----------------------------------------------------------------------------
# The divergences.


def _check_shapes(student_logits: Array, teacher) -> None:
  if not isinstance(teacher, (TopK, Sampled)):
    raise TypeError(
        f"teacher is a {type(teacher).__name__}; pass a kd.sparse.TopK or "
        "kd.sparse.Sampled (dense teacher logits go to kd.<name>)."
    )
  lead = student_logits.shape[:-1]
  for field, x in zip(teacher._fields, teacher):
    if x.shape[:-1] != lead or x.shape != teacher.ids.shape:
      raise ValueError(
          f"teacher {field} has shape {x.shape}; it must be the student's "
          f"leading axes {lead} followed by the number of kept tokens."
      )


def divergence(
    name: str,
    student_logits: Array,
    teacher: TopK | Sampled,
    *,
    temperature=1.0,
    chunk_size: int | None = None,
    **hp,
) -> Array:
  """Per-position divergence ``name`` of a sparse teacher, shape ``[...]``.

  ``TopK``: the engine's divergence of the ``(K + 1)``-bin pair (module
  docstring). ``Sampled``: RS-KD's FKL estimate (:func:`sampled_fkl`).
  ``chunk_size`` chunks the student's pass over the vocabulary as in the
  engine. Hyper-parameters as for ``kd.<name>``, traced or not.
  """
  s = jnp.asarray(student_logits)
  _check_shapes(s, teacher)
  if isinstance(teacher, Sampled):
    if name != "fkl":
      raise ValueError(
          f"a Sampled teacher supports only fkl, not {name!r}; encode the "
          "teacher with kd.sparse.top_k for the other divergences."
      )
    engine.resolve(name, temperature, hp)
    return sampled_fkl(
        s, teacher, temperature=temperature, chunk_size=chunk_size
    )
  engine.resolve(name, temperature, hp)
  log_p_K = jax.lax.stop_gradient(teacher.log_probs.astype(_F32))
  used = log_p_K > -jnp.inf
  log_q_K, log_q_tail = coarsen(
      s, teacher.ids, used, temperature=temperature, chunk_size=chunk_size
  )
  student = jnp.concatenate([log_q_K, log_q_tail[..., None]], axis=-1)
  teacher_bins = jnp.concatenate(
      [log_p_K, teacher_tail(log_p_K)[..., None]], axis=-1
  )
  return engine.divergence(name, student, teacher_bins, **hp)


def sampled_fkl(
    student_logits: Array,
    teacher: Sampled,
    *,
    temperature=1.0,
    chunk_size: int | None = None,
) -> Array:
  """RS-KD's estimate of ``KL(p‖q)`` from draws ``x_i ~ p`` with weights
  ``w_i = count_i / S``:

      D̂ = Σ_i w_i (log p(x_i) − log q(x_i)),   E[D̂] = KL(p‖q),
      ∇D̂ = −Σ_i w_i ∇ log q(x_i),             E[∇D̂] = ∇ KL(p‖q),

  because the expected count of a token ``v`` is ``S·p_v``. Unused slots
  (weight 0) contribute nothing.
  """
  s = jnp.asarray(student_logits)
  _check_shapes(s, teacher)
  weights = jax.lax.stop_gradient(teacher.weights.astype(_F32))
  used = weights > 0
  log_q, _ = coarsen(
      s, teacher.ids, used, temperature=temperature, chunk_size=chunk_size
  )
  log_p = jax.lax.stop_gradient(teacher.log_probs.astype(_F32))
  terms = jnp.where(used, weights * (log_p - jnp.where(used, log_q, 0.0)), 0.0)
  return jnp.sum(terms, axis=-1)


def _named(name: str) -> Callable:
  defaults = engine.HYPER_PARAMETERS[name]
  hp_text = (
      ", ".join(f"{k}={v}" for k, v in defaults.items()) or "no hyper-parameter"
  )
  rs_kd = " A :class:`Sampled` teacher gives RS-KD." if name == "fkl" else ""
  return engine.public(
      name,
      divergence,
      teacher=("teacher", "TopK | Sampled"),
      module=__name__,
      doc=(
          f"``kd.{name}`` against a sparse teacher ({hp_text}); see "
          f":func:`divergence`.{rs_kd}"
      ),
  )


fkl = _named("fkl")
rkl = _named("rkl")
fkl_rkl = _named("fkl_rkl")
skl = _named("skl")
srkl = _named("srkl")
jsd = _named("jsd")
tvd = _named("tvd")
akl = _named("akl")
abkd = _named("abkd")

__all__ = [
    "Sampled",
    "TopK",
    "abkd",
    "akl",
    "coarsen",
    "divergence",
    "fkl",
    "fkl_rkl",
    "jsd",
    "rkl",
    "sample",
    "sampled_fkl",
    "skl",
    "srkl",
    "teacher_tail",
    "top_k",
    "tvd",
]
