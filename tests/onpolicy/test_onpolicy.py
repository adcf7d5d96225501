"""On-policy sequence sources: layouts, the student's samples, GKD's choice.

Sources are frozen dataclasses: :func:`_jitted` compiles each distinct one
once, so a test's later steps (and other tests with an equal source) reuse
its program instead of tracing ``jax.jit(src.__call__)`` again.
"""

import functools

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import models, sampling, sharding
from kdjax.config import files as config_files
from kdjax.config import recipe
from kdjax.config import spec as config_spec
from kdjax.data import pipeline
from kdjax.onpolicy import batches, distillm, gkd, strategies, strategy

V, EOS, L, P = 40, 3, 24, 10


def _examples(rng, n):
  """Tokenized examples: prompts of 1..P tokens, responses ending in EOS."""
  out = []
  for _ in range(n):
    p = int(rng.randint(1, P + 1))
    prompt = rng.randint(4, V, p).tolist()
    response = rng.randint(4, V, int(rng.randint(0, 12))).tolist() + [EOS]
    ids = (prompt + response)[:L]
    out.append(pipeline.Tokenized(np.asarray(ids, np.int32), p))
  return out


def _dataset_batch(examples):
  return pipeline._stack(
      [pipeline.train_row(e, max_length=L, eos_id=EOS) for e in examples]
  )


def _student(seed=0):
  model = models.create(
      "tiny-gpt2",
      vocab_size=V,
      n_embd=16,
      n_layer=2,
      n_head=2,
      rngs=nnx.Rngs(seed),
  )
  return model


def _source(model, kind="gkd", lmbda=1.0, n_new=12, total_steps=100, **kw):
  settings = sampling.Settings(
      max_new_tokens=n_new,
      greedy=False,
      temperature=1.3,
      stop_ids=(EOS,),
      pad_id=EOS,
  )
  return strategies.make(
      kind=kind,
      settings=settings,
      prompt_length=P,
      max_length=L,
      eos_id=EOS,
      total_steps=total_steps,
      student_graphdef=nnx.split(model, nnx.Param, ...)[0],
      lmbda=lmbda,
      **kw,
  )


@functools.cache
def _jitted(src):
  return jax.jit(src.__call__)


def _call(src, model, batch, state, step, teacher_state=None):
  _, params, rest = nnx.split(model, nnx.Param, ...)
  jb = {k: jnp.asarray(v) for k, v in batch.items()}
  return _jitted(src)(
      params, rest, teacher_state, jb, state, jnp.asarray(step, jnp.int32)
  )


def _np(tree):
  return jax.tree.map(np.asarray, tree)


def _reference_rows(prompts, tokens, stop_ids=(EOS,)):
  """pipeline.train_row of ``prompt ‖ tokens through the first stop id``."""
  rows = []
  for prompt, gen in zip(prompts, tokens):
    gen = list(gen)
    ends = [i for i, t in enumerate(gen) if t in stop_ids]
    g = ends[0] + 1 if ends else len(gen)
    ids = (list(prompt) + gen[:g])[:L]
    rows.append(
        pipeline.train_row(
            pipeline.Tokenized(np.asarray(ids, np.int32), len(prompt)),
            max_length=L,
            eos_id=EOS,
        )
    )
  return pipeline._stack(rows)


# ----------------------------------------------------------------------------
# Layouts.


def test_prompts_from_batch_equal_left_padded_dataset_prompts():
  examples = _examples(np.random.RandomState(0), 16)
  got, mask = jax.jit(batches.prompts_from_batch, static_argnums=(1, 2))(
      {k: jnp.asarray(v) for k, v in _dataset_batch(examples).items()}, P, EOS
  )
  want = pipeline.left_pad(
      [e.ids[: e.prompt_len].tolist() for e in examples], length=P, eos_id=EOS
  )
  np.testing.assert_array_equal(np.asarray(got), want["input_ids"])
  np.testing.assert_array_equal(np.asarray(mask), want["attention_mask"] > 0)


