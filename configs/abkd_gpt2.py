r"""ABKD: the α-β divergence (Wang et al., ICML 2025, arXiv 2505.04560).

D_AB(p‖q) = −1/(αβ) Σ_v [p^α q^β − α/(α+β)·p^(α+β) − β/(α+β)·q^(α+β)]
(docs/divergences.md, "Alpha-beta divergence (ABKD)"). α = 1, β = 0 is FKL
and α = 0, β = 1 is RKL; the paper's GPT-2 setting (its scripts' defaults)
is α = 0.2, β = 0.7, trained on the KD term alone (kd_ratio 1).

Paper setup, GPT-2 XL SFT teacher -> GPT-2 124M on Dolly:

  python -m kdjax.train --config=configs/abkd_gpt2.py --workdir=workdirs/abkd_gpt2 \
      --config.teacher.path=workdirs/gpt2_xl_sft/hf

Laptop-CPU scale on the embedded benchmark (needs the tiny teacher, see sft_gpt2.py):

  python -m kdjax.train --config=configs/abkd_gpt2.py:tiny --workdir=workdirs/tiny/abkd

Other (α, β): --config.loss.hp.alpha=0.5 --config.loss.hp.beta=0.5.
"""

from kdjax.config import recipe


def get_config(arg=None):
  return recipe.get_config("abkd", arg, kd_ratio=1.0, alpha=0.2, beta=0.7)
