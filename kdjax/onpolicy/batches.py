"""Between training rows and generation: prompts out, responses back in.

A training batch (:mod:`kdjax.data.pipeline`) holds rows of ``ids = prompt ‖
response ‖ EOS`` laid out from column 0: ``input_ids = ids[:-1]``, ``labels =
ids[1:]`` (EOS after the end), ``loss_mask`` 1 on columns ``p-1 .. n-2``
(``p`` prompt tokens, ``n = len(ids)``), ``attention_mask`` 1 on the ``n - 1``
real inputs, ``positions = arange(L)``. Everything here is jittable and
shape-static, so it runs on device inside the step's mesh:

* :func:`prompts_from_batch` recovers each row's prompt (its first ``p``
  tokens, ``p = 1 + first column of loss_mask``) and left-pads it to
  ``prompt_length``, the layout :func:`kdjax.sampling.generate` expects;
* :func:`response_rows` turns left-padded prompts and generated tokens back
  into training rows of the same layout: ``ids = prompt ‖ y_1..y_g`` where
  ``g`` is the position of the first stop id (the EOS or an end-of-turn
  token; kept, as the dataset's final EOS) or ``max_new_tokens`` without
  one, truncated to ``L`` tokens; the loss covers exactly the generated
  tokens, nothing after the stop.

Rows travel in a compact form, :class:`Rows` (``ids``, ``p``, ``n``), which
is also what the replay buffer stores.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp

from kdjax import sampling

Array = jax.Array
# The keys and dtypes of a training batch (kdjax.data.pipeline.train_row).
DTYPES = {
    "input_ids": jnp.int32,
    "labels": jnp.int32,
    "loss_mask": jnp.float32,
    "attention_mask": jnp.int32,
    "positions": jnp.int32,
}


class Rows(NamedTuple):
  """Training rows in compact form.

  Attributes:
    ids_BxL1: ``prompt ‖ response`` from column 0, EOS after column ``n - 1``
      (``L + 1`` columns: inputs and labels are its two shifted views).
    prompt_len_B: ``p``, the number of prompt tokens.
    length_B: ``n``, the number of real tokens (``p <= n <= L``).
  """

  ids_BxL1: Array
  prompt_len_B: Array
  length_B: Array


def prompts_from_batch(
    batch: dict, prompt_length: int, eos_id: int
) -> tuple[Array, Array]:
  """Left-padded prompts ``[B, prompt_length]`` and their masks.

  Row ``r`` keeps its first ``p_r`` input tokens, ``p_r = 1 + min{t :
  loss_mask[r, t] > 0}`` (the dataset's prompts are at most
  ``max_prompt_length`` long, so nothing is cut when ``prompt_length`` is
  that), right-aligned and padded on the left with ``eos_id``.
  """
  ids_BxL = batch["input_ids"]
  mask_BxL = batch["loss_mask"] > 0
  p_B = jnp.where(
      jnp.any(mask_BxL, axis=1), jnp.argmax(mask_BxL, axis=1) + 1, 0
  )
  p_B = jnp.minimum(p_B, prompt_length).astype(jnp.int32)
  pad_B = prompt_length - p_B
  j_P = jnp.arange(prompt_length)
  src_BxP = jnp.clip(j_P[None, :] - pad_B[:, None], 0, ids_BxL.shape[1] - 1)
  real_BxP = j_P[None, :] >= pad_B[:, None]
  prompt_BxP = jnp.where(
      real_BxP, jnp.take_along_axis(ids_BxL, src_BxP, axis=1), eos_id
  )
  return prompt_BxP.astype(jnp.int32), real_BxP


def generated_length(tokens_BxN: Array, stop_ids: Sequence[int]) -> Array:
  """Tokens up to and including the first stop id (all ``N`` without one)."""
  N = tokens_BxN.shape[1]
  stop_BxN = sampling.is_stop(tokens_BxN, sampling.stop_tuple(stop_ids))
  return jnp.where(
      jnp.any(stop_BxN, axis=1), jnp.argmax(stop_BxN, axis=1) + 1, N
  ).astype(jnp.int32)


def response_rows(
    prompt_BxP: Array,
    prompt_mask_BxP: Array,
    tokens_BxN: Array,
    *,
    max_length: int,
    eos_id: int,
    stop_ids: Sequence[int],
) -> Rows:
  """Rows ``prompt ‖ generated`` (through the first stop id), <= max_length.

  ``prompt_BxP`` is left-padded (``prompt_mask`` True on real tokens);
  ``tokens_BxN`` is the sampler's output (after a row's stop id comes
  padding, ignored here); ``eos_id`` fills the row after its end.
  """
  B, P = prompt_BxP.shape
  L = max_length
  p_B = jnp.sum(prompt_mask_BxP, axis=1, dtype=jnp.int32)
  g_B = generated_length(tokens_BxN, stop_ids)
  n_B = jnp.minimum(p_B + g_B, L)
  seq_BxS = jnp.concatenate([prompt_BxP, tokens_BxN.astype(jnp.int32)], axis=1)
  t = jnp.arange(L + 1)
  src_BxL1 = jnp.clip((P - p_B)[:, None] + t[None, :], 0, seq_BxS.shape[1] - 1)
  ids_BxL1 = jnp.where(
      t[None, :] < n_B[:, None],
      jnp.take_along_axis(seq_BxS, src_BxL1, axis=1),
      eos_id,
  )
  return Rows(ids_BxL1.astype(jnp.int32), p_B, n_B)


def to_batch(rows: Rows, eos_id: int) -> dict[str, Array]:
  """The training batch of ``rows`` (the layout of ``pipeline.train_row``)."""
  ids_BxL1, p_B, n_B = rows
  B, L1 = ids_BxL1.shape
  L = L1 - 1
  t_L = jnp.arange(L)[None, :]
  real_BxL = t_L < (n_B - 1)[:, None]
  return {
      "input_ids": jnp.where(real_BxL, ids_BxL1[:, :-1], eos_id),
      "labels": jnp.where(real_BxL, ids_BxL1[:, 1:], eos_id),
      "loss_mask": (real_BxL & (t_L >= (p_B - 1)[:, None])).astype(jnp.float32),
      "attention_mask": real_BxL.astype(jnp.int32),
      "positions": jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L)),
  }
