"""The trainer: configs, the sharded step, accumulation, resume, failure modes."""

import json
import os
import re

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from commands import ROOT
import extras
from kdjax import metrics, models, objective, training
from kdjax.config import files as config_files
import tiny_run

CONFIGS = [
    n[:-3] for n in config_files.available(os.path.join(ROOT, "configs"))
]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  return str(tmp_path_factory.mktemp("trainer"))


def _params(state) -> dict:
  return {
      "/".join(map(str, k)): np.asarray(v)
      for k, v in jax.tree_util.tree_flatten_with_path(state.params)[0]
  }


def _assert_same_grads(a, b, rtol):
  (ga, ma), (gb, mb) = a, b
  for k in ("loss", "ce", "kd", "grad_norm", "tokens"):
    assert ma[k] == pytest.approx(mb[k], rel=rtol, abs=1e-7), k
  scale = max(np.abs(g).max() for g in ga.values())
  for k in ga:
    np.testing.assert_allclose(
        ga[k], gb[k], rtol=rtol, atol=rtol * scale, err_msg=k
    )


def _steps(run, mesh, n, batch=None):
  """``n`` train steps (on ``batch`` every time if given); metrics per step."""
  out = []
  with jax.set_mesh(mesh):
    f = jax.jit(run.step.train)
    state, it = run.state, run.train_data.iterator()
    teacher = None if run.teacher is None else nnx.state(run.teacher)
    bad = training.Health.init()
    for _ in range(n):
      b = training.put_batch(batch if batch is not None else next(it), mesh)
      state, m, bad = f(state, b, teacher, bad)
      out.append({k: float(v) for k, v in m.items()})
  return state, out


# ----------------------------------------------------------------------------
# Configs.


def test_every_paper_config_is_present():
  assert set(CONFIGS) == {
      "akl_gpt2",
      "fkl_gpt2",
      "rkl_gpt2",
      "fkl_rkl_gpt2",
      "skl_gpt2",
      "srkl_gpt2",
      "jsd_gpt2",
      "tvd_gpt2",
      "sinkhorn_gpt2",
      "sft_gpt2",
      "seqkd_gpt2",
      "akl_llama",
      "gkd_gpt2",
      "distillm_gpt2",
      "skd_gpt2",
      "minillm_gpt2",
      "taid_gpt2",
      "abkd_gpt2",
      "akl_qwen3",
      "fkl_llama3",
      "gkd_gemma3",
      "fkl_qwen25",
      "skl_gemma2",
      "uld_xtok_gpt2",
      "features_gpt2",
      "attention_gpt2",
      "multiteacher_gpt2",
  }


@pytest.mark.parametrize("name", CONFIGS)
def test_config_defaults_and_docstring_command(name):
  module = config_files.experiment(name)
  assert f"python -m kdjax.train --config=configs/{name}.py" in module.__doc__
  paper, tiny = module.get_config(), module.get_config("tiny")
  assert paper.data.name == "dolly" and tiny.data.name == "synthetic_instruct"
  # The cross-tokenizer student reads a BPE; its teacher the bytes.
  own = tiny.teacher.tokenizer
  assert (own or tiny.data.tokenizer) == "byte"
  assert paper.data.max_length == 512 and paper.data.max_prompt_length == 256
  assert paper.optim.clip == 1.0
  if name != "minillm_gpt2":  # MiniLLM's RL phase has the reference's optimizer
    assert paper.batch_size == 32
    assert paper.optim.weight_decay == 0.01 and paper.optim.lr_min == 1e-7
  if name not in ("akl_llama", "minillm_gpt2") and name.endswith("gpt2"):
    assert paper.num_epochs == 20 and paper.optim.lr == 5e-4
  if paper.loss.kd_ratio > 0:
    # The recipe mixes 0.5 CE + 0.5 KD; ABKD's paper trains on its divergence alone.
    assert paper.loss.kd_ratio == (1.0 if name == "abkd_gpt2" else 0.5)
    assert paper.teacher.dtype == "bfloat16"
  with pytest.raises(AttributeError):  # locked: a typo is not a new field
    paper.optim.learning_rate = 1.0


