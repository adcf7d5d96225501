"""LoRA students: only the adapters train, are checkpointed and resume; the
merged export is the adapted model to transformers, the adapter export to peft.
"""

import json

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import safetensors.numpy

import extras
from kdjax import metrics, models, training
from kdjax.models import lora
import tiny_run

RANK, ALPHA = 4, 8.0
IDS = np.array([[5, 17, 3, 42, 8, 1, 66, 23, 9, 31]])


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  return str(tmp_path_factory.mktemp("lora"))


def _config(root, steps=4, **overrides):
  return tiny_run.config(
      "sft_gpt2",
      root,
      steps=steps,
      **{"student.lora.rank": RANK, "student.lora.alpha": ALPHA, **overrides},
  )


def _flat(tree) -> dict[str, np.ndarray]:
  """Arrays by path (RNG keys as their raw data)."""
  out = {}
  for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if jnp.issubdtype(getattr(v, "dtype", None), jax.dtypes.prng_key):
      v = jax.random.key_data(v)
    out[jax.tree_util.keystr(k)] = np.asarray(v)
  return out


def _size(tree) -> int:
  return sum(x.size for x in jax.tree.leaves(tree))


def _adapted(name: str, seed: int = 0):
  """A tiny preset with rank-``RANK`` adapters whose A and B are both random
  (B non-zero, so the adapters change the output), in eval mode; and the
  same model without adapters."""
  vocab = 97
  base = models.create(name, vocab_size=vocab, rngs=nnx.Rngs(seed))
  base.eval()
  model = lora.apply(nnx.clone(base), rank=RANK, alpha=ALPHA, rngs=nnx.Rngs(1))
  key = jax.random.key(seed)
  for _, m in lora.adapted(model):
    for v in (m.lora.lora_a, m.lora.lora_b):
      key, sub = jax.random.split(key)
      v[...] = 0.2 * jax.random.normal(sub, v.shape)
  model.eval()
  return model, base


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
  # The base keeps its own paths (and values): the plain model's state.
  plain = nnx.state(model, nnx.All(nnx.Param, nnx.Not(lora.TRAINABLE)))
  assert jax.tree.structure(plain) == jax.tree.structure(
      nnx.state(base, nnx.Param)
  )
  # A regex on paths: the first layer's query and value projections only.
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
  names = "c_attn,c_fc,c_proj" if name == "tiny-gpt2" else "down_proj,"
  with pytest.raises(ValueError, match=f"none .* choose among {names}"):
    lora.apply(base, rank=RANK, alpha=ALPHA, targets="lm_head", rngs=None)


def test_only_the_adapters_train(root):
  # FSDP-sharded base (adapters replicated) and rematerialised blocks.
  c = _config(root, **{"mesh.fsdp": 2, "student.remat": "full"})
  run, mesh = tiny_run.built(c, root)
  layer = run.state.params["h"][0]["attn"]["c_attn"]
  assert "fsdp" in str(layer["kernel"].sharding.spec)
  assert layer["lora"]["lora_a"].sharding.is_fully_replicated
  before = _flat(run.state.params)
  adapters = run.step.trained(run.state.params)
  n = _size(adapters)
  assert n == sum(v.size for k, v in before.items() if "lora" in k)
  # Adam's two moments over the adapters alone (+ int32 step counts).
  assert 2 * n <= _size(run.state.opt_state) <= 2 * n + 4
  with jax.set_mesh(mesh):
    state, it = run.state, run.train_data.iterator()
    teacher = None
    # Gradients exist for the adapters alone.
    batch = training.put_batch(run.train_data.dataset[0], mesh)
    grads = jax.eval_shape(run.step.grads, state, batch, teacher)[0]
    assert jax.tree.structure(grads) == jax.tree.structure(adapters)
    train = jax.jit(run.step.train)
    for _ in range(3):
      batch = training.put_batch(next(it), mesh)
      state, _, _ = train(state, batch, teacher, jnp.asarray(-1))
  after = _flat(state.params)
  assert after.keys() == before.keys()
  for k in before:
    if "lora" in k:  # B starts at zero; both factors move
      assert not np.array_equal(after[k], before[k]), k
    else:
      np.testing.assert_array_equal(after[k], before[k], err_msg=k)


def test_resume_is_exact_and_checkpoints_hold_only_what_trains(root, tmp_path):
  c = _config(root, steps=4, export_hf=True, **{"student.lora.dropout": 0.1})
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  training.train_and_evaluate(c, straight)
  training.train_and_evaluate(c, resumed, stop_at=2)
  training.train_and_evaluate(c, resumed)
  a, b = metrics.read(straight), metrics.read(resumed)
  assert [r["step"] for r in b] == [1, 2, 3, 4]
  for x, y in zip(a, b):
    assert x["loss"] == y["loss"] and x["grad_norm"] == y["grad_norm"]
  finals = []
  for workdir in (straight, resumed):
    path = f"{workdir}/hf_adapter/adapter_model.safetensors"
    with open(path, "rb") as f:
      finals.append(safetensors.numpy.load(f.read()))
  assert len(finals[0]) == 8 and finals[0].keys() == finals[1].keys()
  for k in finals[0]:
    np.testing.assert_array_equal(finals[0][k], finals[1][k], err_msg=k)
  # The checkpoint holds the adapters, not the frozen base.
  saved = ocp.StandardCheckpointer().metadata(f"{resumed}/ckpt/4/state")
  paths = [
      jax.tree_util.keystr(k)
      for k, _ in jax.tree_util.tree_flatten_with_path(saved.item_metadata)[0]
  ]
  params = [p for p in paths if p.startswith("['params']")]
  assert len(params) == 8 and all("['lora']" in p for p in params)
  assert not any("kernel" in p or "embedding" in p for p in paths)


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
  np.testing.assert_allclose(np.asarray(model(IDS)), want, atol=1e-5)
  # The adapters do change the model: the merge is not a no-op.
  assert np.abs(np.asarray(base(IDS)) - want).max() > 1e-2


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
  got = np.asarray(model(IDS))
  np.testing.assert_allclose(got, want, atol=1e-5)
  assert np.abs(np.asarray(base(IDS)) - want).max() > 1e-2
