r"""DistiLLM: skew KL with adaptive student-generated outputs (Ko et al., ICML 2024).

Divergence: skew KL ``KL(p || a p + (1 - a) q)``, a = 0.1. The probability of
training on the student's own samples follows DistiLLM's schedule: a
threshold ``tau`` starts at ``onpolicy.init_threshold`` and rises by 0.1
(capped at 1) after every validation whose loss is at least
``onpolicy.loss_eps`` above the loss of the last rise. Per step, with ``r ~
U[0, 1)``: fresh student samples (also pushed into the replay buffer) when
``r < tau * (1 - step / steps)`` (``replay_ratio="decreasing"``) or when ``r <
tau`` and the buffer is not full; a batch drawn from the buffer when ``r <
tau``; otherwise the dataset batch. The buffer keeps the last
``onpolicy.buffer_size`` generated sequences. Math: docs/on_policy.md.

Defaults (DistiLLM's GPT-2 scripts): ``init_threshold=0.0``,
``loss_eps=0.1``, ``buffer_size=1000`` sequences, ``replay_ratio=
"decreasing"``, sampling ``temperature=1.0``, ``top_k=0``, ``top_p=1.0``,
``max_new_tokens=256`` (= max_length - max_prompt_length), validation every
epoch; kd_ratio 0.5 as every kdjax KD recipe. ``:tiny``: ``buffer_size=160``
(ten batches), up to 32 new tokens.

  python -m kdjax.train --config=configs/distillm_gpt2.py --workdir=workdirs/distillm_gpt2 \
      --config.teacher.path=workdirs/gpt2_xl_sft/hf
  python -m kdjax.train --config=configs/distillm_gpt2.py:tiny --workdir=workdirs/tiny/distillm
"""

from kdjax.config import recipe


def get_config(arg=None):
  c = recipe.get_config("skl", arg, alpha=0.1)
  tiny = recipe.parse_scale(arg).tiny
  recipe.add_onpolicy(
      c,
      source="distillm",
      init_threshold=0.0,
      loss_eps=0.1,
      buffer_size=160 if tiny else 1000,
      replay_ratio="decreasing",
      temperature=1.0,
      max_new_tokens=32 if tiny else 0,
  )
  return c
