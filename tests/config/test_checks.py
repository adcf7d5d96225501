"""kdjax.config.checks: every bad config is one sentence naming the value and fix.

Each case breaks one field of a tiny config and asserts the key words of the
sentence; ``validate`` reads only config.json files, so the module runs in
seconds and nothing is written anywhere.
"""

import json
import os

import pytest

from kdjax.config import checks
import tiny_run


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("validation"))
  tiny_run.make_teacher(os.path.join(root, "teacher"))
  return root


def _config(root, name="akl_gpt2", **overrides):
  return tiny_run.config(name, root, steps=4, **overrides)


def _refused(config, *words, error=checks.ConfigError):
  with pytest.raises(error) as e:
    checks.validate(config)
  msg = str(e.value)
  assert "\n" not in msg and msg.endswith("."), msg
  for w in words:
    assert w in msg, (w, msg)
  return msg


def _hf_dir(path, **cfg):
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(
        {"model_type": "gpt2", "vocab_size": 257, "n_positions": 512, **cfg}, f
    )
  return str(path)


def test_the_tiny_configs_pass(root):
  for name in (
      "akl_gpt2",
      "fkl_gpt2",
      "jsd_gpt2",
      "sinkhorn_gpt2",
      "sft_gpt2",
      "skl_gpt2",
  ):
    assert checks.validate(_config(root, name)) == []


@pytest.mark.parametrize(
    "key,value,words",
    [
        (
            "optim.lr",
            -1e-3,
            ("optim.lr=-0.001 must be > 0", "--config.optim.lr="),
        ),
        ("optim.lr", 0.0, ("optim.lr=0.0 must be > 0",)),
        (
            "loss.kd_ratio",
            1.5,
            (
                "loss.kd_ratio=1.5 must be in [0, 1]",
                "--config.loss.kd_ratio=0.5",
            ),
        ),
        ("batch_size", 0, ("batch_size=0 must be a positive integer",)),
        ("grad_accum", 3, ("grad_accum=3 does not divide batch_size=8",)),
        ("num_steps", -5, ("num_steps=-5 must be an integer >= 0",)),
        (
            "optim.clip",
            0.0,
            ("optim.clip=0.0 must be > 0", "pass --config.optim.clip=1.0"),
        ),
        ("optim.b2", 1.0, ("optim.b2=1.0 must be in [0, 1)",)),
        ("optim.lr_min", 1.0, ("optim.lr_min=1.0 is above optim.lr",)),
        (
            "data.max_prompt_length",
            96,
            (
                "data.max_length=96 leaves no room for a "
                "response after data.max_prompt_length=96",
            ),
        ),
        (
            "ckpt.max_to_keep",
            0,
            ("ckpt.max_to_keep=0 must be an integer >= 1",),
        ),
        (
            "eval.every_steps",
            -2,
            ("eval.every_steps=-2 must be -1 (every epoch)",),
        ),
        (
            "eval.seeds",
            "ten",
            ("eval.seeds='ten' is not a comma-separated list",),
        ),
        ("log_every", 0, ("log_every=0 must be an integer >= 1",)),
    ],
)
def test_numbers_out_of_range(root, key, value, words):
  _refused(_config(root, **{key: value}), *words)


@pytest.mark.parametrize(
    "name,hp,value,words",
    [
        (
            "akl_gpt2",
            "mu",
            1.5,
            (
                "loss.hp.mu=1.5 is outside [0, 1] for akl",
                "--config.loss.hp.mu=0.5",
            ),
        ),
        (
            "jsd_gpt2",
            "beta",
            -0.1,
            ("loss.hp.beta=-0.1 is outside [0, 1] for jsd",),
        ),
        (
            "skl_gpt2",
            "alpha",
            2.0,
            ("loss.hp.alpha=2.0 is outside [0, 1] for skl",),
        ),
        (
            "srkl_gpt2",
            "alpha",
            -1.0,
            ("loss.hp.alpha=-1.0 is outside [0, 1] for " "srkl",),
        ),
        (
            "fkl_rkl_gpt2",
            "weight",
            1.5,
            ("loss.hp.weight=1.5 is outside [0, 1] for fkl_rkl",),
        ),
        (
            "sinkhorn_gpt2",
            "epsilon",
            -0.1,
            ("loss.hp.epsilon=-0.1 must be > 0 for sinkhorn",),
        ),
        (
            "sinkhorn_gpt2",
            "solver",
            "exact",
            (
                "loss.hp.solver='exact' is unknown for sinkhorn",
                "('ott', 'debiased', 'sinkd')",
            ),
        ),
    ],
)
def test_divergence_hyper_parameters_out_of_range(root, name, hp, value, words):
  _refused(_config(root, name, **{f"loss.hp.{hp}": value}), *words)