def test_unknown_config_arg_and_override_fail_clearly():

  akl_gpt2 = config_files.experiment("akl_gpt2")

  with pytest.raises(ValueError, match="config arg 'tiyn' is unknown"):
    akl_gpt2.get_config("tiyn")
  # The CLI: an unknown --config.key is refused by ml_collections.
  import subprocess
  import sys

  out = subprocess.run(
      [
          sys.executable,
          "-m",
          "kdjax.train",
          "--config=configs/akl_gpt2.py:tiny",
          "--workdir=/tmp/never_written",
          "--config.optim.lrr=1",
      ],
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert out.returncode != 0 and "lrr" in out.stderr
  assert not os.path.exists("/tmp/never_written")


def test_paper_default_without_teacher_fails_fast_naming_the_fix(tmp_path):

  akl_gpt2 = config_files.experiment("akl_gpt2")

  c = akl_gpt2.get_config()
  c.teacher.path = str(tmp_path / "missing")
  from kdjax.config import checks

  with pytest.raises(checks.MissingInputError) as e:
    training.train_and_evaluate(c, str(tmp_path / "w"))
  msg = str(e.value)
  assert "`hf download gpt2-xl" in msg and "--config.teacher.path" in msg
  assert "\n" not in msg
  assert not os.path.exists(tmp_path / "w")  # refused before any write


# ----------------------------------------------------------------------------
# Every config runs.


@pytest.mark.parametrize("name", [n for n in CONFIGS if n != "seqkd_gpt2"])
def test_every_tiny_config_trains(name, root, tmp_path):
  c = tiny_run.config(name, root, steps=3)
  c.export_hf = True
  last = training.train_and_evaluate(c, str(tmp_path))
  rows = metrics.read(str(tmp_path))
  assert [r["step"] for r in rows] == [1, 2, 3]
  assert all(np.isfinite(r["loss"]) for r in rows)
  r = c.loss.kd_ratio
  want = (1 - r) * last["ce"] + r * last["kd"]
  for term, group in (("feature", "features"), ("attention", "attention")):
    w = c.loss[group].weight
    assert (term in last) == (w > 0)
    want += w * last.get(term, 0.0)
  if name == "minillm_gpt2":  # the CE/KD mix is its pre-training term
    assert last["pt_loss"] == pytest.approx(want, rel=1e-5)
    want += last["minillm_pg"] + last["minillm_reg"]
  assert last["loss"] == pytest.approx(want, rel=1e-5)
  assert (last["kd"] > 0) == (r > 0)
  saved = json.load(open(tmp_path / "config.json"))
  assert saved["loss"]["name"] == c.loss.name
  # The export loads back (in transformers too, for the other families)
  # and computes the logits of the model the run ended with.
  student = models.load(str(tmp_path / "hf"))
  if c.student.init == "preset:tiny-gpt2":
    vocab = c.student.model_overrides.vocab_size
    assert student.head_weight().shape == (vocab, tiny_run.STUDENT["n_embd"])
    return
  transformers = extras.require("transformers")
  torch = extras.require("torch")
  ids_BxT = np.arange(2 * 24, dtype=np.int32).reshape(2, 24) % 257
  theirs = transformers.AutoModelForCausalLM.from_pretrained(
      str(tmp_path / "hf"), dtype=torch.float32
  )
  with torch.no_grad():
    want = theirs(torch.from_numpy(ids_BxT).long()).logits.numpy()
  np.testing.assert_allclose(np.asarray(student(ids_BxT)), want, atol=1e-5)


def test_akl_loss_decreases_on_one_fixed_batch(root):
  c = tiny_run.config(
      "akl_gpt2", root, steps=30, **{"optim.warmup_steps": 0, "optim.lr": 3e-3}
  )
  run, mesh = tiny_run.built(c, root)
  batch = run.train_data.dataset[0]
  _, m = _steps(run, mesh, 30, batch)
  losses = [x["loss"] for x in m]
  assert all(np.isfinite(losses))
  falls = np.diff(losses) < 0
  assert falls.mean() >= 0.9 and losses[-1] < 0.85 * losses[0], losses


def test_sft_never_loads_a_teacher(root, tmp_path, monkeypatch):
  def refuse(*a, **k):
    raise AssertionError("SFT loaded a model from disk")

  monkeypatch.setattr(models, "load", refuse)
  c = tiny_run.config(
      "sft_gpt2", root, steps=2, **{"teacher.path": str(tmp_path / "nowhere")}
  )
  run, _ = tiny_run.built(c, root)
  assert run.teacher is None and run.step.teacher_graphdef is None


# ----------------------------------------------------------------------------
# The step's numerics.


@pytest.mark.multi_device
def test_eight_device_step_equals_one_device(root):
  c = tiny_run.config("akl_gpt2", root, **{"mesh.data": 4, "mesh.fsdp": 2})
  run8, mesh8 = tiny_run.built(c, root)
  c1 = tiny_run.config("akl_gpt2", root, **{"mesh.data": 1})
  run1, mesh1 = tiny_run.built(c1, root, devices=jax.devices()[:1])
  assert mesh8.devices.size == 8
  # FSDP really shards weights (and the batch is split over all 8).
  specs = {str(x.sharding.spec) for x in jax.tree.leaves(run8.state.params)}
  assert any("fsdp" in s for s in specs), specs
  _assert_same_grads(
      tiny_run.first_grads(run8, mesh8), tiny_run.first_grads(run1, mesh1), 1e-5
  )
  # Two full steps (optimizer included) agree too, to Adam's amplification.
  (_, m8), (_, m1) = _steps(run8, mesh8, 2), _steps(run1, mesh1, 2)
  for a, b in zip(m8, m1):
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)


