"""The shared recipe: every experiment config is this plus a divergence.

The default arg is the paper's setup (docs/training.md "The paper recipe"),
which is the schema's defaults (:func:`kdjax.config.spec.defaults`, listed in
docs/config.md): teacher = GPT-2 XL fine-tuned on Dolly, student = pretrained GPT-2 124M, lr 5e-4, global batch 32,
20 epochs, cosine decay to 1e-7, AdamW with weight decay 0.01 on matrices only,
global-norm clipping at 1.0, max length 512 / prompt 256, loss
``(1 - kd_ratio) * CE + kd_ratio * KD`` with kd_ratio 0.5, teacher in bf16.

The arg ``tiny`` swaps in the embedded ``synthetic_instruct`` data, a byte-level
tokenizer and tiny GPT-2-shaped models so a run finishes on a laptop CPU in a
few minutes; ``tiny_teacher`` is the stage that trains that teacher. Extra
``key=value`` items in the arg set config fields (``tiny,steps=30``). The
values here and in ``configs/*.py`` are only values: every field is declared
in :mod:`kdjax.config.spec`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import ml_collections

from kdjax.config import schema, spec

# Where `make demo` and the tiny configs keep their runs. The tiny teacher is
# shipped in the repository (trained by sft_gpt2.py:tiny_teacher; retrained by
# `python -m experiments.demo --retrain-teacher`) and read from there by every
# tiny KD config; paths are relative to the repository root.
TINY_ROOT = "workdirs/tiny"
TINY_TEACHER = "experiments/assets/tiny_teacher"
TINY_DATA_DIR = f"{TINY_ROOT}/data"

# Paper-size teacher: an SFT'd GPT-2 XL. Produce it with configs/sft_gpt2.py:teacher
# or point teacher.path at any GPT-2-vocabulary HF directory.
PAPER_TEACHER = spec.TeacherSpec().path

# Tiny model shapes (fields of kdjax.models.GPT2Config): the teacher is ~6x the
# student's parameter count.
TINY_TEACHER_MODEL = dict(n_embd=96, n_layer=4, n_head=4)
TINY_STUDENT_MODEL = dict(n_embd=48, n_layer=2, n_head=4)
# Every model trains on all 24,000 training examples (train_limit 0), as in
# the paper, where teacher and students are fine-tuned on the same Dolly set.
TINY_STUDENT_EXAMPLES = 0
TINY_TEACHER_STEPS = 1500


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """``"tiny,steps=30"`` -> ConfigDict(tiny=True, steps=30) over ``defaults``.

  A bare word sets a bool flag; ``key=value`` is cast to the default's type.
  Unknown keys fail, so a typo in the arg is caught like a typo in a flag.
  """
  out = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, eq, value = item.partition("=")
    if key not in defaults:
      raise ValueError(
          f"config arg {key!r} is unknown; valid: "
          f"{', '.join(sorted(defaults))}."
      )
    kind = type(defaults[key])
    if not eq:
      out[key] = True
    elif kind is bool:
      out[key] = value.lower() in ("1", "true", "yes")
    else:
      out[key] = kind(value)
  return out


# The arg every KD config takes: the tiny scale and its number of steps.
SCALE_ARGS = dict(tiny=False, steps=300)


def parse_scale(arg: str | None) -> ml_collections.ConfigDict:
  """``"tiny,steps=30"`` -> ``ConfigDict(tiny=True, steps=30)`` (:data:`SCALE_ARGS`)."""
  return parse_arg(arg, **SCALE_ARGS)


def _tiny(c: ml_collections.ConfigDict, steps: int) -> None:
  """Embedded data, byte tokenizer, tiny models: the laptop-CPU scale."""
  c.data.update(
      name="synthetic_instruct",
      data_dir=TINY_DATA_DIR,
      tokenizer="byte",
      template="compact",
      max_length=96,
      max_prompt_length=80,
      train_limit=TINY_STUDENT_EXAMPLES,
  )
  c.teacher.update(path=TINY_TEACHER, hub_id="", dtype="float32")
  c.student.init = "preset:tiny-gpt2"
  c.student.model_overrides = ml_collections.ConfigDict(
      dict(
          vocab_size=257,
          embd_pdrop=0.0,
          attn_pdrop=0.0,
          resid_pdrop=0.0,
          **TINY_STUDENT_MODEL,
      ),
      type_safe=False,
  )
  c.loss.chunk_size = 512
  c.optim.update(lr=3e-3, lr_min=1e-5, warmup_steps=20)
  c.batch_size = 16
  c.num_steps = steps
  c.log_every = 10
  c.ckpt.update(every_steps=100, max_to_keep=2)
  c.eval.update(
      # Six validations over the run; a run shorter than six steps
      # validates once, at its end.
      every_steps=steps // 6 or steps,
      val_batches=8,
      num_examples=64,
      batch_size=64,
      max_new_tokens=32,
      greedy=True,
      datasets="synthetic_instruct",
      seeds="10",
  )


# The tiny scale of a model family: a random teacher 1.5x the student's width
# and twice its MLP, over the byte tokenizer's vocabulary (same depth, so a
# family's layer pattern fits both).
TINY_FAMILY_STUDENT = dict(vocab_size=257)
TINY_FAMILY_TEACHER = dict(
    vocab_size=257, hidden_size=96, intermediate_size=256
)


def tiny_family(c: ml_collections.ConfigDict, family: str) -> None:
  """The ``tiny`` scale with ``preset:tiny-<family>`` models, both random.

  The run exercises the family's code (attention variants, soft-capping,
  sliding windows, export) end to end on a CPU; the teacher knows nothing,
  so its numbers say nothing about distillation.
  """
  preset = f"preset:tiny-{family}"
  with c.unlocked():
    c.student.init = preset
    c.student.model_overrides = ml_collections.ConfigDict(
        TINY_FAMILY_STUDENT, type_safe=False
    )
    c.teacher.update(path=preset, hub_id="")
    c.teacher.model_overrides = ml_collections.ConfigDict(
        TINY_FAMILY_TEACHER, type_safe=False
    )


def hf_pair(
    c: ml_collections.ConfigDict,
    *,
    teacher: str,
    teacher_dir: str,
    student: str,
) -> None:
  """A Hugging Face pair sharing one tokenizer, data in its chat template.

  ``teacher`` is the hub id downloaded to ``teacher_dir`` (a post-trained
  model is distilled as it is); the student starts from the hub id
  ``student`` and its tokenizer formats the data. bf16 teacher, FSDP over 8
  devices and a fully rematerialised student, as the LLaMA paper setup.
  A post-trained student fine-tunes at 5e-5 (transformers' Trainer default,
  which TRL's distillation trainers inherit), not the 5e-4 that MiniLLM's
  recipe gives pretrained GPT-2 bases.
  """
  c.data.update(tokenizer=student, template="chat")
  c.teacher.update(path=teacher_dir, hub_id=teacher)
  c.student.update(init=student, remat="full")
  c.optim.lr = 5e-5
  c.num_epochs = 10
  c.mesh.fsdp = 8


def override(c: ml_collections.ConfigDict, items: Mapping[str, Any]) -> None:
  """Sets dotted keys, ``override(c, {"loss.impl": "fused"})``.

  A string value for a non-string field is read as that field's type, as
  ``--config.key=value`` would be (booleans from ``true``/``1``).
  """
  flat = {}
  for key, value in items.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    old = node[leaf]
    if isinstance(value, str) and old is not None and not isinstance(old, str):
      value = (
          value.lower() in ("1", "true")
          if isinstance(old, bool)
          else type(old)(value)
      )
    flat[key] = value
  c.update_from_flattened_dict(flat)


def get_config(
    loss: str = "akl",
    arg: str | None = None,
    *,
    kd_ratio: float = 0.5,
    **hp: Any,
) -> ml_collections.ConfigDict:
  """The recipe with divergence ``loss`` and its hyper-parameters ``hp``.

  ``arg``: None (paper setup) or ``tiny[,steps=N]`` (:func:`parse_scale`). A
  ``temperature`` in ``hp`` becomes ``loss.temperature`` (default 1; SinKD's
  config sets 2).
  """
  a = parse_scale(arg)
  c = spec.defaults()
  c.loss.name = loss
  c.loss.kd_ratio = kd_ratio
  c.loss.temperature = float(hp.pop("temperature", 1.0))
  c.loss.hp.update(hp)
  if a.tiny:
    _tiny(c, a.steps)
  if kd_ratio == 0:  # SFT: no teacher is loaded at all
    c.teacher.update(path="", hub_id="")
  c.lock()  # a typo in a later override is an error, not a new field
  return c


def add_onpolicy(c: ml_collections.ConfigDict, **fields: Any) -> None:
  """Adds the ``c.onpolicy`` block: its defaults updated by ``fields``."""
  block = schema.defaults(spec.OnPolicySpec)
  unknown = sorted(set(fields) - set(block))
  if unknown:
    raise ValueError(
        f"onpolicy fields {unknown} are unknown; valid: "
        f"{', '.join(sorted(block))}."
    )
  block.update(fields)
  with c.unlocked():
    c.onpolicy = block
  c.lock()  # the new block too: a typo in an override is an error
