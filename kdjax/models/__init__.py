"""GPT-2 and LLaMA-style language models (LLaMA 2/3, Mistral, Qwen2/2.5,
Qwen3, Gemma 2, Gemma 3 text) in Flax NNX, with HF checkpoints in and out.

```python
from kdjax import models
model = models.load("gpt2", dtype=jnp.bfloat16)     # HF dir or hub id; eval mode
teacher = models.load("Qwen/Qwen3-8B")              # config.json picks the family
logits_BxTxV = model(input_ids_BxT)                  # float32 logits
model.train()                                        # dropout on, to fine-tune
models.save_hf(model, "out_dir", tokenizer=tok)      # weights, configs, tokenizer
student = models.create("tiny-gpt2", vocab_size=257, rngs=nnx.Rngs(0))
student = models.create("qwen3-0.6b", rngs=nnx.Rngs(0))  # see PRESETS
tok = models.load_tokenizer("path/to/hf_dir")
```

``load`` returns the model in eval mode (dropout off), as transformers'
``from_pretrained`` does; call ``model.train()`` before training it. A hub id
is fetched only when the hub answers within seconds (:func:`hub_reachable`);
offline (or ``HF_HUB_OFFLINE=1``) only the local cache is used.
"""

from __future__ import annotations

import dataclasses
import os

from flax import nnx
import jax.numpy as jnp

from kdjax import fs, hub
from kdjax.hub import download_hint, hub_reachable
from kdjax.models import gpt2, hf, llama, lora
from kdjax.models.gpt2 import GPT2, GPT2Config
from kdjax.models.layers import KVCache
from kdjax.models.llama import Llama, LlamaConfig

_DTYPES = {
    "float32": jnp.float32,
    "bfloat16": jnp.bfloat16,
    "float16": jnp.float16,
}

PRESETS = {
    **{k: (gpt2.GPT2Config, gpt2.GPT2, v) for k, v in gpt2.PRESETS.items()},
    **{
        k: (llama.LlamaConfig, llama.Llama, v) for k, v in llama.PRESETS.items()
    },
}

__all__ = [
    "load",
    "create",
    "dtype_of",
    "save_hf",
    "load_tokenizer",
    "PRESETS",
    "GPT2",
    "GPT2Config",
    "Llama",
    "LlamaConfig",
    "KVCache",
    "download_hint",
    "hub_reachable",
]


def dtype_of(name: str) -> jnp.dtype:
  """The jax dtype of a config's dtype string, or one sentence on the choices."""
  if name not in _DTYPES:
    raise ValueError(
        f"dtype {name!r} is unknown; use one of {sorted(_DTYPES)}."
    )
  return _DTYPES[name]


def preset_config(name: str, **overrides):
  """The config dataclass of preset ``name`` with ``overrides`` applied."""
  if name not in PRESETS:
    raise ValueError(
        f"unknown model preset {name!r}; choose one of " f"{sorted(PRESETS)}."
    )
  cfg_cls, _, fields = PRESETS[name]
  known = {f.name for f in dataclasses.fields(cfg_cls)}
  bad = sorted(set(overrides) - known)
  if bad:
    raise ValueError(
        f"{cfg_cls.__name__} has no field(s) {bad}; valid fields "
        f"are {sorted(known)}."
    )
  return cfg_cls(**{**fields, **overrides})


def create(
    name: str,
    *,
    rngs: nnx.Rngs,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    **overrides,
):
  """A randomly initialised model from a preset, e.g. ``create("gpt2", rngs=...)``.

  ``overrides`` replace config fields (``vocab_size=257``, ``n_layer=4``, ...).
  """
  cfg = preset_config(name, dtype=dtype, param_dtype=param_dtype, **overrides)
  return (gpt2.GPT2 if isinstance(cfg, gpt2.GPT2Config) else llama.Llama)(
      cfg, rngs=rngs
  )


def _resolve(path_or_hub_id: str, revision: str = "") -> str:
  """A local directory, or a hub id (at ``revision``) from the cache or (if
  reachable) the hub."""
  if os.path.isdir(path_or_hub_id):
    return path_or_hub_id
  return hub.snapshot(
      path_or_hub_id,
      ("*.json", "*.safetensors", "*.txt", "*.model"),
      f"{path_or_hub_id!r} is not a local directory",
      revision=revision,
  )


def load(
    path_or_hub_id: str,
    dtype=jnp.float32,
    param_dtype=None,
    mesh=None,
    seed: int = 0,
    revision: str = "",
    **overrides,
):
  """Loads a HF checkpoint of a supported family (safetensors only).

  Args:
    path_or_hub_id: a directory with ``config.json`` + safetensors, or a hub id.
    dtype: compute dtype.
    param_dtype: parameter storage dtype (default: ``dtype``, so a bf16
      teacher takes half the memory).
    mesh: a ``kdjax.sharding.make_mesh`` mesh; every tensor is placed on its
      sharding as it is read. None: the default device.
    seed: seed of the model's "dropout" RNG stream.
    revision: a hub id's commit hash, tag or branch ('': the default branch).
    **overrides: config fields to replace (``remat="full"``, dropout rates).

  Returns:
    The model in eval mode (dropout off); ``model.train()`` turns dropout on.

  Raises:
    FileNotFoundError: no ``config.json`` (an export that did not finish has
      none).
    kdjax.fs.BadFileError: ``config.json`` is not JSON, or a safetensors file
      is damaged.
  """
  directory = _resolve(path_or_hub_id, revision)
  cfg_path = os.path.join(directory, "config.json")
  if not os.path.exists(cfg_path):
    raise FileNotFoundError(
        f"no config.json in {directory}; point load() at a "
        "Hugging Face model directory."
    )
  cfg = hf.config_from_hf(
      fs.read_json(cfg_path, "re-download or re-export that model directory"),
      dtype=dtype,
      param_dtype=param_dtype or dtype,
      **overrides,
  )
  model = hf.load_params(directory, cfg, mesh, seed)
  model.eval()
  return model


def save_hf(
    model,
    directory,
    *,
    tokenizer=None,
    dtype=None,
    max_shard_size: int = 5 * 2**30,
) -> None:
  """Writes ``model`` as a HF checkpoint transformers loads and generates with.

  safetensors + ``config.json`` + ``generation_config.json`` + the tokenizer
  files (see :func:`kdjax.models.hf.save`); ``directory`` may be a URI. A
  LoRA model is written merged, ``W + (alpha / r) A B``
  (:func:`kdjax.models.lora.merged`): plain weights, no adapters.
  """
  hf.save(
      lora.merged(model) if lora.adapted(model) else model,
      directory,
      tokenizer=tokenizer,
      dtype=dtype,
      max_shard_size=max_shard_size,
  )


def load_tokenizer(path: str):
  """A ``tokenizers.Tokenizer`` from ``tokenizer.json`` or GPT-2's
  ``vocab.json`` + ``merges.txt`` (byte-level BPE), a local path or hub id;
  :func:`kdjax.data.tokenizer.from_pretrained`."""
  from kdjax.data import tokenizer  # pylint: disable=g-import-not-at-top

  return tokenizer.from_pretrained(path)
