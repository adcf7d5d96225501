"""LLaMA-style families against transformers: Llama 3, Mistral, Qwen2, Qwen3,
Gemma 2 and Gemma 3 (text).

One tiny random transformers model per family (``hf_tiny.DECODERS``: 2
layers, width 32, sliding window 5, randomised norms and biases, Gemma's
weights drawn large enough for Gemma 2's two soft-caps to act), loaded by
kdjax from its ``save_pretrained`` directory. Sequences of 12 tokens run past
the window. Logits are compared in float32 with ``atol=1e-5``: they are O(1)
(below 1 for LLaMA, Mistral and Qwen, 2 for Gemma 2, 6 for Gemma 3), and the
measured differences are 1e-7 to 4e-6 (docs/models.md).
"""

import copy
import json
import re

from flax import nnx, traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import extras
import hf_tiny
from kdjax import models, objective, sampling
from kdjax import sharding as shd
from kdjax.models import hf, layers, llama

torch = extras.require("torch")
transformers = extras.require("transformers")

FAMILIES = ["llama3", "mistral", "qwen2", "qwen3", "gemma2", "gemma3"]
ATOL = 1e-5
WIDTH = 12  # > hf_tiny.WINDOW


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request, tmp_path_factory):
  """(name, checkpoint dir, transformers model, kdjax model)."""
  path = str(tmp_path_factory.mktemp(request.param))
  ref = hf_tiny.decoder(request.param, path)
  return request.param, path, ref, models.load(path)


@nnx.jit
def _forward(model, ids, mask):
  """The model's logits, jitted: one compiled program per family's graph,
  shared by the module's tests (the same shapes), not op by op."""
  return model(ids, attention_mask=mask)


def _batch(seed=0):
  """Left-padded ids, mask and positions: rows of 12 and 9 tokens."""
  return hf_tiny.left_padded(np.random.RandomState(seed), 100, [12, 9], WIDTH)


def test_full_forward_matches_transformers(pair):
  _, _, ref, model = pair
  ids, mask, pos = _batch()
  got = np.asarray(_forward(model, ids, mask))
  want = hf_tiny.torch_logits(ref, ids, mask, pos)
  np.testing.assert_allclose(got[mask], want[mask], atol=ATOL, rtol=0)


def test_cached_decode_matches_transformers(pair):
  """A 4-token prefill, then one token at a time through the KV cache, past
  the window: every step's logits equal transformers' full forward."""
  _, _, ref, model = pair
  ids, mask, pos = _batch(1)
  want = hf_tiny.torch_logits(ref, ids, mask, pos)
  decode = nnx.jit(lambda m, x, c, mask: m.decode(x, c, attention_mask=mask))
  cache = model.init_cache(2, WIDTH)
  got = []
  for start, stop in [(0, 4)] + [(t, t + 1) for t in range(4, WIDTH)]:
    logits, cache = decode(
        model,
        jnp.asarray(ids[:, start:stop]),
        cache,
        jnp.asarray(mask[:, start:stop]),
    )
    got.append(np.asarray(logits))
  got = np.concatenate(got, axis=1)
  np.testing.assert_allclose(got[mask], want[mask], atol=ATOL, rtol=0)


def test_export_reloads_in_transformers_with_same_logits(pair, tmp_path):
  name, _, _, model = pair
  models.save_hf(model, str(tmp_path))
  cfg = json.loads((tmp_path / "config.json").read_text())
  family = model.config.family
  assert cfg["architectures"] == [family.architecture]
  back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path))
  assert type(back).__name__ == family.architecture
  back.eval()
  ids, mask, pos = _batch(2)
  got = np.asarray(_forward(model, ids, mask))
  want = hf_tiny.torch_logits(back, ids, mask, pos)
  np.testing.assert_allclose(got[mask], want[mask], atol=ATOL, rtol=0)
  # And kdjax reads its own export back to the same config.
  assert models.load(str(tmp_path)).config == model.config, name


