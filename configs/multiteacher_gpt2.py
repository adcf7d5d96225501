r"""Several teachers at once: FKL toward their per-token confidence-weighted mixture.

Paper-size setup, two SFT teachers over GPT-2's vocabulary -> GPT-2 124M on
Dolly: at each response token the teachers are weighted by their probability
of the label token (``teacher.combine=confidence``), and ``0.5 CE + 0.5 FKL``
distils toward the mixture of their distributions (docs/beyond_logits.md,
"Several teachers"). The second teacher is GPT-2 Large fine-tuned like the
first (``configs/sft_gpt2.py:teacher --config.student.init=gpt2-large``):

  python -m kdjax.train --config=configs/multiteacher_gpt2.py --workdir=workdirs/multiteacher_gpt2 \
      --config.teacher.path=workdirs/gpt2_xl_sft/hf \
      --config.teacher.others=workdirs/gpt2_large_sft/hf

Laptop-CPU scale on the embedded benchmark (needs the tiny teacher, see
sft_gpt2.py): the shipped tiny teacher beside a random one of the same
vocabulary; on the response tokens of a first batch the confidence rule gives
the trained teacher 0.99 of the weight on average:

  python -m kdjax.train --config=configs/multiteacher_gpt2.py:tiny --workdir=workdirs/tiny/multiteacher

Fixed weights instead: ``--config.teacher.combine=fixed
--config.teacher.weights=3,1`` (``teacher.path`` first).
"""

from __future__ import annotations

import ml_collections

from kdjax.config import recipe

PAPER_OTHERS = "workdirs/gpt2_large_sft/hf"
# A random teacher over the byte tokenizer's vocabulary (the preset's own
# shape otherwise); the override is a no-op for the shipped tiny teacher.
TINY_OTHERS = "preset:tiny-gpt2"


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = recipe.get_config("fkl", arg)
  tiny = recipe.parse_scale(arg).tiny
  c.teacher.update(
      others=TINY_OTHERS if tiny else PAPER_OTHERS, combine="confidence"
  )
  if tiny:
    c.teacher.model_overrides = ml_collections.ConfigDict(
        dict(vocab_size=257), type_safe=False
    )
  return c
