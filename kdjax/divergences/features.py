"""Feature and attention transfer: per-token losses on models' intermediates.

Pure functions of arrays, float32 inside whatever the models' dtype; each
returns a per-position loss ``[B, T]`` that the caller masks and sums
(docs/beyond_logits.md gives the math and how the objective uses them).
Student first, teacher second.

* :func:`hidden_mse`, :func:`hidden_cosine`: a student hidden state through
  a learned projection ``W [D_s, D_t]`` against the teacher's, per position.
* :func:`attention_kl`: MiniLM's self-attention distribution transfer,
  ``KL(A_t ‖ A_s)`` per query row and head, ``A = softmax(q k^T / √K)``.
* :func:`relation_kl`: MiniLM's value relation and MiniLMv2's q-q, k-k, v-v
  self-attention relations: the heads' vectors concatenated and split into
  ``R`` relation heads, ``KL(softmax(x_t x_t^T / √d_t) ‖ softmax(x_s x_s^T /
  √d_s))`` per row and relation head, so the two models' head counts may
  differ.
* :func:`layer_pairs`: which student layer learns from which teacher layer.

Every distribution over positions is causal and ignores padding: row ``i``
spans the keys ``j ≤ i`` with ``valid_BxT[j]`` set, as the model's own
attention does.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp

Array = jax.Array

LAYER_MAPS = ("uniform", "last", "pairs")


def _f32(x: Array) -> Array:
  return x.astype(jnp.float32)


def hidden_mse(h_s_BxTxD: Array, h_t_BxTxE: Array, w_DxE: Array) -> Array:
  """``mean_e ((h_s W)_e − (h_t)_e)²`` per position, ``[B, T]``."""
  p = jnp.einsum("btd,de->bte", _f32(h_s_BxTxD), _f32(w_DxE))
  return jnp.mean(jnp.square(p - _f32(h_t_BxTxE)), axis=-1)


def hidden_cosine(h_s_BxTxD: Array, h_t_BxTxE: Array, w_DxE: Array) -> Array:
  """``1 − cos(h_s W, h_t)`` per position, ``[B, T]`` (0 for a zero vector)."""
  p = jnp.einsum("btd,de->bte", _f32(h_s_BxTxD), _f32(w_DxE))
  t = _f32(h_t_BxTxE)
  dot = jnp.sum(p * t, axis=-1)
  norms = jnp.linalg.norm(p, axis=-1) * jnp.linalg.norm(t, axis=-1)
  return 1.0 - dot / jnp.maximum(norms, 1e-12)


def _log_softmax_rows(scores_BxHxTxT: Array, valid_BxT: Array) -> Array:
  """Log-softmax of each row ``i`` over the keys ``j ≤ i`` that are valid."""
  T = scores_BxHxTxT.shape[-1]
  causal_TxT = jnp.arange(T)[None, :] <= jnp.arange(T)[:, None]
  allowed = causal_TxT[None, None] & (valid_BxT[:, None, None, :] > 0)
  scores = jnp.where(allowed, scores_BxHxTxT, jnp.finfo(jnp.float32).min)
  return jax.nn.log_softmax(scores, axis=-1), allowed


def _row_kl(
    log_s_BxHxTxT: Array, log_t_BxHxTxT: Array, allowed: Array
) -> Array:
  """``KL(p_t ‖ p_s)`` of each row, averaged over heads: ``[B, T]``."""
  p_t = jnp.exp(log_t_BxHxTxT)
  kl = jnp.where(allowed, p_t * (log_t_BxHxTxT - log_s_BxHxTxT), 0.0)
  return jnp.mean(jnp.sum(kl, axis=-1), axis=1)


def _attention_logits(q_BxTxHxK: Array, k_BxTxGxK: Array) -> Array:
  """``q k^T / √K`` per query head ``[B, H, T, T]``; a key head serves
  ``H / G`` query heads (grouped-query attention)."""
  H, G, K = q_BxTxHxK.shape[2], k_BxTxGxK.shape[2], q_BxTxHxK.shape[3]
  k = jnp.repeat(_f32(k_BxTxGxK), H // G, axis=2)
  return jnp.einsum("bthk,bshk->bhts", _f32(q_BxTxHxK), k) / math.sqrt(K)


def attention_kl(
    q_s_BxTxHxK: Array,
    k_s_BxTxGxK: Array,
    q_t_BxTxHxL: Array,
    k_t_BxTxFxL: Array,
    valid_BxT: Array,
) -> Array:
  """MiniLM's attention transfer: ``mean_h KL(A_t,h[i] ‖ A_s,h[i])``, ``[B, T]``.

  ``A_h = softmax(q_h k_h^T / √K)`` over the causal, non-padding keys of
  row ``i``; the student's head ``h`` learns the teacher's head ``h``, so
  both need the same number of query heads ``H`` (widths ``K``, ``L`` may
  differ).
  """
  H, H_t = q_s_BxTxHxK.shape[2], q_t_BxTxHxL.shape[2]
  if H != H_t:
    raise ValueError(
        f"MiniLM attention transfer pairs heads one to one, but the student "
        f"has {H} attention heads and the teacher {H_t}; use "
        "loss.attention.kind=minilmv2, whose relation heads allow different "
        "head counts."
    )
  log_s, allowed = _log_softmax_rows(
      _attention_logits(q_s_BxTxHxK, k_s_BxTxGxK), valid_BxT
  )
  log_t, _ = _log_softmax_rows(
      _attention_logits(q_t_BxTxHxL, k_t_BxTxFxL), valid_BxT
  )
  return _row_kl(log_s, log_t, allowed)


def _relation_logits(x_BxTxHxK: Array, heads: int, who: str) -> Array:
  """``x_r x_r^T / √d`` for ``heads`` relation heads of the concatenated
  heads' vectors (``d = H·K / heads``): ``[B, heads, T, T]``."""
  B, T, H, K = x_BxTxHxK.shape
  if (H * K) % heads:
    raise ValueError(
        f"{heads} relation heads do not divide the {who}'s {H}x{K} = {H * K} "
        "attention width; set loss.attention.relation_heads to a divisor of "
        "both models' widths."
    )
  d = H * K // heads
  x = _f32(x_BxTxHxK).reshape(B, T, heads, d)
  return jnp.einsum("btrd,bsrd->brts", x, x) / math.sqrt(d)


