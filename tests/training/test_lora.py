"""LoRA students in training: only the adapters get gradients and AdamW
state and move, checkpoints hold them alone, and a resumed run is exact."""

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import safetensors.numpy

from kdjax import training
import tiny_run

RANK, ALPHA = 4, 8.0


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


@pytest.mark.multi_device
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
      state, _, _ = train(state, batch, teacher, training.Health.init())
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
  a, b = tiny_run.straight_and_resumed(c, str(tmp_path), stop_at=2)
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