@pytest.mark.parametrize("stop_ids", [(EOS,), (EOS, 2)])
def test_response_rows_equal_pipeline_train_rows(stop_ids):
  rng = np.random.RandomState(1)
  examples = _examples(rng, 32)
  prompts = [e.ids[: e.prompt_len].tolist() for e in examples]
  left = pipeline.left_pad(prompts, length=P, eos_id=EOS)
  # Generated tokens: some rows end in EOS early (then padding), some in the
  # end-of-turn id 2 a few tokens before an EOS, some never.
  tokens = rng.randint(4, V, (32, 18))
  for r in range(0, 32, 2):
    end = int(rng.randint(0, 15))
    if r % 4 == 2:
      tokens[r, end] = 2
      end += 3
    tokens[r, end] = EOS
    tokens[r, end + 1 :] = EOS
  rows = batches.response_rows(
      jnp.asarray(left["input_ids"]),
      jnp.asarray(left["attention_mask"] > 0),
      jnp.asarray(tokens),
      max_length=L,
      eos_id=EOS,
      stop_ids=stop_ids,
  )
  got = _np(batches.to_batch(rows, EOS))
  want = _reference_rows(prompts, tokens, stop_ids)
  assert set(got) == set(want)
  for k in want:
    assert got[k].dtype == want[k].dtype, k
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  # Some rows were cut at L, some ended before it.
  n = np.asarray(rows.length_B)
  assert (n == L).any() and (n < L).any()


# ----------------------------------------------------------------------------
# The student's samples.


def _generated_steps(src, state, n):
  """The first ``n`` steps at which GKD's mixture chooses the student."""
  chosen = jax.vmap(lambda s: gkd.uses_generated(state.key, s, src.lmbda))(
      jnp.arange(64)
  )
  return [int(s) for s in np.flatnonzero(np.asarray(chosen))[:n]]


def test_onpolicy_batch_is_the_students_samples_and_masks_them_exactly():
  model = _student()
  examples = _examples(np.random.RandomState(2), 8)
  batch = _dataset_batch(examples)
  # The mixture's source (compiled once for this test and the next): at a
  # step where it chooses the student, its batch is the student's samples.
  src = _source(model, lmbda=0.5)
  state = src.init(seed=7)
  step, other = _generated_steps(src, state, 2)
  out, _, info = _np(_call(src, model, batch, state, step=step))
  # Independently: kdjax.sampling.generate on the same prompts and key.
  prompts = [e.ids[: e.prompt_len].tolist() for e in examples]
  left = pipeline.left_pad(prompts, length=P, eos_id=EOS)
  key = strategy.step_keys(state.key, jnp.asarray(step, jnp.int32))[1]
  model.eval()
  tokens = np.asarray(
      sampling.generate(
          model,
          left["input_ids"],
          left["attention_mask"] > 0,
          key,
          **src.sampler.settings._asdict(),
      )
  )
  want = _reference_rows(prompts, tokens)
  for k in want:
    np.testing.assert_array_equal(out[k], want[k], err_msg=k)
  # The mask covers exactly the generated tokens, through EOS, nothing after.
  lengths = []
  for r, prompt in enumerate(prompts):
    gen = tokens[r].tolist()
    g = gen.index(EOS) + 1 if EOS in gen else len(gen)
    g = min(g, L - len(prompt))
    lengths.append(g)
    cols = np.flatnonzero(out["loss_mask"][r])
    np.testing.assert_array_equal(
        cols, np.arange(len(prompt) - 1, len(prompt) - 1 + g)
    )
    np.testing.assert_array_equal(out["labels"][r, cols], gen[:g])
    np.testing.assert_array_equal(out["input_ids"][r, : len(prompt)], prompt)
  assert any(EOS in t.tolist() for t in tokens)  # both endings are covered
  assert not all(EOS in t.tolist() for t in tokens)
  assert info["onpolicy"] == 1 and info["generated"] == 1
  assert info["gen_len"] == pytest.approx(np.mean(lengths))
  # Another step, another sample.
  again, _, _ = _np(_call(src, model, batch, state, step=other))
  assert (again["labels"] != out["labels"]).any()


