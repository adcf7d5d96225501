"""Batched generation with a preallocated KV cache, jitted once per setting.

``generate(model, prompt_ids_BxP, prompt_mask_BxP, key, ...)`` takes
left-padded prompts (real tokens flush right, ``prompt_mask`` True on them),
prefills the cache with one forward pass and then decodes inside a
``lax.while_loop``: no Python loop per token, no re-tracing. Per step, the
next-token logits go through the HF logits-processor order:

  no_repeat_ngram_size -> temperature -> top-k -> top-p -> argmax / sample

A row ends at the first token that is one of ``stop_ids`` (kept): the EOS and
an instruct model's end-of-turn token (:func:`kdjax.data.tokenizer.stop_ids`
gives a tokenizer's set). After it the row emits ``pad_id``; the loop ends when
every row is done or after ``max_new_tokens``.
"""

from __future__ import annotations

import functools
import numbers
from typing import Iterable, NamedTuple

from flax import nnx
import jax
import jax.numpy as jnp

Array = jax.Array
NEG_INF = -jnp.inf


class Settings(NamedTuple):
  """Static decoding settings (hashable: one compilation per distinct value).

  ``stop_ids``: the ids that end a row, a tuple (empty: rows run to
  ``max_new_tokens``); :func:`make_settings` takes one EOS id or several.
  """

  max_new_tokens: int = 32
  greedy: bool = True
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  no_repeat_ngram_size: int = 0
  stop_ids: tuple[int, ...] = ()
  pad_id: int = 0


def stop_tuple(stop_ids: int | Iterable[int] | None) -> tuple[int, ...]:
  """``stop_ids`` as a tuple of Python ints in their order, duplicates
  dropped: one id (the EOS) or several; None is none."""
  if stop_ids is None:
    return ()
  if isinstance(stop_ids, numbers.Integral):
    stop_ids = (stop_ids,)
  return tuple(dict.fromkeys(int(i) for i in stop_ids))


def make_settings(**fields) -> Settings:
  """:class:`Settings` from its fields; ``stop_ids`` may be one id
  (``stop_ids=eos_id``) or any iterable of ids (:func:`stop_tuple`)."""
  if "stop_ids" in fields:
    fields["stop_ids"] = stop_tuple(fields["stop_ids"])
  return Settings(**fields)


def is_stop(tokens: Array, stop_ids: tuple[int, ...]) -> Array:
  """True where a token is one of ``stop_ids`` (all False when there are
  none); ``stop_ids`` is static, so each set is its own program."""
  if not stop_ids:
    return jnp.zeros(jnp.shape(tokens), bool)
  return jnp.isin(tokens, jnp.asarray(stop_ids, jnp.int32))


def top_k_mask(logits_BxV: Array, k: int) -> Array:
  """Sets every logit below the k-th largest to -inf (ties with it are kept)."""
  if k <= 0 or k >= logits_BxV.shape[-1]:
    return logits_BxV
  kth_Bx1 = jax.lax.top_k(logits_BxV, k)[0][..., -1:]
  return jnp.where(logits_BxV < kth_Bx1, NEG_INF, logits_BxV)


def top_p_mask(logits_BxV: Array, p: float) -> Array:
  """Nucleus filtering with HF semantics.

  Sort ascending; drop a token when the cumulative probability of it and all
  less likely tokens is ``<= 1 - p``; the most likely token always stays.
  """
  if p >= 1.0:
    return logits_BxV
  order_BxV = jnp.argsort(logits_BxV, axis=-1)
  sorted_BxV = jnp.take_along_axis(logits_BxV, order_BxV, axis=-1)
  cum_BxV = jnp.cumsum(jax.nn.softmax(sorted_BxV, axis=-1), axis=-1)
  drop_sorted = (cum_BxV <= 1.0 - p).at[..., -1].set(False)
  drop_BxV = (
      jnp.zeros_like(drop_sorted)
      .at[jnp.arange(logits_BxV.shape[0])[:, None], order_BxV]
      .set(drop_sorted)
  )
  return jnp.where(drop_BxV, NEG_INF, logits_BxV)


def banned_ngram_mask(
    tokens_BxS: Array, valid_BxS: Array, end: Array, n: int, vocab: int
) -> Array:
  """True for tokens that would repeat an n-gram of ``tokens[:, :end]``.

  HF ``NoRepeatNGramLogitsProcessor``: if the last ``n - 1`` tokens occurred
  before followed by ``w``, ``w`` is banned. Prompt tokens count; padding
  slots (``valid`` False) never match.
  """
  B, S = tokens_BxS.shape
  W = S - n + 1  # candidate n-gram starts j = 0..W-1
  last_Bxn1 = jax.lax.dynamic_slice_in_dim(
      tokens_BxS, end - (n - 1), n - 1, axis=1
  )
  match_BxW = jnp.arange(W)[None, :] + n <= end  # n-gram fully before `end`
  for m in range(n - 1):
    match_BxW &= tokens_BxS[:, m : m + W] == last_Bxn1[:, m : m + 1]
  for m in range(n):
    match_BxW &= valid_BxS[:, m : m + W]
  follower_BxW = tokens_BxS[:, n - 1 : n - 1 + W]
  banned_BxV = (
      jnp.zeros((B, vocab), jnp.int32)
      .at[jnp.arange(B)[:, None], follower_BxW]
      .max(match_BxW.astype(jnp.int32))
  )
  return banned_BxV > 0


