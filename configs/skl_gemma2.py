r"""Skew KL (DistiLLM), Gemma-2-9B-it -> Gemma-2-2B-it on Dolly, in Gemma's chat template.

The common recipe (docs/training.md "The paper recipe") with a pair that shares
Gemma 2's 256,000-token vocabulary; instruction data is rendered by its chat
template (docs/data.md "Chat templates"). Both models soft-cap attention and
final logits, which every forward applies, the fused loss path included. The
bf16 teacher and the student are sharded with FSDP over 8 devices and the
student is fully rematerialised.

  huggingface-cli download google/gemma-2-9b-it --local-dir workdirs/gemma2_9b
  python -m kdjax.train --config=configs/skl_gemma2.py --workdir=workdirs/skl_gemma2
  python -m kdjax.train --config=configs/skl_gemma2.py:tiny --workdir=workdirs/tiny/skl_gemma2

``:tiny`` runs the same recipe with random ``tiny-gemma2`` models on a CPU.
"""

from __future__ import annotations

import ml_collections

from kdjax.config import recipe


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """``arg``: None (the pair) or ``tiny[,steps=N]``."""
  c = recipe.get_config("skl", arg, alpha=0.1)
  if recipe.parse_scale(arg).tiny:
    recipe.tiny_family(c, "gemma2")
    return c
  recipe.hf_pair(
      c,
      teacher="google/gemma-2-9b-it",
      teacher_dir="workdirs/gemma2_9b",
      student="google/gemma-2-2b-it",
  )
  return c
