"""GPT-2: parity with PyTorch transformers, both key layouts, presets."""

import os

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import extras
import hf_tiny
from kdjax import models

torch = extras.require("torch")


@nnx.jit
def _forward(model, ids, mask=None, positions=None):
  """Logits in one compiled program per shape, not op by op."""
  return model(ids, positions=positions, attention_mask=mask)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("gpt2"))
  return path, hf_tiny.gpt2(path)


def test_parity_prefixed_layout_with_left_padding(ckpt):
  path, ref = ckpt
  keys = load_file(os.path.join(path, "model.safetensors")).keys()
  assert all(k.startswith("transformer.") for k in keys)  # v5 layout
  model = models.load(path)
  model.eval()
  ids, mask, pos = hf_tiny.left_padded(
      np.random.RandomState(0), 100, [9, 5, 1], 9
  )
  got = np.asarray(_forward(model, jnp.asarray(ids), jnp.asarray(mask)))
  want = hf_tiny.torch_logits(ref, ids, mask, pos)
  np.testing.assert_allclose(got[mask], want[mask], atol=1e-4, rtol=0)
  # The explicit-positions path agrees with the derived one.
  got_pos = _forward(
      model, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(pos)
  )
  np.testing.assert_allclose(np.asarray(got_pos)[mask], got[mask], atol=1e-6)


def test_parity_unprefixed_layout_with_mask_buffers(ckpt, tmp_path):
  """Hub gpt2/gpt2-xl files: no prefix, causal-mask buffers, tied lm_head."""
  path, ref = ckpt
  tensors = load_file(os.path.join(path, "model.safetensors"))
  flat = {k.removeprefix("transformer."): v for k, v in tensors.items()}
  for i in range(2):
    flat[f"h.{i}.attn.bias"] = np.tril(np.ones((1, 1, 64, 64), np.float32))
    flat[f"h.{i}.attn.masked_bias"] = np.array(-1e4, np.float32)
  flat["lm_head.weight"] = flat["wte.weight"]
  save_file(flat, str(tmp_path / "model.safetensors"), {"format": "pt"})
  (tmp_path / "config.json").write_text(open(f"{path}/config.json").read())
  model = models.load(str(tmp_path))
  model.eval()
  ids = np.random.RandomState(1).randint(0, 100, (2, 11))
  np.testing.assert_allclose(
      np.asarray(_forward(model, jnp.asarray(ids))),
      hf_tiny.torch_logits(ref, ids),
      atol=1e-4,
      rtol=0,
  )


def test_dropout_only_in_train_mode(ckpt):
  path, ref = ckpt
  model = models.load(path)  # eval mode, as transformers' from_pretrained
  ids = jnp.asarray(np.random.RandomState(2).randint(0, 100, (1, 8)))
  assert model.config.attn_pdrop == 0.1
  np.testing.assert_allclose(
      np.asarray(_forward(model, ids)),
      hf_tiny.torch_logits(ref, np.asarray(ids)),
      atol=1e-4,
      rtol=0,
  )
  model.train()  # one compiled train-mode program, called twice
  train_a, train_b = np.asarray(_forward(model, ids)), np.asarray(
      _forward(model, ids)
  )
  assert np.abs(train_a - train_b).max() > 1e-3  # fresh masks each call


def test_hidden_states_and_head_weight_give_logits(ckpt):
  model = models.load(ckpt[0])
  model.eval()
  ids = jnp.arange(6)[None]
  h, w, logits = nnx.jit(
      lambda m: (m.hidden_states(ids), m.head_weight(), m(ids))
  )(model)
  h, w = np.asarray(h, np.float64), np.asarray(w, np.float64)
  assert w.shape == (100, 32)
  np.testing.assert_allclose(h @ w.T, np.asarray(logits), atol=1e-5)


def test_bf16_logits_are_float32_and_close(ckpt):
  path, ref = ckpt
  model = models.load(path, dtype=jnp.bfloat16)
  model.eval()
  ids = np.random.RandomState(3).randint(0, 100, (1, 8))
  got = _forward(model, jnp.asarray(ids))
  assert got.dtype == jnp.float32
  assert model.wte.embedding[...].dtype == jnp.bfloat16
  np.testing.assert_allclose(
      np.asarray(got), hf_tiny.torch_logits(ref, ids), atol=0.1
  )


def _count(name, **kw):
  abstract = nnx.eval_shape(lambda: models.create(name, rngs=nnx.Rngs(0), **kw))
  return sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))


def _by_layers(count, n_layer):
  """``count(n)`` (parameters with ``n`` blocks) at ``n_layer`` blocks.

  Blocks are alike, so the count is affine in the number of blocks:
  ``count(1) + (n_layer - 1) * (count(2) - count(1))``. Building one- and
  two-block copies instead of all of a large preset's blocks saves most of
  the test's time (tracing gpt2-xl's 48 blocks takes seconds).
  """
  one, two = count(1), count(2)
  return one + (n_layer - 1) * (two - one)


def _n_params(name, **kw):
  n_layer = models.preset_config(name, **kw).n_layer
  return _by_layers(lambda n: _count(name, **{**kw, "n_layer": n}), n_layer)


def _torch_count(cfg):
  import transformers

  def count(n):
    with torch.device("meta"):
      m = transformers.GPT2LMHeadModel(
          cfg.__class__(**{**cfg.to_dict(), "n_layer": n})
      )
    return sum(p.numel() for p in m.parameters())  # tied head counted once

  return _by_layers(count, cfg.n_layer)


def test_preset_parameter_counts():
  import transformers

  assert _n_params("gpt2") == 124_439_808
  assert _torch_count(transformers.GPT2Config()) == 124_439_808
  # The full two-block model, without the extrapolation.
  assert _count("tiny-gpt2", vocab_size=257) == _torch_count(
      transformers.GPT2Config(
          n_layer=2, n_embd=64, n_head=4, vocab_size=257, n_positions=512
      )
  )


@pytest.mark.slow
def test_gpt2_xl_parameter_count():
  import transformers

  assert _n_params("gpt2-xl") == 1_557_611_200
  assert (
      _torch_count(transformers.GPT2Config(n_layer=48, n_embd=1600, n_head=25))
      == 1_557_611_200
  )


def test_create_rejects_unknown_preset_and_field():
  with pytest.raises(ValueError, match="gpt3"):
    models.create("gpt3", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="n_layers"):
    models.create("tiny-gpt2", n_layers=3, rngs=nnx.Rngs(0))