def test_gradient_accumulation_equals_the_big_batch(root):
  devices = jax.devices()[:2]
  base = tiny_run.built(
      tiny_run.config("fkl_gpt2", root, **{"mesh.data": 2}), root, devices
  )
  acc = tiny_run.built(
      tiny_run.config("fkl_gpt2", root, **{"mesh.data": 2, "grad_accum": 4}),
      root,
      devices,
  )
  _assert_same_grads(
      tiny_run.first_grads(*base), tiny_run.first_grads(*acc), 1e-5
  )


@pytest.mark.parametrize("impl", ["reference", "fused"])
def test_loss_impls_give_the_same_step(root, impl):
  devices = jax.devices()[:2]
  ref = tiny_run.config("akl_gpt2", root, **{"mesh.data": 2})
  other = tiny_run.config(
      "akl_gpt2",
      root,
      **{"mesh.data": 2, "loss.impl": impl, "loss.chunk_size": 100},
  )
  (r0, m0), (r1, m1) = tiny_run.built(ref, root, devices), tiny_run.built(
      other, root, devices
  )
  _assert_same_grads(
      tiny_run.first_grads(r0, m0), tiny_run.first_grads(r1, m1), 1e-4
  )


def test_objective_matches_a_numpy_reference(root):
  """CE and FKL sums of one batch against float64 NumPy on the same logits."""
  c = tiny_run.config("fkl_gpt2", root)
  run, mesh = tiny_run.built(c, root)
  batch = run.train_data.dataset[0]
  with jax.set_mesh(mesh):
    student = run.student
    teacher = run.teacher
    s = np.asarray(
        student(
            batch["input_ids"], batch["positions"], batch["attention_mask"]
        ),
        np.float64,
    )
    t = np.asarray(
        teacher(
            batch["input_ids"], batch["positions"], batch["attention_mask"]
        ),
        np.float64,
    )
    got = objective.sums(
        c.loss, student, teacher, training.put_batch(batch, mesh)
    )
  mask = batch["loss_mask"].astype(np.float64)
  log_q = (
      s
      - np.log(np.exp(s - s.max(-1, keepdims=True)).sum(-1, keepdims=True))
      - s.max(-1, keepdims=True)
  )
  log_p = (
      t
      - np.log(np.exp(t - t.max(-1, keepdims=True)).sum(-1, keepdims=True))
      - t.max(-1, keepdims=True)
  )
  ce = -np.take_along_axis(log_q, batch["labels"][..., None], -1)[..., 0]
  fkl = (np.exp(log_p) * (log_p - log_q)).sum(-1)
  assert float(got.tokens) == mask.sum()
  assert float(got.ce) == pytest.approx((ce * mask).sum(), rel=1e-5)
  assert float(got.kd) == pytest.approx((fkl * mask).sum(), rel=1e-4)


def test_schedule_and_weight_decay_mask():

  akl_gpt2 = config_files.experiment("akl_gpt2")

  c = akl_gpt2.get_config()
  sched = training.make_schedule(c.optim, 1000)
  assert float(sched(0)) == pytest.approx(5e-4)
  assert float(sched(1000)) == pytest.approx(1e-7, rel=1e-3)
  assert float(sched(500)) == pytest.approx((5e-4 + 1e-7) / 2, rel=1e-3)
  # No decay on 1-D params: with zero gradients only matrices shrink.
  params = {"w": jnp.ones((2, 2)), "b": jnp.ones((2,))}
  tx = training.make_optimizer(c.optim, 1000)
  upd, _ = tx.update(
      jax.tree.map(jnp.zeros_like, params), tx.init(params), params
  )
  assert float(jnp.abs(upd["b"]).max()) == 0.0
  assert float(upd["w"][0, 0]) == pytest.approx(-5e-4 * 0.01, rel=1e-4)


# ----------------------------------------------------------------------------
# Around the step.


def test_resume_continues_exactly(root, tmp_path):
  c = tiny_run.config("akl_gpt2", root, steps=6)
  training.train_and_evaluate(c, str(tmp_path / "straight"))
  training.train_and_evaluate(c, str(tmp_path / "resumed"), stop_at=3)
  rows = metrics.read(str(tmp_path / "resumed"))
  assert [r["step"] for r in rows] == [1, 2, 3]
  training.train_and_evaluate(c, str(tmp_path / "resumed"))
  a = metrics.read(str(tmp_path / "straight"))
  b = metrics.read(str(tmp_path / "resumed"))
  assert [r["step"] for r in b] == list(range(1, 7))
  for x, y in zip(a, b):
    assert x["loss"] == y["loss"] and x["grad_norm"] == y["grad_norm"]
  run_a = _restored(c, tmp_path / "straight")
  run_b = _restored(c, tmp_path / "resumed")
  pa, pb = _params(run_a), _params(run_b)
  for k in pa:
    np.testing.assert_array_equal(pa[k], pb[k], err_msg=k)


