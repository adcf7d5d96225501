"""MiniLLM: the teacher-mixed sampler and the loss vs float64 NumPy."""

import dataclasses
import functools
import os

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from kdjax import divergences as kd
from kdjax import (
    metrics,
    sampling,
    training,
)
from kdjax.config import checks
from kdjax.config import files as config_files
from kdjax.config import spec as config_spec
from kdjax.data import pipeline
from kdjax.onpolicy import batches, minillm, sampler, strategies, strategy
import reference_np
import tiny_run

minillm_gpt2 = config_files.experiment("minillm_gpt2")

V, EOS, TAU = 40, 3, 1.3


PROMPTS = [[5, 9, 11, 20], [7], [30, 31, 8], [12, 13]]


def _prompts():
  left = pipeline.left_pad(PROMPTS, length=5, eos_id=EOS)
  return (
      jnp.asarray(left["input_ids"]),
      jnp.asarray(left["attention_mask"] > 0),
  )


SETTINGS = dict(
    max_new_tokens=10,
    greedy=False,
    temperature=TAU,
    stop_ids=(EOS,),
    pad_id=EOS,
)
# The sources' settings (shorter responses).
SOURCE_SETTINGS = sampling.Settings(**{**SETTINGS, "max_new_tokens": 8})


# ----------------------------------------------------------------------------
# Teacher-mixed sampling.


@pytest.mark.parametrize("alpha,who", [(0.0, "student"), (1.0, "teacher")])
def test_mixed_sampler_at_the_ends_is_that_models_sampler(alpha, who):
  student, teacher = tiny_run.decode_pair(V)
  ids, mask = _prompts()
  key = jax.random.key(7)
  got, _ = minillm.generate(
      student, teacher, ids, mask, key, alpha=alpha, **SETTINGS
  )
  model = student if who == "student" else teacher
  want = sampling.generate(model, ids, mask, key, **SETTINGS)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


# A jitted forward: one compiled program per model instead of op by op.
_forward = nnx.jit(lambda m, ids, mask: m(ids, attention_mask=mask))


def _full_forward_log_probs(model, tokens_BxN):
  """log softmax(z / TAU) of each generated token, one uncached forward."""
  seqs, starts = [], []
  for p, row in zip(PROMPTS, np.asarray(tokens_BxN)):
    seqs.append(list(p) + [int(t) for t in row])
    starts.append(len(p))
  width = len(seqs[0]) + 5
  left = pipeline.left_pad(seqs, length=width, eos_id=EOS)
  logits = np.asarray(
      _forward(
          model,
          jnp.asarray(left["input_ids"]),
          jnp.asarray(left["attention_mask"]),
      )
  )
  out = np.zeros(tokens_BxN.shape)
  for r, (seq, p) in enumerate(zip(seqs, starts)):
    pad = width - len(seq)
    for i in range(tokens_BxN.shape[1]):
      lp = reference_np.log_softmax(logits[r, pad + p - 1 + i] / TAU)
      out[r, i] = lp[seq[p + i]]
  return out


def test_recorded_log_probs_equal_numpy_at_the_chosen_tokens():
  student, teacher = tiny_run.decode_pair(V)
  ids, mask = _prompts()
  # The source's mixture and settings: the program the source tests reuse.
  alpha = 0.2
  tokens, rec = minillm.generate(
      student,
      teacher,
      ids,
      mask,
      jax.random.key(3),
      alpha=alpha,
      **SOURCE_SETTINGS._asdict(),
  )
  tokens = np.asarray(tokens)
  g = np.asarray(batches.generated_length(jnp.asarray(tokens), (EOS,)))
  live = np.arange(tokens.shape[1])[None, :] < g[:, None]
  lq = _full_forward_log_probs(student, tokens)
  lp = _full_forward_log_probs(teacher, tokens)
  lmix = np.log(alpha * np.exp(lp) + (1 - alpha) * np.exp(lq))
  for name, want in (
      ("old_logp", lq),
      ("teacher_logp", lp),
      ("mix_logp", lmix),
  ):
    got = np.asarray(rec[name])
    np.testing.assert_allclose(got[live], want[live], rtol=2e-5, atol=2e-5)
    assert (got[~live] == 0).all(), name
  assert live.sum() > 20


