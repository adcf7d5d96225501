"""LLaMA-style decoders in Flax NNX, laid out like their HF checkpoints.

One model serves LLaMA 2/3, Mistral, Qwen2/2.5, Qwen3, Gemma 2 and Gemma 3
(text): pre-norm blocks with RMSNorm, rotary position embedding (HF
rotate-half layout, ``rope_theta`` and optional ``rope_scaling``),
grouped-query attention, a gated MLP ``down(act(gate(x)) * up(x))`` and a
head ``lm_head [V, D]`` (tied when ``tie_word_embeddings``). What the
transformers ``model_type`` fixes is a :class:`Family`; what a checkpoint
chooses is an option field of :class:`LlamaConfig`:

* ``llama``: the block above; ``attention_bias`` puts biases on q/k/v/o.
* ``mistral``: ``sliding_window`` on every layer.
* ``qwen2``: q/k/v biases (none on o); a window on the ``layer_types``
  marked ``sliding_attention``.
* ``qwen3``: an RMSNorm over ``head_dim`` on every query and key head,
  before RoPE.
* ``gemma2``: embeddings times ``sqrt(D)``, RMSNorm scale ``1 + w``, norms
  after attention and after the MLP too, GeGLU (``gelu_pytorch_tanh``),
  attention scale ``query_pre_attn_scalar^-1/2``, attention-logit and
  final-logit soft-capping ``c tanh(z / c)``, sliding and global layers
  alternating.
* ``gemma3_text``: ``gemma2`` plus q/k norms, RoPE base
  ``rope_local_theta`` on sliding layers (``rope_theta`` and
  ``rope_scaling`` on global ones), five sliding layers per global one, no
  attention soft-capping.

Names follow HF; ``hf.py`` transposes torch ``nn.Linear`` weights
``(out, in)`` into NNX kernels ``(in, out)``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp

from kdjax.models import layers

SLIDING, FULL = "sliding_attention", "full_attention"

ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
}


@dataclasses.dataclass(frozen=True)
class Family:
  """What a transformers ``model_type`` fixes about the decoder."""

  architecture: str  # the transformers class (config.json "architectures")
  hidden_act: str = "silu"  # the MLP activation unless the config names one
  qkv_bias: bool = False  # q/k/v biases whatever ``attention_bias`` says
  qk_norm: bool = False  # RMSNorm over head_dim on q and k, before RoPE
  unit_offset_norms: bool = False  # every RMSNorm scales by 1 + w
  sandwich_norms: bool = False  # norms after attention and MLP as well
  scaled_embeddings: bool = False  # embeddings times sqrt(D), compute dtype
  options: frozenset = frozenset()  # option fields its config.json has


_WINDOWED = frozenset({"sliding_window", "layer_types"})
_GEMMA = dict(
    hidden_act="gelu_pytorch_tanh",
    unit_offset_norms=True,
    sandwich_norms=True,
    scaled_embeddings=True,
)
_GEMMA_OPTIONS = _WINDOWED | {
    "attention_bias",
    "query_pre_attn_scalar",
    "final_logit_softcapping",
}
FAMILIES = {
    "llama": Family("LlamaForCausalLM", options=frozenset({"attention_bias"})),
    "mistral": Family(
        "MistralForCausalLM", options=frozenset({"sliding_window"})
    ),
    "qwen2": Family("Qwen2ForCausalLM", qkv_bias=True, options=_WINDOWED),
    "qwen3": Family(
        "Qwen3ForCausalLM",
        qk_norm=True,
        options=_WINDOWED | {"attention_bias"},
    ),
    "gemma2": Family(
        "Gemma2ForCausalLM",
        **_GEMMA,
        options=_GEMMA_OPTIONS | {"attn_logit_softcapping"},
    ),
    "gemma3_text": Family(
        "Gemma3ForCausalLM",
        **_GEMMA,
        qk_norm=True,
        options=_GEMMA_OPTIONS | {"rope_local_theta"},
    ),
}

# The option fields of LlamaConfig: at their default unless the family
# lists them in Family.options.
OPTIONS = (
    "attention_bias",
    "sliding_window",
    "layer_types",
    "query_pre_attn_scalar",
    "attn_logit_softcapping",
    "final_logit_softcapping",
    "rope_local_theta",
)


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """A LLaMA-style decoder; field names are transformers' where it has them.

  ``model_type`` picks the :data:`FAMILIES` entry; the option fields from
  ``attention_bias`` on may differ from their defaults only where the family
  has them (``Family.options``).
  """

  vocab_size: int = 32000
  hidden_size: int = 4096
  intermediate_size: int = 11008
  num_hidden_layers: int = 32
  num_attention_heads: int = 32
  num_key_value_heads: int = 32
  head_dim: int | None = None  # None: hidden_size // num_attention_heads
  max_position_embeddings: int = 2048
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_scaling: tuple | None = None  # sorted (key, value) items of the HF dict
  tie_word_embeddings: bool = False
  bos_token_id: int | None = 1
  eos_token_id: int | None = 2
  model_type: str = "llama"
  hidden_act: str | None = None  # None: the family's
  # Option fields (see OPTIONS).
  attention_bias: bool = False  # biases on q/k/v/o (HF ``attention_bias``)
  sliding_window: int | None = None  # a query sees the last W key slots
  # Per layer "sliding_attention" (windowed) or "full_attention"; None:
  # every layer is windowed when sliding_window is set.
  layer_types: tuple[str, ...] | None = None
  query_pre_attn_scalar: float | None = None  # scale^-1/2; None: head_dim
  attn_logit_softcapping: float | None = None
  final_logit_softcapping: float | None = None
  rope_local_theta: float | None = None  # RoPE base of sliding layers
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  remat: str = "none"

  def __post_init__(self):
    # Resolved here so equal models have equal configs.
    if self.head_dim is None:
      object.__setattr__(
          self, "head_dim", self.hidden_size // self.num_attention_heads
      )
    if self.layer_types is not None:  # a list from JSON: hashable tuple
      object.__setattr__(self, "layer_types", tuple(self.layer_types))
    _check(self)

  @property
  def kv_head_dim(self) -> int:
    return self.head_dim

  @property
  def family(self) -> Family:
    return FAMILIES[self.model_type]

  @property
  def activation(self) -> str:
    return self.hidden_act or self.family.hidden_act

  def window(self, layer: int) -> int | None:
    """The sliding window of ``layer``, or None (global attention)."""
    if self.layer_types is None or self.layer_types[layer] == SLIDING:
      return self.sliding_window
    return None

  def rope(self, layer: int) -> tuple[float, tuple | None]:
    """``(theta, scaling)`` of ``layer``'s rotary embedding."""
    if self.rope_local_theta is not None and self.window(layer) is not None:
      return self.rope_local_theta, None
    return self.rope_theta, self.rope_scaling


