"""kdjax.models.lora: the adapters' count and paths; the merged export is the
adapted model to transformers, the adapter export the same model to peft."""

import functools
import json

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

import extras
from kdjax import models
from kdjax.models import lora

RANK, ALPHA = 4, 8.0
IDS = np.array([[5, 17, 3, 42, 8, 1, 66, 23, 9, 31]])


def _size(tree) -> int:
  return sum(x.size for x in jax.tree.leaves(tree))


@functools.cache
def _adapted(name: str):
  """A tiny preset with rank-``RANK`` adapters whose A and B are both random
  (B non-zero, so the adapters change the output), in eval mode; and the
  same model without adapters. Built once per preset; tests only read them."""
  vocab = 97
  base = models.create(name, vocab_size=vocab, rngs=nnx.Rngs(0))
  base.eval()
  model = lora.apply(nnx.clone(base), rank=RANK, alpha=ALPHA, rngs=nnx.Rngs(1))
  rng = np.random.RandomState(0)  # host draws: no program per adapter shape
  for _, m in lora.adapted(model):
    for v in (m.lora.lora_a, m.lora.lora_b):
      v[...] = jnp.asarray(0.2 * rng.standard_normal(v.shape), jnp.float32)
  model.eval()
  return model, base


@functools.cache
def _logits(name: str) -> tuple[np.ndarray, np.ndarray]:
  """The adapted and the plain model's logits on ``IDS``, each one program."""
  forward = nnx.jit(lambda m: m(jnp.asarray(IDS)))
  model, base = _adapted(name)
  return np.asarray(forward(model)), np.asarray(forward(base))


def _closed_form_count(name: str) -> int:
  """``r (in + out)`` summed over the default targets of each layer."""
  cfg = models.preset_config(name)
  if name == "tiny-gpt2":
    d = cfg.n_embd
    shapes = [(d, 3 * d), (d, d), (d, 4 * d), (4 * d, d)]
    layers = cfg.n_layer
  else:
    d, f = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_attention_heads * cfg.kv_head_dim, (
        cfg.num_key_value_heads * cfg.kv_head_dim
    )
    shapes = [(d, q), (d, kv), (d, kv), (q, d), (d, f), (d, f), (f, d)]
    layers = cfg.num_hidden_layers
  return layers * sum(RANK * (n_in + n_out) for n_in, n_out in shapes)


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_trainable_count_is_the_closed_form(name):
  model, base = _adapted(name)
  assert _size(nnx.state(model, lora.TRAINABLE)) == _closed_form_count(name)
  # The base keeps its own paths and values: the plain model's state.
  plain = nnx.state(model, nnx.All(nnx.Param, nnx.Not(lora.TRAINABLE)))
  want = nnx.state(base, nnx.Param)
  assert jax.tree.structure(plain) == jax.tree.structure(want)
  for x, y in zip(jax.tree.leaves(plain), jax.tree.leaves(want)):
    np.testing.assert_array_equal(x, y)
  names = "c_attn,c_fc,c_proj" if name == "tiny-gpt2" else "down_proj,"
  with pytest.raises(ValueError, match=f"none .* choose among {names}"):
    lora.apply(base, rank=RANK, alpha=ALPHA, targets="lm_head", rngs=None)


def test_a_path_regex_selects_its_layers():
  # The first layer's query and value projections only.
  cfg = models.preset_config("tiny-llama")
  d, q = cfg.hidden_size, cfg.num_attention_heads * cfg.kv_head_dim
  kv = cfg.num_key_value_heads * cfg.kv_head_dim
  one = lora.apply(
      models.create("tiny-llama", rngs=nnx.Rngs(0)),
      rank=RANK,
      alpha=ALPHA,
      targets=r"layers/0/self_attn/(q|v)_proj",
      rngs=nnx.Rngs(1),
  )
  assert _size(nnx.state(one, lora.TRAINABLE)) == RANK * (2 * d + q + kv)
  assert lora.linear_paths(one) and lora.select(
      lora.linear_paths(one), r"layers/0/self_attn/(q|v)_proj"
  ) == ["layers/0/self_attn/q_proj", "layers/0/self_attn/v_proj"]


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_merged_export_is_the_adapted_model_in_transformers(name, tmp_path):
  extras.require("torch")
  transformers = extras.require("transformers")
  import hf_tiny  # pylint: disable=g-import-not-at-top

  model, base = _adapted(name)
  models.save_hf(model, tmp_path)
  with open(tmp_path / "model.safetensors", "rb") as f:
    keys = safetensors.numpy.load(f.read()).keys()
  assert not any("lora" in k for k in keys)
  hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
  want = hf_tiny.torch_logits(hf, IDS)
  got, plain = _logits(name)
  np.testing.assert_allclose(got, want, atol=1e-5)
  # The adapters do change the model: the merge is not a no-op.
  assert np.abs(plain - want).max() > 1e-2


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_adapter_export_loads_in_peft(name, tmp_path):
  extras.require("torch")
  transformers = extras.require("transformers")
  peft = extras.require("peft")
  import hf_tiny  # pylint: disable=g-import-not-at-top

  model, base = _adapted(name)
  models.save_hf(base, tmp_path / "base")
  lora.save_adapter(model, tmp_path / "adapter", base_model="base")
  config = json.loads(
      (tmp_path / "adapter" / "adapter_config.json").read_text()
  )
  assert config["fan_in_fan_out"] == (name == "tiny-gpt2")  # Conv1D (in, out)
  torch_base = transformers.AutoModelForCausalLM.from_pretrained(
      tmp_path / "base"
  )
  adapted = peft.PeftModel.from_pretrained(torch_base, tmp_path / "adapter")
  want = hf_tiny.torch_logits(adapted, IDS)
  got, plain = _logits(name)
  np.testing.assert_allclose(got, want, atol=1e-5)
  assert np.abs(plain - want).max() > 1e-2
