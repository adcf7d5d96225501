r"""SeqKD: SFT of the student on the teacher's responses (Kim & Rush 2016).

The trainer first samples one response per training prompt from the teacher
(evaluation protocol: temperature 1, no_repeat_ngram 6), caches them in
``workdir/seqkd/train.jsonl``, then trains with plain CE (kd_ratio 0).

  python -m kdjax.train --config=configs/seqkd_gpt2.py --workdir=workdirs/seqkd_gpt2 \
      --config.data.seqkd_teacher=workdirs/gpt2_xl_sft/hf
  python -m kdjax.train --config=configs/seqkd_gpt2.py:tiny --workdir=workdirs/tiny/seqkd
"""

from __future__ import annotations

import ml_collections

from kdjax.config import recipe


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """``arg``: None (paper setup) or ``tiny[,steps=N]``."""
  tiny = recipe.parse_scale(arg).tiny
  c = recipe.get_config("fkl", arg, kd_ratio=0.0)
  c.data.seqkd_teacher = recipe.TINY_TEACHER if tiny else recipe.PAPER_TEACHER
  return c
