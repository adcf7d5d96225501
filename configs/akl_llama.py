r"""AKL, LLaMA 6.7B SFT teacher -> TinyLLaMA 1.1B on Dolly (the seed paper's 2nd setup).

The common recipe with MiniLLM's LLaMA changes (docs/training.md "The paper
recipe"): 10 epochs,
gradient checkpointing, the bf16 teacher and the student sharded with FSDP.
TinyLLaMA (1.1B) sits in MiniLLM's small-model grid, so lr stays 5e-4.

  python -m kdjax.train --config=configs/akl_llama.py --workdir=workdirs/akl_llama \
      --config.teacher.path=workdirs/llama_7b_sft/hf --config.mesh.fsdp=8
  python -m kdjax.train --config=configs/akl_llama.py:tiny --workdir=workdirs/tiny/akl_llama
"""

from __future__ import annotations

import ml_collections

from kdjax.config import recipe


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """``arg``: None (paper setup) or ``tiny[,steps=N]``."""
  c = recipe.get_config("akl", arg, mu=0.5)
  if recipe.parse_scale(arg).tiny:
    return c  # the tiny scale is model-family agnostic
  c.data.tokenizer = "TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T"
  c.teacher.update(
      path="workdirs/llama_7b_sft/hf", hub_id="huggyllama/llama-7b"
  )
  c.student.update(
      init="TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T", remat="full"
  )
  c.num_epochs = 10
  c.mesh.fsdp = 8
  return c
