r"""RKL: reverse KL(q||p) (MiniLLM's token-level baseline).

Paper setup, GPT-2 XL SFT teacher -> GPT-2 124M on Dolly (docs/training.md
"The paper recipe"):

  python -m kdjax.train --config=configs/rkl_gpt2.py --workdir=workdirs/rkl_gpt2 \
      --config.teacher.path=workdirs/gpt2_xl_sft/hf

Laptop-CPU scale on the embedded benchmark (needs the tiny teacher, see sft_gpt2.py):

  python -m kdjax.train --config=configs/rkl_gpt2.py:tiny --workdir=workdirs/tiny/rkl
"""

from __future__ import annotations

import ml_collections

from kdjax.config import recipe


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return recipe.get_config("rkl", arg)
