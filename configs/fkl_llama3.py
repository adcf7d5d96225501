r"""FKL, Llama-3.1-8B-Instruct -> Llama-3.2-1B-Instruct on Dolly, in Llama 3's chat template.

The common recipe (docs/training.md "The paper recipe") with a 2026 pair that
shares Llama 3's 128,256-token vocabulary; instruction data is rendered by
the tokenizer's chat template (docs/data.md "Chat templates"), the bf16
teacher and the student are sharded with FSDP over 8 devices and the student
is fully rematerialised. Sizing per mesh: docs/scaling.md.

  huggingface-cli download meta-llama/Llama-3.1-8B-Instruct --local-dir workdirs/llama3_8b
  python -m kdjax.train --config=configs/fkl_llama3.py --workdir=workdirs/fkl_llama3
  python -m kdjax.train --config=configs/fkl_llama3.py:tiny --workdir=workdirs/tiny/fkl_llama3

``:tiny`` runs the same recipe with random ``tiny-llama`` models on a CPU.
"""

from __future__ import annotations

import ml_collections

from kdjax.config import recipe


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """``arg``: None (the 2026 pair) or ``tiny[,steps=N]``."""
  c = recipe.get_config("fkl", arg)
  if recipe.parse_scale(arg).tiny:
    recipe.tiny_family(c, "llama")
    return c
  recipe.hf_pair(
      c,
      teacher="meta-llama/Llama-3.1-8B-Instruct",
      teacher_dir="workdirs/llama3_8b",
      student="meta-llama/Llama-3.2-1B-Instruct",
  )
  return c