def test_warmup_longer_than_the_run_is_only_a_note(root):
  c = _config(root, **{"optim.warmup_steps": 4})
  assert checks.validate(c) == [
      "optim.warmup_steps=4 is not below num_steps=4: the learning rate stays "
      "below optim.lr."
  ]


def test_akl_rule_must_be_known(root):
  c = _config(root)
  with c.unlocked(), c.loss.hp.unlocked():
    c.loss.hp.rule = "top"
  _refused(c, "loss.hp.rule='top' is unknown for akl", "('akl', 'dskd')")


def test_loss_temperature_must_be_positive(root):
  c = _config(root)
  with c.unlocked(), c.loss.unlocked():
    c.loss.temperature = 0.0
  _refused(c, "loss.temperature=0.0 must be > 0")


def test_switching_the_divergence_drops_what_it_does_not_take(root):
  c = _config(root, **{"loss.name": "fkl", "loss.impl": "reference"})
  notes = checks.validate(c)
  assert notes == [
      "loss.hp.mu=0.5 dropped: fkl takes no 'mu' (its "
      "hyper-parameters: none)."
  ]
  assert dict(c.loss.hp) == {}
  c = _config(root, **{"loss.name": "jsd"})  # akl's mu is not jsd's beta
  checks.validate(c)
  assert dict(c.loss.hp) == {}


def test_unknown_names(root):
  _refused(
      _config(root, **{"loss.name": "kll"}),
      "loss.name='kll' is unknown: name must be one of",
      "'akl'",
  )
  _refused(
      _config(root, **{"student.dtype": "fp32"}),
      "student.dtype='fp32' is unknown",
      "'bfloat16'",
  )
  _refused(
      _config(root, **{"student.init": "preset:gpt3"}),
      "student.init='preset:gpt3' is unknown",
      "'preset:tiny-gpt2'",
  )
  _refused(
      _config(root, **{"data.name": "dolly2"}),
      "data.name='dolly2' is not a dataset",
      "'synthetic_instruct'",
  )


def test_unknown_model_override_is_named(root):
  c = _config(root)
  with c.unlocked(), c.student.model_overrides.unlocked():
    c.student.model_overrides["n_embdd"] = 32
  _refused(
      c,
      "student.model_overrides.n_embdd=32 is not a field of " "GPT2Config",
      "'n_embd'",
  )


def test_max_length_above_the_students_positions(root):
  c = _config(root, **{"data.max_length": 1024, "data.max_prompt_length": 80})
  _refused(
      c,
      "data.max_length=1024 exceeds the 512 positions of the student "
      "(preset:tiny-gpt2)",
      "--config.data.max_length=512",
      "student.model_overrides.n_positions",
  )


def test_max_length_above_an_hf_students_positions(root, tmp_path):
  student = _hf_dir(tmp_path / "student", n_positions=64)
  c = _config(root, **{"student.init": student})
  c.student.model_overrides = {}
  msg = _refused(
      c,
      "data.max_length=96 exceeds the 64 positions of the "
      f"student ({student})",
      "max_length=64 or less",
  )
  assert "n_positions" not in msg  # pretrained weights fix the positions


