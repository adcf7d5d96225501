"""Hugging Face checkpoints in and out: config.json and safetensors key maps.

Loading streams one tensor at a time (``safetensors.safe_open``) straight onto
its target sharding, so a 1.5B/7B model never sits unsharded on one device.
Only safetensors are read (float32, float16 or bfloat16; one file or shards
with ``model.safetensors.index.json``); pickled ``.bin`` checkpoints are
refused. Every problem (unknown key, missing key, wrong shape) is collected
and reported in one error.

``config.json``'s ``model_type`` picks the family: ``gpt2``, or one of the
LLaMA-style families of :data:`kdjax.models.llama.FAMILIES` (``llama``,
``mistral``, ``qwen2``, ``qwen3``, ``gemma2``, ``gemma3_text``; ``gemma3``,
the multimodal checkpoint, gives its language model). Keys a file leaves out
take transformers' defaults (:data:`HF_DEFAULTS`); rope settings are read in
the v5 (``rope_parameters``) and v4 (``rope_theta``, ``rope_scaling``,
``rope_local_base_freq``) forms.

Writing puts everything ``transformers`` needs next to the weights: a
``config.json`` (the family's ``model_type``, ``architectures`` and fields)
whose special-token ids are the tokenizer's (inside the vocabulary),
``generation_config.json`` (EOS stops generation, EOS pads) and the tokenizer
(``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json``),
so ``AutoTokenizer`` + ``AutoModelForCausalLM`` + ``generate`` work on the
directory as written. Paths go through :mod:`kdjax.fs`, so the directory may
be remote (``gs://...``).

Key maps (HF name -> NNX path, transpose?):

* GPT-2: ``[transformer.]wte.weight -> wte/embedding``, ``h.{i}.attn.c_attn.weight
  -> h/i/attn/c_attn/kernel`` (Conv1D is already ``(in, out)``: no transpose),
  causal-mask buffers ``attn.bias``/``attn.masked_bias`` dropped, ``lm_head.weight``
  accepted only when equal to ``wte.weight`` (tied).
* LLaMA-style: ``model.layers.{i}.self_attn.q_proj.weight ->
  layers/i/self_attn/q_proj/kernel`` transposed (torch ``nn.Linear`` is
  ``(out, in)``), its ``bias -> .../bias`` as is, norms' ``weight -> scale``
  (q/k norms ``self_attn.{q,k}_norm``, Gemma's ``pre_/post_feedforward_layernorm``
  too), ``lm_head.weight -> head`` (no transpose: kept ``[V, D]``; when tied,
  accepted only when equal to the embedding), ``rotary_emb.inv_freq`` buffers
  dropped. Gemma 3 multimodal files: ``language_model.model.`` /
  ``model.language_model.`` read as ``model.``, the vision tower and projector
  dropped.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Callable, NamedTuple

from absl import logging
from flax import nnx, traverse_util
import jax
import numpy as np

from kdjax import fs
from kdjax import sharding as shd
from kdjax.models import gpt2, llama, safetensors_check

Path = tuple  # an NNX state path, e.g. ("h", 0, "attn", "c_attn", "kernel")


@dataclasses.dataclass(frozen=True)
class Entry:
  hf_key: str
  path: Path
  transpose: bool = False


# ----------------------------------------------------------------------------
# config.json <-> config dataclasses.


def config_from_hf(cfg: dict, **overrides):
  """Builds a GPT2Config or LlamaConfig from a HF ``config.json`` dict.

  ``model_type`` picks the family; ``gemma3`` (the multimodal checkpoint)
  gives its ``text_config``, the language model.
  """
  kind = cfg.get("model_type")
  if kind == "gpt2":
    fields = {f.name for f in dataclasses.fields(gpt2.GPT2Config)}
    act = cfg.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
      raise ValueError(
          f"GPT-2 activation_function={act!r} is not supported; "
          "kdjax implements gelu_new (tanh GELU)."
      )
    kw = {k: v for k, v in cfg.items() if k in fields and v is not None}
    return gpt2.GPT2Config(**{**kw, **overrides})
  if kind == "gemma3":
    cfg, kind = dict(cfg.get("text_config") or {}), "gemma3_text"
  if kind in llama.FAMILIES:
    return llama.LlamaConfig(**{**_decoder_fields(kind, cfg), **overrides})
  raise ValueError(
      f"config.json model_type={kind!r} is not supported; kdjax loads "
      f"{['gpt2', 'gemma3', *llama.FAMILIES]} checkpoints."
  )


# transformers' defaults (5.x config classes) of the config.json keys
# read here, for files that leave some out (Gemma 3's nested text_config).
_HF_LLAMA = dict(
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    max_position_embeddings=2048,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    tie_word_embeddings=False,
    hidden_act="silu",
    attention_bias=False,
    bos_token_id=1,
    eos_token_id=2,
)
_HF_QWEN = dict(
    _HF_LLAMA,
    vocab_size=151936,
    intermediate_size=22016,
    max_position_embeddings=32768,
    use_sliding_window=False,
    sliding_window=4096,
    max_window_layers=28,
    bos_token_id=None,
    eos_token_id=None,
)
_HF_GEMMA2 = dict(
    vocab_size=256000,
    hidden_size=2304,
    intermediate_size=9216,
    num_hidden_layers=26,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=256,
    max_position_embeddings=8192,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    tie_word_embeddings=True,
    hidden_activation="gelu_pytorch_tanh",
    attention_bias=False,
    sliding_window=4096,
    query_pre_attn_scalar=256,
    attn_logit_softcapping=50.0,
    final_logit_softcapping=30.0,
    bos_token_id=2,
    eos_token_id=1,
)
HF_DEFAULTS = {
    "llama": _HF_LLAMA,
    "mistral": dict(
        _HF_LLAMA,
        intermediate_size=14336,
        num_key_value_heads=8,
        max_position_embeddings=131072,
        sliding_window=4096,
    ),
    "qwen2": _HF_QWEN,
    "qwen3": dict(_HF_QWEN, head_dim=128),
    "gemma2": _HF_GEMMA2,
    "gemma3_text": dict(
        _HF_GEMMA2,
        vocab_size=262208,
        max_position_embeddings=131072,
        rope_theta=1000000.0,
        rope_local_base_freq=10000.0,
        sliding_window_pattern=6,
        attn_logit_softcapping=None,
        final_logit_softcapping=None,
    ),
}


def _first(token_id):
  """The first id of a list (several EOS ids); the id itself otherwise."""
  return token_id[0] if isinstance(token_id, list) else token_id


def _split_rope(rope: dict) -> tuple[float, tuple | None]:
  """``(rope_theta, scaling)`` of a HF rope dict; scaling None when default."""
  rope = dict(rope)
  theta = float(rope.pop("rope_theta"))
  if "type" in rope:  # the key's older name
    rope.setdefault("rope_type", rope.pop("type"))
  kind = rope.get("rope_type", "default")
  return theta, None if kind == "default" else tuple(sorted(rope.items()))


def _rope_from_hf(kind: str, hf: dict):
  """``(theta, scaling, local_theta)``; transformers v5 writes
  ``rope_parameters`` (per layer type for Gemma 3), v4 wrote ``rope_theta``
  + ``rope_scaling`` (+ Gemma 3's ``rope_local_base_freq``)."""
  params = dict(hf.get("rope_parameters") or {})
  if kind != "gemma3_text":
    rope = params or dict(hf.get("rope_scaling") or {})
    rope.setdefault("rope_theta", hf["rope_theta"])
    return (*_split_rope(rope), None)
  if llama.FULL in params:
    glob = dict(params[llama.FULL] or {})
    local = dict(params.get(llama.SLIDING) or {})
  else:
    glob, local = dict(hf.get("rope_scaling") or {}), {}
  glob.setdefault("rope_theta", hf["rope_theta"])
  local.setdefault("rope_theta", hf["rope_local_base_freq"])
  local_theta, local_scaling = _split_rope(local)
  if local_scaling is not None:
    raise ValueError(
        "Gemma 3 rope scaling on the sliding layers is not supported; "
        "kdjax scales the global layers' RoPE only."
    )
  return (*_split_rope(glob), local_theta)


def _windows_from_hf(kind: str, hf: dict):
  """``(sliding_window, layer_types)`` by transformers' rules."""
  if kind == "llama":
    return None, None
  window = hf.get("sliding_window")
  if kind in ("qwen2", "qwen3") and not hf.get("use_sliding_window"):
    window = None
  if window is None or kind == "mistral":  # Mistral: every layer windowed
    return window, None
  n = hf["num_hidden_layers"]
  types = hf.get("layer_types")
  if types is None and kind in ("qwen2", "qwen3"):
    first = hf["max_window_layers"]
    types = [llama.SLIDING if i >= first else llama.FULL for i in range(n)]
  elif types is None:
    period = 2 if kind == "gemma2" else hf["sliding_window_pattern"]
    types = llama.periodic_layer_types(n, period)
  return window, tuple(types)


def _decoder_fields(kind: str, hf: dict) -> dict:
  """LlamaConfig fields of a LLaMA-style family's ``config.json``."""
  hf = {**HF_DEFAULTS[kind], **hf}
  family = llama.FAMILIES[kind]
  if hf.get("mlp_bias"):
    raise ValueError(
        "checkpoints with mlp_bias=True are not supported; kdjax's MLP has "
        "no biases."
    )
  if hf.get("use_bidirectional_attention"):
    raise ValueError(
        "use_bidirectional_attention=True is not supported; kdjax's "
        "decoders are causal."
    )
  theta, scaling, local_theta = _rope_from_hf(kind, hf)
  window, types = _windows_from_hf(kind, hf)
  kw = dict(
      model_type=kind,
      rope_theta=theta,
      rope_scaling=scaling,
      num_key_value_heads=(
          hf.get("num_key_value_heads") or hf["num_attention_heads"]
      ),
      head_dim=hf.get("head_dim"),
      bos_token_id=_first(hf.get("bos_token_id")),
      eos_token_id=_first(hf.get("eos_token_id")),
      hidden_act=hf.get(
          "hidden_activation" if family.unit_offset_norms else "hidden_act"
      ),
      sliding_window=window,
      layer_types=types,
  )
  for name in (
      "vocab_size",
      "hidden_size",
      "intermediate_size",
      "num_hidden_layers",
      "num_attention_heads",
      "max_position_embeddings",
      "rms_norm_eps",
      "tie_word_embeddings",
  ):
    kw[name] = hf[name]
  for name in (
      "attention_bias",
      "query_pre_attn_scalar",
      "attn_logit_softcapping",
      "final_logit_softcapping",
  ):
    if name in family.options:
      kw[name] = hf.get(name)
  if "rope_local_theta" in family.options:
    kw["rope_local_theta"] = local_theta
  return kw


def config_to_hf(config) -> dict:
  """The ``config.json`` dict transformers needs to rebuild ``config``."""
  if isinstance(config, gpt2.GPT2Config):
    skip = {"dtype", "param_dtype", "remat"}
    out = {k: v for k, v in dataclasses.asdict(config).items() if k not in skip}
    out.update(
        model_type="gpt2",
        architectures=["GPT2LMHeadModel"],
        n_ctx=config.n_positions,
        activation_function="gelu_new",
        tie_word_embeddings=True,
    )
  else:
    out = _decoder_to_hf(config)
  out["torch_dtype"] = "float32"
  return out


def _decoder_to_hf(c: llama.LlamaConfig) -> dict:
  """transformers' config.json of a LLaMA-style family: its own key names,
  every option its model reads, v5 ``rope_parameters`` and the v4 keys."""
  family = c.family
  gemma = family.unit_offset_norms
  out = {
      name: getattr(c, name)
      for name in (
          "vocab_size",
          "hidden_size",
          "intermediate_size",
          "num_hidden_layers",
          "num_attention_heads",
          "num_key_value_heads",
          "max_position_embeddings",
          "rms_norm_eps",
          "tie_word_embeddings",
          "bos_token_id",
          "eos_token_id",
          "model_type",
      )
  }
  out.update(architectures=[family.architecture], head_dim=c.kv_head_dim)
  out["hidden_activation" if gemma else "hidden_act"] = c.activation
  rope = {"rope_type": "default", **dict(c.rope_scaling or ())}
  rope["rope_theta"] = c.rope_theta
  out["rope_theta"] = c.rope_theta
  if c.rope_scaling:
    out["rope_scaling"] = rope
  if c.model_type == "gemma3_text":
    local = c.rope_local_theta or c.rope_theta
    out["rope_local_base_freq"] = local
    rope = {
        llama.FULL: rope,
        llama.SLIDING: {"rope_type": "default", "rope_theta": local},
    }
  out["rope_parameters"] = rope
  if "attention_bias" in family.options:
    out["attention_bias"] = c.attention_bias
  if c.model_type == "llama":
    out["mlp_bias"] = False
  if c.model_type == "mistral":
    out["sliding_window"] = c.sliding_window
  if "layer_types" in family.options:
    every = llama.FULL if c.sliding_window is None else llama.SLIDING
    types = list(c.layer_types or c.num_hidden_layers * [every])
    out.update(layer_types=types, sliding_window=c.sliding_window)
    if c.model_type in ("qwen2", "qwen3"):
      # Qwen's switch, and its rule's first windowed layer (exact where the
      # windowed layers are the last ones, as Qwen's rule makes them).
      first = (
          types.index(llama.SLIDING) if llama.SLIDING in types else len(types)
      )
      out.update(
          use_sliding_window=c.sliding_window is not None,
          max_window_layers=first,
      )
  if gemma:
    # Gemma builds a sliding-window mask whatever the layer types: a
    # window no sequence reaches when every layer is global.
    if c.sliding_window is None:
      out["sliding_window"] = c.max_position_embeddings
    out.update(
        query_pre_attn_scalar=c.query_pre_attn_scalar or c.kv_head_dim,
        attn_logit_softcapping=c.attn_logit_softcapping,
        final_logit_softcapping=c.final_logit_softcapping,
    )
  return out


class Layout(NamedTuple):
  """How a config's model meets its HF checkpoint."""

  cls: Callable  # the model class
  entries: list  # the key map, one Entry per tensor
  ignored: tuple  # regexes of checkpoint keys that are dropped
  prefixes: tuple  # (old, new) key prefixes rewritten before the lookup
  tied: Path | None  # the embedding a tied ``lm_head.weight`` must equal


def family(config) -> Layout:
  """The model class, key map and key rules of ``config``'s family."""
  if isinstance(config, gpt2.GPT2Config):
    return Layout(
        gpt2.GPT2,
        gpt2_entries(config),
        (r"h\.\d+\.attn\.(masked_)?bias",),
        (("transformer.", ""),),
        ("wte", "embedding"),
    )
  prefixes = ()
  if config.model_type == "gemma3_text":
    # The language model of Gemma3ForConditionalGeneration, as
    # transformers v4 and v5 name it; the vision tower is dropped.
    prefixes = (
        ("language_model.model.", "model."),
        ("model.language_model.", "model."),
        ("language_model.lm_head.", "lm_head."),
    )
  return Layout(
      llama.Llama,
      llama_entries(config),
      (
          r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",
          r"(model\.)?(vision_tower|multi_modal_projector)\..*",
      ),
      prefixes,
      ("embed_tokens", "embedding") if config.tie_word_embeddings else None,
  )


def key_prefix(config) -> str:
  """What the written keys (and the HF model's module names) put before the
  key map's names: GPT-2's ``transformer.``."""
  return "transformer." if isinstance(config, gpt2.GPT2Config) else ""


def gpt2_entries(cfg: gpt2.GPT2Config) -> list[Entry]:
  out = [
      Entry("wte.weight", ("wte", "embedding")),
      Entry("wpe.weight", ("wpe", "embedding")),
      Entry("ln_f.weight", ("ln_f", "scale")),
      Entry("ln_f.bias", ("ln_f", "bias")),
  ]
  for i in range(cfg.n_layer):
    for ln in ("ln_1", "ln_2"):
      out += [
          Entry(f"h.{i}.{ln}.weight", ("h", i, ln, "scale")),
          Entry(f"h.{i}.{ln}.bias", ("h", i, ln, "bias")),
      ]
    for mod, lin in (
        ("attn", "c_attn"),
        ("attn", "c_proj"),
        ("mlp", "c_fc"),
        ("mlp", "c_proj"),
    ):
      out += [
          Entry(f"h.{i}.{mod}.{lin}.weight", ("h", i, mod, lin, "kernel")),
          Entry(f"h.{i}.{mod}.{lin}.bias", ("h", i, mod, lin, "bias")),
      ]
  return out


def llama_entries(cfg: llama.LlamaConfig) -> list[Entry]:
  family = cfg.family
  out = [
      Entry("model.embed_tokens.weight", ("embed_tokens", "embedding")),
      Entry("model.norm.weight", ("norm", "scale")),
  ]
  if not cfg.tie_word_embeddings:
    out.append(Entry("lm_head.weight", ("head",)))
  norms = ["input_layernorm", "post_attention_layernorm"]
  if family.sandwich_norms:
    norms += ["pre_feedforward_layernorm", "post_feedforward_layernorm"]
  qkv_bias = family.qkv_bias or cfg.attention_bias
  biased = {"q_proj": qkv_bias, "k_proj": qkv_bias, "v_proj": qkv_bias}
  biased["o_proj"] = cfg.attention_bias
  for i in range(cfg.num_hidden_layers):
    pre = f"model.layers.{i}"
    for ln in norms:
      out.append(Entry(f"{pre}.{ln}.weight", ("layers", i, ln, "scale")))
    if family.qk_norm:
      for ln in ("q_norm", "k_norm"):
        out.append(
            Entry(
                f"{pre}.self_attn.{ln}.weight",
                ("layers", i, "self_attn", ln, "scale"),
            )
        )
    for mod, lins in (
        ("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
        ("mlp", ("gate_proj", "up_proj", "down_proj")),
    ):
      for lin in lins:
        out.append(
            Entry(
                f"{pre}.{mod}.{lin}.weight",
                ("layers", i, mod, lin, "kernel"),
                transpose=True,
            )
        )
        if biased.get(lin):
          out.append(
              Entry(f"{pre}.{mod}.{lin}.bias", ("layers", i, mod, lin, "bias"))
          )
  return out


# ----------------------------------------------------------------------------
# Reading.


def safetensors_files(directory: str) -> list[str]:
  """The checkpoint's safetensors files; refuses pickle-only checkpoints."""
  index = os.path.join(directory, "model.safetensors.index.json")
  if os.path.exists(index):
    with open(index) as f:
      names = sorted(set(json.load(f)["weight_map"].values()))
    return [os.path.join(directory, n) for n in names]
  single = os.path.join(directory, "model.safetensors")
  if os.path.exists(single):
    return [single]
  pickles = [
      n
      for n in os.listdir(directory)
      if n.endswith((".bin", ".pt", ".pth", ".ckpt"))
  ]
  if pickles:
    raise ValueError(
        f"{directory} holds only pickle checkpoints ({pickles[0]}); "
        "kdjax reads safetensors only: convert it with "
        "transformers' save_pretrained(..., safe_serialization=True)."
    )
  raise FileNotFoundError(
      f"no model.safetensors or model.safetensors.index.json "
      f"in {directory}."
  )


def _renamed(key: str, prefixes: tuple) -> str:
  for old, new in prefixes:
    if key.startswith(old):
      return new + key[len(old) :]
  return key


def _host_device():
  """The CPU device, where bf16 tensors are read (None: the default)."""
  try:
    return jax.devices("cpu")[0]
  except RuntimeError:  # JAX_PLATFORMS without the CPU backend
    return None


def _tensors(fname: str):
  """``(key, read)`` for each tensor of a safetensors file; ``read()`` gives
  the tensor as a NumPy array.

  Read through safetensors' flax backend on the host CPU: NumPy has no
  bfloat16, and jax arrays on the CPU convert to ``ml_dtypes`` NumPy arrays.
  """
  from safetensors import safe_open

  with jax.default_device(_host_device()):
    with safe_open(fname, framework="flax") as f:
      for key in f.keys():
        yield key, lambda key=key: np.asarray(f.get_tensor(key))


# The [V, D] tensors indexed by token id.
_VOCAB_PATHS = (("wte", "embedding"), ("embed_tokens", "embedding"), ("head",))


def _vocab_rows(entry: Entry, value: np.ndarray, shape: tuple) -> np.ndarray:
  """The first ``shape[0]`` rows of an embedding or head that has more.

  A ``vocab_size`` override below the checkpoint's keeps the tokens a
  smaller tokenizer can emit: Gemma 3's 4B-27B checkpoints carry 64 image
  tokens (262,208 rows) past the 262,144 text tokens of Gemma-3-1B, and a
  softmax over the kept rows is the teacher restricted to the student's
  vocabulary.
  """
  if (
      entry.path in _VOCAB_PATHS
      and value.shape[0] > shape[0]
      and tuple(value.shape[1:]) == tuple(shape[1:])
  ):
    return value[: shape[0]]
  return value


def load_params(directory: str, config, mesh=None, seed: int = 0) -> nnx.Module:
  """Builds the model for ``config`` with the weights in ``directory``.

  Every tensor is read lazily (float32, float16 or bfloat16) and
  ``device_put`` on its own sharding (over ``mesh``, or the default device),
  cast to the parameter dtype. A tied model accepts an ``lm_head.weight``
  equal to its embedding. The model is constructed once, traced: that gives
  the parameters' shapes and shardings, and the non-parameter state (dropout
  RNG) as real arrays, its random parameters dead-code eliminated by XLA.
  """
  safetensors_check.check_directory(directory)  # one sentence if damaged
  layout = family(config)
  graphdef, params, rest, shardings = _skeleton(layout.cls, config, mesh, seed)
  targets = traverse_util.flatten_dict(nnx.to_pure_dict(params))
  by_key = {e.hf_key: e for e in layout.entries}
  loaded, errors, tied_head = {}, [], None
  for fname in safetensors_files(directory):
    for raw, read in _tensors(fname):
      key = _renamed(raw, layout.prefixes)
      if any(re.fullmatch(p, key) for p in layout.ignored):
        continue
      if layout.tied is not None and key == "lm_head.weight":
        tied_head = read()
        continue
      entry = by_key.get(key)
      if entry is None:
        errors.append(f"unexpected key {raw!r}")
        continue
      value = read()
      if entry.transpose:
        value = value.T
      want = targets[entry.path]
      value = _vocab_rows(entry, value, want.shape)
      if tuple(value.shape) != tuple(want.shape):
        errors.append(
            f"{raw!r} has shape {tuple(value.shape)}, expected "
            f"{tuple(want.shape)} for the config"
        )
        continue
      loaded[entry.path] = jax.device_put(
          value.astype(want.dtype), shardings[entry.path]
      )
  if tied_head is not None and layout.tied in loaded:
    tied_head = tied_head[: loaded[layout.tied].shape[0]]
  missing = [e.hf_key for e in layout.entries if e.path not in loaded]
  errors += [f"missing key {k!r}" for k in missing]
  if (
      tied_head is not None
      and layout.tied in loaded
      and not np.array_equal(
          tied_head.astype(np.float32),
          np.asarray(loaded[layout.tied]).astype(np.float32),
      )
  ):
    errors.append(
        "'lm_head.weight' differs from the token embedding but the "
        "config ties them (tie_word_embeddings)"
    )
  if errors:
    raise ValueError(
        f"checkpoint {directory} does not match the "
        f"{type(config).__name__}: " + "; ".join(errors) + "."
    )
  nnx.replace_by_pure_dict(params, traverse_util.unflatten_dict(loaded))
  return nnx.merge(graphdef, params, rest)


def _skeleton(cls, config, mesh, seed: int):
  """``(graphdef, params, rest, shardings)`` of ``cls(config)`` from one
  traced construction: ``params`` holds ``ShapeDtypeStruct``s, ``rest`` (the
  RNG state) real arrays, ``shardings`` every array's by path.

  One trace, not an abstract one and a jitted one: building a model under a
  trace costs time quadratic in its depth with flax 0.12 (every RNG count
  update asks its tracer for a sharding, and jax explains at length why
  there is none), about 5 s for GPT-2 XL.
  """
  found = {}

  def build():
    model = cls(config, rngs=nnx.Rngs(params=0, dropout=seed))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    found["graphdef"] = graphdef
    found["params"] = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params
    )
    found["shardings"] = shd.state_shardings(model, mesh, nnx.state(model))
    return rest

  replicated = (
      None if mesh is None else jax.sharding.NamedSharding(mesh, jax.P())
  )
  rest = jax.jit(build, out_shardings=replicated)()
  return found["graphdef"], found["params"], rest, found["shardings"]


# ----------------------------------------------------------------------------
# Writing.

# End-of-text tokens, in the order they are looked up in a tokenizer.
EOS_TOKENS = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eot_id|>")
BOS_TOKENS = ("<s>", "<|begin_of_text|>", "<bos>")


def special_tokens(tokenizer, vocab_size: int) -> dict[str, tuple[str, int]]:
  """``{"eos": (token, id), "bos": ..., "pad": ...}`` of ``tokenizer``.

  EOS is the tokenizer's own ``eos_token`` (a Hugging Face tokenizer
  directory's, :class:`kdjax.data.tokenizer.HFTokenizer`) or the first of
  :data:`EOS_TOKENS` it knows; BOS likewise, else ``<s>`` (LLaMA) or, GPT-2's
  convention, the EOS; padding is the EOS (left-padded
  prompts, as kdjax pads). Every id must lie inside the model's vocabulary.
  """
  found = {}
  for role, names in (("eos", EOS_TOKENS), ("bos", BOS_TOKENS)):
    own = getattr(tokenizer, f"{role}_token", None)  # an HFTokenizer's own
    for name in (own, *names) if own else names:
      token_id = tokenizer.token_to_id(name)
      if token_id is not None:
        found[role] = (name, token_id)
        break
  if "eos" not in found:
    raise ValueError(
        f"the tokenizer has none of the end-of-text tokens "
        f"{EOS_TOKENS}; add one (tokenizer.add_special_tokens) "
        "before exporting."
    )
  found.setdefault("bos", found["eos"])
  found["pad"] = found["eos"]
  for role, (name, token_id) in found.items():
    if not 0 <= token_id < vocab_size:
      raise ValueError(
          f"the tokenizer's {role} token {name!r} has id "
          f"{token_id}, outside the model's vocabulary of "
          f"{vocab_size}; export with the model's own tokenizer."
      )
  return found


def default_tokenizer(config):
  """The byte-level tokenizer for byte-vocabulary models, else None."""
  from kdjax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top

  if _vocab_size(config) == tokenizer_lib.VOCAB_SIZE:
    return tokenizer_lib.byte_level()
  return None


def _vocab_size(config) -> int:
  return config.vocab_size


def _tokenizer_files(tokenizer, special: dict, config) -> dict[str, str]:
  """``tokenizer.json`` + the two small files transformers reads next to it."""
  names = {f"{role}_token": name for role, (name, _) in special.items()}
  max_len = getattr(config, "n_positions", None) or getattr(
      config, "max_position_embeddings"
  )
  tok_config = dict(
      tokenizer_class="PreTrainedTokenizerFast",
      model_max_length=max_len,
      add_bos_token=False,
      add_eos_token=False,
      clean_up_tokenization_spaces=False,
      **names,
  )
  files = {
      "tokenizer.json": tokenizer.to_str(),
      "tokenizer_config.json": json.dumps(tok_config, indent=2),
      "special_tokens_map.json": json.dumps(names, indent=2),
  }
  template = getattr(tokenizer, "chat_template", None)
  if template:  # where transformers v5 reads it
    files["chat_template.jinja"] = template
  return files


def _save_tensors(tensors: dict, target, meta: dict) -> None:
  from safetensors.numpy import save

  # Through kdjax.fs: a full disk is an OSError naming the file (safetensors'
  # own save_file reports it as a SafetensorError).
  fs.write_bytes(target, save(tensors, meta))


def save(
    model: nnx.Module,
    directory: fs.PathLike,
    *,
    tokenizer: Any = None,
    dtype=None,
    max_shard_size: int = 5 * 2**30,
) -> None:
  """Writes the weights, configs and tokenizer that transformers loads.

  Tensors go to host one at a time. Above ``max_shard_size`` bytes the
  weights are split into ``model-0000i-of-0000n.safetensors`` files with a
  ``model.safetensors.index.json``, as transformers does.

  Args:
    model: a kdjax GPT-2 or LLaMA-style model.
    directory: output directory (local or a URI such as ``gs://b/run/hf``).
    tokenizer: the ``tokenizers.Tokenizer`` the model was trained with; its
      EOS/BOS/pad ids go into the configs. Default: the byte-level tokenizer
      for a 257-token vocabulary; other models without one keep the config's
      own ids where they lie in the vocabulary (null, with a warning, where
      they do not) and get no tokenizer files.
    dtype: storage dtype of the tensors (default: as held).
    max_shard_size: bytes per safetensors file.
  """
  config = model.config
  if tokenizer is None:
    tokenizer = default_tokenizer(config)
  if tokenizer is not None:
    special = special_tokens(tokenizer, _vocab_size(config))
  else:
    special = {}
    for role, token_id in (
        ("eos", config.eos_token_id),
        ("bos", config.bos_token_id),
    ):
      if token_id is not None and 0 <= token_id < _vocab_size(config):
        special[role] = ("", token_id)
      else:  # a random model with a made-up vocabulary: no such token
        logging.warning(
            "%s_token_id %s is unset or outside the vocabulary of %d and no "
            "tokenizer was given: the export declares no %s token (pass "
            "tokenizer= to save_hf).",
            role,
            token_id,
            _vocab_size(config),
            role,
        )
        special[role] = ("", None)
    special["pad"] = special["eos"]
  entries = family(config).entries
  flat = traverse_util.flatten_dict(
      nnx.to_pure_dict(nnx.state(model, nnx.Param))
  )
  prefix = key_prefix(config)
  shards, current, size = [], {}, 0
  for e in entries:
    value = np.asarray(jax.device_get(flat[e.path]))
    if dtype is not None:
      value = value.astype(dtype)
    if e.transpose:
      value = value.T
    value = np.ascontiguousarray(value)
    if current and size + value.nbytes > max_shard_size:
      shards.append(current)
      current, size = {}, 0
    current[prefix + e.hf_key] = value
    size += value.nbytes
  shards.append(current)
  out = fs.path(directory)
  out.mkdir(parents=True, exist_ok=True)
  # config.json marks a whole export: removed first and written last, so a
  # directory left by an interrupted write (or by an older export being
  # replaced) is not loaded as a model.
  (out / "config.json").unlink(missing_ok=True)
  meta = {"format": "pt"}
  if len(shards) == 1:
    _save_tensors(shards[0], out / "model.safetensors", meta)
  else:
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
      name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
      _save_tensors(shard, out / name, meta)
      weight_map.update({k: name for k in shard})
      total += sum(v.nbytes for v in shard.values())
    fs.write_text(
        out / "model.safetensors.index.json",
        json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map},
            indent=2,
        ),
    )
  ids = {
      f"{role}_token_id": token_id for role, (_, token_id) in special.items()
  }
  hf_cfg = config_to_hf(config)
  hf_cfg.update(
      bos_token_id=ids["bos_token_id"], eos_token_id=ids["eos_token_id"]
  )
  if dtype is not None:
    hf_cfg["torch_dtype"] = np.dtype(dtype).name
  files = {"generation_config.json": json.dumps(ids, indent=2)}
  if tokenizer is not None:
    files.update(_tokenizer_files(tokenizer, special, config))
  for name, text in files.items():
    fs.write_text(out / name, text)
  fs.write_text_atomic(out / "config.json", json.dumps(hf_cfg, indent=2))