def _check(cfg: LlamaConfig) -> None:
  """Raises one sentence on the first field that does not fit."""
  if cfg.model_type not in FAMILIES:
    raise ValueError(
        f"model_type={cfg.model_type!r} is not a LLaMA-style family; use "
        f"one of {sorted(FAMILIES)}."
    )
  defaults = {f.name: f.default for f in dataclasses.fields(LlamaConfig)}
  for name in OPTIONS:
    value = getattr(cfg, name)
    if value != defaults[name] and name not in cfg.family.options:
      having = sorted(t for t, f in FAMILIES.items() if name in f.options)
      raise ValueError(
          f"{name}={value!r} is not part of model_type={cfg.model_type!r} "
          f"({cfg.family.architecture} has no such field); leave it at "
          f"{defaults[name]!r} or use a model_type that has it: {having}."
      )
  if cfg.activation not in ACTIVATIONS:
    raise ValueError(
        f"hidden_act={cfg.activation!r} is not supported; use one of "
        f"{sorted(ACTIVATIONS)}."
    )
  types = cfg.layer_types
  if types is not None and (
      len(types) != cfg.num_hidden_layers or set(types) - {SLIDING, FULL}
  ):
    raise ValueError(
        f"layer_types={list(types)} must give each of the "
        f"{cfg.num_hidden_layers} layers {SLIDING!r} or {FULL!r}."
    )
  if types is not None and SLIDING in types and cfg.sliding_window is None:
    raise ValueError(
        "layer_types has sliding_attention layers but sliding_window is "
        "None; set the window size."
    )
  kind = dict(cfg.rope_scaling or ()).get("rope_type", "default")
  if kind not in layers.ROPE_TYPES:
    raise ValueError(
        f"rope_scaling type {kind!r} is not supported; use one of "
        f"{layers.ROPE_TYPES}."
    )
  H, G = cfg.num_attention_heads, cfg.num_key_value_heads
  if H % G:
    raise ValueError(
        f"num_attention_heads={H} is not a multiple of "
        f"num_key_value_heads={G}."
    )