def test_lora_targets_must_select_a_linear_layer(root, tmp_path):
  lora = {"student.lora.rank": 8}
  assert checks.validate(_config(root, **lora)) == []
  _refused(
      _config(root, **lora, **{"student.lora.targets": "q_proj,v_proj"}),
      "student.lora.targets='q_proj,v_proj' select none of the linear layers "
      "of the student (preset:tiny-gpt2)",
      "choose among c_attn,c_fc,c_proj",
  )
  _refused(
      _config(root, **lora, **{"student.lora.targets": "h/(0"}),
      "student.lora.targets='h/(0' is neither module names nor a regular "
      "expression",
  )
  # An HF student is checked from its config.json (a LLaMA here).
  student = str(tmp_path / "llama")
  os.makedirs(student)
  with open(os.path.join(student, "config.json"), "w") as f:
    json.dump({"model_type": "llama", "vocab_size": 257, **_LLAMA}, f)
  c = _config(root, **lora, **{"student.init": student})
  c.student.model_overrides = {}
  assert checks.validate(c) == []
  c.student.lora.targets = r"layers/\d+/mlp/c_fc"
  _refused(c, "choose among down_proj,gate_proj,k_proj,o_proj,q_proj,")


_LLAMA = dict(
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=512,
)


def test_max_length_above_the_teachers_positions(root, tmp_path):
  teacher = _hf_dir(tmp_path / "teacher", n_positions=80)
  c = _config(root, **{"teacher.path": teacher})
  _refused(c, "data.max_length=96 exceeds the 80 positions of the teacher")


def test_generation_beyond_the_positions(root):
  c = _config(root, **{"eval.max_new_tokens": 500, "eval.num_examples": 4})
  _refused(
      c,
      "eval.max_new_tokens=500 plus data.max_prompt_length=80 "
      "exceeds the 512 positions",
      "lower eval.max_new_tokens",
  )


@pytest.mark.parametrize("loss", ["akl", "uld"])
def test_teacher_vocabulary_mismatch_recommends_no_broken_path(
    root, tmp_path, loss
):
  teacher = _hf_dir(tmp_path / "teacher", vocab_size=300)
  c = _config(
      root,
      **{"teacher.path": teacher, "loss.name": loss, "loss.impl": "reference"},
  )
  msg = _refused(
      c,
      "teacher vocabulary 300 != student vocabulary 257",
      "share a tokenizer",
      "--config.teacher.tokenizer=DIR and a cross-tokenizer loss (uld, gold)",
  )
  assert "--config.loss.name=uld" not in msg


def test_the_cross_tokenizer_config_passes(root):
  for loss in ("uld", "gold"):
    c = _config(root, "uld_xtok_gpt2", **{"loss.name": loss})
    assert checks.validate(c) == []


@pytest.mark.parametrize(
    "overrides,words",
    [
        (
            {"loss.name": "fkl"},
            "loss.name='fkl' compares the same vocabulary entries of both "
            "models, but teacher.tokenizer='byte' gives the teacher its own "
            "tokens; use a cross-tokenizer loss (uld, gold)",
        ),
        (
            {"teacher.max_length": 600},
            "teacher.max_length=600 exceeds the 512 positions of the teacher",
        ),
        (
            {"loss.select.fraction": 0.5},
            "teacher.tokenizer='byte' cannot run here: loss.select",
        ),
        (
            {"teacher.tokenizer": "", "loss.name": "gold"},
            "loss.name='gold' pairs the vocabularies of two tokenizers but "
            "teacher.tokenizer is empty",
        ),
        (
            {"loss.impl": "fused"},
            "teacher.tokenizer='byte' cannot run here: loss.impl='fused'",
        ),
    ],
)
def test_cross_tokenizer_refusals(root, overrides, words):
  _refused(_config(root, "uld_xtok_gpt2", **overrides), words)


def test_the_multiteacher_config_passes(root):
  assert checks.validate(_config(root, "multiteacher_gpt2")) == []