def _restored(c, workdir):
  from kdjax import checkpoint

  run, mesh = tiny_run.built(c, str(workdir))
  ck = checkpoint.Checkpoints(str(workdir), every_steps=1, max_to_keep=1)
  with jax.set_mesh(mesh):
    state, record = ck.restore(
        ck.latest_step(), run.state, run.train_data.iterator()
    )
  ck.close()
  assert record["step"] == int(state.step)
  return state


def test_changed_config_in_same_workdir_is_refused(root, tmp_path):
  c = tiny_run.config("fkl_gpt2", root, steps=1)
  training.train_and_evaluate(c, str(tmp_path))
  c2 = tiny_run.config("rkl_gpt2", root, steps=1)
  with pytest.raises(
      training.TrainingError, match=r"loss\.name.*force_new_run"
  ):
    training.train_and_evaluate(c2, str(tmp_path))
  assert json.load(open(tmp_path / "config.json"))["loss"]["name"] == "fkl"
  c2.force_new_run = True
  training.train_and_evaluate(c2, str(tmp_path))
  assert json.load(open(tmp_path / "config.json"))["loss"]["name"] == "rkl"
  assert [r["step"] for r in metrics.read(str(tmp_path))] == [1]


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_checkpoint(
    root, tmp_path
):
  c = tiny_run.config(
      "fkl_gpt2",
      root,
      steps=6,
      **{
          "optim.lr": 1e30,
          "optim.warmup_steps": 0,
          "optim.clip": 1e30,
          "ckpt.every_steps": 1,
      },
  )
  with pytest.raises(training.TrainingError) as e:
    training.train_and_evaluate(c, str(tmp_path))
  msg = str(e.value)
  step = int(re.search(r"non-finite at step (\d+)", msg).group(1))
  assert 1 < step <= 6 and "last good checkpoint" in msg
  steps = sorted(int(s) for s in os.listdir(tmp_path / "ckpt") if s.isdigit())
  assert steps and max(steps) < step


def test_vocabulary_mismatch_is_refused(root, tmp_path):
  other = str(tmp_path / "t")
  models.save_hf(
      tiny_run.gpt2(vocab_size=300, **tiny_run.TEACHER),
      other,
  )
  c = tiny_run.config("fkl_gpt2", root, **{"teacher.path": other})
  with pytest.raises(
      ValueError, match="teacher vocabulary 300 != student " "vocabulary 257"
  ):
    tiny_run.built(c, root)


def test_seqkd_trains_on_the_teachers_responses(root, tmp_path):
  c = tiny_run.config(
      "seqkd_gpt2",
      root,
      steps=2,
      **{
          "data.train_limit": 16,
          "eval.batch_size": 8,
          "eval.max_new_tokens": 8,
      },
  )
  assert c.loss.kd_ratio == 0 and c.data.seqkd_teacher
  training.train_and_evaluate(c, str(tmp_path))
  rows = [json.loads(l) for l in open(tmp_path / "seqkd" / "train.jsonl")]
  assert len(rows) == 16
  # Responses are the teacher's greedy continuations, not the references.
  from kdjax import evaluation
  from kdjax.config import spec
  from kdjax.data import sources, tokenizer

  tok, eos = tokenizer.load("byte")
  src = sources.head(
      sources.load_source("synthetic_instruct", "train", c.data.data_dir), 16
  )
  want = evaluation.generate_responses(
      models.load(c.data.seqkd_teacher),
      tok,
      eos,
      src,
      protocol=spec.protocol_from_config(c)._replace(max_new_tokens=16),
      seed=c.seed,
      batch_size=8,
      progress=False,
  )
  assert [r["output"] for r in rows] == [w["response"] for w in want]
  assert [r["step"] for r in metrics.read(str(tmp_path))] == [1, 2]


def test_metrics_survive_a_line_cut_short_by_a_kill(tmp_path):
  w = metrics.Writer(str(tmp_path))
  w.write(1, {"loss": 2.0})
  w.write(2, {"loss": float("nan")})
  w.close()
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 3, "lo')  # killed mid-append
  rows = metrics.read(str(tmp_path))
  assert [r["step"] for r in rows] == [1, 2] and rows[1]["loss"] == "nan"
  metrics.Writer(str(tmp_path)).truncate(after_step=1)
  assert [r["step"] for r in metrics.read(str(tmp_path))] == [1]
