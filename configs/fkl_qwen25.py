r"""FKL, Qwen2.5-7B-Instruct -> Qwen2.5-0.5B-Instruct on Dolly, in Qwen2.5's chat template.

The common recipe (docs/training.md "The paper recipe") with a pair that shares
Qwen2.5's tokenizer; instruction data is rendered by its chat template
(docs/data.md "Chat templates"), the bf16 teacher and the student are sharded
with FSDP over 8 devices and the student is fully rematerialised. The 7B
checkpoint pads its embedding to 152,064 rows, the 0.5B to 151,936; both
cover the tokenizer's 151,665 tokens, so the teacher keeps the student's rows
(docs/models.md "Checkpoints").

  huggingface-cli download Qwen/Qwen2.5-7B-Instruct --local-dir workdirs/qwen25_7b
  python -m kdjax.train --config=configs/fkl_qwen25.py --workdir=workdirs/fkl_qwen25
  python -m kdjax.train --config=configs/fkl_qwen25.py:tiny --workdir=workdirs/tiny/fkl_qwen25

``:tiny`` runs the same recipe with random ``tiny-qwen2`` models on a CPU.
"""

from __future__ import annotations

import ml_collections

from kdjax.config import recipe


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """``arg``: None (the pair) or ``tiny[,steps=N]``."""
  c = recipe.get_config("fkl", arg)
  if recipe.parse_scale(arg).tiny:
    recipe.tiny_family(c, "qwen2")
    return c
  recipe.hf_pair(
      c,
      teacher="Qwen/Qwen2.5-7B-Instruct",
      teacher_dir="workdirs/qwen25_7b",
      student="Qwen/Qwen2.5-0.5B-Instruct",
  )
  c.teacher.model_overrides = {"vocab_size": 151936}
  return c