def test_greedy_generation_equals_transformers(pair):
  """Ten greedy tokens, past the window, none repeated (tiny tied models
  would otherwise repeat the last token); both stop at the config's EOS."""
  _, _, ref, model = pair
  prompt = np.random.RandomState(3).randint(1, 100, 4)
  eos = model.config.eos_token_id
  got = np.asarray(
      sampling.generate(
          model,
          jnp.asarray(prompt[None]),
          max_new_tokens=10,
          stop_ids=eos,
          pad_id=-1,
          no_repeat_ngram_size=1,
      )
  )[0]
  out = ref.generate(
      torch.tensor(prompt[None]),
      attention_mask=torch.ones(1, 4, dtype=torch.long),
      do_sample=False,
      max_new_tokens=10,
      pad_token_id=0,
      no_repeat_ngram_size=1,
  )
  want = out[0, 4:].numpy()
  np.testing.assert_array_equal(got[: len(want)], want)
  assert (got[len(want) :] == -1).all() and len(want) > 2


def test_sharded_bfloat16_checkpoint_loads_exactly(pair, tmp_path):
  """transformers' bf16 shards + index: every weight arrives bit-exact (as
  float32), and the logits equal the bf16-rounded torch model's."""
  _, _, ref, _ = pair
  half = copy.deepcopy(ref).to(torch.bfloat16)
  half.save_pretrained(str(tmp_path), max_shard_size="20KB")
  index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
  assert len(set(index["weight_map"].values())) > 2
  # transformers' own float32 load of the bf16 checkpoint: the reference.
  rounded = transformers.AutoModelForCausalLM.from_pretrained(
      str(tmp_path), dtype=torch.float32
  )
  rounded.eval()
  want_params = {k: v.numpy() for k, v in rounded.state_dict().items()}
  model = models.load(str(tmp_path))
  params = traverse_util.flatten_dict(
      nnx.to_pure_dict(nnx.state(model, nnx.Param))
  )
  for e in hf.family(model.config).entries:
    value = np.asarray(params[e.path])
    np.testing.assert_array_equal(
        value.T if e.transpose else value, want_params[e.hf_key], e.hf_key
    )
  ids, mask, pos = _batch(4)
  got = np.asarray(_forward(model, ids, mask))
  want = hf_tiny.torch_logits(rounded, ids, mask, pos)
  np.testing.assert_allclose(got[mask], want[mask], atol=ATOL, rtol=0)


def test_sliding_window_boundary():
  """Query slot t sees key slots t - W < s <= t (transformers' rule), with
  and without a cache offset, padding still masked."""
  W, T, S = 3, 4, 9
  valid = np.ones((1, S), bool)
  valid[0, 0] = False  # a left-padding slot
  cache = models.KVCache((), (), jnp.asarray(valid), jnp.asarray(5))
  ctx, _ = layers.context(None, None, cache, (1, T))
  got = np.asarray(layers.sliding_window(ctx, W))[0]
  t, s = np.arange(5, 9)[:, None], np.arange(S)[None, :]
  want = (s <= t) & (s > t - W) & valid
  np.testing.assert_array_equal(got, want)
  ctx, _ = layers.context(None, None, None, (1, T))
  np.testing.assert_array_equal(
      np.asarray(layers.sliding_window(ctx, 1))[0], np.eye(T, dtype=bool)
  )


def test_gemma2_parity_needs_both_softcaps(tmp_path):
  """The tiny Gemma 2's logits and attention logits are past the caps:
  leaving either cap out moves the logits far from transformers'."""
  ref = hf_tiny.decoder("gemma2", str(tmp_path))
  ids, mask, pos = _batch()
  want = hf_tiny.torch_logits(ref, ids, mask, pos)[mask]
  for cap in ("attn_logit_softcapping", "final_logit_softcapping"):
    model = models.load(str(tmp_path), **{cap: None})
    got = np.asarray(_forward(model, ids, mask))
    assert np.abs(got[mask] - want).max() > 0.05, cap


