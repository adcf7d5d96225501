"""The fused LM-head path: hidden states and head weights in, never ``[N, V]``.

Per chunk of tokens it computes the student's logits (float32 GEMM output),
the teacher's, the divergence and its gradient with the canonical per-block
functions of :mod:`kdjax.divergences.engine` (no second copy of the math),
the next-token cross-entropy on the same logits chunk, and contracts the
combined logit gradient with the head at once (Liger style, gradients in the
forward): ``∂X_s[chunk] = ∂Z · W_s`` and ``∂W_s += ∂Zᵀ · X_s``
(docs/divergences.md, "Chunked and fused execution").

A model whose logits are a map of ``X Wᵀ`` (Gemma 2's final-logit
soft-capping ``c·tanh(z/c)``, the model's ``logits_map()``) passes that map;
it is applied to each chunk, and the chain rule through it comes from
``jax.vjp``.

Memory: a few ``[chunk, V]`` float32 arrays plus one ``[V, H]`` float32 head
gradient, whatever N. The gradients are exact for the trainer's objective
``(1 − r)·CE + r·KD`` (see :func:`ce_kd_sums`).
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp

from kdjax.divergences import engine

Array = jax.Array
LogitsMap = Callable[[Array], Array] | None


def _check_chunk(chunk_size) -> int:
  if (
      not isinstance(chunk_size, int)
      or isinstance(chunk_size, bool)
      or chunk_size < 1
  ):
    raise ValueError(
        f"chunk_size={chunk_size!r} must be a positive int "
        "(tokens per chunk)."
    )
  return chunk_size


def _check_shapes(x_s, w_s, x_t, w_t, mask_N):
  n_tokens = x_s.shape[0]
  if x_s.ndim != 2 or (
      x_t is not None
      and (x_t.shape[0] != n_tokens or w_s.shape[0] != w_t.shape[0])
  ):
    raise ValueError(
        f"the fused path needs hidden states [N, H] with the same N and "
        f"heads [V, H] with the same V; got student {x_s.shape} x "
        f"{w_s.shape}, teacher {None if x_t is None else x_t.shape} x "
        f"{None if w_t is None else w_t.shape}. Flatten batch and time into "
        "N first."
    )
  if mask_N is None:
    return jnp.ones((n_tokens,), jnp.float32)
  if mask_N.shape != (n_tokens,):
    raise ValueError(
        f"mask shape {mask_N.shape} does not match the "
        f"{n_tokens} tokens; pass one mask entry per row."
    )
  return mask_N.astype(jnp.float32)


def ce_kd_sums(
    name: str | None,
    hidden_s_NxH: Array,
    head_s_VxH: Array,
    hidden_t_NxK: Array | None,
    head_t_VxK: Array | None,
    labels_N: Array | None,
    mask_N: Array | None = None,
    *,
    kd_ratio: float = 0.5,
    chunk_size: int = 1024,
    temperature=1.0,
    logits_map_s: LogitsMap = None,
    logits_map_t: LogitsMap = None,
    **hp,
) -> tuple[Array, Array]:
  """Masked token sums ``(Σ m·CE, Σ m·D)`` from one pass over logits chunks.

  Args:
    name: a divergence of ``engine.NAMES``, or None for CE alone.
    hidden_s_NxH: student final hidden states (after the final norm).
    head_s_VxH: student LM-head weight (GPT-2: the tied token embedding).
    hidden_t_NxK, head_t_VxK: the same for the teacher (constants); None
      without KD.
    labels_N: next-token labels, or None without CE.
    mask_N: per-token weights ``m`` (response mask); None: all ones.
    kd_ratio: ``r`` of the objective ``(1 − r)·CE + r·KD``.
    chunk_size: tokens per chunk; peak memory is a few ``[chunk, V]`` f32.
    temperature: as for the divergence (may be traced).
    logits_map_s, logits_map_t: what turns each model's ``X Wᵀ`` into its
      logits (``model.logits_map()``: a soft-cap), or None for the identity.
    **hp: the divergence's hyper-parameters (may be traced).

  Returns:
    Two float32 scalars. Their gradient is computed in the forward pass for
    ``G = (1 − r)·∇CE + r·∇KD`` and returned as ``(g_CE + g_KD)·G``: exact
    whenever the cotangents are in the ratio ``(1 − r) : r``, as in any
    multiple of ``(1 − r)·CE + r·KD`` (and for either sum alone when the
    other weight is 0). Differentiable w.r.t. the student hidden states and
    head only.
  """
  mask_N = _check_shapes(
      hidden_s_NxH, head_s_VxH, hidden_t_NxK, head_t_VxK, mask_N
  )
  size = min(_check_chunk(chunk_size), hidden_s_NxH.shape[0])
  sp, params = (
      (None, {}) if name is None else engine.resolve(name, temperature, hp)
  )
  parts = (labels_N is not None, name is not None)
  weights = (1.0 - kd_ratio if parts[0] else 0.0, kd_ratio if parts[1] else 0.0)
  if labels_N is None:
    labels_N = jnp.zeros(mask_N.shape, jnp.int32)
  consts = jax.lax.stop_gradient((hidden_t_NxK, head_t_VxK, mask_N, params))
  return _fused(
      sp,
      size,
      parts,
      weights,
      (logits_map_s, logits_map_t),
      hidden_s_NxH,
      head_s_VxH,
      *consts[:3],
      labels_N.astype(jnp.int32),
      consts[3],
  )


def fused_linear(
    name: str,
    hidden_s_NxH: Array,
    head_s_VxH: Array,
    hidden_t_NxK: Array,
    head_t_VxK: Array,
    mask_N: Array | None = None,
    *,
    chunk_size: int = 1024,
    temperature=1.0,
    logits_map_s: LogitsMap = None,
    logits_map_t: LogitsMap = None,
    **hp,
) -> Array:
  """Masked-mean divergence of ``X_s W_sᵀ`` against ``X_t W_tᵀ``, fused.

  ``Σ m·D / max(Σ m, 1)``, a float32 scalar; its gradient is exact for any
  scalar multiple of it. Arguments as for :func:`ce_kd_sums`.
  """
  mask = _check_shapes(
      hidden_s_NxH, head_s_VxH, hidden_t_NxK, head_t_VxK, mask_N
  )
  _, kd_sum = ce_kd_sums(
      name,
      hidden_s_NxH,
      head_s_VxH,
      hidden_t_NxK,
      head_t_VxK,
      None,
      mask,
      kd_ratio=1.0,
      chunk_size=chunk_size,
      temperature=temperature,
      logits_map_s=logits_map_s,
      logits_map_t=logits_map_t,
      **hp,
  )
  return kd_sum / jnp.maximum(jnp.sum(mask), 1.0)


def cross_entropy(
    hidden_NxH: Array,
    head_VxH: Array,
    labels_N: Array,
    mask_N: Array | None = None,
    *,
    chunk_size: int = 1024,
    logits_map: LogitsMap = None,
) -> Array:
  """Masked-mean next-token NLL ``−log softmax(X Wᵀ)[label]``, chunk by chunk,
  never forming the ``[N, V]`` logits (``logits_map`` as in
  :func:`ce_kd_sums`)."""
  mask = _check_shapes(hidden_NxH, head_VxH, None, None, mask_N)
  ce_sum, _ = ce_kd_sums(
      None,
      hidden_NxH,
      head_VxH,
      None,
      None,
      labels_N,
      mask,
      kd_ratio=0.0,
      chunk_size=chunk_size,
      logits_map_s=logits_map,
  )
  return ce_sum / jnp.maximum(jnp.sum(mask), 1.0)


def _pad_rows(x: Array, rows: int) -> Array:
  return jnp.pad(x, [(0, rows - x.shape[0])] + [(0, 0)] * (x.ndim - 1))


def _fused_forward(
    sp, size, parts, weights, maps, x_s, w_s, x_t, w_t, mask, labels, params
):
  """Both sums and the gradient of ``weights · sums`` in one scan."""
  with_ce, with_kd = parts
  ce_weight, kd_weight = weights
  map_s, map_t = (f or (lambda z: z) for f in maps)
  n_tokens = x_s.shape[0]
  n_chunks = -(-n_tokens // size)
  padded = n_chunks * size  # padding rows have mask 0: no value, no gradient
  x_s_p, mask_p, labels_p = (_pad_rows(a, padded) for a in (x_s, mask, labels))
  x_t_p = _pad_rows(x_t, padded) if with_kd else None
  matmul_f32 = functools.partial(jnp.matmul, preferred_element_type=jnp.float32)

  def body(carry, i):
    ce_total, kd_total, grad_w_VxH = carry
    take = lambda x: jax.lax.dynamic_slice_in_dim(x, i * size, size)
    x_CxH, mask_C = take(x_s_p), take(mask_p)
    # Logits, and the pullback of the student's map to X_s Wᵀ.
    z_s_CxV, pullback = jax.vjp(map_s, matmul_f32(x_CxH, w_s.T))
    grad_z_CxV = jnp.zeros_like(z_s_CxV)
    if with_ce:
      labels_C = take(labels_p)
      log_q_CxV = jax.nn.log_softmax(z_s_CxV, axis=-1)
      nll_C = -jnp.take_along_axis(log_q_CxV, labels_C[:, None], axis=-1)[:, 0]
      ce_total = ce_total + jnp.sum(nll_C * mask_C)
      one_hot = jax.nn.one_hot(labels_C, z_s_CxV.shape[-1], dtype=jnp.float32)
      grad_z_CxV = (ce_weight * mask_C[:, None]) * (
          jnp.exp(log_q_CxV) - one_hot
      )
    if with_kd:
      z_t_CxV = map_t(matmul_f32(take(x_t_p), w_t.T))
      value_C, grad_kd_CxV = engine.value_and_grad(sp, z_s_CxV, z_t_CxV, params)
      kd_total = kd_total + jnp.sum(
          jnp.where(mask_C > 0, value_C * mask_C, 0.0)
      )
      grad_z_CxV = grad_z_CxV + (kd_weight * mask_C[:, None]) * grad_kd_CxV
    (grad_z_CxV,) = pullback(grad_z_CxV)
    grad_x_CxH = matmul_f32(grad_z_CxV.astype(w_s.dtype), w_s)
    grad_w_VxH = grad_w_VxH + matmul_f32(grad_z_CxV.T.astype(x_s.dtype), x_CxH)
    return (ce_total, kd_total, grad_w_VxH), grad_x_CxH.astype(x_s.dtype)

  # A zero that varies like x_s: under shard_map the carry must have the same
  # device-variance as what the body adds to it.
  zero = jnp.sum(x_s[:0]).astype(jnp.float32)
  init = (zero, zero, jnp.zeros(w_s.shape, jnp.float32) + zero)
  (ce, kd, grad_w), grad_x = jax.lax.scan(body, init, jnp.arange(n_chunks))
  grad_x = grad_x.reshape(padded, -1)[:n_tokens]
  return (ce, kd), (grad_x, grad_w.astype(w_s.dtype), params)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3, 4))
def _fused(
    sp, size, parts, weights, maps, x_s, w_s, x_t, w_t, mask, labels, params
):
  return _fused_forward(
      sp, size, parts, weights, maps, x_s, w_s, x_t, w_t, mask, labels, params
  )[0]


def _fused_bwd(sp, size, parts, weights, maps, residuals, cotangents):
  del sp, size, parts, weights, maps
  grad_x, grad_w, params = residuals
  scale = cotangents[0] + cotangents[1]
  return (
      (scale * grad_x).astype(grad_x.dtype),
      (scale * grad_w).astype(grad_w.dtype),
      None,
      None,
      None,
      None,
      jax.tree.map(jnp.zeros_like, params),
  )


_fused.defvjp(_fused_forward, _fused_bwd)
