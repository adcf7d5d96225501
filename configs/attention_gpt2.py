r"""Attention transfer: FKL on the logits plus MiniLMv2's self-attention relations.

Paper setup, GPT-2 XL SFT teacher -> GPT-2 124M on Dolly: the student's last
block learns the q-q, k-k and v-v relations of the teacher's last block on 8
relation heads (GPT-2 has 12 heads and GPT-2 XL 25, so MiniLM's one-to-one
attention maps cannot pair them), beside ``0.5 CE + 0.5 FKL``
(docs/beyond_logits.md):

  python -m kdjax.train --config=configs/attention_gpt2.py --workdir=workdirs/attention_gpt2 \
      --config.teacher.path=workdirs/gpt2_xl_sft/hf

Laptop-CPU scale on the embedded benchmark (needs the tiny teacher, see sft_gpt2.py):

  python -m kdjax.train --config=configs/attention_gpt2.py:tiny --workdir=workdirs/tiny/attention

The tiny student and teacher both have 4 heads, so MiniLM's attention maps and
value relations apply too: ``--config.loss.attention.kind=minilm``.
"""

from __future__ import annotations

import ml_collections

from kdjax.config import recipe


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = recipe.get_config("fkl", arg)
  c.loss.attention.update(
      weight=1.0, kind="minilmv2", relation_heads=8, layer_map="last"
  )
  return c