def test_one_step_token_frequencies_match_the_mixture():
  rng = np.random.RandomState(0)
  v, n_keys, alpha = 6, 20000, 0.35
  s_logits = rng.randn(1, v).astype(np.float32) * 1.5
  t_logits = rng.randn(1, v).astype(np.float32) * 1.5
  rule = minillm.MixRule(sampling.Settings(greedy=False), alpha)
  draw = jax.jit(
      jax.vmap(lambda k: rule(s_logits, t_logits, k, None, None, None)[0][0])
  )
  tokens = np.asarray(draw(jax.random.split(jax.random.key(1), n_keys)))
  freq = np.bincount(tokens, minlength=v) / n_keys
  q, p = np.exp(reference_np.log_softmax(s_logits[0])), np.exp(
      reference_np.log_softmax(t_logits[0])
  )
  mix = alpha * p + (1 - alpha) * q
  bound = 5 * np.sqrt(mix * (1 - mix) / n_keys) + 1e-4
  assert (np.abs(freq - mix) < bound).all(), (freq, mix)
  # Neither end: the student's and the teacher's own laws are rejected.
  assert np.abs(freq - q).max() > 10 * bound.max()
  assert np.abs(freq - p).max() > 10 * bound.max()


# ----------------------------------------------------------------------------
# The loss.

CFG = minillm.Config(
    alpha=0.2,
    gamma=0.9,
    cliprange=0.2,
    reward_scaling=0.5,
    reward_clip=3.0,
    lm_coef=0.7,
    single_step=True,
    temperature=TAU,
)


def _reference_loss(s, t, labels, old, tlogp, mix, mask, cfg, pt):
  """The reference's MiniLLM objective in float64 NumPy, loop by loop."""
  s, t = np.asarray(s, np.float64), np.asarray(t, np.float64)
  m = np.asarray(mask, np.float64)
  B, T = m.shape
  lq, lp = reference_np.log_softmax(
      s / cfg.temperature
  ), reference_np.log_softmax(t / cfg.temperature)
  logp = np.take_along_axis(lq, labels[..., None], -1)[..., 0]
  r = np.clip(
      (tlogp - old) / cfg.reward_scaling, -cfg.reward_clip, cfg.reward_clip
  )
  r = r * m
  adv = np.zeros((B, T))
  for b in range(B):
    acc = 0.0
    for k in reversed(range(T)):
      acc = r[b, k] + cfg.gamma * acc
      adv[b, k] = acc / max(m[b, k:].sum(), 1.0)
  sel = m > 0
  mean, var = adv[sel].mean(), adv[sel].var(ddof=1)
  adv = (adv - mean) / np.sqrt(var + 1e-8)
  w = np.exp(old - mix)
  ratio = np.exp((logp - old) * m) * w
  pg1 = -adv * ratio
  pg2 = -adv * np.clip(ratio, 1 - cfg.cliprange, 1 + cfg.cliprange)
  n = m.sum()
  pg = (np.maximum(pg1, pg2) * m).sum() / n
  q = np.exp(lq)
  xent = -(q * lp).sum(-1)
  ent = -(q * lq).sum(-1)
  reg = ((xent - ent) * m).sum() / n
  return pg + (reg if cfg.single_step else 0.0) + cfg.lm_coef * pt, pg, reg


def _random_case(seed, B=3, T=7, v=9):
  rng = np.random.RandomState(seed)
  s = rng.randn(B, T, v) * 1.5
  t = rng.randn(B, T, v) * 1.5
  labels = rng.randint(0, v, (B, T))
  mask = np.zeros((B, T))
  for b, (lo, hi) in enumerate([(1, 6), (0, 7), (3, 5)][:B]):
    mask[b, lo:hi] = 1
  lq = reference_np.log_softmax(s / TAU)
  at = np.take_along_axis(lq, labels[..., None], -1)[..., 0]
  old = at + rng.randn(B, T) * 0.3  # the policy moved since the rollout
  tlogp = np.take_along_axis(
      reference_np.log_softmax(t / TAU), labels[..., None], -1
  )[..., 0]
  tlogp = tlogp + rng.randn(B, T) * 2  # some rewards reach the clip
  mix = np.log(0.2 * np.exp(tlogp) + 0.8 * np.exp(old)) + rng.randn(B, T) * 0.3
  return s, t, labels, old * mask, tlogp * mask, mix * mask, mask


def _jax_loss(s, t, labels, old, tlogp, mix, mask, cfg, pt):
  rollout = minillm.Rollout(
      jnp.asarray(labels, jnp.int32),
      *(jnp.asarray(x, jnp.float32) for x in (old, tlogp, mix)),
  )
  return minillm.minillm_loss(
      jnp.asarray(s, jnp.float32),
      jnp.asarray(t, jnp.float32),
      rollout,
      jnp.asarray(mask, jnp.float32),
      cfg,
      pt_loss=pt,
  )


