r"""SKL: skew KL, KL(p || a p + (1-a) q) (DistiLLM).

Paper setup, GPT-2 XL SFT teacher -> GPT-2 124M on Dolly (docs/training.md
"The paper recipe"):

  python -m kdjax.train --config=configs/skl_gpt2.py --workdir=workdirs/skl_gpt2 \
      --config.teacher.path=workdirs/gpt2_xl_sft/hf

Laptop-CPU scale on the embedded benchmark (needs the tiny teacher, see sft_gpt2.py):

  python -m kdjax.train --config=configs/skl_gpt2.py:tiny --workdir=workdirs/tiny/skl
"""

from __future__ import annotations

import ml_collections

from kdjax.config import recipe


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return recipe.get_config("skl", arg, alpha=0.1)
