"""Speculative KD: the replacement rule and the two-cache decode loop vs NumPy."""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import sampling
from kdjax.data import pipeline
from kdjax.onpolicy import batches, skd, strategies, strategy
import tiny_run

V, EOS, TAU = 40, 3, 1.3


def _gumbels(key, shape):
  """jax.random.categorical's noise: at key, and at fold_in(key, 1)."""
  g = lambda k: np.asarray(jax.random.gumbel(k, shape, jnp.float32), np.float64)
  return g(key), g(jax.random.fold_in(key, 1))


def _reference_choose(s_logits, t_logits, key, k, tau, resample="top_k"):
  """The SKD rule in float64 NumPy with the same Gumbel noise."""
  s = np.asarray(s_logits, np.float64) / tau
  t_raw = np.asarray(t_logits, np.float64)
  g_s, g_t = _gumbels(key, s.shape)
  proposal = np.argmax(s + g_s, axis=-1)
  vocab = t_raw.shape[-1]
  if k >= vocab:
    accept = np.ones(len(s), bool)
    kth = np.full(len(s), -np.inf)
  else:
    kth = np.sort(t_raw, axis=-1)[:, ::-1][:, k - 1]
    accept = t_raw[np.arange(len(s)), proposal] >= kth
  t = t_raw / tau
  if resample == "top_k":
    t = np.where(t_raw >= kth[:, None], t, -np.inf)
  replacement = np.argmax(t + g_t, axis=-1)
  return np.where(accept, proposal, replacement), ~accept


@pytest.mark.parametrize("k", [1, 3, 10, V, V + 5])
@pytest.mark.parametrize("resample", skd.RESAMPLE)
def test_choose_equals_numpy_reference(k, resample):
  rng = np.random.RandomState(k)
  s = rng.randn(64, V).astype(np.float32) * 2
  t = rng.randn(64, V).astype(np.float32) * 2
  key = jax.random.key(k)
  settings = sampling.Settings(greedy=False, temperature=TAU)
  got, replaced = jax.jit(
      lambda a, b, key: skd.choose(
          a, b, key, teacher_top_k=k, settings=settings, resample=resample
      )
  )(s, t, key)
  want, want_replaced = _reference_choose(s, t, key, k, TAU, resample)
  np.testing.assert_array_equal(np.asarray(got), want)
  np.testing.assert_array_equal(np.asarray(replaced), want_replaced)
  if k >= V:
    assert not want_replaced.any()
  else:
    assert 0 < want_replaced.sum() < 64
  if k == 1 and resample == "top_k":  # mismatch -> the teacher's argmax
    np.testing.assert_array_equal(
        np.asarray(got)[want_replaced], np.argmax(t, -1)[want_replaced]
    )
    np.testing.assert_array_equal(
        np.asarray(got)[~want_replaced], np.argmax(t, -1)[~want_replaced]
    )


def _reference_filter(logits, tau, top_k, top_p):
  """Temperature, then top-k, then HF nucleus filtering, in float64."""
  x = np.asarray(logits, np.float64) / tau
  if 0 < top_k < x.shape[-1]:
    kth = np.sort(x, axis=-1)[:, ::-1][:, top_k - 1 : top_k]
    x = np.where(x < kth, -np.inf, x)
  order = np.argsort(x, axis=-1)
  srt = np.take_along_axis(x, order, axis=-1)
  p = np.exp(srt - srt.max(-1, keepdims=True))
  cum = np.cumsum(p / p.sum(-1, keepdims=True), axis=-1)
  drop_sorted = cum <= 1.0 - top_p
  drop_sorted[:, -1] = False
  drop = np.zeros_like(drop_sorted)
  np.put_along_axis(drop, order, drop_sorted, axis=-1)
  return np.where(drop, -np.inf, x)


