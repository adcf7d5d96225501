"""Divergences over token chunks: memory O(chunk · V) instead of O(N · V).

Two paths (performance.md 4):

* :func:`chunked` takes the logits ``[..., V]`` and runs a fast divergence
  (:mod:`kdjax.divergences.fast`) over token chunks with ``lax.map``, forward
  and backward, keeping only per-row statistics in between. Returns per-token
  values like the other divergences.
* :func:`fused_linear` takes the final hidden states and LM-head weights of
  both models and never forms the ``[N, V]`` logits: per chunk it computes the
  logits (float32 GEMM output), the divergence and its gradient, and contracts
  the gradient with the head at once (Liger style, gradients in the forward):
  ``∂X_s[chunk] = ∂Z · W_s`` and ``∂W_s += ∂Zᵀ · X_s``. It returns the masked
  token mean (kd_losses.md 1.5) and is differentiable w.r.t. the student hidden
  states and head weight only; its gradient is exact for a loss used linearly
  downstream (first order, any scalar multiplier).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kdjax.divergences import fast

Array = jax.Array


def _check_chunk(chunk_size) -> int:
  if not isinstance(chunk_size, int) or chunk_size < 1:
    raise ValueError(f"chunk_size={chunk_size!r} must be a positive int "
                     "(tokens per chunk).")
  return chunk_size


def chunked(name: str, student_logits: Array, teacher_logits: Array, *,
            chunk_size: int = 1024, temperature: float = 1.0, **hp) -> Array:
  """Per-token divergence ``name`` computed ``chunk_size`` tokens at a time.

  Same values and gradients as ``fast.<name>``; the leading axes are flattened
  into tokens. The forward pass keeps only per-row statistics (log-partitions
  and the row constant of the gradient, a few floats per token); the backward
  pass re-reads each chunk once and writes its gradient, so nothing of the
  forward pass is recomputed. A remainder of ``N mod chunk_size`` tokens is one
  extra call (and its gradient one concatenation).
  """
  op = fast._resolve(name, temperature, hp, chunk=True)
  chunk_size = _check_chunk(chunk_size)
  if student_logits.shape != teacher_logits.shape:
    raise ValueError(
        f"student logits {student_logits.shape} and teacher logits "
        f"{teacher_logits.shape} differ in shape.")
  lead, vocab = student_logits.shape[:-1], student_logits.shape[-1]
  s_NxV = student_logits.reshape(-1, vocab)
  t_NxV = jax.lax.stop_gradient(teacher_logits).reshape(-1, vocab)
  size = min(chunk_size, s_NxV.shape[0])
  return _chunked(op, size, s_NxV, t_NxV).reshape(lead)


def _over_chunks(fn, size: int, n_tokens: int, *arrays):
  """``fn`` on consecutive ``size``-row slices of ``arrays`` (pytrees of
  ``[N, ...]``), outputs concatenated along rows; the remainder is one call."""
  n_chunks = n_tokens // size
  take = lambda i: jax.tree.map(
      lambda x: jax.lax.dynamic_slice_in_dim(x, i * size, size), arrays)
  out = jax.lax.map(lambda i: fn(*take(i)), jnp.arange(n_chunks))
  out = jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), out)
  rest = n_chunks * size
  if rest == n_tokens:
    return out
  tail = fn(*jax.tree.map(lambda x: x[rest:], arrays))
  return jax.tree.map(lambda a, b: jnp.concatenate([a, b]), out, tail)


def _chunked_forward(op, size, s_NxV, t_NxV):
  value_N, stats = _over_chunks(op.forward, size, s_NxV.shape[0], s_NxV, t_NxV)
  value_N, stats = op.finish(value_N, stats, s_NxV, t_NxV, size)
  return value_N, (s_NxV, t_NxV, stats)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _chunked(op, size, s_NxV, t_NxV):
  return _chunked_forward(op, size, s_NxV, t_NxV)[0]


def _chunked_bwd(op, size, residuals, g_N):
  s_NxV, t_NxV, stats = residuals
  grad_NxV = _over_chunks(op.backward, size, s_NxV.shape[0], s_NxV, t_NxV,
                          stats, g_N)
  return grad_NxV, None


_chunked.defvjp(_chunked_forward, _chunked_bwd)


def fused_linear(name: str, hidden_s_NxH: Array, head_s_VxH: Array,
                 hidden_t_NxK: Array, head_t_VxK: Array,
                 mask_N: Array | None = None, *, chunk_size: int = 1024,
                 temperature: float = 1.0, **hp) -> Array:
  """Masked-mean divergence of ``X_s W_sᵀ`` against ``X_t W_tᵀ``, fused.

  Args:
    name: a divergence of :data:`kdjax.divergences.fast.NAMES`.
    hidden_s_NxH: student final hidden states (after the final norm).
    head_s_VxH: student LM-head weight (GPT-2: the tied token embedding).
    hidden_t_NxK, head_t_VxK: the same for the teacher (constants).
    mask_N: response mask; ``None`` averages over every token.
    chunk_size: tokens per chunk; peak memory is a few ``[chunk, V]`` f32.
    temperature: as for the divergence.
    **hp: the divergence's hyper-parameters.

  Returns:
    ``Σ mask·D / max(Σ mask, 1)``, a float32 scalar.
  """
  value_and_grad = fast._resolve(name, temperature, hp,
                                 chunk=True).value_and_grad
  chunk_size = _check_chunk(chunk_size)
  n_tokens = hidden_s_NxH.shape[0]
  if (hidden_s_NxH.ndim != 2 or hidden_t_NxK.shape[0] != n_tokens
      or head_s_VxH.shape[0] != head_t_VxK.shape[0]):
    raise ValueError(
        f"fused_linear needs hidden states [N, H] with the same N and heads "
        f"[V, H] with the same V; got student {hidden_s_NxH.shape} x "
        f"{head_s_VxH.shape}, teacher {hidden_t_NxK.shape} x "
        f"{head_t_VxK.shape}. Flatten batch and time into N first.")
  if mask_N is None:
    mask_N = jnp.ones((n_tokens,), jnp.float32)
  if mask_N.shape != (n_tokens,):
    raise ValueError(f"mask shape {mask_N.shape} does not match the "
                     f"{n_tokens} tokens; pass one mask entry per row.")
  consts = jax.lax.stop_gradient((hidden_t_NxK, head_t_VxK,
                                  mask_N.astype(jnp.float32)))
  return _fused(value_and_grad, min(chunk_size, n_tokens), hidden_s_NxH,
                head_s_VxH, *consts)


def _pad_rows(x: Array, rows: int) -> Array:
  return jnp.pad(x, [(0, rows - x.shape[0])] + [(0, 0)] * (x.ndim - 1))


def _fused_forward(value_and_grad, size, x_s, w_s, x_t, w_t, mask):
  """Loss and its gradients w.r.t. ``(x_s, w_s)`` in one scan over chunks."""
  n_tokens = x_s.shape[0]
  n_chunks = -(-n_tokens // size)
  padded = n_chunks * size  # padding rows have mask 0: no value, no gradient
  x_s_p, x_t_p = _pad_rows(x_s, padded), _pad_rows(x_t, padded)
  weight_N = _pad_rows(mask, padded) / jnp.maximum(jnp.sum(mask), 1.0)
  matmul_f32 = functools.partial(jnp.matmul, preferred_element_type=jnp.float32)

  def body(carry, i):
    total, grad_w_VxH = carry
    take = lambda x: jax.lax.dynamic_slice_in_dim(x, i * size, size)
    x_CxH, weight_C = take(x_s_p), take(weight_N)
    z_s_CxV = matmul_f32(x_CxH, w_s.T)
    z_t_CxV = matmul_f32(take(x_t_p), w_t.T)
    value_C, grad_z_CxV = value_and_grad(z_s_CxV, z_t_CxV)
    grad_z_CxV = grad_z_CxV * weight_C[:, None]
    total = total + jnp.sum(jnp.where(weight_C > 0, value_C * weight_C, 0.0))
    grad_x_CxH = matmul_f32(grad_z_CxV.astype(w_s.dtype), w_s)
    grad_w_VxH = grad_w_VxH + matmul_f32(grad_z_CxV.T.astype(x_s.dtype), x_CxH)
    return (total, grad_w_VxH), grad_x_CxH.astype(x_s.dtype)

  # A zero that varies like x_s: under shard_map the carry must have the same
  # device-variance as what the body adds to it.
  zero = jnp.sum(x_s[:0]).astype(jnp.float32)
  init = (zero, jnp.zeros(w_s.shape, jnp.float32) + zero)
  (total, grad_w), grad_x = jax.lax.scan(body, init, jnp.arange(n_chunks))
  grad_x = grad_x.reshape(padded, -1)[:n_tokens]
  return total, (grad_x, grad_w.astype(w_s.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _fused(value_and_grad, size, x_s, w_s, x_t, w_t, mask):
  return _fused_forward(value_and_grad, size, x_s, w_s, x_t, w_t, mask)[0]


def _fused_fwd(value_and_grad, size, x_s, w_s, x_t, w_t, mask):
  return _fused_forward(value_and_grad, size, x_s, w_s, x_t, w_t, mask)


def _fused_bwd(value_and_grad, size, grads, g):
  del value_and_grad, size
  grad_x, grad_w = grads
  return (g * grad_x).astype(grad_x.dtype), (g * grad_w).astype(grad_w.dtype), \
      None, None, None


_fused.defvjp(_fused_fwd, _fused_bwd)


def cross_entropy(hidden_NxH: Array, head_VxH: Array, labels_N: Array,
                  mask_N: Array | None = None, *,
                  chunk_size: int = 1024) -> Array:
  """Masked-mean next-token NLL ``-log softmax(X Wᵀ)[label]``, chunk by chunk.

  The CE half of the ``(1 - kd_ratio)·CE + kd_ratio·KD`` objective for the
  fused path: each chunk's ``[chunk, V]`` logits live only inside a
  ``jax.checkpoint``-ed body, so the backward pass recomputes them instead of
  keeping ``[N, V]`` residuals. Differentiable w.r.t. hidden states and head.
  """
  chunk_size = _check_chunk(chunk_size)
  n_tokens = hidden_NxH.shape[0]
  if mask_N is None:
    mask_N = jnp.ones((n_tokens,), jnp.float32)
  size = min(chunk_size, n_tokens)
  n_chunks = -(-n_tokens // size)
  padded = n_chunks * size  # padding rows have mask 0
  x = _pad_rows(hidden_NxH, padded)
  labels = _pad_rows(labels_N.astype(jnp.int32), padded)
  mask = _pad_rows(mask_N.astype(jnp.float32), padded)

  @jax.checkpoint
  def one_chunk(i):
    take = lambda a: jax.lax.dynamic_slice_in_dim(a, i * size, size)
    z_CxV = jnp.matmul(take(x), head_VxH.T, preferred_element_type=jnp.float32)
    nll_C = (jax.nn.logsumexp(z_CxV, axis=-1)
             - jnp.take_along_axis(z_CxV, take(labels)[:, None], axis=-1)[:, 0])
    return jnp.sum(nll_C * take(mask))

  total = jnp.sum(jax.lax.map(one_chunk, jnp.arange(n_chunks)))
  return total / jnp.maximum(jnp.sum(mask_N), 1.0)
