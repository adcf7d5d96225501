r"""Feature transfer: FKL on the logits plus hidden states through a learned projection.

Paper setup, GPT-2 XL SFT teacher -> GPT-2 124M on Dolly: each of the
student's 12 blocks learns the teacher block ``round(l · 48 / 12)`` (the
uniform map) through its own projection 768 -> 1600, by cosine distance,
beside ``0.5 CE + 0.5 FKL`` (docs/beyond_logits.md):

  python -m kdjax.train --config=configs/features_gpt2.py --workdir=workdirs/features_gpt2 \
      --config.teacher.path=workdirs/gpt2_xl_sft/hf

Laptop-CPU scale on the embedded benchmark (needs the tiny teacher, see sft_gpt2.py):

  python -m kdjax.train --config=configs/features_gpt2.py:tiny --workdir=workdirs/tiny/features

Other maps and distances: ``--config.loss.features.kind=mse``,
``--config.loss.features.layer_map=last --config.loss.features.last_k=2``, or
``--config.loss.features.layer_map=pairs --config.loss.features.pairs=1:2,2:4``.
"""

from __future__ import annotations

import ml_collections

from kdjax.config import recipe


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = recipe.get_config("fkl", arg)
  c.loss.features.update(weight=1.0, kind="cosine", layer_map="uniform")
  return c
