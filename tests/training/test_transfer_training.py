"""Feature and attention transfer in the trainer: the projection is trained,
checkpointed and restored on resume, and left out of the export."""

import os

from flax import nnx
import jax
import numpy as np
import pytest
import safetensors.numpy

from kdjax import checkpoint, models, training
import tiny_run


def _config(root):
  return tiny_run.config(
      "features_gpt2",
      root,
      steps=4,
      **{"loss.attention.weight": 0.5, "eval.every_steps": 4},
  )


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  """``(config, run, mesh)``: one build the tests share."""
  root = str(tmp_path_factory.mktemp("transfer"))
  c = _config(root)
  return (c, *tiny_run.built(c, root))


def _projections(run, mesh, *workdirs):
  """The initial projections, then each workdir's latest checkpointed ones."""
  out = [run.state.projection]
  for w in workdirs:
    ck = checkpoint.Checkpoints(str(w), every_steps=1, max_to_keep=1)
    with jax.set_mesh(mesh):
      state, _ = ck.restore(
          ck.latest_step(), run.state, run.train_data.iterator()
      )
    ck.close()
    out.append(jax.device_get(state.projection))
  return out


def test_resume_with_projection_equals_straight_run_and_export_drops_it(
    built, tmp_path
):
  c, run, mesh = built
  exported = c.copy_and_resolve_references()
  exported.export_hf = True
  a, b = tiny_run.straight_and_resumed(
      c, str(tmp_path), stop_at=2, straight=exported
  )
  for x, y in zip(a, b):
    for k in ("loss", "feature", "attention", "grad_norm"):
      assert x[k] == y[k], (x["step"], k)
  # Validation reports both terms, in its loss too.
  val = a[-1]
  assert val["val_feature"] > 0 and val["val_attention"] > 0
  w = c.loss.features.weight, c.loss.attention.weight
  r = c.loss.kd_ratio
  want = (1 - r) * val["val_ce"] + r * val["val_kd"]
  want += w[0] * val["val_feature"] + w[1] * val["val_attention"]
  assert val["val_loss"] == pytest.approx(want, rel=1e-5)
  # The loss is the weighted sum of the logged terms.
  want = (1 - r) * a[-1]["ce"] + r * a[-1]["kd"]
  want += w[0] * a[-1]["feature"] + w[1] * a[-1]["attention"]
  assert a[-1]["loss"] == pytest.approx(want, rel=1e-5)
  # Checkpointed and trained: both runs end on the same projections, which
  # moved from their initial values.
  initial, straight, resumed = _projections(
      run, mesh, tmp_path / "straight", tmp_path / "resumed"
  )
  assert sorted(straight) == ["1_1"]  # one block each
  for k, p in straight.items():
    np.testing.assert_array_equal(p, resumed[k], err_msg=k)
    assert p.shape == (16, 32)
    assert not np.allclose(p, initial[k])
  # The export holds the student's weights alone.
  exported = safetensors.numpy.load_file(
      os.path.join(tmp_path / "straight" / "hf", "model.safetensors")
  )
  plain = tmp_path / "plain"
  models.save_hf(tiny_run.gpt2(0, 257), str(plain))
  assert set(exported) == set(
      safetensors.numpy.load_file(str(plain / "model.safetensors"))
  )
  assert models.load(str(tmp_path / "straight" / "hf")).head_weight().shape == (
      257,
      16,
  )


def test_weights_are_traced_in_the_step(built):
  """A new weight value reuses the compiled train step."""
  _, run, mesh = built
  with jax.set_mesh(mesh):
    f = jax.jit(run.step.train)
    batch = training.put_batch(run.train_data.dataset[0], mesh)
    teacher = nnx.state(run.teacher)
    losses = []
    for w in (1.0, 3.0):
      weights = {"feature": np.float32(w), "attention": np.float32(0.5)}
      _, m, _ = f(run.state, batch, teacher, training.Health.init(), weights)
      losses.append(m)
  assert f._cache_size() == 1  # pylint: disable=protected-access
  rise = float(losses[1]["loss"] - losses[0]["loss"])
  assert rise == pytest.approx(2.0 * float(losses[0]["feature"]), rel=1e-5)
