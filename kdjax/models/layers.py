"""Pieces shared by the GPT-2 and LLaMA-style families.

* :func:`attention`: softmax attention with grouped-query heads, a boolean
  ``[B, T, S]`` mask, an optional logit soft-cap and float32 logits/softmax
  whatever the compute dtype; :func:`sliding_window` narrows the mask to the
  last W positions.
* :class:`KVCache`: a preallocated per-layer key/value cache plus the mask of
  which slots hold real (non-padding) tokens.
* :func:`context`: positions and the attention mask for one forward pass, with
  or without a cache. Positions default to ``cumsum(attention_mask) - 1`` so a
  left-padded prompt sees the same positions as the unpadded one.
* :class:`CausalLM`: the forward pass, LM head, cached decoding and
  rematerialisation, written once; a family supplies ``embed``, ``blocks``,
  ``final_norm`` and ``head_weight``. :meth:`CausalLM.intermediates`
  returns chosen layers' hidden states and attention q, k, v (:class:`Taps`)
  from the same forward pass.
* :func:`rope`: rotary position embedding in the HF (rotate-half) layout.
* :class:`RMSNorm`: transformers' RMSNorm, with the ``1 + w`` scale of Gemma.
* :func:`softcap`: ``c tanh(x / c)``, Gemma's attention and final-logit cap.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple

from flax import nnx
import jax
import jax.numpy as jnp

from kdjax import sharding

Array = jax.Array

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class KVCache(NamedTuple):
  """Preallocated keys/values for every layer.

  Attributes:
    k: per-layer keys, each ``[B, S, G, K]`` (G key/value heads).
    v: per-layer values, same shapes.
    valid_BxS: True where a slot holds a real token (False: padding or empty).
    index: the next slot to write (int32 scalar; the same for every row, since
      prompts are left-padded to a common length).
  """

  k: tuple
  v: tuple
  valid_BxS: Array
  index: Array


class Context(NamedTuple):
  """What every layer needs besides its input."""

  positions_BxT: Array
  mask_BxTxS: Array
  index: Array | None  # cache slot of the first query; None without a cache
  q_slot_T: Array  # the key slot each query occupies


def context(
    attention_mask_BxT: Array | None,
    positions_BxT: Array | None,
    cache: KVCache | None,
    shape_BxT: tuple[int, int],
) -> tuple[Context, Array | None]:
  """Positions and the boolean ``[B, T, S]`` attention mask.

  Without a cache, ``S = T`` and query ``t`` sees keys ``s <= t`` that are not
  padding. With one, the T new tokens occupy slots ``index .. index+T-1`` and
  may see every valid slot up to their own. Returns the context and the
  updated cache-slot mask (None without a cache).
  """
  B, T = shape_BxT
  if attention_mask_BxT is None:
    attention_mask_BxT = jnp.ones((B, T), bool)
  attention_mask_BxT = attention_mask_BxT.astype(bool)
  if cache is None:
    valid_BxS, index, new_valid = attention_mask_BxT, 0, None
  else:
    index = cache.index
    valid_BxS = jax.lax.dynamic_update_slice_in_dim(
        cache.valid_BxS, attention_mask_BxT, index, axis=1
    )
    new_valid = valid_BxS
  S = valid_BxS.shape[1]
  if positions_BxT is None:
    # Position of a token = number of real tokens before it.
    before_BxS = jnp.cumsum(valid_BxS, axis=1, dtype=jnp.int32) - 1
    positions_BxT = jax.lax.dynamic_slice_in_dim(before_BxS, index, T, axis=1)
    positions_BxT = jnp.maximum(positions_BxT, 0)
  q_slot_T = index + jnp.arange(T)
  causal_TxS = jnp.arange(S)[None, :] <= q_slot_T[:, None]
  mask_BxTxS = causal_TxS[None] & valid_BxS[:, None, :]
  ctx = Context(
      positions_BxT.astype(jnp.int32),
      mask_BxTxS,
      None if cache is None else index,
      q_slot_T,
  )
  return ctx, new_valid


def sliding_window(ctx: Context, window: int | None) -> Array:
  """The mask of ``ctx`` restricted to the last ``window`` slots.

  The query in slot ``t`` sees key slots ``t - window < s <= t`` (itself and
  the ``window - 1`` before it), transformers' ``sliding_window`` rule; slots
  count padding, as transformers' mask indices do. None: the mask unchanged.
  """
  if window is None:
    return ctx.mask_BxTxS
  S = ctx.mask_BxTxS.shape[-1]
  near_TxS = jnp.arange(S)[None, :] > ctx.q_slot_T[:, None] - window
  return ctx.mask_BxTxS & near_TxS[None]


def softcap(x: Array, cap: float | None) -> Array:
  """``cap * tanh(x / cap)``: squashes ``x`` into ``(-cap, cap)``; None: ``x``."""
  if cap is None:
    return x
  return cap * jnp.tanh(x / cap)


def attention(
    q_BxTxHxK: Array,
    k_BxSxGxK: Array,
    v_BxSxGxK: Array,
    mask_BxTxS: Array,
    dropout: Callable[[Array], Array] | None = None,
    *,
    scale: float | None = None,
    cap: float | None = None,
) -> Array:
  """``softmax(softcap(s q k^T, cap) + mask) v``, H query heads sharing G kv heads.

  ``s = scale`` (default ``1 / sqrt(K)``); the soft-cap (Gemma 2's
  ``attn_logit_softcapping``) acts before the mask, as in transformers.
  Logits and softmax are float32. A fully masked row (a padding query) gets a
  uniform distribution instead of NaN; its output is never used.
  """
  B, T, H, K = q_BxTxHxK.shape
  G = k_BxSxGxK.shape[2]
  q = q_BxTxHxK.reshape(B, T, G, H // G, K)
  scale = 1.0 / math.sqrt(K) if scale is None else scale
  logits = softcap(
      jnp.einsum(
          "btgrk,bsgk->bgrts", q, k_BxSxGxK, preferred_element_type=jnp.float32
      )
      * scale,
      cap,
  )
  logits = jnp.where(
      mask_BxTxS[:, None, None], logits, jnp.finfo(jnp.float32).min
  )
  probs = jax.nn.softmax(logits, axis=-1).astype(v_BxSxGxK.dtype)
  if dropout is not None:
    probs = dropout(probs)
  out = jnp.einsum("bgrts,bsgk->btgrk", probs, v_BxSxGxK)
  return out.reshape(B, T, H, K)


def cached_attention(
    q_BxTxHxK: Array,
    k_BxTxGxK: Array,
    v_BxTxGxK: Array,
    ctx: Context,
    kv: tuple | None,
    dropout: Callable[[Array], Array] | None = None,
    *,
    window: int | None = None,
    scale: float | None = None,
    cap: float | None = None,
) -> tuple[Array, tuple | None]:
  """Writes the new keys/values into the layer's cache (if any), then attends
  (within the last ``window`` slots where one is given)."""
  if kv is not None:
    ck, cv = kv
    k_BxTxGxK = jax.lax.dynamic_update_slice_in_dim(
        ck, k_BxTxGxK.astype(ck.dtype), ctx.index, axis=1
    )
    v_BxTxGxK = jax.lax.dynamic_update_slice_in_dim(
        cv, v_BxTxGxK.astype(cv.dtype), ctx.index, axis=1
    )
    kv = (k_BxTxGxK, v_BxTxGxK)
  mask_BxTxS = sliding_window(ctx, window)
  out = attention(
      q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, mask_BxTxS, dropout, scale=scale, cap=cap
  )
  return out, kv


ROPE_TYPES = ("default", "linear", "llama3")


def rope_inv_freq(
    head_dim: int, theta: float, scaling: dict | None = None
) -> Array:
  """Inverse frequencies ``theta^(-2i/K)``, with HF ``linear``/``llama3`` scaling."""
  inv = 1.0 / (
      theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
  )
  kind = (scaling or {}).get(
      "rope_type", (scaling or {}).get("type", "default")
  )
  if kind == "default":
    return inv
  if kind == "linear":
    return inv / scaling["factor"]
  if kind == "llama3":
    factor = scaling["factor"]
    lo, hi = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_ctx = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    scaled = jnp.where(wavelen > old_ctx / lo, inv / factor, inv)
    smooth = (old_ctx / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_ctx / hi) & (wavelen <= old_ctx / lo)
    return jnp.where(medium, smoothed, scaled)
  raise ValueError(
      f"rope_scaling type {kind!r} is not supported; use one of {ROPE_TYPES}."
  )


def rope(x_BxTxHxK: Array, positions_BxT: Array, inv_freq: Array) -> Array:
  """Rotary embedding, HF layout: pairs are (i, i + K/2), not interleaved."""
  angles_BxTxF = positions_BxT[..., None].astype(jnp.float32) * inv_freq
  angles = jnp.concatenate([angles_BxTxF, angles_BxTxF], axis=-1)[:, :, None]
  x = x_BxTxHxK.astype(jnp.float32)
  x1, x2 = jnp.split(x, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return (x * jnp.cos(angles) + rotated * jnp.sin(angles)).astype(
      x_BxTxHxK.dtype
  )


class RMSNorm(nnx.Module):
  """transformers' RMSNorm over the last axis, float32 inside.

  ``y = x / sqrt(mean(x^2) + eps)`` in float32, then either ``w * y`` with
  ``y`` first cast to the compute dtype (LLaMA, Qwen, Mistral) or
  ``(1 + w) * y`` cast afterwards (Gemma, ``unit_offset``; ``w`` starts at
  0). The parameter is ``scale``, HF's ``weight``.
  """

  def __init__(
      self,
      dim: int,
      eps: float,
      *,
      unit_offset: bool = False,
      dtype=jnp.float32,
      param_dtype=jnp.float32,
  ):
    init = jnp.zeros if unit_offset else jnp.ones
    self.scale = nnx.Param(init((dim,), param_dtype))
    self.eps, self.unit_offset, self.dtype = eps, unit_offset, dtype

  def __call__(self, x: Array) -> Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(
        jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps
    )
    w = self.scale[...]
    if self.unit_offset:
      return (y * (1.0 + w.astype(jnp.float32))).astype(self.dtype)
    return w.astype(self.dtype) * y.astype(self.dtype)


class Taps(NamedTuple):
  """Which intermediates :meth:`CausalLM.intermediates` returns.

  Layers count as transformers' ``hidden_states`` do: 0 is the embedding
  output, ``l`` (1..L) the residual stream after block ``l`` (before the
  final norm).

  Attributes:
    hidden: the layers whose hidden states ``[B, T, D]`` are returned.
    qkv: the blocks (1..L) whose attention inputs are returned: ``q [B, T,
      H, K]``, ``k`` and ``v [B, T, G, K]`` (G key/value heads), as the
      block's attention uses them (after q/k norms and RoPE).
  """

  hidden: tuple[int, ...] = ()
  qkv: tuple[int, ...] = ()


class Intermediates(NamedTuple):
  """What :class:`Taps` asked for: ``hidden[l]`` and ``qkv[l] = (q, k, v)``."""

  hidden: dict[int, Array]
  qkv: dict[int, tuple[Array, Array, Array]]


class CausalLM(nnx.Module):
  """The forward pass shared by every family.

  Subclasses set ``self.config`` (with ``dtype``, ``remat``), ``self.blocks``
  (an ``nnx.List`` of blocks ``block(x, ctx, kv, qkv=False) -> (x, kv)``,
  ``(x, kv, (q, k, v))`` when ``qkv``) and implement ``embed(ids,
  positions)``, ``final_norm(x)``, ``head_weight()`` and ``kv_shape()``
  (``(G, K)``).
  """

  LOGICAL_AXES: tuple = ()

  def _block(self, block, x, ctx, qkv: bool):
    """One block without a cache (rematerialised under ``config.remat``):
    ``(x, (q, k, v))`` when ``qkv``, else ``(x, None)``."""
    policy = self.config.remat
    if policy not in REMAT_POLICIES:
      raise ValueError(
          f"remat={policy!r} is not one of " f"{sorted(REMAT_POLICIES)}."
      )
    run = lambda b, x, c: (lambda out: (out[0], out[2] if qkv else None))(
        b(x, c, None, qkv=qkv)
    )
    if policy == "none":
      return run(block, x, ctx)
    return nnx.remat(run, policy=REMAT_POLICIES[policy])(block, x, ctx)

  def _forward(
      self,
      input_ids_BxT,
      positions_BxT,
      attention_mask_BxT,
      cache,
      taps: Taps = Taps(),
  ):
    ctx, new_valid = context(
        attention_mask_BxT, positions_BxT, cache, input_ids_BxT.shape
    )
    residual = ("batch", None, None)  # logical axes of the residual stream
    x = sharding.constrain(
        self.embed(input_ids_BxT, ctx.positions_BxT), residual
    )
    new_k, new_v = [], []
    out = Intermediates({}, {})
    if 0 in taps.hidden:
      out.hidden[0] = x
    for i, block in enumerate(self.blocks, start=1):
      if cache is None:
        x, qkv = self._block(block, x, ctx, i in taps.qkv)
        if qkv is not None:
          out.qkv[i] = qkv
      else:
        x, (k, v) = block(x, ctx, (cache.k[i - 1], cache.v[i - 1]))
        new_k.append(k)
        new_v.append(v)
      x = sharding.constrain(x, residual)
      if i in taps.hidden:
        out.hidden[i] = x
    h = self.final_norm(x)
    if cache is None:
      return h, (out if taps != Taps() else None)
    T = input_ids_BxT.shape[1]
    return h, KVCache(tuple(new_k), tuple(new_v), new_valid, cache.index + T)

  def hidden_states(
      self,
      input_ids_BxT: Array,
      positions: Array | None = None,
      attention_mask: Array | None = None,
  ) -> Array:
    """Final-norm hidden states ``[B, T, D]`` (the LM head's input)."""
    return self._forward(input_ids_BxT, positions, attention_mask, None)[0]

  def intermediates(
      self,
      input_ids_BxT: Array,
      positions: Array | None = None,
      attention_mask: Array | None = None,
      *,
      taps: Taps,
  ) -> tuple[Array, Intermediates]:
    """Final-norm hidden states ``[B, T, D]`` and the ``taps``, one forward.

    The pass is :meth:`hidden_states`'s; the tapped values are ones it
    computes anyway, so with ``Taps()`` the program is the same. What a tap
    costs is keeping its values alive until the loss that reads them: per
    hidden layer ``B·T·D`` values of the compute dtype, per ``qkv`` block
    ``B·T·(H + 2G)·K`` (under a gradient they are residuals of the
    backward pass already, unless ``remat`` recomputes them).
    """
    if any(not 0 <= l <= len(self.blocks) for l in taps.hidden) or any(
        not 1 <= l <= len(self.blocks) for l in taps.qkv
    ):
      raise ValueError(
          f"taps {taps} name layers outside this model's "
          f"{len(self.blocks)} blocks; hidden layers are 0..L and qkv "
          "blocks 1..L."
      )
    h, out = self._forward(input_ids_BxT, positions, attention_mask, None, taps)
    return h, out if out is not None else Intermediates({}, {})

  def logits_map(self) -> Callable[[Array], Array] | None:
    """The map from ``h W^T`` to the logits, or None for the identity.

    ``c tanh(z / c)`` where the config sets ``final_logit_softcapping = c``
    (Gemma 2). Every path that makes logits from :meth:`hidden_states` and
    :meth:`head_weight` applies it (:meth:`lm_head`, the fused loss).
    """
    cap = getattr(self.config, "final_logit_softcapping", None)
    return None if cap is None else functools.partial(softcap, cap=cap)

  def lm_head(self, h_BxTxD: Array) -> Array:
    """Logits ``h W^T`` (then :meth:`logits_map`), float32 accumulation and
    output in any dtype."""
    dtype = self.config.dtype
    z = jnp.einsum(
        "...d,vd->...v",
        h_BxTxD.astype(dtype),
        self.head_weight().astype(dtype),
        preferred_element_type=jnp.float32,
    )
    logits_map = self.logits_map()
    return z if logits_map is None else logits_map(z)

  def __call__(
      self,
      input_ids_BxT: Array,
      positions: Array | None = None,
      attention_mask: Array | None = None,
  ) -> Array:
    """Logits ``[B, T, V]`` in float32."""
    return self.lm_head(
        self.hidden_states(input_ids_BxT, positions, attention_mask)
    )

  def init_cache(self, batch: int, max_len: int, dtype=None) -> KVCache:
    """An empty cache for ``batch`` rows of up to ``max_len`` tokens."""
    G, K = self.kv_shape()
    dtype = dtype or self.config.dtype
    z = lambda: jnp.zeros((batch, max_len, G, K), dtype)
    n = len(self.blocks)
    return KVCache(
        tuple(z() for _ in range(n)),
        tuple(z() for _ in range(n)),
        jnp.zeros((batch, max_len), bool),
        jnp.array(0, jnp.int32),
    )

  def decode(
      self,
      input_ids_BxT: Array,
      cache: KVCache,
      positions: Array | None = None,
      attention_mask: Array | None = None,
  ) -> tuple[Array, KVCache]:
    """Runs T new tokens against ``cache``; returns their logits and the cache."""
    h, cache = self._forward(input_ids_BxT, positions, attention_mask, cache)
    return self.lm_head(h), cache
