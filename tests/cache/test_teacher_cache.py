"""The teacher cache: codec bounds, the writer, the checks, resume, training.

References are float64 NumPy: the teacher's ``log_softmax(t / T)`` and its
top-k, and the (k+1)-bin forward KL of docs/divergences.md "Sparse teachers"
(top-k bins plus one tail bin, the student's from its full softmax).
"""

import dataclasses
import functools
import json
import os
import signal
import subprocess
import sys
import time

from flax import nnx
import jax
import numpy as np
import pytest

import commands
from commands import ROOT, listing, run_cli
from kdjax import models, objective, training
from kdjax.cache import build, codec, store
from kdjax.config import checks, recipe
from kdjax.config import spec as spec_lib
from kdjax.data import inputs, pipeline
from kdjax.data import tokenizer as tokenizer_lib
import tiny_run

TEMPERATURE = 2.0
PER_SHARD = 16  # 64 examples: 4 shards


def _log_softmax64(x):
  x = np.asarray(x, np.float64)
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _peaked_logits(rng, n, vocab):
  """Zipf-like logits with a few dominant tokens per row."""
  ranks = rng.permuted(np.tile(np.arange(1, vocab + 1), (n, 1)), axis=1)
  return -1.1 * np.log(ranks) * 3 + rng.normal(0, 0.5, (n, vocab))


# ----------------------------------------------------------------------------
# Codec.


@pytest.mark.parametrize("vocab,k", [(257, 64), (70000, 16)])
def test_topk_round_trip_is_within_the_stated_bound(vocab, k):
  rng = np.random.default_rng(0)
  lp = _log_softmax64(_peaked_logits(rng, 40, vocab))
  ids = np.argsort(-lp, -1, kind="stable")[:, :k]
  top = np.take_along_axis(lp, ids, -1)
  blob = codec.encode_topk(ids, top, vocab)
  ids2, lp2 = codec.decode_topk(blob)
  order = np.argsort(ids, -1)
  want_ids = np.take_along_axis(ids, order, -1)
  want_lp = np.take_along_axis(top, order, -1)
  np.testing.assert_array_equal(ids2, want_ids)
  bound = codec.topk_bound(top)
  err = np.abs(lp2 - want_lp).max(-1)
  assert (err <= bound).all(), (err - bound).max()
  assert bound.max() < 0.1  # eight bits over a span of ~15 nats
  tail = 1 - np.exp(want_lp).sum(-1)
  tail2 = 1 - np.exp(lp2.astype(np.float64)).sum(-1)
  m = np.log(np.exp(want_lp).sum(-1))
  assert (np.abs(tail2 - tail) <= 2**-10 * (np.abs(m) + 2**-4) + 1e-6).all()


def test_sampled_round_trip_keeps_ids_and_weights_exactly():
  ids = np.array([[3, 5, 0, 0], [1, 2, 7, 9]], np.int32)
  weights = np.array([[0.75, 0.25, 0, 0], [0.25, 0.25, 0.25, 0.25]], np.float32)
  lp = np.array([[-0.2, -1.9, 0, 0], [-1.0, -1.5, -2.25, -3.0]], np.float32)
  got_ids, got_w, got_lp = codec.decode_sampled(
      codec.encode_sampled(ids, weights, lp, 4, 300), 4
  )
  np.testing.assert_array_equal(got_ids, ids)
  np.testing.assert_array_equal(got_w, weights)
  np.testing.assert_allclose(got_lp, lp, rtol=2**-11)


def test_ids_above_uint16_take_four_bytes():
  ids = np.array([[70000, 3]], np.int64)
  lp = np.log(np.array([[0.6, 0.3]]))
  got, _ = codec.decode_topk(codec.encode_topk(ids, lp, 70001))
  np.testing.assert_array_equal(got, [[3, 70000]])


# ----------------------------------------------------------------------------
# The writer over a tiny dataset.


def _config(root, **overrides):
  c = tiny_run.config(
      "fkl_gpt2", root, steps=4, **{"loss.temperature": TEMPERATURE}
  )
  recipe.override(c, overrides)
  return c


