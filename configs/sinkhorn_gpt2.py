r"""SINKHORN: Sinkhorn/Wasserstein distance between token distributions (SinKD).

Paper setup, GPT-2 XL SFT teacher -> GPT-2 124M on Dolly (docs/training.md
"The paper recipe"):

  python -m kdjax.train --config=configs/sinkhorn_gpt2.py --workdir=workdirs/sinkhorn_gpt2 \
      --config.teacher.path=workdirs/gpt2_xl_sft/hf

Laptop-CPU scale on the embedded benchmark (needs the tiny teacher, see sft_gpt2.py):

  python -m kdjax.train --config=configs/sinkhorn_gpt2.py:tiny --workdir=workdirs/tiny/sinkhorn
"""

from __future__ import annotations

import ml_collections

from kdjax.config import recipe


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return recipe.get_config(
      "sinkhorn", arg, temperature=2.0, epsilon=0.1, solver="sinkd"
  )