def _teacher(seed=7):
  return models.create(
      "tiny-gpt2",
      vocab_size=V,
      n_embd=32,
      n_layer=2,
      n_head=2,
      rngs=nnx.Rngs(seed),
  )


EIGHT_DEVICE_KINDS = {
    "gkd": {},
    # Step 0 fills the buffer, later steps replay from it or generate again.
    "distillm": dict(capacity=16, total_steps=4),
    # The student proposes, the teacher replaces tokens outside its top 5.
    "skd": dict(skd_top_k=5),
    # Teacher-mixed rollouts with their log-probs, reused for two updates.
    "minillm": dict(minillm_ppo_epochs=2, batch_size=16),
}


@pytest.mark.parametrize("kind", list(EIGHT_DEVICE_KINDS))
def test_eight_devices_equal_one(kind):
  examples = _examples(np.random.RandomState(3), 16)
  batch = _dataset_batch(examples)
  kw = EIGHT_DEVICE_KINDS[kind]
  outs = []
  for devices in (jax.devices()[:1], jax.devices()[:8]):
    mesh = sharding.make_mesh(devices=devices)
    # Initialised outside the mesh (the programs other tests compiled), then
    # placed on it.
    student, teacher = _student(3), _teacher()
    with jax.set_mesh(mesh):
      m = sharding.shard_model(student, mesh)
      teacher_state = None
      if kind in ("skd", "minillm"):
        teacher = sharding.shard_model(teacher, mesh)
        teacher.eval()
        graphdef, teacher_state = nnx.split(teacher)
        kw = dict(kw, teacher_graphdef=graphdef)
      src = _source(m, kind=kind, **kw)
      b = {
          k: jax.device_put(v, sharding.batch_sharding(mesh))
          for k, v in batch.items()
      }
      state = src.init(seed=1, threshold=1.0)
      steps = []
      for step in range(4 if kind == "distillm" else 3):
        out, state, info = _call(src, m, b, state, step, teacher_state)
        if len(devices) == 8:
          assert len(out["labels"].sharding.device_set) == 8
        steps.append(_np((out, info)))
      outs.append(steps)
  for (a, ia), (b, ib) in zip(*outs):
    for k in a:
      if np.issubdtype(a[k].dtype, np.floating):
        # MiniLLM's recorded log-probs: sharded reductions round differently.
        np.testing.assert_allclose(a[k], b[k], rtol=1e-6, atol=1e-6, err_msg=k)
      else:  # the tokens, masks and lengths themselves: exactly
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert ia == ib
  if kind == "distillm":
    assert {float(i["generated"]) for _, i in outs[0]} == {0.0, 1.0}


# ----------------------------------------------------------------------------
# GKD's choice.


def test_lmbda_zero_returns_the_dataset_batch_bit_for_bit():
  model = _student()
  batch = _dataset_batch(_examples(np.random.RandomState(4), 8))
  for kind in ("dataset", "gkd", "skd"):
    src = _source(model, kind=kind, lmbda=0.0)
    for step in range(3):
      out, state, info = _np(_call(src, model, batch, src.init(0), step))
      for k in batch:
        assert out[k].dtype == batch[k].dtype
        np.testing.assert_array_equal(out[k], batch[k])
      assert info["onpolicy"] == 0