_TINY = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)
_TINY_GEMMA = dict(
    _TINY,
    head_dim=16,
    query_pre_attn_scalar=16,
    sliding_window=8,
    tie_word_embeddings=True,
)
# Published config.json values of the real checkpoints (hub ids in the
# comments); the tests count their parameters against transformers.
_LLAMA3_ROPE = (
    ("high_freq_factor", 4.0),
    ("low_freq_factor", 1.0),
    ("original_max_position_embeddings", 8192),
    ("rope_type", "llama3"),
)
_LLAMA3 = dict(
    vocab_size=128256,
    num_key_value_heads=8,
    max_position_embeddings=131072,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    bos_token_id=128000,
    eos_token_id=128001,
)
_QWEN3 = dict(
    model_type="qwen3",
    vocab_size=151936,
    head_dim=128,
    num_key_value_heads=8,
    max_position_embeddings=40960,
    rope_theta=1000000.0,
    num_hidden_layers=28,
    num_attention_heads=16,
    bos_token_id=151643,
    eos_token_id=151645,
)
_GEMMA3 = dict(
    model_type="gemma3_text",
    head_dim=256,
    query_pre_attn_scalar=256,
    rope_theta=1000000.0,
    rope_local_theta=10000.0,
    tie_word_embeddings=True,
    bos_token_id=2,
    eos_token_id=1,
)


def periodic_layer_types(n_layers: int, period: int) -> tuple[str, ...]:
  """Every ``period``-th layer global, the others sliding: Gemma 2's rule
  with period 2, Gemma 3's ``sliding_window_pattern`` (6)."""
  return tuple(
      FULL if (i + 1) % period == 0 else SLIDING for i in range(n_layers)
  )


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
    # meta-llama/Llama-3.2-1B
    "llama-3.2-1b": dict(
        _LLAMA3,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        head_dim=64,
        rope_scaling=tuple(sorted(_LLAMA3_ROPE + (("factor", 32.0),))),
        tie_word_embeddings=True,
    ),
    # meta-llama/Llama-3.1-8B
    "llama-3.1-8b": dict(
        _LLAMA3,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        rope_scaling=tuple(sorted(_LLAMA3_ROPE + (("factor", 8.0),))),
    ),
    # Qwen/Qwen3-0.6B, Qwen/Qwen3-1.7B, Qwen/Qwen3-8B
    "qwen3-0.6b": dict(
        _QWEN3,
        hidden_size=1024,
        intermediate_size=3072,
        tie_word_embeddings=True,
    ),
    "qwen3-1.7b": dict(
        _QWEN3,
        hidden_size=2048,
        intermediate_size=6144,
        tie_word_embeddings=True,
    ),
    "qwen3-8b": dict(
        _QWEN3,
        hidden_size=4096,
        intermediate_size=12288,
        num_hidden_layers=36,
        num_attention_heads=32,
    ),
    # google/gemma-3-1b-pt
    "gemma-3-1b": dict(
        _GEMMA3,
        vocab_size=262144,
        hidden_size=1152,
        intermediate_size=6912,
        num_hidden_layers=26,
        num_attention_heads=4,
        num_key_value_heads=1,
        max_position_embeddings=32768,
        sliding_window=512,
        layer_types=periodic_layer_types(26, 6),
    ),
    # google/gemma-3-12b-pt (its text_config)
    "gemma-3-12b": dict(
        _GEMMA3,
        vocab_size=262208,
        hidden_size=3840,
        intermediate_size=15360,
        num_hidden_layers=48,
        num_attention_heads=16,
        num_key_value_heads=8,
        max_position_embeddings=131072,
        sliding_window=1024,
        layer_types=periodic_layer_types(48, 6),
        rope_scaling=(("factor", 8.0), ("rope_type", "linear")),
    ),
    "tiny-llama": dict(_TINY, rms_norm_eps=1e-5),
    "tiny-mistral": dict(_TINY, model_type="mistral", sliding_window=8),
    "tiny-qwen2": dict(
        _TINY,
        model_type="qwen2",
        sliding_window=8,
        layer_types=(FULL, SLIDING),
        tie_word_embeddings=True,
    ),
    "tiny-qwen3": dict(_TINY, model_type="qwen3", head_dim=32),
    "tiny-gemma2": dict(
        _TINY_GEMMA,
        model_type="gemma2",
        layer_types=(SLIDING, FULL),
        attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0,
    ),
    "tiny-gemma3": dict(
        _TINY_GEMMA,
        model_type="gemma3_text",
        layer_types=(SLIDING, FULL),
        rope_theta=1000000.0,
        rope_local_theta=10000.0,
    ),
}


