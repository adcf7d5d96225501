"""The source in a loop: exact resume from a checkpoint with a full buffer, metrics."""

from typing import Any, NamedTuple

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from kdjax import models, sampling
from kdjax.data import pipeline
from kdjax.onpolicy import gkd, strategies
from kdjax.onpolicy.runner import Runner

V, EOS, L, P, B = 40, 3, 20, 6, 4


class FakeState(NamedTuple):
  """What the source reads of a train state."""

  step: Any
  params: Any
  rest: Any


def _setup(kind="distillm", total_steps=40, **kw):
  model = models.create(
      "tiny-gpt2",
      vocab_size=V,
      n_embd=16,
      n_layer=1,
      n_head=2,
      rngs=nnx.Rngs(0),
  )
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  settings = sampling.Settings(
      max_new_tokens=8,
      greedy=False,
      temperature=1.0,
      stop_ids=(EOS,),
      pad_id=EOS,
  )
  src = strategies.make(
      kind=kind,
      settings=settings,
      prompt_length=P,
      max_length=L,
      eos_id=EOS,
      total_steps=total_steps,
      student_graphdef=graphdef,
      **kw,
  )
  rng = np.random.RandomState(0)
  batches = []
  for _ in range(10):
    rows = [
        pipeline.train_row(
            pipeline.Tokenized(
                rng.randint(4, V, P + 3).astype(np.int32),
                int(rng.randint(1, P + 1)),
            ),
            max_length=L,
            eos_id=EOS,
        )
        for _ in range(B)
    ]
    batches.append(
        {k: jnp.asarray(v) for k, v in pipeline._stack(rows).items()}
    )
  return src, params, rest, batches


def _committed(tree):
  """``tree`` committed to the device, as the trainer's step outputs are (an
  uncommitted first call would compile the runner a second time)."""
  return jax.device_put(tree, jax.devices()[0])


def _state(params, rest):
  """A step-0 train state."""
  return _committed(FakeState(jnp.asarray(0, jnp.int32), params, rest))


@jax.jit  # one program, not one eager op per parameter
def _train(state):
  """A stand-in update: the parameters move every step."""
  return FakeState(
      state.step + 1,
      jax.tree.map(lambda p: p * 1.01 + 0.001, state.params),
      state.rest,
  )


def _run(runner, state, batches, start, end):
  out = []
  for s in range(start, end):
    batch = runner(state, None, batches[s])
    out.append(jax.tree.map(np.asarray, batch))
    state = _train(state)
  return out, state


def test_resume_from_a_checkpoint_with_a_full_buffer_is_bit_identical(tmp_path):
  src, params, rest, batches = _setup(capacity=8, total_steps=12)
  # tau = 1: every step trains on the student's samples or the buffer's,
  # replays more and more often as tau * (1 - step / 12) falls.
  start = _state(params, rest)
  uninterrupted = Runner(src, _committed(src.init(5, threshold=1.0)))
  whole, _ = _run(uninterrupted, start, batches, 0, 10)
  generated = [float(i["generated"]) for i in uninterrupted._infos]
  assert 0.0 in generated[5:]  # replays after the restore point
  m = uninterrupted.log()
  assert m["onpolicy_fraction"] == 1
  assert m["gen_fraction"] == pytest.approx(np.mean(generated))

  runner = Runner(src, _committed(src.init(5, threshold=1.0)))
  first, state = _run(runner, start, batches, 0, 5)
  assert int(runner.state.buffer.count) == 8  # full when the run is "killed"
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(tmp_path / "c", (state, runner.state))
  ckpt.wait_until_finished()
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), (state, src.init(0))
  )
  state, src_state = ckpt.restore(tmp_path / "c", target=abstract)
  rest_of_run, _ = _run(Runner(src, src_state), state, batches, 5, 10)
  for s, (a, b) in enumerate(zip(whole, first + rest_of_run)):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=f"step {s} {k}")


def test_log_reports_the_window_and_resets():
  src, params, rest, batches = _setup(kind="gkd", lmbda=0.5)
  runner = Runner(src, _committed(src.init(1)))
  state = _state(params, rest)
  _, _ = _run(runner, state, batches, 0, 10)
  got = runner.log()
  chosen = [
      bool(gkd.uses_generated(runner.state.key, jnp.asarray(s), 0.5))
      for s in range(10)
  ]
  assert got["onpolicy_fraction"] == pytest.approx(np.mean(chosen))
  assert 0 < got["gen_len"] <= 8 and got["gen_time_s"] > 0
  assert runner.log() == {}
  dataset = Runner(_setup(kind="dataset")[0], src.init(1))
  assert dataset(state, None, batches[0]) is batches[0]
  assert dataset.log() == {}


def test_after_validation_moves_distillm_threshold_only():
  src, *_ = _setup(capacity=8)
  runner = Runner(src, src.init(0, threshold=0.0, initial_val_loss=2.0))
  runner.after_validation(2.05)
  assert float(runner.state.threshold) == 0.0
  runner.after_validation(2.2)
  assert float(runner.state.threshold) == pytest.approx(0.1)
  gkd = Runner(_setup(kind="gkd", lmbda=0.5)[0], src.init(0))
  gkd.after_validation(9.0)
  assert float(gkd.state.threshold) == 0.0
