"""LLaMA (and TinyLLaMA) in Flax NNX, laid out like the Hugging Face checkpoint.

Pre-norm blocks with RMSNorm, rotary position embedding (HF rotate-half
layout, ``rope_theta`` and optional ``rope_scaling``), grouped-query attention
without biases, a SwiGLU MLP ``down(silu(gate(x)) * up(x))`` and an untied
head ``lm_head [V, D]`` (tied when ``tie_word_embeddings``). Names follow HF;
``hf.py`` transposes torch ``nn.Linear`` weights ``(out, in)`` into NNX
kernels ``(in, out)``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp

from kdjax.models import layers


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  vocab_size: int = 32000
  hidden_size: int = 4096
  intermediate_size: int = 11008
  num_hidden_layers: int = 32
  num_attention_heads: int = 32
  num_key_value_heads: int = 32
  head_dim: int | None = None  # default hidden_size // num_attention_heads
  max_position_embeddings: int = 2048
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_scaling: tuple | None = None  # sorted (key, value) items of the HF dict
  tie_word_embeddings: bool = False
  bos_token_id: int = 1
  eos_token_id: int = 2
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  remat: str = "none"

  @property
  def kv_head_dim(self) -> int:
    return self.head_dim or self.hidden_size // self.num_attention_heads


PRESETS = {
    "llama-7b": dict(),
    "tinyllama-1.1b": dict(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        rms_norm_eps=1e-5,
    ),
    "tiny-llama": dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
    ),
}


def _linear(cfg, n_in, n_out, rngs):
  return nnx.Linear(
      n_in,
      n_out,
      use_bias=False,
      dtype=cfg.dtype,
      param_dtype=cfg.param_dtype,
      rngs=rngs,
  )


def _rms_norm(cfg, rngs):
  return nnx.RMSNorm(
      cfg.hidden_size,
      epsilon=cfg.rms_norm_eps,
      dtype=cfg.dtype,
      param_dtype=cfg.param_dtype,
      rngs=rngs,
  )


class Attention(nnx.Module):

  def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs):
    H, G, K, D = (
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.kv_head_dim,
        cfg.hidden_size,
    )
    if H % G:
      raise ValueError(
          f"num_attention_heads={H} is not a multiple of "
          f"num_key_value_heads={G}."
      )
    self.shape = (H, G, K)
    self.q_proj = _linear(cfg, D, H * K, rngs)
    self.k_proj = _linear(cfg, D, G * K, rngs)
    self.v_proj = _linear(cfg, D, G * K, rngs)
    self.o_proj = _linear(cfg, H * K, D, rngs)
    self.rope = (K, cfg.rope_theta, cfg.rope_scaling)

  def __call__(self, x_BxTxD, ctx: layers.Context, kv):
    B, T, _ = x_BxTxD.shape
    H, G, K = self.shape
    K_, theta, scaling = self.rope  # a constant XLA folds
    inv_freq = layers.rope_inv_freq(K_, theta, dict(scaling or ()))
    q = layers.rope(
        self.q_proj(x_BxTxD).reshape(B, T, H, K), ctx.positions_BxT, inv_freq
    )
    k = layers.rope(
        self.k_proj(x_BxTxD).reshape(B, T, G, K), ctx.positions_BxT, inv_freq
    )
    v = self.v_proj(x_BxTxD).reshape(B, T, G, K)
    out, kv = layers.cached_attention(q, k, v, ctx, kv)
    return self.o_proj(out.reshape(B, T, H * K)), kv


class MLP(nnx.Module):

  def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs):
    D, F = cfg.hidden_size, cfg.intermediate_size
    self.gate_proj = _linear(cfg, D, F, rngs)
    self.up_proj = _linear(cfg, D, F, rngs)
    self.down_proj = _linear(cfg, F, D, rngs)

  def __call__(self, x):
    return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nnx.Module):

  def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs):
    self.input_layernorm = _rms_norm(cfg, rngs)
    self.self_attn = Attention(cfg, rngs)
    self.post_attention_layernorm = _rms_norm(cfg, rngs)
    self.mlp = MLP(cfg, rngs)

  def __call__(self, x, ctx, kv):
    a, kv = self.self_attn(self.input_layernorm(x), ctx, kv)
    x = x + a
    return x + self.mlp(self.post_attention_layernorm(x)), kv


class Llama(layers.CausalLM):
  """LLaMA language model; see :class:`layers.CausalLM` for the call API."""

  LOGICAL_AXES = (
      (r"embed_tokens/embedding", ("vocab", "embed")),
      (r"head", ("vocab", "embed")),
      (r"layers/\d+/self_attn/q_proj/kernel", ("embed", "heads")),
      (r"layers/\d+/self_attn/[kv]_proj/kernel", ("embed", "kv_heads")),
      (r"layers/\d+/self_attn/o_proj/kernel", ("heads", "embed")),
      (r"layers/\d+/mlp/(gate|up)_proj/kernel", ("embed", "mlp")),
      (r"layers/\d+/mlp/down_proj/kernel", ("mlp", "embed")),
  )

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    self.config = config
    init = nnx.initializers.normal(0.02)
    self.embed_tokens = nnx.Embed(
        config.vocab_size,
        config.hidden_size,
        embedding_init=init,
        dtype=config.dtype,
        param_dtype=config.param_dtype,
        rngs=rngs,
    )
    self.layers = nnx.List(
        [Block(config, rngs) for _ in range(config.num_hidden_layers)]
    )
    self.norm = _rms_norm(config, rngs)
    if not config.tie_word_embeddings:
      # Not "lm_head": that name is the CausalLM method h -> logits.
      self.head = nnx.Param(
          init(
              rngs.params(),
              (config.vocab_size, config.hidden_size),
              config.param_dtype,
          )
      )

  @property
  def blocks(self):
    return self.layers

  def embed(self, input_ids_BxT, positions_BxT):
    del positions_BxT  # positions enter through RoPE
    return self.embed_tokens(input_ids_BxT)

  def final_norm(self, x):
    return self.norm(x)

  def head_weight(self):
    """The head ``[V, D]`` (HF ``lm_head.weight``; the embedding when tied)."""
    if self.config.tie_word_embeddings:
      return self.embed_tokens.embedding[...]
    return self.head[...]

  def kv_shape(self):
    return self.config.num_key_value_heads, self.config.kv_head_dim