@pytest.mark.parametrize("k", [2, 6])
def test_choose_with_top_k_and_top_p_sampling_equals_numpy(k):
  # The sampling filters shape both the proposal and the teacher's draw;
  # membership in the teacher's top-K is judged on its raw logits.
  rng = np.random.RandomState(20 + k)
  s = rng.randn(64, V).astype(np.float32) * 2
  t = rng.randn(64, V).astype(np.float32) * 2
  key = jax.random.key(k)
  settings = sampling.Settings(
      greedy=False, temperature=TAU, top_k=12, top_p=0.8
  )
  got, replaced = jax.jit(
      lambda a, b, key: skd.choose(
          a, b, key, teacher_top_k=k, settings=settings
      )
  )(s, t, key)
  g_s, g_t = _gumbels(key, s.shape)
  proposal = np.argmax(_reference_filter(s, TAU, 12, 0.8) + g_s, axis=-1)
  kth = np.sort(t, axis=-1)[:, ::-1][:, k - 1]
  accept = t[np.arange(64), proposal] >= kth
  t_filtered = _reference_filter(t, TAU, 12, 0.8)
  t_filtered = np.where(t >= kth[:, None], t_filtered, -np.inf)
  replacement = np.argmax(t_filtered + g_t, axis=-1)
  np.testing.assert_array_equal(np.asarray(replaced), ~accept)
  np.testing.assert_array_equal(
      np.asarray(got), np.where(accept, proposal, replacement)
  )
  assert 0 < (~accept).sum() < 64


@pytest.mark.parametrize("k", [1, 3])
def test_greedy_choose_keeps_the_students_argmax_inside_the_teachers_top_k(k):
  rng = np.random.RandomState(k)
  s = rng.randn(64, V).astype(np.float32)
  t = rng.randn(64, V).astype(np.float32)
  settings = sampling.Settings(greedy=True)
  got, replaced = jax.jit(
      lambda a, b: skd.choose(
          a, b, jax.random.key(0), teacher_top_k=k, settings=settings
      )
  )(s, t)
  proposal = np.argmax(s, -1)
  kth = np.sort(t, axis=-1)[:, ::-1][:, k - 1]
  accept = t[np.arange(64), proposal] >= kth
  np.testing.assert_array_equal(np.asarray(replaced), ~accept)
  # A rejected proposal becomes the teacher's argmax (inside its top-K).
  np.testing.assert_array_equal(
      np.asarray(got), np.where(accept, proposal, np.argmax(t, -1))
  )
  assert 0 < (~accept).sum() < 64


def test_ties_with_the_kth_teacher_logit_are_accepted():
  t = jnp.asarray([[0.0, 2.0, 1.0, 1.0, -1.0]])
  assert bool(skd.in_top_k(t, jnp.asarray([3]), 2))  # tied for 2nd
  assert not bool(skd.in_top_k(t, jnp.asarray([0]), 2))
  assert bool(skd.in_top_k(t, jnp.asarray([4]), 5))


def _prompts():
  prompts = [[5, 9, 11, 20], [7], [30, 31, 8], [12, 13]]
  left = pipeline.left_pad(prompts, length=5, eos_id=EOS)
  return (
      prompts,
      jnp.asarray(left["input_ids"]),
      jnp.asarray(left["attention_mask"] > 0),
  )


def _reference_generate(student, teacher, prompts, key, n, k, tau):
  """Full forwards every step (no cache), the NumPy rule, the sampler's keys."""
  seqs = [list(p) for p in prompts]
  done = np.zeros(len(prompts), bool)
  out = np.full((len(prompts), n), EOS)
  replaced = np.zeros((len(prompts), n), bool)
  forward = nnx.jit(lambda m, ids, mask: m(ids, attention_mask=mask)[:, -1])
  width = max(map(len, prompts)) + n  # one shape: one compilation
  for i in range(n):
    left = pipeline.left_pad(seqs, length=width, eos_id=EOS)
    ids, mask = jnp.asarray(left["input_ids"]), jnp.asarray(
        left["attention_mask"]
    )
    s_last = np.asarray(forward(student, ids, mask))
    t_last = np.asarray(forward(teacher, ids, mask))
    key, sub = jax.random.split(key)
    tok, rep = _reference_choose(s_last, t_last, sub, k, tau)
    for r in range(len(prompts)):
      if done[r]:
        continue
      out[r, i], replaced[r, i] = tok[r], rep[r]
      seqs[r].append(int(tok[r]))
      done[r] |= tok[r] == EOS
    if done.all():
      break
  return out, replaced


