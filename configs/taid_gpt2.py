r"""TAID: distil toward a target moving from the student to the teacher (Shing et al., ICLR 2025).

The KD term is ``KL(p_t ‖ q_θ)`` with ``p_t ∝ exp((1 − t)·log q̄ + t·log p)``,
``q̄`` the detached student, and ``t`` rising from ``loss.taid.t_start`` to
``t_end`` by the adaptive rule of :mod:`kdjax.taid` (the reference code's
constants: t_start 0.4, t_end 1.0, alpha 5e-4, beta 0.99). ``t`` is part of the
train state, so a resumed run continues it, and is logged as ``taid_t``. The
mix with CE is the recipe's ``kd_ratio`` 0.5; the reference code distils with
KD alone, ``--config.loss.kd_ratio=1``.

Paper setup, GPT-2 XL SFT teacher -> GPT-2 124M on Dolly:

  python -m kdjax.train --config=configs/taid_gpt2.py --workdir=workdirs/taid_gpt2 \
      --config.teacher.path=workdirs/gpt2_xl_sft/hf

Laptop-CPU scale on the embedded benchmark (needs the tiny teacher, see sft_gpt2.py):

  python -m kdjax.train --config=configs/taid_gpt2.py:tiny --workdir=workdirs/tiny/taid

The linear ramp alone (no adaptive step): ``--config.loss.taid.adaptive=False``.
"""

from kdjax import taid
from kdjax.config import recipe


def get_config(arg=None):
  c = recipe.get_config("taid", arg)
  with c.unlocked():
    c.loss.taid = dict(taid.DEFAULTS)
  return c
