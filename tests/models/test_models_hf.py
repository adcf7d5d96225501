"""HF checkpoints: round trips through transformers, loader errors, sharded loads."""

import json
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
from kdjax import sharding as shd

torch = extras.require("torch")
IDS = np.random.RandomState(0).randint(0, 100, (2, 9))


def _tiny(name):
  kw = (
      dict(vocab_size=100, n_positions=64, n_embd=32)
      if "gpt2" in name
      else dict(vocab_size=100, hidden_size=32)
  )
  model = models.create(name, rngs=nnx.Rngs(1), **kw)
  model.eval()
  return model


@pytest.mark.parametrize(
    "name,cls",
    [("tiny-gpt2", "GPT2LMHeadModel"), ("tiny-llama", "LlamaForCausalLM")],
)
def test_save_hf_loads_in_transformers_with_same_logits(tmp_path, name, cls):
  import transformers

  model = _tiny(name)
  models.save_hf(model, str(tmp_path))
  ref = getattr(transformers, cls).from_pretrained(str(tmp_path))
  ref.eval()
  np.testing.assert_allclose(
      hf_tiny.torch_logits(ref, IDS),
      np.asarray(model(jnp.asarray(IDS))),
      atol=1e-4,
      rtol=0,
  )


def test_sharded_save_round_trips_exactly(tmp_path):
  model = _tiny("tiny-llama")
  models.save_hf(model, str(tmp_path), max_shard_size=20_000)
  index = json.load(open(tmp_path / "model.safetensors.index.json"))
  files = sorted(set(index["weight_map"].values()))
  assert len(files) > 2 and not (tmp_path / "model.safetensors").exists()
  back = models.load(str(tmp_path))
  for a, b in zip(
      jax.tree.leaves(nnx.state(model, nnx.Param)),
      jax.tree.leaves(nnx.state(back, nnx.Param)),
  ):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_smaller_vocab_override_keeps_the_first_rows(tmp_path, name):
  """A teacher read with a student's smaller vocabulary (Gemma 3's image
  tokens dropped) computes the first logit columns of the whole model."""
  model = _tiny(name)
  models.save_hf(model, str(tmp_path))
  small = models.load(str(tmp_path), vocab_size=64)
  np.testing.assert_allclose(
      np.asarray(small(IDS % 64)),
      np.asarray(model(IDS % 64))[..., :64],
      rtol=1e-6,
      atol=1e-6,
  )


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("gpt2"))
  hf_tiny.gpt2(path)
  return path


def _copy_with(src, dst, edit):
  tensors = load_file(os.path.join(src, "model.safetensors"))
  edit(tensors)
  save_file(tensors, os.path.join(dst, "model.safetensors"), {"format": "pt"})
  with open(os.path.join(dst, "config.json"), "w") as f:
    f.write(open(os.path.join(src, "config.json")).read())
  return dst


def test_loader_reports_every_bad_key_at_once(gpt2_dir, tmp_path):
  def edit(t):
    t["transformer.h.0.attn.extra.weight"] = np.zeros(3, np.float32)
    t["transformer.h.1.mlp.c_fc.weight"] = np.zeros((32, 100), np.float32)
    del t["transformer.ln_f.bias"]

  path = _copy_with(gpt2_dir, str(tmp_path), edit)
  with pytest.raises(ValueError) as e:
    models.load(path)
  msg = str(e.value)
  assert "unexpected key 'transformer.h.0.attn.extra.weight'" in msg
  assert "'transformer.h.1.mlp.c_fc.weight' has shape (32, 100)" in msg
  assert "(32, 128)" in msg
  assert "missing key 'ln_f.bias'" in msg


def test_loader_rejects_untied_gpt2_head(gpt2_dir, tmp_path):
  def edit(t):
    t["lm_head.weight"] = t["transformer.wte.weight"] + 1.0

  with pytest.raises(ValueError, match="lm_head.weight"):
    models.load(_copy_with(gpt2_dir, str(tmp_path), edit))


def test_loader_refuses_pickle(gpt2_dir, tmp_path):
  (tmp_path / "config.json").write_text(open(f"{gpt2_dir}/config.json").read())
  (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not read")
  with pytest.raises(
      ValueError, match="pickle.*pytorch_model.bin.*safetensors"
  ):
    models.load(str(tmp_path))


def test_missing_hub_id_offline_gives_one_line(tmp_path, monkeypatch):
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  with pytest.raises(FileNotFoundError) as e:
    models.load(str(tmp_path / "no-such-org/no-such-model"))
  msg = str(e.value)
  assert "\n" not in msg and "`hf download " in msg
  assert "the hub is unreachable" in msg


def test_unreachable_hub_fails_in_seconds(tmp_path, monkeypatch):
  import time

  monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
  monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens
  t0 = time.perf_counter()
  with pytest.raises(FileNotFoundError, match="the hub is unreachable"):
    models.load("no-such-org/no-such-model")
  assert time.perf_counter() - t0 < 10


@pytest.mark.multi_device
def test_mesh_load_matches_unsharded(tmp_path):
  hf_tiny.llama(str(tmp_path))  # 4 query heads, 2 kv heads
  mesh = shd.make_mesh(data=2, fsdp=2, tensor=2)
  plain = models.load(str(tmp_path))
  sharded = models.load(str(tmp_path), mesh=mesh)
  q = sharded.layers[0].self_attn.q_proj.kernel[...]
  assert q.sharding.spec == jax.P("fsdp", "tensor")
  assert sharded.head[...].sharding.spec == jax.P("tensor", "fsdp")
  ids = np.concatenate([IDS, IDS[:, ::-1]])  # batch 4 = data * fsdp
  placed = jax.device_put(jnp.asarray(ids), shd.batch_sharding(mesh))
  with jax.set_mesh(mesh):
    got = jax.jit(lambda m, x: m(x))(sharded, placed)
  # The residual-stream constraint keeps activations split over the batch.
  assert got.sharding.spec[0] == ("data", "fsdp")
  np.testing.assert_allclose(
      np.asarray(got), np.asarray(plain(jnp.asarray(ids))), atol=1e-5
  )


@pytest.mark.multi_device
def test_make_mesh_validates_sizes():
  mesh = shd.make_mesh(fsdp=2)
  assert dict(mesh.shape) == {"data": 4, "fsdp": 2, "tensor": 1}
  with pytest.raises(ValueError, match="fsdp\\*tensor=3"):
    shd.make_mesh(fsdp=3)


def test_load_tokenizer_from_vocab_merges_matches_tokenizer_json(tmp_path):
  from tokenizers import ByteLevelBPETokenizer

  text = [
      "the quick brown fox jumps over the lazy dog " * 5,
      "distillation of language models, teacher and student",
  ]
  bpe = ByteLevelBPETokenizer()
  bpe.train_from_iterator(text, vocab_size=300, min_frequency=1)
  bpe.save_model(str(tmp_path))  # vocab.json + merges.txt
  bpe.save(str(tmp_path / "tok.json"))
  tok = models.load_tokenizer(str(tmp_path))
  ref = models.load_tokenizer(str(tmp_path / "tok.json"))
  for s in ["the lazy student", "Unseen Words! 123", " fox  jumps"]:
    assert tok.encode(s).ids == ref.encode(s).ids == bpe.encode(s).ids
    assert tok.decode(tok.encode(s).ids) == s
