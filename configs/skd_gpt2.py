r"""SKD: speculative KD, student proposals vetted by the teacher (Xu et al., ICLR 2025).

With probability ``onpolicy.lmbda`` (1: every step) the batch's responses
are decoded by student and teacher together: the student samples each next
token (temperature ``onpolicy.temperature``); when it is not among the
teacher's ``onpolicy.skd_top_k`` most likely tokens it is replaced by a
draw from the teacher restricted to that top-K (``skd_resample="top_k"``) or
from the teacher's whole distribution (``"full"``). The loss covers the
decoded tokens through EOS. Divergence: forward KL. Math:
docs/on_policy.md.

Defaults: ``skd_top_k=25``, ``lmbda=1.0``, ``temperature=1.0``,
``top_k=0``, ``top_p=1.0``, ``max_new_tokens=256`` (= max_length -
max_prompt_length); kd_ratio 0.5 as every kdjax KD recipe. ``:tiny``: up to
32 new tokens.

  python -m kdjax.train --config=configs/skd_gpt2.py --workdir=workdirs/skd_gpt2 \
      --config.teacher.path=workdirs/gpt2_xl_sft/hf
  python -m kdjax.train --config=configs/skd_gpt2.py:tiny --workdir=workdirs/tiny/skd
"""

from kdjax.config import recipe


def get_config(arg=None):
  c = recipe.get_config("fkl", arg)
  tiny = recipe.parse_scale(arg).tiny
  recipe.add_onpolicy(
      c,
      source="skd",
      lmbda=1.0,
      skd_top_k=25,
      skd_resample="top_k",
      temperature=1.0,
      max_new_tokens=32 if tiny else 0,
  )
  return c
