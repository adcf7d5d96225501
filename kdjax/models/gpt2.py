"""GPT-2 in Flax NNX, laid out like the Hugging Face checkpoint.

Pre-LN blocks ``x + attn(ln_1(x))``, ``x + mlp(ln_2(x))``, a final ``ln_f``,
learned position embeddings, LayerNorm epsilon 1e-5, tanh GELU, biases
everywhere and a head tied to the token embedding (``logits = h wte^T``).
Parameter names follow HF (``wte``, ``h.{i}.attn.c_attn``, ...) so the
checkpoint map in ``hf.py`` is one-to-one; Conv1D weights are already
``(in, out)``, an ``nnx.Linear`` kernel.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp

from kdjax.models import layers


@dataclasses.dataclass(frozen=True)
class GPT2Config:
  vocab_size: int = 50257
  n_positions: int = 1024
  n_embd: int = 768
  n_layer: int = 12
  n_head: int = 12
  layer_norm_epsilon: float = 1e-5
  embd_pdrop: float = 0.1
  attn_pdrop: float = 0.1
  resid_pdrop: float = 0.1
  bos_token_id: int = 50256
  eos_token_id: int = 50256
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  remat: str = "none"


PRESETS = {
    "gpt2": dict(n_embd=768, n_layer=12, n_head=12),
    "gpt2-medium": dict(n_embd=1024, n_layer=24, n_head=16),
    "gpt2-large": dict(n_embd=1280, n_layer=36, n_head=20),
    "gpt2-xl": dict(n_embd=1600, n_layer=48, n_head=25),
    "tiny-gpt2": dict(n_embd=64, n_layer=2, n_head=4, n_positions=512),
}


class Attention(nnx.Module):

  def __init__(self, cfg: GPT2Config, rngs: nnx.Rngs):
    D = cfg.n_embd
    kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
    self.n_head = cfg.n_head
    self.c_attn = nnx.Linear(D, 3 * D, **kw)
    self.c_proj = nnx.Linear(D, D, **kw)
    self.attn_dropout = nnx.Dropout(cfg.attn_pdrop, rngs=rngs)
    self.resid_dropout = nnx.Dropout(cfg.resid_pdrop, rngs=rngs)

  def __call__(self, x_BxTxD, ctx: layers.Context, kv, *, qkv=False):
    """``(out, kv)``, plus this layer's ``(q, k, v)`` heads when ``qkv``."""
    B, T, D = x_BxTxD.shape
    heads = self.c_attn(x_BxTxD).reshape(B, T, 3, self.n_head, D // self.n_head)
    q, k, v = heads[:, :, 0], heads[:, :, 1], heads[:, :, 2]
    out, kv = layers.cached_attention(q, k, v, ctx, kv, self.attn_dropout)
    out = self.resid_dropout(self.c_proj(out.reshape(B, T, D)))
    return (out, kv, (q, k, v)) if qkv else (out, kv)


class MLP(nnx.Module):

  def __init__(self, cfg: GPT2Config, rngs: nnx.Rngs):
    D = cfg.n_embd
    kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
    self.c_fc = nnx.Linear(D, 4 * D, **kw)
    self.c_proj = nnx.Linear(4 * D, D, **kw)
    self.dropout = nnx.Dropout(cfg.resid_pdrop, rngs=rngs)

  def __call__(self, x):
    # HF "gelu_new" is the tanh approximation.
    return self.dropout(
        self.c_proj(jax.nn.gelu(self.c_fc(x), approximate=True))
    )


class Block(nnx.Module):

  def __init__(self, cfg: GPT2Config, rngs: nnx.Rngs):
    kw = dict(
        epsilon=cfg.layer_norm_epsilon,
        dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
        rngs=rngs,
    )
    self.ln_1 = nnx.LayerNorm(cfg.n_embd, **kw)
    self.attn = Attention(cfg, rngs)
    self.ln_2 = nnx.LayerNorm(cfg.n_embd, **kw)
    self.mlp = MLP(cfg, rngs)

  def __call__(self, x, ctx, kv, *, qkv=False):
    """``(x, kv)``, plus the attention's ``(q, k, v)`` when ``qkv``."""
    a, kv, *taps = self.attn(self.ln_1(x), ctx, kv, qkv=qkv)
    x = x + a
    return (x + self.mlp(self.ln_2(x)), kv, *taps)


class GPT2(layers.CausalLM):
  """GPT-2 language model; see :class:`layers.CausalLM` for the call API."""

  LOGICAL_AXES = (
      (r"wte/embedding", ("vocab", "embed")),
      (r"wpe/embedding", ("pos", "embed")),
      (r"h/\d+/attn/c_attn/kernel", ("embed", "heads")),
      (r"h/\d+/attn/c_attn/bias", ("heads",)),
      (r"h/\d+/attn/c_proj/kernel", ("heads", "embed")),
      (r"h/\d+/mlp/c_fc/kernel", ("embed", "mlp")),
      (r"h/\d+/mlp/c_fc/bias", ("mlp",)),
      (r"h/\d+/mlp/c_proj/kernel", ("mlp", "embed")),
  )

  def __init__(self, config: GPT2Config, *, rngs: nnx.Rngs):
    if config.n_embd % config.n_head:
      raise ValueError(
          f"n_embd={config.n_embd} is not divisible by "
          f"n_head={config.n_head}."
      )
    self.config = config
    kw = dict(dtype=config.dtype, param_dtype=config.param_dtype, rngs=rngs)
    init = nnx.initializers.normal(0.02)
    self.wte = nnx.Embed(
        config.vocab_size, config.n_embd, embedding_init=init, **kw
    )
    self.wpe = nnx.Embed(
        config.n_positions,
        config.n_embd,
        embedding_init=nnx.initializers.normal(0.01),
        **kw,
    )
    self.drop = nnx.Dropout(config.embd_pdrop, rngs=rngs)
    self.h = nnx.List([Block(config, rngs) for _ in range(config.n_layer)])
    self.ln_f = nnx.LayerNorm(
        config.n_embd,
        epsilon=config.layer_norm_epsilon,
        dtype=config.dtype,
        param_dtype=config.param_dtype,
        rngs=rngs,
    )

  @property
  def blocks(self):
    return self.h

  def embed(self, input_ids_BxT, positions_BxT):
    return self.drop(self.wte(input_ids_BxT) + self.wpe(positions_BxT))

  def final_norm(self, x):
    return self.ln_f(x)

  def head_weight(self):
    """The tied head ``[V, D]``: the token embedding."""
    return self.wte.embedding[...]

  def kv_shape(self):
    return self.config.n_head, self.config.n_embd // self.config.n_head
