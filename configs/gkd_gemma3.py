r"""GKD, Gemma-3-12B-it -> Gemma-3-1B-it on Dolly, in Gemma's chat template.

On-policy KD with generalized JSD (beta 0.5, ``lmbda=0.5``; settings and math:
docs/on_policy.md) for a 2026 pair that shares Gemma 3's 262,144-token
vocabulary. Instruction data and the student's prompts are rendered by the
tokenizer's chat template (docs/data.md "Chat templates"); the bf16 teacher
and the student are sharded with FSDP over 8 devices, the student fully
rematerialised. Sizing per mesh: docs/scaling.md.

  huggingface-cli download google/gemma-3-12b-it --local-dir workdirs/gemma3_12b
  python -m kdjax.train --config=configs/gkd_gemma3.py --workdir=workdirs/gkd_gemma3
  python -m kdjax.train --config=configs/gkd_gemma3.py:tiny --workdir=workdirs/tiny/gkd_gemma3

``:tiny`` runs the same recipe with random ``tiny-gemma3`` models on a CPU.
"""

from __future__ import annotations

import ml_collections

from kdjax.config import recipe


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """``arg``: None (the 2026 pair) or ``tiny[,steps=N]``."""
  c = recipe.get_config("jsd", arg, beta=0.5)
  tiny = recipe.parse_scale(arg).tiny
  if tiny:
    recipe.tiny_family(c, "gemma3")
  else:
    recipe.hf_pair(
        c,
        teacher="google/gemma-3-12b-it",
        teacher_dir="workdirs/gemma3_12b",
        student="google/gemma-3-1b-it",
    )
    # Gemma-3-12B's 64 image tokens past the 262,144 text tokens are never
    # in the 1B student's data: the teacher keeps the text rows
    # (docs/models.md "Checkpoints").
    c.teacher.model_overrides = {"vocab_size": 262144}
  recipe.add_onpolicy(
      c,
      source="gkd",
      lmbda=0.5,
      temperature=1.0,
      max_new_tokens=32 if tiny else 0,
  )
  return c
