"""The resume identity: what may change between restarts and what may not."""

import json

from kdjax.config import files as config_files
from kdjax.config import identity

akl_gpt2 = config_files.experiment("akl_gpt2")


def _resolved(arg, **overrides):
  c = akl_gpt2.get_config(arg)
  from kdjax.config import recipe

  recipe.override(c, overrides)
  return json.loads(c.to_json_best_effort())


def test_extending_a_run_keeps_its_identity():
  # steps=60 also changes the derived eval.every_steps (10 -> 5 per 6 evals).
  old, new = _resolved("tiny,steps=30"), _resolved("tiny,steps=60")
  assert (
      identity.flatten(old)["eval.every_steps"]
      != identity.flatten(new)["eval.every_steps"]
  )
  assert identity.changed(old, new) == []


def test_operational_fields_are_free():
  old = _resolved("tiny")
  new = _resolved(
      "tiny",
      **{
          "ckpt.every_steps": 7,
          "mesh.fsdp": 2,
          "grad_accum": 2,
          "log_every": 3,
          "eval.num_examples": 0,
          "student.remat": "full",
          "data.data_dir": "/elsewhere",
      },
  )
  assert identity.changed(old, new) == []


def test_what_defines_the_run_is_refused():
  old = _resolved("tiny")
  new = _resolved(
      "tiny",
      **{
          "loss.hp.mu": 0.6,
          "optim.lr": 1e-3,
          "seed": 1,
          "data.max_length": 90,
          "student.model_overrides.n_embd": 32,
      },
  )
  assert identity.changed(old, new) == [
      "data.max_length",
      "loss.hp.mu",
      "optim.lr",
      "seed",
      "student.model_overrides.n_embd",
  ]


def test_undeclared_keys_take_their_nearest_declared_ancestor():
  old = _resolved("tiny")
  new = json.loads(json.dumps(old))
  new["loss"]["taid"] = {"t_start": 0.4}  # a key the schema does not declare
  new["optim"]["nesterov"] = True
  new["eval"]["temperature"] = 0.7
  new["newer_top_level"] = 1
  assert identity.changed(old, new) == ["loss.taid.t_start", "optim.nesterov"]


def test_a_workdir_without_teacher_source_was_a_live_teacher():
  old, new = _resolved("tiny"), _resolved("tiny")
  del old["teacher"]["source"]
  assert identity.changed(old, new) == []
  new["teacher"]["source"] = "cache"
  assert identity.changed(old, new) == ["teacher.source"]


def test_a_workdir_without_lora_trained_every_weight():
  old, new = _resolved("tiny"), _resolved("tiny")
  del old["student"]["lora"]
  assert identity.changed(old, new) == []
  lora = _resolved(
      "tiny",
      **{"student.lora.rank": 8, "student.lora.export_adapter": False},
  )
  assert identity.changed(new, lora) == ["student.lora.rank"]


def test_a_workdir_without_other_teachers_had_one_teacher():
  old, new = _resolved("tiny"), _resolved("tiny")
  for key in ("others", "weights", "combine"):
    del old["teacher"][key]
  assert identity.changed(old, new) == []
  more = _resolved(
      "tiny",
      **{
          "teacher.others": "preset:tiny-gpt2",
          "teacher.weights": "2,1",
          "teacher.combine": "confidence",
      },
  )
  assert identity.changed(old, more) == [
      "teacher.combine",
      "teacher.others",
      "teacher.weights",
  ]