def test_fused_loss_of_softcapped_models_equals_logits_path():
  """loss.impl='fused' on a Gemma 2 student and teacher (final-logit caps
  of 1 and 2) gives the logits path's sums and gradient."""
  student = models.create(
      "tiny-gemma2",
      vocab_size=64,
      final_logit_softcapping=1.0,
      rngs=nnx.Rngs(0),
  )
  teacher = models.create(
      "tiny-gemma2",
      vocab_size=64,
      final_logit_softcapping=2.0,
      rngs=nnx.Rngs(1),
  )
  rng = np.random.RandomState(5)
  batch = {
      "input_ids": jnp.asarray(rng.randint(0, 64, (2, 10))),
      "positions": jnp.tile(jnp.arange(10), (2, 1)),
      "attention_mask": jnp.ones((2, 10), bool),
      "labels": jnp.asarray(rng.randint(0, 64, (2, 10))),
      "loss_mask": jnp.ones((2, 10)),
  }

  def loss(model, impl):
    cfg = dict(
        name="fkl", impl=impl, kd_ratio=0.5, chunk_size=8, temperature=1.0
    )
    cfg["hp"] = {}
    sums = objective.sums(cfg, model, teacher, batch)
    return objective.combine(cfg, sums)[0]

  step = nnx.jit(nnx.value_and_grad(loss), static_argnums=1)
  want, g_want = step(student, "auto")
  got, g_got = step(student, "fused")
  np.testing.assert_allclose(got, want, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_want)):
    np.testing.assert_allclose(a, b, atol=1e-5 * np.abs(b).max() + 1e-8)