def relation_kl(
    x_s_BxTxHxK: Array, x_t_BxTxGxL: Array, valid_BxT: Array, heads: int
) -> Array:
  """Self-attention relation transfer: ``mean_r KL(R_t,r[i] ‖ R_s,r[i])``.

  ``R_r = softmax(x_r x_r^T / √d_r)`` over the causal, non-padding keys of
  row ``i``, with ``x_r`` the ``r``-th of ``heads`` equal slices of the
  concatenated heads (MiniLMv2). With ``heads`` equal to the models' own
  head count it is MiniLM's per-head value relation. ``[B, T]``.
  """
  log_s, allowed = _log_softmax_rows(
      _relation_logits(x_s_BxTxHxK, heads, "student"), valid_BxT
  )
  log_t, _ = _log_softmax_rows(
      _relation_logits(x_t_BxTxGxL, heads, "teacher"), valid_BxT
  )
  return _row_kl(log_s, log_t, allowed)


def layer_pairs(
    kind: str,
    n_student: int,
    n_teacher: int,
    *,
    last_k: int = 1,
    pairs: Sequence[tuple[int, int]] = (),
    first: int = 1,
) -> tuple[tuple[int, int], ...]:
  """``(student_layer, teacher_layer)`` pairs of a layer map.

  Layers count from ``first`` (0: the embeddings may be paired, as for
  hidden states; 1: blocks only, as for attention) to ``n``:

  * ``uniform``: student layer ``l`` (1..n_s) with teacher layer
    ``round(l · n_t / n_s)`` (halves up), TinyBERT's map;
  * ``last``: the last ``last_k`` layers of each, in order;
  * ``pairs``: ``pairs`` as given.
  """
  if kind == "uniform":
    out = tuple(
        (l, (2 * l * n_teacher + n_student) // (2 * n_student))
        for l in range(1, n_student + 1)
    )
  elif kind == "last":
    if not 1 <= last_k <= min(n_student, n_teacher):
      raise ValueError(
          f"last_k={last_k} must be in [1, {min(n_student, n_teacher)}] for a "
          f"{n_student}-layer student and a {n_teacher}-layer teacher; lower "
          "it."
      )
    out = tuple(
        (n_student - last_k + i, n_teacher - last_k + i)
        for i in range(1, last_k + 1)
    )
  elif kind == "pairs":
    out = tuple((int(s), int(t)) for s, t in pairs)
    bad = [
        p
        for p in out
        if not (first <= p[0] <= n_student and first <= p[1] <= n_teacher)
    ]
    if not out or bad:
      raise ValueError(
          f"layer pairs {list(out)} must be non-empty (student, teacher) "
          f"layers in [{first}, {n_student}] x [{first}, {n_teacher}]; fix "
          "the pairs."
      )
  else:
    raise ValueError(f"layer map {kind!r} is unknown; use one of {LAYER_MAPS}.")
  return out
