"""Hugging Face checkpoints in and out: config.json and safetensors key maps.

Loading streams one tensor at a time (``safetensors.safe_open``) straight onto
its target sharding, so a 1.5B/7B model never sits unsharded on one device.
Only safetensors are read; pickled ``.bin`` checkpoints are refused. Every
problem (unknown key, missing key, wrong shape) is collected and reported in
one error.

Writing puts everything ``transformers`` needs next to the weights: a
``config.json`` whose special-token ids are the tokenizer's (inside the
vocabulary), ``generation_config.json`` (EOS stops generation, EOS pads) and
the tokenizer (``tokenizer.json``, ``tokenizer_config.json``,
``special_tokens_map.json``), so ``AutoTokenizer`` + ``AutoModelForCausalLM``
+ ``generate`` work on the directory as written. Paths go through
:mod:`kdjax.fs`, so the directory may be remote (``gs://...``).

Key maps (HF name -> NNX path, transpose?):

* GPT-2: ``[transformer.]wte.weight -> wte/embedding``, ``h.{i}.attn.c_attn.weight
  -> h/i/attn/c_attn/kernel`` (Conv1D is already ``(in, out)``: no transpose),
  causal-mask buffers ``attn.bias``/``attn.masked_bias`` dropped, ``lm_head.weight``
  accepted only when equal to ``wte.weight`` (tied).
* LLaMA: ``model.layers.{i}.self_attn.q_proj.weight -> layers/i/self_attn/q_proj/kernel``
  transposed (torch ``nn.Linear`` is ``(out, in)``), norms' ``weight -> scale``,
  ``lm_head.weight -> head`` (no transpose: kept ``[V, D]``), ``rotary_emb.inv_freq``
  buffers dropped.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Callable

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
  """Builds a GPT2Config or LlamaConfig from a HF ``config.json`` dict."""
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
  if kind == "llama":
    fields = {f.name for f in dataclasses.fields(llama.LlamaConfig)}
    kw = {k: v for k, v in cfg.items() if k in fields}
    # transformers v5 writes rope_parameters; v4 wrote rope_theta + rope_scaling.
    rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    kw["rope_theta"] = rope.pop("rope_theta", cfg.get("rope_theta", 10000.0))
    kind_ = rope.get("rope_type", rope.get("type", "default"))
    kw["rope_scaling"] = (
        None if kind_ == "default" else tuple(sorted(rope.items()))
    )
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
      raise ValueError(
          "LLaMA checkpoints with attention_bias/mlp_bias=True are "
          "not supported; kdjax's LLaMA has no biases."
      )
    for k in ("bos_token_id", "eos_token_id"):
      if isinstance(kw.get(k), list):
        kw[k] = kw[k][0]
      if kw.get(k) is None:
        kw.pop(k, None)
    return llama.LlamaConfig(**{**kw, **overrides})
  raise ValueError(
      f"config.json model_type={kind!r} is not supported; kdjax "
      "loads 'gpt2' and 'llama' checkpoints."
  )


def config_to_hf(config) -> dict:
  """The ``config.json`` dict transformers needs to rebuild ``config``."""
  skip = {"dtype", "param_dtype", "remat", "rope_scaling", "rope_theta"}
  out = {k: v for k, v in dataclasses.asdict(config).items() if k not in skip}
  if isinstance(config, gpt2.GPT2Config):
    out.update(
        model_type="gpt2",
        architectures=["GPT2LMHeadModel"],
        n_ctx=config.n_positions,
        activation_function="gelu_new",
        tie_word_embeddings=True,
    )
  else:
    rope = {"rope_type": "default", **dict(config.rope_scaling or ())}
    rope["rope_theta"] = config.rope_theta
    out.update(
        model_type="llama",
        architectures=["LlamaForCausalLM"],
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
        head_dim=config.kv_head_dim,
        rope_theta=config.rope_theta,
        rope_parameters=rope,
    )
    if config.rope_scaling:
      out["rope_scaling"] = rope
  out["torch_dtype"] = "float32"
  return out


def family(config) -> tuple[Callable, list[Entry], tuple[str, ...]]:
  """(model class, key map, ignored-key regexes) for a config."""
  if isinstance(config, gpt2.GPT2Config):
    return gpt2.GPT2, gpt2_entries(config), (r"h\.\d+\.attn\.(masked_)?bias",)
  return (
      llama.Llama,
      llama_entries(config),
      (r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",),
  )


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
  out = [
      Entry("model.embed_tokens.weight", ("embed_tokens", "embedding")),
      Entry("model.norm.weight", ("norm", "scale")),
  ]
  if not cfg.tie_word_embeddings:
    out.append(Entry("lm_head.weight", ("head",)))
  for i in range(cfg.num_hidden_layers):
    pre = f"model.layers.{i}"
    for ln in ("input_layernorm", "post_attention_layernorm"):
      out.append(Entry(f"{pre}.{ln}.weight", ("layers", i, ln, "scale")))
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


def _normalise_gpt2(key: str) -> str:
  return key[len("transformer.") :] if key.startswith("transformer.") else key


def load_params(directory: str, config, mesh=None, seed: int = 0) -> nnx.Module:
  """Builds the model for ``config`` with the weights in ``directory``.

  Every tensor is read lazily and ``device_put`` on its own sharding (over
  ``mesh``, or the default device). Non-parameter state (dropout RNG) is built
  by a jitted constructor whose random parameters XLA dead-code eliminates.
  """
  from safetensors import safe_open

  safetensors_check.check_directory(directory)  # one sentence if damaged
  cls, entries, ignored = family(config)
  abstract = nnx.eval_shape(lambda: cls(config, rngs=nnx.Rngs(0)))
  graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
  shardings = shd.state_shardings(abstract, mesh, nnx.state(abstract))
  targets = traverse_util.flatten_dict(nnx.to_pure_dict(params))
  by_key = {e.hf_key: e for e in entries}
  is_gpt2 = isinstance(config, gpt2.GPT2Config)
  loaded, errors, tied_head = {}, [], None
  for fname in safetensors_files(directory):
    with safe_open(fname, framework="numpy") as f:
      for raw in f.keys():
        key = _normalise_gpt2(raw) if is_gpt2 else raw
        if any(re.fullmatch(p, key) for p in ignored):
          continue
        if is_gpt2 and key == "lm_head.weight":
          tied_head = f.get_tensor(raw)
          continue
        entry = by_key.get(key)
        if entry is None:
          errors.append(f"unexpected key {raw!r}")
          continue
        value = f.get_tensor(raw)
        if entry.transpose:
          value = value.T
        want = targets[entry.path]
        if tuple(value.shape) != tuple(want.shape):
          errors.append(
              f"{raw!r} has shape {tuple(value.shape)}, expected "
              f"{tuple(want.shape)} for the config"
          )
          continue
        loaded[entry.path] = jax.device_put(
            np.asarray(value).astype(want.dtype), shardings[entry.path]
        )
  missing = [e.hf_key for e in entries if e.path not in loaded]
  errors += [f"missing key {k!r}" for k in missing]
  if (
      tied_head is not None
      and not missing
      and not np.array_equal(
          tied_head, np.asarray(loaded[("wte", "embedding")])
      )
  ):
    errors.append(
        "'lm_head.weight' differs from 'wte.weight' but GPT-2's " "head is tied"
    )
  if errors:
    raise ValueError(
        f"checkpoint {directory} does not match the "
        f"{type(config).__name__}: " + "; ".join(errors) + "."
    )
  nnx.replace_by_pure_dict(params, traverse_util.unflatten_dict(loaded))
  replicated = (
      None if mesh is None else jax.sharding.NamedSharding(mesh, jax.P())
  )
  rngs = lambda: nnx.Rngs(params=0, dropout=seed)
  rest_real = jax.jit(
      lambda: nnx.state(cls(config, rngs=rngs()), nnx.Not(nnx.Param)),
      out_shardings=replicated,
  )()
  return nnx.merge(graphdef, params, rest_real)


# ----------------------------------------------------------------------------
# Writing.

# End-of-text tokens, in the order they are looked up in a tokenizer.
EOS_TOKENS = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<|eot_id|>")
BOS_TOKENS = ("<s>", "<|begin_of_text|>")


def special_tokens(tokenizer, vocab_size: int) -> dict[str, tuple[str, int]]:
  """``{"eos": (token, id), "bos": ..., "pad": ...}`` of ``tokenizer``.

  EOS is the first of :data:`EOS_TOKENS` the tokenizer knows; BOS is ``<s>``
  (LLaMA) or, GPT-2's convention, the EOS; padding is the EOS (left-padded
  prompts, as kdjax pads). Every id must lie inside the model's vocabulary.
  """
  found = {}
  for role, names in (("eos", EOS_TOKENS), ("bos", BOS_TOKENS)):
    for name in names:
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
  return {
      "tokenizer.json": tokenizer.to_str(),
      "tokenizer_config.json": json.dumps(tok_config, indent=2),
      "special_tokens_map.json": json.dumps(names, indent=2),
  }


def _save_tensors(tensors: dict, target, meta: dict) -> None:
  from safetensors.numpy import save, save_file

  if fs.is_remote(target):
    target.write_bytes(save(tensors, meta))
  else:
    save_file(tensors, os.fspath(target), meta)


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
    model: a kdjax GPT-2 or LLaMA.
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
            "%s_token_id %s lies outside the vocabulary of %d and no tokenizer "
            "was given: the export declares no %s token (pass tokenizer= to "
            "save_hf).",
            role,
            token_id,
            _vocab_size(config),
            role,
        )
        special[role] = ("", None)
    special["pad"] = special["eos"]
  _, entries, _ = family(config)
  flat = traverse_util.flatten_dict(
      nnx.to_pure_dict(nnx.state(model, nnx.Param))
  )
  prefix = "transformer." if isinstance(config, gpt2.GPT2Config) else ""
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
    (out / "model.safetensors.index.json").write_text(
        json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map},
            indent=2,
        )
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
  files = {
      "config.json": json.dumps(hf_cfg, indent=2),
      "generation_config.json": json.dumps(ids, indent=2),
  }
  if tokenizer is not None:
    files.update(_tokenizer_files(tokenizer, special, config))
  for name, text in files.items():
    (out / name).write_text(text)