def _linear(cfg, n_in, n_out, rngs, bias=False):
  return nnx.Linear(
      n_in,
      n_out,
      use_bias=bias,
      dtype=cfg.dtype,
      param_dtype=cfg.param_dtype,
      rngs=rngs,
  )


def _rms_norm(cfg, dim=None):
  return layers.RMSNorm(
      dim or cfg.hidden_size,
      cfg.rms_norm_eps,
      unit_offset=cfg.family.unit_offset_norms,
      dtype=cfg.dtype,
      param_dtype=cfg.param_dtype,
  )


class Attention(nnx.Module):

  def __init__(self, cfg: LlamaConfig, layer: int, rngs: nnx.Rngs):
    H, G, K, D = (
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.kv_head_dim,
        cfg.hidden_size,
    )
    qkv_bias = cfg.family.qkv_bias or cfg.attention_bias
    self.shape = (H, G, K)
    self.q_proj = _linear(cfg, D, H * K, rngs, qkv_bias)
    self.k_proj = _linear(cfg, D, G * K, rngs, qkv_bias)
    self.v_proj = _linear(cfg, D, G * K, rngs, qkv_bias)
    self.o_proj = _linear(cfg, H * K, D, rngs, cfg.attention_bias)
    if cfg.family.qk_norm:
      self.q_norm = _rms_norm(cfg, K)
      self.k_norm = _rms_norm(cfg, K)
    theta, scaling = cfg.rope(layer)
    self.rope = (K, theta, scaling)
    scalar = cfg.query_pre_attn_scalar
    self.window = cfg.window(layer)
    self.scale = None if scalar is None else 1.0 / math.sqrt(scalar)
    self.cap = cfg.attn_logit_softcapping

  def _heads(self, proj, norm, x_BxTxD, n, ctx, inv_freq):
    B, T, _ = x_BxTxD.shape
    h = proj(x_BxTxD).reshape(B, T, n, self.shape[2])
    if norm is not None:
      h = norm(h)
    return layers.rope(h, ctx.positions_BxT, inv_freq)

  def __call__(self, x_BxTxD, ctx: layers.Context, kv, *, qkv=False):
    """``(out, kv)``, plus this layer's ``(q, k, v)`` heads when ``qkv``
    (q and k after their norms and RoPE)."""
    B, T, _ = x_BxTxD.shape
    H, G, K = self.shape
    K_, theta, scaling = self.rope  # a constant XLA folds
    inv_freq = layers.rope_inv_freq(K_, theta, dict(scaling or ()))
    norms = getattr(self, "q_norm", None), getattr(self, "k_norm", None)
    q = self._heads(self.q_proj, norms[0], x_BxTxD, H, ctx, inv_freq)
    k = self._heads(self.k_proj, norms[1], x_BxTxD, G, ctx, inv_freq)
    v = self.v_proj(x_BxTxD).reshape(B, T, G, K)
    out, kv = layers.cached_attention(
        q, k, v, ctx, kv, window=self.window, scale=self.scale, cap=self.cap
    )
    out = self.o_proj(out.reshape(B, T, H * K))
    return (out, kv, (q, k, v)) if qkv else (out, kv)


