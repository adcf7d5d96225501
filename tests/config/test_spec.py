"""Configs resolved into typed parts; their arg grammar; data without models."""

import dataclasses
import json
import os

import pytest

from commands import ROOT, run_python
from kdjax.config import files as config_files
from kdjax.config import recipe, spec
from kdjax.data import tokenizer

seqkd_gpt2 = config_files.experiment("seqkd_gpt2")
sft_gpt2 = config_files.experiment("sft_gpt2")

CONFIGS = [
    n[:-3] for n in config_files.available(os.path.join(ROOT, "configs"))
]


def _module(name):
  return config_files.experiment(name)


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("arg", [None, "tiny"])
def test_every_config_resolves_to_its_own_values(name, arg):
  c = _module(name).get_config(arg)
  s = spec.from_config(c)
  for part, node in (
      (s.optim, c.optim),
      (s.ckpt, c.ckpt),
      (s.mesh, c.mesh),
      (s.teacher, c.teacher),
  ):
    assert dataclasses.asdict(part) == node.to_dict()
  d = c.data
  assert s.data.data_dir == os.path.expanduser(d.data_dir)
  assert s.data.manual_dir == (os.path.expanduser(d.manual_dir) or None)
  for k in (
      "name",
      "tokenizer",
      "template",
      "max_length",
      "max_prompt_length",
      "prompt_policy",
      "train_limit",
      "seqkd_teacher",
  ):
    assert getattr(s.data, k) == d[k], k
  assert s.loss == c.loss.to_dict() and isinstance(s.loss["hp"], dict)
  assert s.student.model_overrides == dict(
      c.student.model_overrides.to_dict(), remat=c.student.remat
  )
  assert s.eval.protocol.seeds == tuple(int(x) for x in c.eval.seeds.split(","))
  assert s.eval.protocol.max_new_tokens == c.eval.max_new_tokens
  assert s.eval.protocol.max_prompt_length == d.max_prompt_length
  assert s.eval.datasets == tuple(c.eval.datasets.split(","))
  assert s.identity == json.loads(c.to_json_best_effort())
  assert (s.num_steps, s.num_epochs, s.batch_size) == (
      c.num_steps,
      c.num_epochs,
      c.batch_size,
  )


def test_a_spec_is_a_frozen_snapshot():
  c = _module("akl_gpt2").get_config("tiny")
  s = spec.from_config(c)
  c.optim.lr = 1.0
  assert s.optim.lr == 3e-3
  with pytest.raises(dataclasses.FrozenInstanceError):
    s.optim.lr = 1.0  # type: ignore[misc]


def test_bad_seeds_name_the_field():
  c = _module("akl_gpt2").get_config()
  c.eval.seeds = "10,x"
  with pytest.raises(
      ValueError,
      match=r"eval\.seeds='10,x' is not a " "comma-separated list of integers",
  ):
    spec.from_config(c)


def test_config_args_are_parsed_not_sniffed():
  assert recipe.parse_scale("tiny,steps=30").to_dict() == dict(
      tiny=True, steps=30
  )
  teacher = sft_gpt2.get_config("tiny_teacher")
  assert teacher.num_steps == recipe.TINY_TEACHER_STEPS == 1500
  assert sft_gpt2.get_config("tiny_teacher,steps=30").num_steps == 30
  assert sft_gpt2.get_config("tiny").num_steps == 300
  assert seqkd_gpt2.get_config("tiny").data.seqkd_teacher == recipe.TINY_TEACHER
  assert seqkd_gpt2.get_config().data.seqkd_teacher == recipe.PAPER_TEACHER
  # A word that merely contains "tiny" is a typo, not the tiny scale.
  for module in (seqkd_gpt2, _module("akl_llama")):
    with pytest.raises(ValueError, match="config arg 'tinyy' is unknown"):
      module.get_config("tinyy")


def test_data_modules_do_not_import_models_or_training(tmp_path):
  tokenizer.byte_level().save(str(tmp_path / "tokenizer.json"))
  code = (
      "import sys\n"
      "import kdjax.data.inputs, kdjax.data.seqkd\n"
      "from kdjax.data import tokenizer\n"
      f"tok, eos = tokenizer.load({str(tmp_path)!r})\n"
      "assert eos == tokenizer.EOS_ID, eos\n"
      "print(sorted(m for m in sys.modules if m.startswith(("
      "'kdjax.models', 'kdjax.training', 'kdjax.evaluation'))))\n"
  )
  assert run_python(code).strip() == "[]"


def test_tokenizer_from_vocab_merges_matches_the_trained_bpe(tmp_path):
  from tokenizers import ByteLevelBPETokenizer

  text = [
      "the quick brown fox jumps over the lazy dog " * 5,
      "distillation of language models, teacher and student<|endoftext|>",
  ]
  bpe = ByteLevelBPETokenizer()
  bpe.train_from_iterator(
      text, vocab_size=300, min_frequency=1, special_tokens=["<|endoftext|>"]
  )
  bpe.save_model(str(tmp_path))  # vocab.json + merges.txt
  bpe.save(str(tmp_path / "tok.json"))
  tok, eos_id = tokenizer.load(str(tmp_path))
  ref = tokenizer.from_pretrained(str(tmp_path / "tok.json"))
  assert eos_id == bpe.token_to_id("<|endoftext|>")
  for s in ["the lazy student", "Unseen Words! 123", " fox  jumps"]:
    assert tok.encode(s).ids == ref.encode(s).ids == bpe.encode(s).ids
    assert tok.decode(tok.encode(s).ids) == s
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="no tokenizer.json or vocab"):
    tokenizer.from_pretrained(str(tmp_path / "empty"))
