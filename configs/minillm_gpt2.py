r"""MiniLLM: sequence-level reverse KL by policy gradient (Gu et al., ICLR 2024).

The student and the teacher decode responses to the batch's prompts
together, each token drawn from the teacher-mixed policy ``α·p + (1 − α)·q_θ``;
the student is trained on those responses with MiniLLM's objective: the
per-token reverse KL exact over the vocabulary (single-step term) plus a
clipped, importance-weighted policy gradient of the length-normalised return
of rewards ``log p − log q``, plus ``lm_coef`` times the ``(1 − kd_ratio)·CE
+ kd_ratio·FKL`` loss on the dataset batch itself (the stand-in for the
reference's pre-training corpus). Math: docs/on_policy.md,
``kdjax.onpolicy.minillm``.

Reference GPT-2 settings (microsoft/LMOps ``minillm/scripts/gpt2``):
``minillm_alpha=0.2``, ``gamma=0.95``, ``cliprange=0.2``,
``reward_scaling=0.5``, ``reward_clip=100``, ``lm_coef=1``, 4 updates per
rollout (``minillm_ppo_epochs``), single-step term on, sampling at
temperature 1 without top-k/top-p, 256 new tokens, kd_ratio 0.5 on the
pre-training term, lr 5e-6 constant after 100 warm-up steps, AdamW
``b2=0.95``, weight decay 1e-6, 5000 updates of 64 sequences. The reference
starts this phase from a student already fine-tuned on the data; set
``--config.student.init`` to such a checkpoint (the default is pretrained
GPT-2). ``:tiny``: the tiny recipe's optimizer and scale, up to 32 new
tokens.

  python -m kdjax.train --config=configs/minillm_gpt2.py --workdir=workdirs/minillm_gpt2 \
      --config.teacher.path=workdirs/gpt2_xl_sft/hf
  python -m kdjax.train --config=configs/minillm_gpt2.py:tiny --workdir=workdirs/tiny/minillm
"""

from kdjax.config import recipe


def get_config(arg=None):
  c = recipe.get_config("fkl", arg)
  tiny = recipe.parse_scale(arg).tiny
  if not tiny:
    c.optim.update(
        lr=5e-6, lr_min=5e-6, warmup_steps=100, b2=0.95, weight_decay=1e-6
    )
    c.batch_size = 64
    c.num_steps = 5000
  recipe.add_onpolicy(
      c,
      source="minillm",
      temperature=1.0,
      top_k=0,
      top_p=1.0,
      max_new_tokens=32 if tiny else 0,
      minillm_alpha=0.2,
      minillm_gamma=0.95,
      minillm_cliprange=0.2,
      minillm_reward_scaling=0.5,
      minillm_reward_clip=100.0,
      minillm_lm_coef=1.0,
      minillm_single_step=True,
      minillm_ppo_epochs=4,
  )
  return c