def process_logits(
    logits_BxV: Array, s: Settings, tokens_BxS=None, valid_BxS=None, end=None
) -> Array:
  """Applies the no-repeat / temperature / top-k / top-p chain."""
  logits_BxV = logits_BxV.astype(jnp.float32)
  if s.no_repeat_ngram_size > 0:
    banned = banned_ngram_mask(
        tokens_BxS, valid_BxS, end, s.no_repeat_ngram_size, logits_BxV.shape[-1]
    )
    logits_BxV = jnp.where(banned, NEG_INF, logits_BxV)
  if s.greedy:
    return logits_BxV
  if s.temperature != 1.0:
    logits_BxV = logits_BxV / s.temperature
  return top_p_mask(top_k_mask(logits_BxV, s.top_k), s.top_p)


def generate(
    model: nnx.Module,
    prompt_ids_BxP: Array,
    prompt_mask_BxP: Array | None = None,
    key: Array | None = None,
    **settings,
) -> Array:
  """Generates up to ``max_new_tokens`` tokens per row.

  Args:
    model: a kdjax causal LM (evaluation mode: dropout off).
    prompt_ids_BxP: left-padded prompt token ids.
    prompt_mask_BxP: True on real prompt tokens (default: all).
    key: PRNG key for sampling (ignored when ``greedy``).
    **settings: fields of :class:`Settings` (:func:`make_settings`:
      ``stop_ids`` one id or several).

  Returns:
    ``[B, max_new_tokens]`` int32 tokens; after a row's first stop id (kept)
    the rest is ``pad_id``.
  """
  s = make_settings(**settings)
  if not s.greedy and key is None:
    raise ValueError(
        "sampling (greedy=False) needs a PRNG key: pass "
        "key=jax.random.key(seed)."
    )
  if s.temperature <= 0:
    raise ValueError(
        f"temperature={s.temperature} must be > 0; use "
        "greedy=True for argmax decoding."
    )
  if prompt_mask_BxP is None:
    prompt_mask_BxP = jnp.ones(prompt_ids_BxP.shape, bool)
  if key is None:
    key = jax.random.key(0)
  graphdef, state = nnx.split(model)
  return _generate(
      graphdef,
      state,
      jnp.asarray(prompt_ids_BxP, jnp.int32),
      jnp.asarray(prompt_mask_BxP, bool),
      key,
      s,
  )


@functools.partial(jax.jit, static_argnums=(0, 5))
def _generate(graphdef, state, prompt_BxP, mask_BxP, key, s: Settings):
  model = nnx.merge(graphdef, state)
  B, P = prompt_BxP.shape
  N = s.max_new_tokens
  S = P + N
  cache = model.init_cache(B, S)
  logits_BxPxV, cache = model.decode(prompt_BxP, cache, attention_mask=mask_BxP)
  tokens_BxS = jnp.full((B, S), s.pad_id, jnp.int32).at[:, :P].set(prompt_BxP)
  valid_BxS = jnp.zeros((B, S), bool).at[:, :P].set(mask_BxP)

  def cond(carry):
    i, _, _, _, done_B, _, _ = carry
    return (i < N) & ~jnp.all(done_B)

  def body(carry):
    i, tokens_BxS, valid_BxS, logits_BxV, done_B, cache, key = carry
    key, sub = jax.random.split(key)
    logits_BxV = process_logits(logits_BxV, s, tokens_BxS, valid_BxS, P + i)
    if s.greedy:
      next_B = jnp.argmax(logits_BxV, axis=-1)
    else:
      next_B = jax.random.categorical(sub, logits_BxV, axis=-1)
    next_B = jnp.where(done_B, s.pad_id, next_B).astype(jnp.int32)
    tokens_BxS = tokens_BxS.at[:, P + i].set(next_B)
    valid_BxS = valid_BxS.at[:, P + i].set(~done_B)
    done_B = done_B | is_stop(next_B, s.stop_ids)
    logits_Bx1xV, cache = model.decode(next_B[:, None], cache)
    return (
        i + 1,
        tokens_BxS,
        valid_BxS,
        logits_Bx1xV[:, 0],
        done_B,
        cache,
        key,
    )

  carry = (
      jnp.array(0, jnp.int32),
      tokens_BxS,
      valid_BxS,
      logits_BxPxV[:, -1],
      jnp.zeros((B,), bool),
      cache,
      key,
  )
  _, tokens_BxS, *_ = jax.lax.while_loop(cond, body, carry)
  # Steps the loop skipped (every row done early) stay pad_id.
  return tokens_BxS[:, P:]