def _cached(c, cache_dir):
  c = c.copy_and_resolve_references()
  c.teacher.source = "cache"
  c.teacher.cache_dir = cache_dir
  return c


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  return str(tmp_path_factory.mktemp("teacher_cache"))


@pytest.fixture(scope="module")
def built(root):
  out = os.path.join(root, "cache")
  meta = build.build(
      _config(root), out, examples_per_shard=PER_SHARD, progress=False
  )
  return out, meta


def _examples(c):
  s = spec_lib.from_config(c)
  tok, eos_id = tokenizer_lib.load(s.data.tokenizer)
  examples, _ = pipeline.tokenize_split(
      inputs.train_source(s.data), tok, **s.data.row_settings(eos_id)
  )
  return examples, eos_id


# A model's logits on a batch's rows: one compiled program per model and
# shape instead of one per operation.
_logits = nnx.jit(
    lambda m, rows: m(
        rows["input_ids"], rows["positions"], rows["attention_mask"]
    )
)


@functools.cache
def _teacher(path):
  return models.load(path)


def _teacher_log_probs(c, rows):
  """float64 log_softmax(t / T) of the tiny teacher on ``rows``."""
  rows = {k: rows[k] for k in ("input_ids", "positions", "attention_mask")}
  logits = _logits(_teacher(c.teacher.path), rows)
  return _log_softmax64(np.asarray(logits, np.float64) / TEMPERATURE)


def test_records_align_with_the_examples_and_hold_the_teachers_top_k(
    root, built
):
  out, meta = built
  c = _config(root)
  examples, eos_id = _examples(c)
  cache = store.Cache(out)
  assert len(cache) == meta["num_examples"] == len(examples) == 64
  assert meta["fingerprint"] == store.fingerprint(examples)
  k = c.teacher.cache.k
  for i in (0, 17, 63):  # three shards
    e = examples[i]
    digest, (ids, lp) = cache.record(i)
    assert digest == store.example_digest(e.prompt_len, e.ids)
    row = pipeline.train_row(e, max_length=c.data.max_length, eos_id=eos_id)
    full = _teacher_log_probs(c, {k_: v[None] for k_, v in row.items()})[0]
    want = full[e.prompt_len - 1 : len(e.ids) - 1]
    top = np.sort(np.argsort(-want, -1, kind="stable")[:, :k], -1)
    np.testing.assert_array_equal(ids, top)
    at = np.take_along_axis(want, top, -1)
    err = np.abs(lp - at).max(-1)
    assert (err <= codec.topk_bound(at) + 1e-5).all(), err
  sizes = sum(
      os.path.getsize(os.path.join(out, n))
      for n in os.listdir(out)
      if n.endswith(".array_record")
  )
  tokens = sum(len(e.ids) - e.prompt_len for e in examples)
  assert meta["tokens"] == tokens and meta["bytes"] == sizes
  assert meta["bytes_per_token"] == pytest.approx(sizes / tokens)
  records = sum(len(cache.raw(i)) for i in range(len(cache)))
  assert meta["record_bytes_per_token"] == pytest.approx(records / tokens)


def test_a_sampled_cache_holds_draws_from_the_teacher(root, tmp_path):
  draws = 12
  c = _config(
      root,
      **{"data.train_limit": 8, "teacher.cache.encoding": "sampled"},
  )
  out = str(tmp_path / "sampled")
  meta = build.build(c, out, examples_per_shard=4, progress=False)
  assert meta["identity"]["num_samples"] == draws
  examples, eos_id = _examples(c)
  cache = store.Cache(out)
  for i in (0, 7):
    e = examples[i]
    _, (ids, weights, lp) = cache.record(i)
    row = pipeline.train_row(e, max_length=c.data.max_length, eos_id=eos_id)
    full = _teacher_log_probs(c, {k: v[None] for k, v in row.items()})[0]
    want = full[e.prompt_len - 1 : len(e.ids) - 1]
    used = weights > 0
    np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(np.rint(weights * draws) / draws, weights)
    for t in range(len(ids)):  # distinct ids, sorted, at the teacher's values
      u = ids[t][used[t]]
      assert (np.diff(u) > 0).all()
      np.testing.assert_allclose(
          lp[t][used[t]], want[t, u], rtol=2**-10, atol=1e-5
      )


