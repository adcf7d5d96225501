r"""ULD (or GOLD's hybrid) across tokenizers: a Qwen2.5 teacher, a GPT-2 student.

The teacher reads the student's text cut by its own tokenizer
(``teacher.tokenizer``); each student row is distilled from the teacher row
that predicts the same bytes after the same prefix (docs/cross_tokenizer.md).
The loss is the recipe's ``0.5·CE + 0.5·ULD`` (the ULD paper weighs
``CE + 1.5·ULD``: ``--config.loss.kd_ratio=0.6`` is that mix scaled by 0.4);
the arg ``gold`` switches to GOLD's hybrid (``beta`` 0.5).

  huggingface-cli download Qwen/Qwen2.5-1.5B-Instruct --local-dir workdirs/qwen25_1.5b
  python -m kdjax.train --config=configs/uld_xtok_gpt2.py --workdir=workdirs/uld_xtok_gpt2

Laptop-CPU scale: the shipped byte-level tiny teacher and a student over a
512-token BPE trained on the synthetic training text
(``experiments/assets/tiny_bpe``, made by ``python -m experiments.tiny_bpe``):

  python -m kdjax.train --config=configs/uld_xtok_gpt2.py:tiny --workdir=workdirs/tiny/uld_xtok
  python -m kdjax.train --config=configs/uld_xtok_gpt2.py:tiny,gold --workdir=workdirs/tiny/gold_xtok
"""

from __future__ import annotations

import ml_collections

from kdjax.config import recipe

TINY_TOKENIZER = "experiments/assets/tiny_bpe"
TINY_VOCAB = 512


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """``arg``: None (the pair) or ``tiny[,steps=N]``, either with ``gold``."""
  a = recipe.parse_arg(arg, **recipe.SCALE_ARGS, gold=False)
  scale = f"tiny,steps={a.steps}" if a.tiny else None
  if a.gold:
    c = recipe.get_config("gold", scale, beta=0.5)
  else:
    c = recipe.get_config("uld", scale)
  if a.tiny:
    c.teacher.tokenizer = "byte"
    c.teacher.max_length = 96  # bytes: the tiny runs' byte-level length
    c.data.update(tokenizer=TINY_TOKENIZER, max_length=40, max_prompt_length=32)
    c.student.model_overrides.vocab_size = TINY_VOCAB
    return c
  c.teacher.update(
      path="workdirs/qwen25_1.5b",
      hub_id="Qwen/Qwen2.5-1.5B-Instruct",
      tokenizer="workdirs/qwen25_1.5b",
      max_length=512,
  )
  return c