@pytest.mark.parametrize("k", [1, 4, V])
def test_decode_loop_equals_full_forward_reference(k):
  student, teacher = tiny_run.decode_pair(V)
  prompts, ids, mask = _prompts()
  key = jax.random.key(10 + k)
  kw = dict(
      max_new_tokens=10,
      greedy=False,
      temperature=TAU,
      stop_ids=(EOS,),
      pad_id=EOS,
  )
  got, replaced = skd.generate(
      student, teacher, ids, mask, key, teacher_top_k=k, **kw
  )
  want, want_replaced = _reference_generate(
      student, teacher, prompts, key, 10, k, TAU
  )
  np.testing.assert_array_equal(np.asarray(got), want)
  np.testing.assert_array_equal(np.asarray(replaced), want_replaced)
  if k >= V:  # nothing is replaced: exactly the student's own samples
    np.testing.assert_array_equal(
        np.asarray(got),
        np.asarray(sampling.generate(student, ids, mask, key, **kw)),
    )
  else:
    assert want_replaced.any()


def test_bad_settings_fail_with_one_sentence():
  student, teacher = tiny_run.decode_pair(V)
  _, ids, mask = _prompts()
  with pytest.raises(ValueError, match="teacher_top_k=0 must be >= 1"):
    skd.generate(
        student, teacher, ids, mask, jax.random.key(0), teacher_top_k=0
    )
  with pytest.raises(ValueError, match="resample='all'"):
    skd.generate(
        student,
        teacher,
        ids,
        mask,
        jax.random.key(0),
        teacher_top_k=2,
        resample="all",
    )


def test_skd_source_trains_on_the_skd_samples():
  student, teacher = tiny_run.decode_pair(V)
  prompts = [[5, 9, 11, 20], [7], [30, 31, 8], [12, 13]]
  rows = [
      pipeline.train_row(
          pipeline.Tokenized(np.asarray(p + [21, 22, EOS], np.int32), len(p)),
          max_length=16,
          eos_id=EOS,
      )
      for p in prompts
  ]
  batch = {k: jnp.asarray(v) for k, v in pipeline._stack(rows).items()}
  settings = sampling.Settings(
      max_new_tokens=8,
      greedy=False,
      temperature=TAU,
      stop_ids=(EOS,),
      pad_id=EOS,
  )
  s_def, params, rest = nnx.split(student, nnx.Param, ...)
  src = strategies.make(
      kind="skd",
      settings=settings,
      prompt_length=5,
      max_length=16,
      eos_id=EOS,
      total_steps=10,
      student_graphdef=s_def,
      teacher_graphdef=nnx.graphdef(teacher),
      lmbda=1.0,
      skd_top_k=2,
  )
  state = src.init(seed=4)
  out, _, info = jax.jit(src.__call__)(
      params, rest, nnx.state(teacher), batch, state, jnp.asarray(3, jnp.int32)
  )
  _, ids, mask = _prompts()
  key = strategy.step_keys(state.key, jnp.asarray(3, jnp.int32))[1]
  tokens, replaced = skd.generate(
      student, teacher, ids, mask, key, teacher_top_k=2, **settings._asdict()
  )
  want = batches.to_batch(
      batches.response_rows(
          ids, mask, tokens, max_length=16, eos_id=EOS, stop_ids=(EOS,)
      ),
      EOS,
  )
  for k in want:
    np.testing.assert_array_equal(np.asarray(out[k]), np.asarray(want[k]))
  gen = np.asarray(replaced).sum()
  assert float(info["skd_replaced"]) == pytest.approx(
      gen / np.asarray(want["loss_mask"]).sum(), rel=1e-6
  )