# ----------------------------------------------------------------------------
# Stale caches.


@pytest.mark.parametrize(
    "override,words",
    [
        ({"data.max_length": 88}, ("data.max_length=96", "88")),
        ({"loss.temperature": 1.0}, ("loss.temperature=2.0",)),
        ({"teacher.cache.k": 8}, ("teacher.cache.k=64",)),
        ({"data.train_limit": 32}, ("data.train_limit=64",)),
    ],
)
def test_a_stale_cache_is_refused_before_anything_is_written(
    root, built, tmp_path, override, words
):
  c = _cached(_config(root, **override), built[0])
  workdir = tmp_path / "w"
  with pytest.raises(checks.ConfigError) as e:
    training.train_and_evaluate(c, str(workdir))
  msg = str(e.value)
  assert "does not match the config" in msg and "\n" not in msg
  assert "python -m kdjax.cache_teacher" in msg and built[0] in msg
  for w in words:
    assert w in msg
  assert not workdir.exists()


def test_changed_examples_are_refused_by_their_fingerprint(root, built):
  examples, _ = _examples(_config(root))
  cache = store.Cache(built[0])
  cache.bind(examples, 96)  # the same examples bind
  e = examples[5]
  ids = e.ids.copy()
  ids[-2] = (ids[-2] + 1) % 256
  changed = examples[:5] + [dataclasses.replace(e, ids=ids)] + examples[6:]
  with pytest.raises(store.CacheError, match="dataset or the tokenizer"):
    cache.bind(changed, 96)


def test_another_or_changed_teacher_is_refused(root, built, tmp_path):
  teacher = tiny_run.make_teacher(str(tmp_path / "teacher"))
  c = _cached(_config(root, **{"teacher.path": teacher}), built[0])
  with pytest.raises(checks.ConfigError, match="teacher.path="):
    checks.validate(c)  # same files, another path
  c = _config(root, **{"teacher.path": teacher, "data.train_limit": 8})
  out = str(tmp_path / "cache")
  build.build(c, out, progress=False)
  checks.validate(_cached(c, out))
  with open(os.path.join(teacher, "config.json"), "a") as f:
    f.write("\n")  # the same path now holds another teacher
  with pytest.raises(checks.ConfigError, match="teacher's files changed"):
    checks.validate(_cached(c, out))


def test_cache_config_checks():
  c = tiny_run.config("fkl_gpt2", "/tmp/unused")
  for key, value, words in (
      ("teacher.cache.encoding", "dense", "teacher.cache.encoding='dense'"),
      ("teacher.cache.k", 0, "teacher.cache.k=0"),
      ("teacher.source", "disk", "teacher.source='disk'"),
  ):
    bad = c.copy_and_resolve_references()
    recipe.override(bad, {key: value})
    with pytest.raises(checks.ConfigError, match=words):
      checks.validate(bad)
  bad = _cached(c, "")
  with pytest.raises(checks.ConfigError, match="teacher.cache_dir=''"):
    checks.validate(bad)
  for key, value, words in (
      ("loss.impl", "fused", "loss.impl='fused'"),
      ("teacher.cache.encoding", "sampled", "no estimator"),
      ("eval.best_metric", "val_kd", "val_kd"),
      ("loss.name", "sinkhorn", "needs the teacher's full logits"),
  ):
    bad = _cached(c, "/tmp/somewhere")
    if key == "teacher.cache.encoding":
      bad.loss.name = "rkl"
    recipe.override(bad, {key: value})
    with pytest.raises(checks.ConfigError, match=words):
      checks.validate(bad)


# ----------------------------------------------------------------------------
# Training from the cache.


def _reference_fkl(student_logits, ids, lp):
  """float64 (k+1)-bin FKL per position: top-k bins plus the tail bin."""
  lq = _log_softmax64(np.asarray(student_logits, np.float64) / TEMPERATURE)
  lq_k = np.take_along_axis(lq, ids, -1)
  p = np.exp(np.asarray(lp, np.float64))
  tail = 1 - p.sum(-1)
  q_tail = 1 - np.exp(lq_k).sum(-1)
  return (p * (np.log(p) - lq_k)).sum(-1) + tail * (
      np.log(tail) - np.log(q_tail)
  )


