"""KV-cache decoding and generation, checked against full forwards and transformers."""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import extras
import hf_tiny
from kdjax import models, sampling


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_incremental_decode_equals_full_forward(name):
  model = models.create(name, vocab_size=50, rngs=nnx.Rngs(0))
  model.eval()
  ids, mask, _ = hf_tiny.left_padded(np.random.RandomState(0), 50, [4, 2], 4)
  cont = np.random.RandomState(1).randint(0, 50, (2, 5))
  full_ids = jnp.asarray(np.concatenate([ids, cont], 1))
  full_mask = jnp.asarray(np.concatenate([mask, np.ones_like(cont, bool)], 1))
  want = np.asarray(
      nnx.jit(lambda m, x, mask: m(x, attention_mask=mask))(
          model, full_ids, full_mask
      )
  )
  decode = nnx.jit(
      lambda m, x, c, mask=None: m.decode(x, c, attention_mask=mask)
  )
  cache = model.init_cache(2, 9)
  logits, cache = decode(model, jnp.asarray(ids), cache, jnp.asarray(mask))
  np.testing.assert_allclose(
      np.asarray(logits)[mask], want[:, :4][mask], atol=1e-5
  )
  for t in range(5):
    logits, cache = decode(model, jnp.asarray(cont[:, t : t + 1]), cache)
    np.testing.assert_allclose(
        np.asarray(logits[:, 0]), want[:, 4 + t], atol=1e-5, err_msg=f"step {t}"
    )
  assert int(cache.index) == 9


@pytest.fixture(scope="module")
def gpt2_pair(tmp_path_factory):
  extras.require("torch")
  path = str(tmp_path_factory.mktemp("gpt2"))
  ref = hf_tiny.gpt2(path)
  model = models.load(path)
  model.eval()
  return model, ref


def _hf_generate(ref, prompt, **kw):
  import torch

  out = ref.generate(
      torch.tensor(np.asarray(prompt)[None]),
      do_sample=False,
      attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
      pad_token_id=0,
      **kw,
  )
  return out[0, len(prompt) :].numpy()


def test_greedy_left_padded_batch_equals_transformers_per_prompt(gpt2_pair):
  model, ref = gpt2_pair
  lengths = [7, 3, 5]
  ids, mask, _ = hf_tiny.left_padded(np.random.RandomState(2), 100, lengths, 7)
  got = np.asarray(sampling.generate(model, ids, mask, max_new_tokens=10))
  for row, n in enumerate(lengths):
    want = _hf_generate(ref, ids[row, 7 - n :], max_new_tokens=10)
    np.testing.assert_array_equal(got[row], want, err_msg=f"row {row}")


def test_no_repeat_ngram_matches_transformers(gpt2_pair):
  model, ref = gpt2_pair
  ids = np.random.RandomState(3).randint(1, 100, (2, 4))
  plain = np.asarray(sampling.generate(model, ids, max_new_tokens=24))
  got = np.asarray(
      sampling.generate(model, ids, max_new_tokens=24, no_repeat_ngram_size=2)
  )

  def bigrams(seq):
    return [tuple(seq[i : i + 2]) for i in range(len(seq) - 1)]

  # The unconstrained tiny model loops, so the check below can fail.
  assert any(
      len(set(bigrams(list(ids[r]) + list(plain[r]))))
      < len(bigrams(list(ids[r]) + list(plain[r])))
      for r in range(2)
  )
  for r in range(2):
    seq = list(ids[r]) + list(got[r])
    assert len(set(bigrams(seq))) == len(bigrams(seq))
    np.testing.assert_array_equal(
        got[r],
        _hf_generate(ref, ids[r], max_new_tokens=24, no_repeat_ngram_size=2),
    )


def test_banned_ngram_mask_matches_hf_processor():
  torch = extras.require("torch")
  from transformers.generation.logits_process import (
      NoRepeatNGramLogitsProcessor,
  )

  rng = np.random.RandomState(4)
  tokens = rng.randint(0, 4, (3, 12))  # small vocabulary: many repeats
  for n in (2, 3):
    banned = np.asarray(
        jax.jit(sampling.banned_ngram_mask, static_argnums=(3, 4))(
            jnp.asarray(tokens), jnp.ones((3, 12), bool), 12, n, 6
        )
    )
    scores = NoRepeatNGramLogitsProcessor(n)(
        torch.tensor(tokens), torch.zeros(3, 6)
    )
    np.testing.assert_array_equal(banned, np.isinf(scores.numpy()))
    assert banned.any()


def test_top_k_and_top_p_on_hand_built_distribution():
  probs = np.array([[0.05, 0.5, 0.15, 0.3]])
  logits = jnp.log(jnp.asarray(probs))
  kept = lambda x: np.isfinite(np.asarray(x))[0].tolist()
  assert kept(sampling.top_k_mask(logits, 2)) == [False, True, False, True]
  assert kept(sampling.top_k_mask(logits, 0)) == [True] * 4
  # Ascending cumsum 0.05, 0.20, 0.50, 1.0; drop where <= 1 - p.
  assert kept(sampling.top_p_mask(logits, 0.8)) == [False, True, False, True]
  assert kept(sampling.top_p_mask(logits, 0.81)) == [False, True, True, True]
  assert kept(sampling.top_p_mask(logits, 0.01)) == [False, True, False, False]


