"""A kdjax export is a complete transformers checkpoint; load() is eval mode.

The exported byte-vocabulary model is opened with ``AutoTokenizer`` and
``AutoModelForCausalLM`` only (no kdjax), ``generate`` stops at the EOS the
export declares, and its tokens equal kdjax's own greedy generation.
"""

import json

import jax.numpy as jnp
import numpy as np

import extras
from kdjax import models, sampling
from kdjax.data import tokenizer as tokenizer_lib
import tiny_run

PROMPT = "add 2 and 3\n"
NORMAL_TOKENS = 4  # tokens generated before the forced EOS


def _byte_model(eos_at: int | None = None):
  """A random byte-vocabulary GPT-2; ``eos_at``: the position whose hidden
  state is forced to predict EOS (through a large position embedding)."""
  model = tiny_run.gpt2(3, n_positions=64, **tiny_run.TEACHER)
  model.eval()
  if eos_at is not None:
    d = model.config.n_embd
    v = np.random.RandomState(0).randn(d).astype(np.float32)
    v -= v.mean()  # LayerNorm keeps a zero-mean direction
    wpe = np.array(model.wpe.embedding[...])
    wpe[eos_at] += 200.0 * v / np.linalg.norm(v)
    model.wpe.embedding[...] = jnp.asarray(wpe)
    wte = np.array(model.wte.embedding[...])
    wte[tokenizer_lib.EOS_ID] = 0.15 * v / np.linalg.norm(v)
    model.wte.embedding[...] = jnp.asarray(wte)
  return model


def test_export_declares_the_byte_tokenizers_special_ids(tmp_path):
  models.save_hf(_byte_model(), str(tmp_path))
  cfg = json.loads((tmp_path / "config.json").read_text())
  gen = json.loads((tmp_path / "generation_config.json").read_text())
  assert cfg["vocab_size"] == 257
  assert cfg["eos_token_id"] == cfg["bos_token_id"] == tokenizer_lib.EOS_ID
  assert gen == {"eos_token_id": 256, "bos_token_id": 256, "pad_token_id": 256}
  special = json.loads((tmp_path / "special_tokens_map.json").read_text())
  assert special["eos_token"] == tokenizer_lib.EOS_TOKEN
  # The tokenizer round-trips through kdjax's own loader too.
  tok = models.load_tokenizer(str(tmp_path))
  assert (
      tok.encode("héllo").ids == tokenizer_lib.byte_level().encode("héllo").ids
  )


def test_export_never_declares_an_eos_outside_the_vocabulary(tmp_path):
  # A random model with a made-up vocabulary and no tokenizer: GPT-2's
  # default EOS 50256 does not exist in it, so no EOS is declared.
  model = tiny_run.gpt2(vocab_size=100)
  models.save_hf(model, str(tmp_path))
  cfg = json.loads((tmp_path / "config.json").read_text())
  gen = json.loads((tmp_path / "generation_config.json").read_text())
  assert cfg["eos_token_id"] is None and gen["eos_token_id"] is None
  assert not (tmp_path / "tokenizer.json").exists()


def test_transformers_auto_classes_generate_what_kdjax_generates(tmp_path):
  extras.require("torch")
  transformers = extras.require("transformers")
  tok_kd = tokenizer_lib.byte_level()
  prompt_ids = tok_kd.encode(PROMPT).ids
  eos_at = len(prompt_ids) - 1 + NORMAL_TOKENS  # hidden that predicts EOS
  model = _byte_model(eos_at=eos_at)
  models.save_hf(model, str(tmp_path))

  ours = np.asarray(
      sampling.generate(
          model,
          jnp.asarray([prompt_ids]),
          max_new_tokens=12,
          greedy=True,
          stop_ids=tokenizer_lib.EOS_ID,
          pad_id=tokenizer_lib.EOS_ID,
      )
  )[0]
  stop = list(ours).index(tokenizer_lib.EOS_ID) + 1
  assert stop == NORMAL_TOKENS + 1  # the forced EOS ends the row
  ours = ours[:stop].tolist()

  tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path))
  hf_model.eval()
  assert tok.eos_token_id == tok.pad_token_id == tokenizer_lib.EOS_ID
  assert len(tok) == 257
  enc = tok(PROMPT, return_tensors="pt")
  assert enc["input_ids"][0].tolist() == prompt_ids
  out = hf_model.generate(**enc, max_new_tokens=12, do_sample=False)
  theirs = out[0, len(prompt_ids) :].tolist()
  assert theirs == ours  # stopped at EOS, same tokens
  text = tok.decode(out[0], skip_special_tokens=True)
  assert text == tok_kd.decode(prompt_ids + ours[:-1])


def test_load_returns_eval_mode_and_train_turns_dropout_on(tmp_path):
  model = tiny_run.gpt2(embd_pdrop=0.5, attn_pdrop=0.5, resid_pdrop=0.5)
  models.save_hf(model, str(tmp_path))
  loaded = models.load(str(tmp_path))
  ids = jnp.asarray(np.arange(12)[None] % 257)
  np.testing.assert_array_equal(loaded(ids), loaded(ids))  # dropout off
  loaded.train()
  assert np.max(np.abs(np.asarray(loaded(ids)) - np.asarray(loaded(ids)))) > 0