def test_gkd_choice_frequency_and_determinism():
  key = _source(_student()).init(seed=11).key
  lmbdas = (0.0, 0.25, 0.7, 1.0)
  # Every lmbda's 4000 choices in one program.
  use_LxS = jax.jit(
      jax.vmap(
          jax.vmap(gkd.uses_generated, in_axes=(None, 0, None)),
          in_axes=(None, None, 0),
      )
  )(key, jnp.arange(4000), jnp.asarray(lmbdas))
  for lmbda, use in zip(lmbdas, np.asarray(use_LxS)):
    # Binomial(4000, lmbda): within 4 standard deviations.
    sd = np.sqrt(4000 * lmbda * (1 - lmbda))
    assert abs(use.sum() - 4000 * lmbda) <= 4 * sd + 1e-9, lmbda
    if 0 < lmbda < 1:  # not a fixed pattern: runs of both lengths occur
      assert (np.diff(use.astype(int)) != 0).sum() > 100
  # The choice of a step depends only on the key and the step (exact resume):
  # separate calls in either order agree.
  choose = jax.jit(gkd.uses_generated, static_argnums=2)
  a = [bool(choose(key, jnp.asarray(s), 0.5)) for s in range(20)]
  b = [bool(choose(key, jnp.asarray(s), 0.5)) for s in reversed(range(20))][
      ::-1
  ]
  assert a == b


def test_gkd_mixture_switches_between_dataset_and_student_batches():
  model = _student()
  batch = _dataset_batch(_examples(np.random.RandomState(5), 8))
  src = _source(model, lmbda=0.5)
  state = src.init(seed=2)
  for step in range(8):
    out, _, info = _np(_call(src, model, batch, state, step))
    chosen = bool(gkd.uses_generated(state.key, jnp.asarray(step), 0.5))
    assert info["onpolicy"] == float(chosen)
    same = all(np.array_equal(out[k], batch[k]) for k in batch)
    assert same == (not chosen), step


def test_distillm_source_generates_fills_then_replays():
  model = _student(4)
  examples = _examples(np.random.RandomState(6), 4)
  batch = _dataset_batch(examples)
  src = _source(model, kind="distillm", capacity=8, total_steps=10)
  state = src.init(seed=3, threshold=0.9)
  call = _jitted(src)
  _, params, rest = nnx.split(model, nnx.Param, ...)
  jb = {k: jnp.asarray(v) for k, v in batch.items()}
  seen = []  # label rows of every generated batch
  acts = []
  for step in range(10):
    u = float(jax.random.uniform(strategy.step_keys(state.key, step)[0]))
    gen_tau = 0.9 * (1 - (step + 1) / 10)
    count = int(state.buffer.count)
    want = (
        distillm.GENERATE
        if u < gen_tau or (u < 0.9 and count < 8)
        else distillm.REPLAY
        if u < 0.9
        else distillm.DATASET
    )
    acts.append(want)
    out, state, info = call(
        params, rest, None, jb, state, jnp.asarray(step, jnp.int32)
    )
    out = _np(out)
    assert info["generated"] == (want == distillm.GENERATE), step
    assert info["onpolicy"] == (want != distillm.DATASET), step
    if want == distillm.GENERATE:
      seen.extend(map(tuple, out["labels"]))
      assert int(state.buffer.count) == min(count + 4, 8)
    elif want == distillm.REPLAY:
      assert set(map(tuple, out["labels"])) <= set(seen[-8:])
    else:
      for k in batch:
        np.testing.assert_array_equal(out[k], batch[k])
  assert {distillm.GENERATE, distillm.REPLAY} <= set(acts)


# ----------------------------------------------------------------------------
# Configs.


@pytest.mark.parametrize(
    "name,kind",
    [("gkd_gpt2", "gkd"), ("distillm_gpt2", "distillm"), ("skd_gpt2", "skd")],
)
def test_configs_build_their_source(name, kind):
  module = config_files.experiment(name)
  model = _student()
  graphdef = nnx.split(model, nnx.Param, ...)[0]
  for arg, n_new in ((None, 256), ("tiny", 32)):
    c = module.get_config(arg)
    assert c.onpolicy.source == kind
    src = strategies.from_config(
        c,
        eos_id=EOS,
        stop_ids=(EOS,),
        total_steps=10,
        student_graphdef=graphdef,
        teacher_graphdef=graphdef,
    )
    assert src.kind == kind and src.sampler.settings.max_new_tokens == n_new
    assert (
        src.sampler.settings.stop_ids == (EOS,)
        and not src.sampler.settings.greedy
    )
    with pytest.raises(AttributeError):  # locked: a typo is not a new field
      c.onpolicy.lmbdaa = 1.0
  assert (
      module.get_config().onpolicy.lmbda
      == {"gkd": 0.5, "distillm": 0.0, "skd": 1.0}[kind]
  )