def test_top_k_top_p_match_hf_warpers_on_random_logits():
  torch = extras.require("torch")
  from transformers.generation.logits_process import (
      TopKLogitsWarper,
      TopPLogitsWarper,
  )

  logits = np.random.RandomState(5).randn(4, 50).astype(np.float32) * 3
  for k in (1, 5, 20):
    want = TopKLogitsWarper(k)(None, torch.tensor(logits)).numpy()
    np.testing.assert_array_equal(
        np.isinf(np.asarray(sampling.top_k_mask(jnp.asarray(logits), k))),
        np.isinf(want),
    )
  for p in (0.3, 0.9, 0.99):
    want = TopPLogitsWarper(p)(None, torch.tensor(logits)).numpy()
    np.testing.assert_array_equal(
        np.isinf(np.asarray(sampling.top_p_mask(jnp.asarray(logits), p))),
        np.isinf(want),
    )


def test_sampling_keys_top_k1_and_eos_stopping():
  model = models.create("tiny-llama", vocab_size=40, rngs=nnx.Rngs(0))
  model.eval()
  ids = np.random.RandomState(6).randint(0, 40, (2, 3))
  greedy = np.asarray(sampling.generate(model, ids, max_new_tokens=8))
  kw = dict(max_new_tokens=8, greedy=False, temperature=0.7)
  a = sampling.generate(model, ids, key=jax.random.key(0), **kw)
  b = sampling.generate(model, ids, key=jax.random.key(0), **kw)
  c = sampling.generate(model, ids, key=jax.random.key(1), **kw)
  np.testing.assert_array_equal(a, b)
  assert np.any(np.asarray(a) != np.asarray(c))
  # top-k = 1 sampling is greedy whatever the key.
  k1 = sampling.generate(
      model, ids, key=jax.random.key(2), **{**kw, "top_k": 1}
  )
  np.testing.assert_array_equal(k1, greedy)
  # eos: the row stops after greedy's third token; the other row may go on.
  eos = int(greedy[0, 2])
  out = np.asarray(
      sampling.generate(model, ids, max_new_tokens=8, stop_ids=eos, pad_id=-1)
  )
  first = int(np.argmax(greedy[0] == eos))
  np.testing.assert_array_equal(out[0, : first + 1], greedy[0, : first + 1])
  assert (out[0, first + 1 :] == -1).all()
  with pytest.raises(ValueError, match="PRNG key"):
    sampling.generate(model, ids, greedy=False)


def _cut_at_stops(tokens, stop_ids, pad_id):
  """Each row through its first stop id, then ``pad_id``: the Python loop."""
  out = np.full_like(tokens, pad_id)
  for r, row in enumerate(tokens.tolist()):
    for i, t in enumerate(row):
      out[r, i] = t
      if t in stop_ids:
        break
  return out


def test_a_row_ends_at_the_first_of_several_stop_ids():
  """Greedy decoding does not depend on where rows stop, so decoding with
  stop ids is the unstopped greedy output cut by a Python loop."""
  model = models.create("tiny-llama", vocab_size=40, rngs=nnx.Rngs(0))
  model.eval()
  ids = np.random.RandomState(7).randint(0, 40, (3, 3))
  greedy = np.asarray(sampling.generate(model, ids, max_new_tokens=10))
  # A stop id from row 0's third token and another from row 1's later
  # tokens: each row ends at whichever comes first in it.
  first = int(greedy[0, 2])
  second = next(int(t) for t in greedy[1, 5:] if t not in greedy[0, :3])
  stops = (first, second)
  want = _cut_at_stops(greedy, stops, pad_id=-1)
  assert (want == -1).any(axis=1).sum() >= 2  # two rows end early
  # ... and the second id ends a row that the first alone would not.
  assert not np.array_equal(want, _cut_at_stops(greedy, (first,), -1))
  got = np.asarray(
      sampling.generate(
          model, ids, max_new_tokens=10, stop_ids=list(stops), pad_id=-1
      )
  )
  np.testing.assert_array_equal(got, want)
  # No stop id: rows run to max_new_tokens.
  none = sampling.generate(model, ids, max_new_tokens=10, stop_ids=())
  np.testing.assert_array_equal(none, greedy)


def test_stop_ids_are_one_id_or_several():
  assert sampling.stop_tuple(5) == (5,)
  assert sampling.stop_tuple(np.int64(5)) == (5,)
  assert sampling.stop_tuple([7, np.int32(3), 7]) == (7, 3)
  assert sampling.stop_tuple(None) == ()
  s = sampling.make_settings(stop_ids=[2, 9], pad_id=2)
  assert s.stop_ids == (2, 9) and hash(s) == hash(s._replace())
  tokens = jnp.asarray([[1, 9, 2], [4, 4, 4]])
  np.testing.assert_array_equal(
      sampling.is_stop(tokens, (2, 9)), [[0, 1, 1], [0, 0, 0]]
  )
  assert not np.asarray(sampling.is_stop(tokens, ())).any()
