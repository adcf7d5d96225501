"""A run's teacher: its checkpoint found, then loaded frozen on the mesh.

Training (:mod:`kdjax.training.builder`) and the teacher cache
(:mod:`kdjax.cache.build`) run the same teacher, loaded here. A
``preset:NAME`` path builds the preset with random weights from a fixed seed:
a teacher of the right family and shape for smoke runs and sizing, which
knows nothing.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from flax import nnx
import jax

from kdjax import models, sharding

PRESET = "preset:"
SEED = 1  # of a preset teacher's random weights (students start from seed 0)

if TYPE_CHECKING:
  from kdjax.config.spec import TeacherSpec


def path(teacher: TeacherSpec) -> str:
  """The teacher directory (or ``preset:NAME``), or one sentence on how to
  get it."""
  if teacher.path.startswith(PRESET):
    return teacher.path
  directory = os.path.expanduser(teacher.path)
  if os.path.isdir(directory):
    return directory
  raise FileNotFoundError(missing(teacher.path, teacher.hub_id))


def missing(path: str, hub_id: str) -> str:
  """The sentence for a teacher checkpoint absent at ``path``: where the
  base model ``hub_id`` comes from and how to fine-tune it, or, without one,
  how to train the tiny teacher there."""
  if hub_id:
    fix = (
        f"download or fine-tune it (base model: `"
        f"{models.download_hint(hub_id)}`, then SFT it with "
        "configs/sft_gpt2.py:teacher) and pass "
        "--config.teacher.path=DIR"
    )
  else:
    fix = (
        "train it first: python -m kdjax.train "
        "--config=configs/sft_gpt2.py:tiny_teacher --workdir="
        f"{os.path.dirname(path.rstrip('/'))}"
    )
  return f"teacher checkpoint {path} not found; {fix}."


def load(teacher: TeacherSpec, mesh: jax.sharding.Mesh) -> nnx.Module:
  """The frozen teacher in eval mode (dropout off), placed on ``mesh``."""
  dtype = models.dtype_of(teacher.dtype)
  overrides = dict(teacher.model_overrides)
  where = path(teacher)
  if not where.startswith(PRESET):
    return models.load(where, dtype=dtype, mesh=mesh, **overrides)
  model = models.create(
      where.removeprefix(PRESET),
      dtype=dtype,
      param_dtype=dtype,
      rngs=nnx.Rngs(SEED),
      **overrides,
  )
  model.eval()
  return sharding.shard_model(model, mesh)
