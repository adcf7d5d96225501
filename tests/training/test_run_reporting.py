"""What a run tells its user and how it may be resumed.

A finished tiny run prints one validation line per evaluation and a summary
(best step and metric, final metrics, where the exports are), records the
best step in best.json, exports students that carry their tokenizer, and can
be extended with more steps although derived fields (eval.every_steps)
changed; ``kdjax.evaluate`` says which checkpoint it scores.
"""

import json
import os

from flax import nnx
import pytest

from fake_gcs import fake_gcs_fixture  # noqa: F401 (the fake_gcs fixture)
from kdjax import models, training
from kdjax.config import files as config_files
from kdjax.config import identity
from kdjax.config import spec as spec_lib
from kdjax.evaluation import files
from kdjax.training import builder
from kdjax.training import workdir as workdir_lib
import tiny_run

akl_gpt2 = config_files.experiment("akl_gpt2")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  return str(tmp_path_factory.mktemp("reporting"))


def _identity(arg, **overrides):
  from kdjax.config import recipe

  c = akl_gpt2.get_config(arg)
  recipe.override(c, overrides)
  return json.loads(c.to_json_best_effort())


def test_claim_extends_a_run_and_refuses_another(tmp_path):
  w = str(tmp_path / "w")
  assert workdir_lib.claim(w, _identity("tiny,steps=30"), force_new_run=False)
  assert not workdir_lib.claim(
      w, _identity("tiny,steps=60"), force_new_run=False
  )
  with pytest.raises(
      training.TrainingError, match=r"changed: loss\.hp\.mu\).*force_new_run"
  ):
    workdir_lib.claim(
        w,
        _identity("tiny,steps=60", **{"loss.hp.mu": 0.6}),
        force_new_run=False,
    )
  assert (
      identity.flatten(json.load(open(f"{w}/config.json")))["num_steps"] == 60
  )


def test_claim_and_release_on_a_bucket(fake_gcs):
  w = "gs://bucket/run"
  assert workdir_lib.claim(w, _identity("tiny"), force_new_run=False)
  assert json.loads(fake_gcs[f"{w}/config.json"].getvalue())["seed"] == 10
  workdir_lib.release(w)
  assert f"{w}/config.json" not in fake_gcs


def test_student_trains_in_training_mode(tmp_path):
  hf_dir = str(tmp_path / "student")
  models.save_hf(tiny_run.gpt2(), hf_dir)
  student = builder.make_student(
      spec_lib.StudentSpec(
          init=hf_dir, dtype="float32", model_overrides={}, seed=0
      ),
      None,
  )
  flags = [
      m.deterministic
      for _, m in nnx.iter_modules(student)
      if isinstance(m, nnx.Dropout)
  ]
  assert flags and not any(flags)  # models.load alone gives eval mode


def test_a_run_reports_and_extends(root, tmp_path, capsys):
  w = str(tmp_path / "w")
  c = tiny_run.config(
      "fkl_gpt2", root, steps=4, **{"eval.every_steps": 2, "export_hf": True}
  )
  training.train_and_evaluate(c, w)
  out = capsys.readouterr().out
  assert "validation step 2/4: val_loss" in out
  assert "validation step 4/4: val_loss" in out
  rows = {
      r["step"]: r
      for r in map(json.loads, open(os.path.join(w, "metrics.jsonl")))
  }
  want = min((2, 4), key=lambda s: rows[s]["val_ce"])
  best = json.load(open(os.path.join(w, "best.json")))
  assert best["step"] == want and best["metric"] == "val_ce"
  assert best["value"] == pytest.approx(rows[want]["val_ce"])
  assert f"best: step {want} by val_ce" in out
  assert f"final student (Hugging Face): {w}/hf" in out
  assert f"best student (Hugging Face): {w}/best_hf" in out
  summary = json.load(open(os.path.join(w, "summary.json")))
  assert summary["steps"] == 4 and summary["best"]["step"] == want
  assert os.path.exists(os.path.join(w, "hf", "tokenizer.json"))
  assert files.describe_checkpoint(f"{w}/best_hf") == (
      f"{w}/best_hf (best checkpoint: step {want}, val_ce "
      f"{rows[want]['val_ce']:.4f})"
  )

  # Extending: more steps and a different (derived) eval cadence resume.
  c = tiny_run.config(
      "fkl_gpt2", root, steps=6, **{"eval.every_steps": 3, "export_hf": True}
  )
  training.train_and_evaluate(c, w)
  out = capsys.readouterr().out
  assert f"resumed {w} from step 4" in out
  assert [
      json.loads(l)["step"] for l in open(os.path.join(w, "metrics.jsonl"))
  ] == [1, 2, 3, 4, 5, 6]
  assert "validation step 6/6" in out

  from kdjax import evaluation

  evaluation.run(c, w, datasets="synthetic_instruct", limit=2, progress=False)
  out = capsys.readouterr().out
  assert f"scoring {w}/best_hf (best checkpoint: step " in out
