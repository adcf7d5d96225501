r"""AKL: AKL, adaptive FKL/RKL weighting by head/tail gaps (Wu et al. 2024, the seed paper).

Paper setup, GPT-2 XL SFT teacher -> GPT-2 124M on Dolly (docs/training.md
"The paper recipe"):

  python -m kdjax.train --config=configs/akl_gpt2.py --workdir=workdirs/akl_gpt2 \
      --config.teacher.path=workdirs/gpt2_xl_sft/hf

Laptop-CPU scale on the embedded benchmark (needs the tiny teacher, see sft_gpt2.py):

  python -m kdjax.train --config=configs/akl_gpt2.py:tiny --workdir=workdirs/tiny/akl

Entropy-based token selection (SE-KD) works with any config: distil only the
20 % of each sequence's positions where the student's entropy is highest (CE
still covers every token; the ``select_fraction`` metric logs the share kept):

  python -m kdjax.train --config=configs/akl_gpt2.py:tiny --workdir=workdirs/tiny/akl_sel20 \
      --config.loss.select.fraction=0.2
"""

from __future__ import annotations

import ml_collections

from kdjax.config import recipe


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return recipe.get_config("akl", arg, mu=0.5)
