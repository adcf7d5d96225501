r"""GKD: on-policy KD with generalized JSD (Agarwal et al., ICLR 2024).

Per step, with probability ``onpolicy.lmbda`` the batch's responses are
replaced by the student's own samples to its prompts (temperature
``onpolicy.temperature``, at most ``onpolicy.max_new_tokens``; 0 means
``max_length - max_prompt_length``); otherwise the dataset batch is used
unchanged. The loss covers the generated tokens through EOS. Divergence:
generalized JSD, beta 0.5. ``onpolicy.seq_kd=True`` first swaps the dataset
responses for the teacher's samples every step (TRL's ``seq_kd``). Math and
settings: docs/on_policy.md.

Defaults (paper setup, the GKD baseline of DistiLLM on Dolly with GPT-2):
``lmbda=0.5``, ``temperature=1.0``, ``top_k=0``, ``top_p=1.0``,
``max_new_tokens=256``, kd_ratio 0.5 as every kdjax KD recipe. ``:tiny``
samples up to 32 new tokens.

  python -m kdjax.train --config=configs/gkd_gpt2.py --workdir=workdirs/gkd_gpt2 \
      --config.teacher.path=workdirs/gpt2_xl_sft/hf
  python -m kdjax.train --config=configs/gkd_gpt2.py:tiny --workdir=workdirs/tiny/gkd

Fully on-policy (the GKD paper's best setting on most tasks):
``--config.onpolicy.lmbda=1.0``.
"""

from kdjax.config import recipe


def get_config(arg=None):
  c = recipe.get_config("jsd", arg, beta=0.5)
  tiny = recipe.parse_scale(arg).tiny
  recipe.add_onpolicy(
      c,
      source="gkd",
      lmbda=0.5,
      temperature=1.0,
      max_new_tokens=32 if tiny else 0,
  )
  return c