@pytest.fixture(scope="module")
def cached_run(root, built):
  """A run that reads the cache, on the default mesh (one device)."""
  c = _cached(_config(root), built[0])
  return (c, *tiny_run.built(c, root))


def test_kd_from_the_cache_equals_the_live_teacher_truncated(cached_run):
  c, run, mesh = cached_run
  assert run.teacher is None
  batch = run.train_data.dataset[0]  # a shuffled batch
  mask = batch["loss_mask"] > 0
  # The live teacher on the same rows, truncated to its top-k.
  live = _teacher_log_probs(c, batch)[mask]
  k = c.teacher.cache.k
  ids = np.sort(np.argsort(-live, -1, kind="stable")[:, :k], -1)
  np.testing.assert_array_equal(batch["teacher_ids"][mask], ids)
  at = np.take_along_axis(live, ids, -1)
  err = np.abs(batch["teacher_log_probs"][mask] - at).max(-1)
  assert (err <= codec.topk_bound(at) + 1e-5).all()
  # The step's KD sum from the cache = the reference on the cached values.
  student = nnx.merge(run.step.graphdef, run.state.params, run.state.rest)
  student.eval()
  s_logits = np.asarray(
      _logits(
          student,
          {k: batch[k] for k in ("input_ids", "positions", "attention_mask")},
      )
  )
  want = _reference_fkl(
      s_logits[mask],
      batch["teacher_ids"][mask],
      batch["teacher_log_probs"][mask],
  ).sum()
  with jax.set_mesh(mesh):
    sums = jax.jit(lambda b: objective.sums(c.loss, student, None, b))(
        training.put_batch(batch, mesh)
    )
  assert float(sums.kd) == pytest.approx(want, rel=2e-5)
  assert float(sums.tokens) == mask.sum() == float(sums.kd_tokens)


@pytest.mark.slow
def test_accumulation_and_devices_give_the_same_gradient(root, cached_run):
  c, run, mesh = cached_run
  ga, ma = tiny_run.first_grads(run, mesh)  # one device, one micro-batch
  c2 = c.copy_and_resolve_references()
  c2.grad_accum = 2
  gb, mb = tiny_run.first_grads(
      *tiny_run.built(c2, root, devices=jax.devices()[:4])
  )
  assert ma["kd"] > 0
  for key in ("loss", "ce", "kd", "tokens"):
    assert mb[key] == pytest.approx(ma[key], rel=1e-5), key
  for k in ga:
    np.testing.assert_allclose(ga[k], gb[k], rtol=1e-4, atol=1e-6, err_msg=k)


@pytest.mark.slow
def test_resume_from_the_cache_continues_exactly(root, built, tmp_path):
  from kdjax import metrics

  c = _cached(_config(root), built[0])
  straight = training.train_and_evaluate(c, str(tmp_path / "a"))
  training.train_and_evaluate(c, str(tmp_path / "b"), stop_at=2)
  resumed = training.train_and_evaluate(c, str(tmp_path / "b"))
  a, b = metrics.read(str(tmp_path / "a")), metrics.read(str(tmp_path / "b"))
  assert [r["step"] for r in b] == [1, 2, 3, 4]
  for x, y in zip(a, b):
    assert x["loss"] == y["loss"] and x["kd"] == y["kd"]
  assert straight["loss"] == resumed["loss"]


def test_validation_reports_the_students_ce_as_its_loss(cached_run):
  from kdjax.training import validation as val_lib

  c, run, mesh = cached_run
  with jax.set_mesh(mesh):
    m = val_lib.validate(run, run.state, None, jax.jit(run.step.eval))
  assert m["val_loss"] == m["val_ce"] > 0 and "val_kd" not in m


# ----------------------------------------------------------------------------
# The command line, a kill and a resume.