class MLP(nnx.Module):

  def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs):
    D, F = cfg.hidden_size, cfg.intermediate_size
    self.gate_proj = _linear(cfg, D, F, rngs)
    self.up_proj = _linear(cfg, D, F, rngs)
    self.down_proj = _linear(cfg, F, D, rngs)
    self.activation = cfg.activation

  def __call__(self, x):
    act = ACTIVATIONS[self.activation]
    return self.down_proj(act(self.gate_proj(x)) * self.up_proj(x))


class Block(nnx.Module):
  """``x + attn(norm(x))``, ``x + mlp(norm(x))``; with sandwich norms (Gemma)
  each sublayer's output is normed too before the residual add."""

  def __init__(self, cfg: LlamaConfig, layer: int, rngs: nnx.Rngs):
    self.input_layernorm = _rms_norm(cfg)
    self.self_attn = Attention(cfg, layer, rngs)
    # LLaMA: the MLP's input norm; Gemma: the attention output's norm.
    self.post_attention_layernorm = _rms_norm(cfg)
    self.sandwich = cfg.family.sandwich_norms
    if self.sandwich:
      self.pre_feedforward_layernorm = _rms_norm(cfg)
      self.post_feedforward_layernorm = _rms_norm(cfg)
    self.mlp = MLP(cfg, rngs)

  def __call__(self, x, ctx, kv, *, qkv=False):
    """``(x, kv)``, plus the attention's ``(q, k, v)`` when ``qkv``."""
    a, kv, *taps = self.self_attn(self.input_layernorm(x), ctx, kv, qkv=qkv)
    if not self.sandwich:
      x = x + a
      return (x + self.mlp(self.post_attention_layernorm(x)), kv, *taps)
    x = x + self.post_attention_layernorm(a)
    m = self.mlp(self.pre_feedforward_layernorm(x))
    return (x + self.post_feedforward_layernorm(m), kv, *taps)


class Llama(layers.CausalLM):
  """A LLaMA-style language model; see :class:`layers.CausalLM` for the API."""

  LOGICAL_AXES = (
      (r"embed_tokens/embedding", ("vocab", "embed")),
      (r"head", ("vocab", "embed")),
      (r"layers/\d+/self_attn/q_proj/kernel", ("embed", "heads")),
      (r"layers/\d+/self_attn/q_proj/bias", ("heads",)),
      (r"layers/\d+/self_attn/[kv]_proj/kernel", ("embed", "kv_heads")),
      (r"layers/\d+/self_attn/[kv]_proj/bias", ("kv_heads",)),
      (r"layers/\d+/self_attn/o_proj/kernel", ("heads", "embed")),
      (r"layers/\d+/self_attn/o_proj/bias", ("norm",)),
      (r"layers/\d+/mlp/(gate|up)_proj/kernel", ("embed", "mlp")),
      (r"layers/\d+/mlp/down_proj/kernel", ("mlp", "embed")),
      # Norm scales (hidden size, or head_dim for q/k norms): replicated.
      (r"(layers/\d+/(self_attn/)?)?[a-z_]*norm/scale", ("norm",)),
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
        [Block(config, i, rngs) for i in range(config.num_hidden_layers)]
    )
    self.norm = _rms_norm(config)
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
    x = self.embed_tokens(input_ids_BxT)
    if self.config.family.scaled_embeddings:
      # sqrt(D) rounded to the compute dtype, as transformers does.
      x = x * jnp.asarray(math.sqrt(self.config.hidden_size), x.dtype)
    return x

  def final_norm(self, x):
    return self.norm(x)

  def head_weight(self):
    """The head ``[V, D]`` (HF ``lm_head.weight``; the embedding when tied)."""
    if self.config.tie_word_embeddings:
      return self.embed_tokens.embedding[...]
    return self.head[...]

  def kv_shape(self):
    return self.config.num_key_value_heads, self.config.kv_head_dim