def test_bad_onpolicy_settings_fail_with_one_sentence():

  gkd_gpt2 = config_files.experiment("gkd_gpt2")
  skd_gpt2 = config_files.experiment("skd_gpt2")

  model = _student()
  graphdef = nnx.split(model, nnx.Param, ...)[0]
  cases = [
      ("onpolicy.lmbda", 1.5, "lmbda=1.5 must be in"),
      ("onpolicy.source", "ppo", "source='ppo' is unknown"),
      ("onpolicy.temperature", 0.0, "temperature=0.0 must be > 0"),
      ("onpolicy.buffer_size", 4, None),
  ]
  for key, value, msg in cases:
    c = gkd_gpt2.get_config("tiny")
    with c.unlocked():
      c.update_from_flattened_dict({key: value})
    build = lambda: strategies.from_config(
        c,
        eos_id=EOS,
        stop_ids=(EOS,),
        total_steps=10,
        student_graphdef=graphdef,
    )
    if msg is None:  # only DistiLLM reads the buffer size
      build()
      continue
    with pytest.raises(ValueError, match=msg) as e:
      build()
    assert "\n" not in str(e.value)
  c = skd_gpt2.get_config("tiny")
  with pytest.raises(ValueError, match="needs the teacher"):
    strategies.from_config(
        c,
        eos_id=EOS,
        stop_ids=(EOS,),
        total_steps=10,
        student_graphdef=graphdef,
    )
  with pytest.raises(ValueError, match=r"onpolicy fields \['lambda_'\] are"):
    recipe.add_onpolicy(c, lambda_=0.5)


def test_seq_kd_trains_on_the_teachers_samples_unless_the_student_is_chosen():
  student, teacher = _student(0), _student(9)
  teacher.eval()
  examples = _examples(np.random.RandomState(7), 8)
  batch = _dataset_batch(examples)
  prompts = [e.ids[: e.prompt_len].tolist() for e in examples]
  left = pipeline.left_pad(prompts, length=P, eos_id=EOS)
  # One mixture (one program): a step where it keeps the (teacher's) dataset
  # side and one where it chooses the student.
  src = _source(
      student, lmbda=0.5, seq_kd=True, teacher_graphdef=nnx.graphdef(teacher)
  )
  state = src.init(seed=8)
  chosen = [
      bool(gkd.uses_generated(state.key, jnp.asarray(s), 0.5))
      for s in range(16)
  ]
  for step, by in (
      (chosen.index(False), "teacher"),
      (chosen.index(True), "student"),
  ):
    out, _, info = _np(
        _call(
            src, student, batch, state, step, teacher_state=nnx.state(teacher)
        )
    )
    keys = strategy.step_keys(state.key, jnp.asarray(step, jnp.int32))
    model, key = (teacher, keys[2]) if by == "teacher" else (student, keys[1])
    model.eval()
    tokens = np.asarray(
        sampling.generate(
            model,
            left["input_ids"],
            left["attention_mask"] > 0,
            key,
            **src.sampler.settings._asdict(),
        )
    )
    want = _reference_rows(prompts, tokens)
    for k in want:
      np.testing.assert_array_equal(out[k], want[k], err_msg=f"{by} {k}")
    assert info["onpolicy"] == float(by == "student")


def test_configs_without_the_block_are_off_policy():

  akl_gpt2 = config_files.experiment("akl_gpt2")
  gkd_gpt2 = config_files.experiment("gkd_gpt2")

  assert config_spec.onpolicy_from_config(akl_gpt2.get_config("tiny")) == (
      config_spec.OnPolicySpec()
  )
  spec = config_spec.onpolicy_from_config(gkd_gpt2.get_config())
  assert spec.source == "gkd" and spec.lmbda == 0.5