def _cli_args(root, out):
  teacher = tiny_run.make_teacher(os.path.join(root, "teacher"))
  return [
      "--config=configs/fkl_gpt2.py:tiny,steps=2",
      f"--config.teacher.path={teacher}",
      f"--config.data.data_dir={tiny_run.data_dir()}",
      "--config.data.train_limit=64",
      "--config.batch_size=8",
      f"--config.loss.temperature={TEMPERATURE}",
      "--config.eval.num_examples=0",
      "--config.eval.batch_size=8",
      "--config.export_hf=false",
      f"--out={out}",
      f"--examples_per_shard={PER_SHARD}",
  ]


@pytest.fixture(scope="module")
def cli_cache(root):
  out = os.path.join(root, "cli_cache")
  rc, stdout, stderr = run_cli(
      "kdjax.cache_teacher", *_cli_args(root, out), cwd=ROOT
  )
  assert rc == 0, stderr
  assert "bytes/token" in stdout
  return out


def _records(directory):
  cache = store.Cache(directory)
  return [cache.raw(i) for i in range(len(cache))]


@pytest.mark.slow
def test_cli_caches_then_trains_from_the_cache(root, cli_cache, tmp_path):
  args = [a for a in _cli_args(root, cli_cache) if not a.startswith("--ex")]
  args = [a for a in args if not a.startswith("--out")]
  workdir = tmp_path / "w"
  rc, out, err = run_cli(
      "kdjax.train",
      *args,
      f"--workdir={workdir}",
      "--config.teacher.source=cache",
      f"--config.teacher.cache_dir={cli_cache}",
      "--config.log_every=1",
      cwd=ROOT,
  )
  assert rc == 0, err
  rows = [json.loads(l) for l in open(workdir / "metrics.jsonl")]
  assert [r["step"] for r in rows] == [1, 2] and rows[-1]["kd"] > 0


def test_a_missing_cache_is_refused_before_anything_is_written(root, tmp_path):
  """One sentence naming the build command (the CLIs print a ConfigError as
  their one ``error:`` line, tests/cli), and no workdir."""
  c = _cached(_config(root), str(tmp_path / "none"))
  workdir = tmp_path / "w"
  with pytest.raises(checks.ConfigError) as e:
    training.train_and_evaluate(c, str(workdir))
  msg = str(e.value)
  assert "holds no teacher cache" in msg and "\n" not in msg
  assert "python -m kdjax.cache_teacher" in msg
  assert not workdir.exists(), listing(workdir)


_KILLED_BUILD = """
import runpy, sys, time
from kdjax.cache import build
commit = build.commit
def slow(tmp, path):
  commit(tmp, path)
  time.sleep(600)
build.commit = slow
sys.argv = ["kdjax.cache_teacher"] + sys.argv[1:]
runpy.run_module("kdjax.cache_teacher", run_name="__main__")
"""


@pytest.mark.slow
def test_a_killed_build_resumes_to_the_same_cache(root, cli_cache, tmp_path):
  out = str(tmp_path / "cache")
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  env["XLA_FLAGS"] = commands.xla_flags()
  p = subprocess.Popen(
      [sys.executable, "-c", _KILLED_BUILD, *_cli_args(root, out)],
      cwd=ROOT,
      env=env,
      stdout=subprocess.DEVNULL,
      stderr=subprocess.PIPE,
  )
  first = os.path.join(out, store.shard_name(0, 4))
  deadline = time.time() + 300
  while not os.path.exists(first) and p.poll() is None:
    assert time.time() < deadline
    time.sleep(0.2)
  assert p.poll() is None, p.stderr.read().decode()
  p.send_signal(signal.SIGKILL)
  p.wait()
  p.stderr.close()
  assert not store.read_metadata(out)["complete"]
  assert sorted(n for n in os.listdir(out) if n.endswith("array_record")) == [
      store.shard_name(0, 4)
  ]
  rc, _, err = run_cli("kdjax.cache_teacher", *_cli_args(root, out), cwd=ROOT)
  assert rc == 0, err
  assert _records(out) == _records(cli_cache)
  assert store.read_metadata(out) == store.read_metadata(cli_cache)