@functools.cache
def _jitted_loss(cfg):
  """``((loss, metrics), d loss / d student logits)`` of :func:`_jax_loss`,
  one compiled program per config, shared by the tests and seeds."""
  return jax.jit(
      jax.value_and_grad(
          lambda *args: _jax_loss(*args[:-1], cfg, args[-1]), has_aux=True
      )
  )


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("single_step", [True, False])
def test_loss_and_gradient_equal_the_numpy_reference(seed, single_step):
  cfg = dataclasses.replace(CFG, single_step=single_step)
  case = _random_case(seed)
  s, t, labels, old, tlogp, mix, mask = case
  pt = 0.37
  want, want_pg, want_reg = _reference_loss(*case, cfg, pt)
  (got, m), grad = _jitted_loss(cfg)(*case, pt)
  np.testing.assert_allclose(float(got), want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(
      float(m["minillm_pg"]), want_pg, rtol=1e-5, atol=1e-6
  )
  np.testing.assert_allclose(float(m["minillm_reg"]), want_reg, rtol=1e-5)
  ratio = np.exp(old - mix) * np.exp(
      (
          np.take_along_axis(
              reference_np.log_softmax(s / TAU), labels[..., None], -1
          )[..., 0]
          - old
      )
      * mask
  )
  clipped = (np.abs(ratio - 1) > cfg.cliprange) & (mask > 0)
  assert 0 < clipped.sum() < mask.sum()  # both branches are exercised
  np.testing.assert_allclose(
      float(m["minillm_clipped"]), clipped.sum() / mask.sum(), rtol=1e-6
  )
  # d loss / d student logits: jax.grad vs central differences in float64.
  grad = np.asarray(grad, np.float64)
  fd = np.zeros_like(s)
  eps = 1e-6
  for idx in np.ndindex(s.shape):
    up, down = s.copy(), s.copy()
    up[idx] += eps
    down[idx] -= eps
    f = lambda x: _reference_loss(x, *case[1:], cfg, pt)[0]
    fd[idx] = (f(up) - f(down)) / (2 * eps)
  np.testing.assert_allclose(grad, fd, rtol=2e-3, atol=2e-5)
  assert np.abs(fd[mask == 0]).max() == 0  # nothing off the response


def test_single_step_term_is_kd_rkl_per_token():
  case = _random_case(5)
  s, t, labels, old, tlogp, mix, mask = case
  (_, m), _ = _jitted_loss(CFG)(*case, 0.0)
  per_token = np.asarray(
      kd.rkl(
          jnp.asarray(s, jnp.float32),
          jnp.asarray(t, jnp.float32),
          temperature=TAU,
      )
  )
  want = (per_token * mask).sum() / mask.sum()
  np.testing.assert_allclose(float(m["minillm_reg"]), want, rtol=1e-6)
  lq, lp = reference_np.log_softmax(s / TAU), reference_np.log_softmax(t / TAU)
  rkl = (np.exp(lq) * (lq - lp)).sum(-1)
  np.testing.assert_allclose(per_token, rkl, rtol=1e-5, atol=1e-6)


def test_normalised_returns_by_hand():
  r = jnp.asarray([[0.0, 1.0, 2.0, 3.0, 0.0]])
  m = jnp.asarray([[0.0, 1.0, 1.0, 1.0, 0.0]])
  got = np.asarray(minillm.normalised_returns(r, m, 0.5))[0]
  # R = [_, 1 + .5 (2 + .5·3), 2 + .5·3, 3]; remaining tokens 3, 2, 1.
  np.testing.assert_allclose(got[1:4], [2.75 / 3, 3.5 / 2, 3.0], rtol=1e-6)


def test_micro_batch_shares_add_up_to_the_batch_loss():
  case = _random_case(4)
  s, t, labels, old, tlogp, mix, mask = case
  (whole, _), _ = _jitted_loss(CFG)(*case, 0.0)
  rollout = minillm.Rollout(
      jnp.asarray(labels),
      *(jnp.asarray(x, jnp.float32) for x in (old, tlogp, mix)),
  )
  adv = jax.jit(minillm.advantages, static_argnums=2)(
      rollout, jnp.asarray(mask), CFG
  )
  n = jnp.asarray(mask.sum(), jnp.float32)
  total = 0.0
  for rows in ([0], [1, 2]):
    part = jax.tree.map(lambda x: x[np.asarray(rows)], rollout)
    loss, _ = jax.jit(minillm.minillm_loss, static_argnums=4)(
        jnp.asarray(s[rows], jnp.float32),
        jnp.asarray(t[rows], jnp.float32),
        part,
        jnp.asarray(mask[rows]),
        CFG,
        advantages_BxT=adv[np.asarray(rows)],
        tokens=n,
    )
    total += float(loss)
  np.testing.assert_allclose(total, float(whole), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------
# The source, the config, the training loop.


def _dataset_batch(response):
  rows = [
      pipeline.train_row(
          pipeline.Tokenized(
              np.asarray(p + response + [EOS], np.int32), len(p)
          ),
          max_length=16,
          eos_id=EOS,
      )
      for p in PROMPTS
  ]
  return {k: jnp.asarray(v) for k, v in pipeline._stack(rows).items()}


def _source(student, teacher, ppo_epochs=1):
  return strategies.make(
      kind="minillm",
      settings=SOURCE_SETTINGS,
      prompt_length=5,
      max_length=16,
      eos_id=EOS,
      total_steps=10,
      student_graphdef=nnx.graphdef(student),
      teacher_graphdef=nnx.graphdef(teacher),
      objective=minillm.Config(alpha=0.2),
      minillm_ppo_epochs=ppo_epochs,
      batch_size=len(PROMPTS),
  )


def test_source_rows_carry_the_rollout_and_the_dataset_batch():
  student, teacher = tiny_run.decode_pair(V)
  batch = _dataset_batch([21, 22])
  settings = SOURCE_SETTINGS
  _, params, rest = nnx.split(student, nnx.Param, ...)
  src = _source(student, teacher)
  state = src.init(seed=4)
  step = jnp.asarray(3, jnp.int32)
  out, _, info = jax.jit(src.__call__)(
      params, rest, nnx.state(teacher), batch, state, step
  )
  ids, mask = _prompts()
  key = strategy.step_keys(state.key, step)[1]
  tokens, rec = minillm.generate(
      student, teacher, ids, mask, key, alpha=0.2, **settings._asdict()
  )
  want = batches.to_batch(
      batches.response_rows(
          ids, mask, tokens, max_length=16, eos_id=EOS, stop_ids=(EOS,)
      ),
      EOS,
  )
  for k in want:
    np.testing.assert_array_equal(np.asarray(out[k]), np.asarray(want[k]))
    np.testing.assert_array_equal(
        np.asarray(out["lm_" + k]), np.asarray(batch[k])
    )
  lm = np.asarray(want["loss_mask"]) > 0
  for name in minillm.RECORDS:
    got = np.asarray(out[f"rollout_{name}"])
    r = np.asarray(rec[name])
    for b in range(len(PROMPTS)):  # generated token i <-> i-th masked column
      np.testing.assert_array_equal(got[b][lm[b]], r[b, : lm[b].sum()])
    assert (got[~lm] == 0).all()
  assert float(info["generated"]) == 1


def test_a_rollout_serves_ppo_epochs_steps_each_with_its_dataset_batch():
  student, teacher = tiny_run.decode_pair(V)
  _, params, rest = nnx.split(student, nnx.Param, ...)
  src = _source(student, teacher, ppo_epochs=2)
  state = src.init(seed=4)
  fn = jax.jit(src.__call__)
  outs, gens = [], []
  for step in range(3):
    batch = _dataset_batch([21 + step, 22])
    out, state, info = fn(
        params, rest, nnx.state(teacher), batch, state, jnp.asarray(step)
    )
    outs.append(jax.tree.map(np.asarray, out))
    gens.append(float(info["generated"]))
    for k in batch:
      np.testing.assert_array_equal(outs[-1]["lm_" + k], np.asarray(batch[k]))
  assert gens == [1, 0, 1]
  rollout_keys = [k for k in outs[0] if not k.startswith("lm_")]
  assert len(rollout_keys) == 8
  for k in rollout_keys:
    np.testing.assert_array_equal(outs[1][k], outs[0][k])
  assert any((outs[2][k] != outs[0][k]).any() for k in rollout_keys)
  key = strategy.step_keys(state.key, jnp.asarray(2))[1]
  ids, mask = _prompts()
  tokens, _ = minillm.generate(
      student, teacher, ids, mask, key, alpha=0.2, **SOURCE_SETTINGS._asdict()
  )
  want = batches.to_batch(
      batches.response_rows(
          ids, mask, tokens, max_length=16, eos_id=EOS, stop_ids=(EOS,)
      ),
      EOS,
  )
  np.testing.assert_array_equal(outs[2]["labels"], np.asarray(want["labels"]))


def test_config_and_its_checks():
  for arg, n_new in ((None, 256), ("tiny", 32)):
    c = minillm_gpt2.get_config(arg)
    spec = config_spec.onpolicy_from_config(c)
    assert spec.source == "minillm"
    assert (
        sampler.new_tokens(spec, c.data.max_length, c.data.max_prompt_length)
        == n_new
    )
    cfg = minillm.Config.from_spec(spec)
    assert (cfg.alpha, cfg.gamma, cfg.cliprange, cfg.lm_coef) == (
        0.2,
        0.95,
        0.2,
        1.0,
    )
    assert (cfg.reward_scaling, cfg.reward_clip) == (0.5, 100.0)
    assert spec.minillm_ppo_epochs == 4
  c = minillm_gpt2.get_config()
  assert (c.optim.lr, c.batch_size, c.loss.name, c.loss.kd_ratio) == (
      5e-6,
      64,
      "fkl",
      0.5,
  )
  cases = [
      ("onpolicy.minillm_alpha", 1.5, "minillm_alpha=1.5 must be in"),
      ("onpolicy.minillm_gamma", -0.1, "minillm_gamma=-0.1 must be in"),
      ("onpolicy.minillm_cliprange", 0.0, "minillm_cliprange=0.0 must be > 0"),
      ("onpolicy.minillm_lm_coef", -1.0, "minillm_lm_coef=-1.0 must be >= 0"),
      ("onpolicy.top_k", 50, "use top_k=0 and top_p=1.0"),
      ("onpolicy.minillm_ppo_epochs", 0, "minillm_ppo_epochs=0 must be an"),
      ("loss.kd_ratio", 0.0, "decodes with the teacher"),
      ("loss.name", "taid", "cannot drive MiniLLM's dataset term"),
  ]
  for key, value, msg in cases:
    c = minillm_gpt2.get_config("tiny")
    c.update_from_flattened_dict({key: value})
    with pytest.raises(checks.ConfigError, match=msg) as e:
      checks.validate(c)
    assert "\n" not in str(e.value)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  return str(tmp_path_factory.mktemp("minillm_training"))


def _params(workdir):
  """The student params of the last checkpoint, read from its files alone
  (no run is built; the train state is paired with the source's)."""
  ckpt = os.path.join(workdir, "ckpt")
  step = max(int(d) for d in os.listdir(ckpt) if d.isdigit())
  state = ocp.StandardCheckpointer().restore(
      os.path.join(ckpt, str(step), "state")
  )
  return [np.asarray(x) for x in jax.tree.leaves(state[0]["params"])]


@pytest.mark.slow
def test_tiny_run_logs_minillm_metrics_and_resumes_bit_identically(
    root, tmp_path
):
  c = tiny_run.config("minillm_gpt2", root, steps=4)
  c.onpolicy.max_new_tokens = 8
  c.onpolicy.minillm_ppo_epochs = 2
  training.train_and_evaluate(c, str(tmp_path / "straight"))
  # Cut inside a rollout's epochs: step 4 reuses the checkpointed rollout.
  training.train_and_evaluate(c, str(tmp_path / "resumed"), stop_at=3)
  training.train_and_evaluate(c, str(tmp_path / "resumed"))
  a = metrics.read(str(tmp_path / "straight"))
  b = metrics.read(str(tmp_path / "resumed"))
  assert [r["step"] for r in b] == [1, 2, 3, 4]
  keys = (
      "loss",
      "grad_norm",
      "minillm_pg",
      "minillm_reg",
      "pt_loss",
      "gen_len",
  )
  for x, y in zip(a, b):
    for k in keys:
      assert np.isfinite(x[k]) and x[k] == y[k], (x["step"], k)
    assert x["gen_fraction"] == x["step"] % 2
    assert 0.5 < x["minillm_w"] < 2
    np.testing.assert_allclose(
        x["loss"], x["minillm_pg"] + x["minillm_reg"] + x["pt_loss"], rtol=1e-5
    )
  pa, pb = _params(tmp_path / "straight"), _params(tmp_path / "resumed")
  assert len(pa) == len(pb) > 0
  for x, y in zip(pa, pb):
    np.testing.assert_array_equal(x, y)
