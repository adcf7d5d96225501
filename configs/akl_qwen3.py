r"""AKL, Qwen3-8B -> Qwen3-0.6B on Dolly, in Qwen3's chat template.

The common recipe (docs/training.md "The paper recipe") with a 2026 pair:
both models share Qwen3's 151,936-token vocabulary, instruction data is
rendered by the tokenizer's chat template (docs/data.md "Chat templates"),
the bf16 teacher and the student are sharded with FSDP over 8 devices and the
student is fully rematerialised. Sizing per mesh: docs/scaling.md.

  huggingface-cli download Qwen/Qwen3-8B --local-dir workdirs/qwen3_8b
  python -m kdjax.train --config=configs/akl_qwen3.py --workdir=workdirs/akl_qwen3
  python -m kdjax.train --config=configs/akl_qwen3.py:tiny --workdir=workdirs/tiny/akl_qwen3

``:tiny`` runs the same recipe with random ``tiny-qwen3`` models on a CPU.
"""

from __future__ import annotations

import ml_collections

from kdjax.config import recipe


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """``arg``: None (the 2026 pair) or ``tiny[,steps=N]``."""
  c = recipe.get_config("akl", arg, mu=0.5)
  if recipe.parse_scale(arg).tiny:
    recipe.tiny_family(c, "qwen3")
    return c
  recipe.hf_pair(
      c,
      teacher="Qwen/Qwen3-8B",
      teacher_dir="workdirs/qwen3_8b",
      student="Qwen/Qwen3-0.6B",
  )
  return c