@pytest.mark.parametrize(
    "overrides,words",
    [
        (
            {"teacher.weights": "1,2,3"},
            "teacher.weights='1,2,3' gives 3 weights for 2 teachers "
            "(teacher.path, then teacher.others); give one weight per teacher",
        ),
        (
            {"teacher.weights": "1,-2"},
            "teacher.weights='1,-2' is not a comma-separated list of "
            "positive numbers",
        ),
        ({"teacher.combine": "vote"}, "teacher.combine='vote' is unknown"),
        (
            {"loss.impl": "fused"},
            "teacher.others='preset:tiny-gpt2' cannot run here: "
            "loss.impl='fused' never forms the teachers' logits",
        ),
        (
            {"loss.features.weight": 1.0},
            "cannot run here: loss.features and loss.attention compare the "
            "student with one teacher's layers",
        ),
        (
            {"teacher.tokenizer": "byte", "loss.name": "uld"},
            "cannot run here: every teacher must read the student's token ids",
        ),
        (
            {"teacher.source": "cache", "teacher.cache_dir": "/nowhere"},
            "cannot run here: a teacher cache holds one teacher",
        ),
    ],
)
def test_multiteacher_refusals(root, overrides, words):
  _refused(_config(root, "multiteacher_gpt2", **overrides), words)


def test_multiteacher_refusals_on_policy_and_other_teachers(root, tmp_path):
  _refused(
      _config(root, "gkd_gpt2", **{"teacher.others": "preset:tiny-gpt2"}),
      "teacher.others='preset:tiny-gpt2' cannot run here: "
      "onpolicy.source='gkd' samples from or scores with one teacher",
  )
  wide = _hf_dir(tmp_path / "wide", vocab_size=300)
  _refused(
      _config(root, "fkl_gpt2", **{"teacher.others": wide}),
      f"teacher.others names {wide}, with a vocabulary of 300, but the "
      "teacher",
      "has 257; every teacher reads the student's token ids",
  )
  _refused(
      _config(root, "fkl_gpt2", **{"teacher.others": "/nowhere"}),
      "teacher.others names /nowhere, which holds no config.json",
      error=checks.MissingInputError,
  )


def test_tokenizer_larger_than_the_students_vocabulary(root):
  c = _config(root, **{"student.model_overrides.vocab_size": 200})
  _refused(
      c,
      "data.tokenizer='byte' has 257 tokens but the student "
      "(preset:tiny-gpt2) has a vocabulary of 200",
  )


def test_chat_template_needs_a_tokenizer_that_has_one(root, tmp_path):
  _refused(
      _config(root, **{"data.template": "chat"}),
      "data.tokenizer='byte' has no chat template for data.template=chat",
      "instruct model's tokenizer directory",
  )
  (tmp_path / "tokenizer_config.json").write_text('{"eos_token": "</s>"}')
  c = _config(
      root, **{"data.template": "chat", "data.tokenizer": str(tmp_path)}
  )
  _refused(c, "no chat_template.jinja, no chat_template in tokenizer_config")
  (tmp_path / "chat_template.jinja").write_text("{{ messages }}")
  assert checks.validate(c) == []


def test_missing_teacher_names_hf_download(root, tmp_path):
  c = _config(root, **{"teacher.path": str(tmp_path / "nowhere")})
  c.teacher.hub_id = "gpt2-xl"
  msg = _refused(
      c,
      "teacher checkpoint",
      "not found",
      "`hf download gpt2-xl",
      "--config.teacher.path=DIR",
      error=checks.MissingInputError,
  )
  assert "huggingface-cli" not in msg


def test_missing_tiny_teacher_says_how_to_train_it(root, tmp_path):
  c = _config(root, **{"teacher.path": str(tmp_path / "t" / "hf")})
  c.teacher.hub_id = ""
  _refused(
      c,
      "sft_gpt2.py:tiny_teacher",
      f"--workdir={tmp_path / 't'}",
      error=checks.MissingInputError,
  )


def test_missing_and_empty_jsonl(root, tmp_path):
  _refused(
      _config(root, **{"data.name": str(tmp_path / "no.jsonl")}),
      "no such file",
      error=checks.MissingInputError,
  )
  empty = tmp_path / "empty.jsonl"
  empty.write_text("\n \n")
  _refused(
      _config(root, **{"data.name": str(empty)}),
      "is empty",
      'one {"instruction", "input", "output"} object per line',
  )


def test_validate_writes_nothing(root, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  checks.validate(_config(root))
  assert os.listdir(tmp_path) == []
