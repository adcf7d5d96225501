"""LLaMA: parity with PyTorch transformers (GQA, RoPE, rope_theta, scaling), presets."""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import extras
import hf_tiny
from kdjax import models

torch = extras.require("torch")


@pytest.mark.parametrize(
    "kw",
    [
        dict(rope_theta=500.0),
        dict(
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=10000.0,
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=8,
            )
        ),
    ],
    ids=["theta", "llama3-scaling"],
)
def test_parity_gqa_rope_left_padding(tmp_path, kw):
  ref = hf_tiny.llama(str(tmp_path), **kw)
  model = models.load(str(tmp_path))
  assert model.config.num_key_value_heads == 2
  ids, mask, pos = hf_tiny.left_padded(
      np.random.RandomState(0), 100, [12, 7], 12
  )
  got = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
  want = hf_tiny.torch_logits(ref, ids, mask, pos)
  np.testing.assert_allclose(got[mask], want[mask], atol=1e-4, rtol=0)
  np.testing.assert_allclose(
      np.asarray(model.hidden_states(jnp.asarray(ids)))
      @ np.asarray(model.head_weight()).T,
      hf_tiny.torch_logits(ref, ids),
      atol=1e-4,
  )


def test_remat_keeps_loss_and_gradients():
  model = models.create("tiny-llama", rngs=nnx.Rngs(0))
  remat = models.create("tiny-llama", remat="full", rngs=nnx.Rngs(0))
  ids = jnp.arange(10)[None] % 7

  def loss(m):
    return -jnp.mean(jax.nn.log_softmax(m(ids))[0, :-1, ids[0, 1:]])

  step = nnx.jit(nnx.value_and_grad(loss))  # eager remat is slow
  l0, g0 = step(model)
  l1, g1 = step(remat)
  np.testing.assert_allclose(l0, l1, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
    np.testing.assert_allclose(a, b, atol=1e-6)


def _n_params(name):
  abstract = nnx.eval_shape(lambda: models.create(name, rngs=nnx.Rngs(0)))
  return sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))


def _torch_count(**kw):
  import transformers

  with torch.device("meta"):
    m = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw))
  return sum(p.numel() for p in m.parameters())


def test_tinyllama_parameter_count():
  # TinyLlama/TinyLlama-1.1B config.json.
  want = _torch_count(
      vocab_size=32000,
      hidden_size=2048,
      intermediate_size=5632,
      num_hidden_layers=22,
      num_attention_heads=32,
      num_key_value_heads=4,
  )
  assert want == 1_100_048_384
  assert _n_params("tinyllama-1.1b") == want


@pytest.mark.slow
def test_llama_7b_parameter_count():
  want = _torch_count()  # LlamaConfig defaults are LLaMA-7B
  assert want == 6_738_415_616
  assert _n_params("llama-7b") == want
