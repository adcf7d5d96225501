r"""SFT: plain next-token cross-entropy (kd_ratio 0; no teacher is loaded).

Three uses, chosen by the arg:

* default -- the student SFT baseline, GPT-2 124M on Dolly:

    python -m kdjax.train --config=configs/sft_gpt2.py --workdir=workdirs/sft_gpt2

* ``teacher`` -- the teacher stage, GPT-2 XL on Dolly (lr 5e-5, 10 epochs); its
  ``hf/`` export is what the KD configs read as ``teacher.path``:

    python -m kdjax.train --config=configs/sft_gpt2.py:teacher --workdir=workdirs/gpt2_xl_sft

* ``tiny`` / ``tiny_teacher`` -- the same two at laptop-CPU scale on the
  embedded benchmark (``make demo`` runs the teacher stage first):

    python -m kdjax.train --config=configs/sft_gpt2.py:tiny_teacher --workdir=workdirs/tiny/teacher
    python -m kdjax.train --config=configs/sft_gpt2.py:tiny --workdir=workdirs/tiny/sft
"""

from __future__ import annotations

import ml_collections

from kdjax.config import recipe


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """``arg``: None, ``teacher``, ``tiny`` or ``tiny_teacher`` (+ ``,steps=N``)."""
  # steps=0: not given (each stage has its own default).
  a = recipe.parse_arg(
      arg, tiny=False, teacher=False, tiny_teacher=False, steps=0
  )
  tiny = a.tiny or a.tiny_teacher
  scale = f"tiny,steps={a.steps}" if a.steps else "tiny"
  c = recipe.get_config("fkl", scale if tiny else None, kd_ratio=0.0)
  if a.teacher:
    c.student.init = "gpt2-xl"
    c.student.remat = "full"
    c.optim.lr = 5e-5
    c.num_epochs = 10
  if a.tiny_teacher:
    # Same 24k examples as the students, 5x their optimizer steps at twice
    # the batch: the teacher is the model the students cannot reach alone.
    c.student.model_overrides = ml_collections.ConfigDict(
        dict(c.student.model_overrides, **recipe.TINY_TEACHER_MODEL),
        type_safe=False,
    )
    c.data.train_limit = 0
    c.batch_size = 32
    c.num_steps = a.steps or recipe.TINY_TEACHER_STEPS
    c.optim.lr = 2e-3
    c.ckpt.every_steps = 250
  return c