def test_gemma3_multimodal_checkpoint_loads_its_language_model(tmp_path):
  """A Gemma3ForConditionalGeneration directory (model_type 'gemma3'):
  kdjax loads the text model and drops the vision tower."""
  torch.manual_seed(0)
  text = dict(hf_tiny.LLAMA_KW, **hf_tiny.DECODERS["gemma3"][2])
  vision = dict(
      hidden_size=16,
      intermediate_size=32,
      num_hidden_layers=1,
      num_attention_heads=2,
      image_size=28,
      patch_size=14,
  )
  ref = transformers.Gemma3ForConditionalGeneration(
      transformers.Gemma3Config(
          text_config=text, vision_config=vision, mm_tokens_per_image=4
      )
  )
  ref.eval()
  ref.save_pretrained(str(tmp_path))
  model = models.load(str(tmp_path))
  assert model.config.model_type == "gemma3_text"
  ids, mask, pos = _batch()
  got = np.asarray(_forward(model, ids, mask))
  want = hf_tiny.torch_logits(ref, ids, mask, pos)
  np.testing.assert_allclose(got[mask], want[mask], atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", list(hf_tiny.DECODERS))
def test_config_defaults_are_transformers_defaults(name):
  """A config.json that leaves keys out gets transformers' class defaults."""
  cfg_cls = hf_tiny.DECODERS[name][0]
  theirs = getattr(transformers, cfg_cls)()
  kind = theirs.model_type
  ours = hf.config_from_hf({"model_type": kind})
  want = hf.config_from_hf(theirs.to_dict())
  assert ours == want


@pytest.mark.parametrize(
    "cfg_cls,kw",
    [
        # Qwen2.5's published form: a window size, but switched off.
        ("Qwen2Config", dict(use_sliding_window=False, sliding_window=32768)),
        ("Qwen2Config", dict(use_sliding_window=True, max_window_layers=3)),
        ("Qwen3Config", dict(use_sliding_window=True, max_window_layers=1)),
        ("MistralConfig", dict(sliding_window=None)),
        ("Gemma2Config", {}),
        ("Gemma3TextConfig", dict(sliding_window_pattern=3)),
    ],
)
def test_layer_types_follow_transformers_rules(cfg_cls, kw):
  """Windows per layer from a v4-style config.json (no layer_types) equal
  those transformers derives for the same file."""
  theirs = getattr(transformers, cfg_cls)(num_hidden_layers=7, **kw)
  raw = {k: v for k, v in theirs.to_dict().items() if k != "layer_types"}
  raw.update(kw)
  ours = hf.config_from_hf(raw)
  window = getattr(theirs, "sliding_window", None)
  types = getattr(theirs, "layer_types", None) or ["sliding_attention"] * 7
  want = [window if t == "sliding_attention" else None for t in types]
  assert [ours.window(i) for i in range(7)] == want


def test_family_options_outside_the_family_are_refused():
  with pytest.raises(
      ValueError, match="sliding_window=8 is not part of.*llama"
  ):
    models.create("tiny-llama", sliding_window=8, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="attn_logit_softcapping.*gemma2"):
    models.create("tiny-gemma3", attn_logit_softcapping=5.0, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="layer_types"):
    models.create(
        "tiny-qwen2", layer_types=("full_attention",), rngs=nnx.Rngs(0)
    )
  with pytest.raises(ValueError, match="model_type='gpt2' is not"):
    llama.LlamaConfig(model_type="gpt2")


def test_every_parameter_has_a_sharding_rule():
  for name in ("tiny-qwen2", "tiny-qwen3", "tiny-gemma2", "tiny-gemma3"):
    kw = dict(attention_bias=True) if name != "tiny-qwen2" else {}
    model = nnx.eval_shape(
        lambda: models.create(name, rngs=nnx.Rngs(0), **kw)  # pylint: disable=cell-var-from-loop
    )
    flat = traverse_util.flatten_dict(
        nnx.to_pure_dict(nnx.state(model, nnx.Param))
    )
    for path in flat:
      joined = "/".join(map(str, path))
      assert any(
          re.fullmatch(p, joined) for p, _ in llama.Llama.LOGICAL_AXES
      ), (name, joined)


@pytest.mark.multi_device
def test_mesh_load_of_a_biased_model_matches_unsharded(tmp_path):
  hf_tiny.decoder("qwen2", str(tmp_path))
  mesh = shd.make_mesh(data=2, fsdp=2, tensor=2)
  plain = models.load(str(tmp_path))
  sharded = models.load(str(tmp_path), mesh=mesh)
  attn = sharded.layers[0].self_attn
  assert attn.q_proj.bias[...].sharding.spec == jax.P("tensor")
  assert attn.k_proj.bias[...].sharding.spec == jax.P("tensor")
  # The module's batch (its unsharded program is test_full_forward's), and
  # its rows reversed: four rows over the data x fsdp = 4 shards.
  ids, mask, _ = _batch(6)
  want = np.asarray(_forward(plain, ids, mask))
  ids, mask, want = (np.concatenate([x, x[::-1]]) for x in (ids, mask, want))
  placed = [
      jax.device_put(jnp.asarray(x), shd.batch_sharding(mesh))
      for x in (ids, mask)
  ]
  with jax.set_mesh(mesh):
    got = jax.jit(lambda m, x, k: m(x, attention_mask=k))(sharded, *placed)
  np.testing.assert_allclose(np.asarray(got)[mask], want[mask], atol=1e-5)


# Parameter counts of the published checkpoints (the hub's model cards;
# Qwen3-1.7B's card counts its tied head twice: 2,031,739,904).
PUBLISHED = {
    "qwen3-0.6b": 596_049_920,
    "qwen3-1.7b": 1_720_574_976,
    "qwen3-8b": 8_190_735_360,
    "llama-3.2-1b": 1_235_814_400,
    "llama-3.1-8b": 8_030_261_248,
    "gemma-3-1b": 999_885_952,
    "gemma-3-12b": 11_766_034_176,  # the language model of the 12B
}


FAST_PRESETS = ("qwen3-0.6b", "llama-3.2-1b", "gemma-3-1b")


@pytest.mark.parametrize(
    "name",
    [
        n if n in FAST_PRESETS else pytest.param(n, marks=pytest.mark.slow)
        for n in PUBLISHED
    ],
)
def test_real_presets_have_the_published_sizes(name):
  """kdjax's count, and transformers' count of the exported config.json.

  Layers differ at most in their attention window, not in their parameters,
  so each count is affine in the number of layers ``L``:
  ``count(1) + (L - 1) * (count(2) - count(1))``, from one- and two-layer
  copies of the preset (its first layers' types) instead of all its layers.
  """
  full = models.preset_config(name)
  ours, theirs = [], []
  for n in (1, 2):
    kw = dict(num_hidden_layers=n)
    if full.layer_types is not None:
      kw["layer_types"] = full.layer_types[:n]
    model = nnx.eval_shape(lambda: models.create(name, rngs=nnx.Rngs(0), **kw))
    ours.append(
        sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    )
    cfg = transformers.AutoConfig.for_model(**hf.config_to_hf(model.config))
    with torch.device("meta"):
      ref = transformers.AutoModelForCausalLM.from_config(cfg)
    assert type(ref).__name__ == model.config.family.architecture
    theirs.append(sum(p.numel() for p in ref.parameters()))
  at_depth = lambda c: c[0] + (full.num_hidden_layers - 1) * (c[1] - c[0])
  assert at_depth(ours) == at_depth(theirs) == PUBLISHED[name]
