"""A run's teacher: its checkpoint found, then loaded frozen on the mesh.

Training (:mod:`kdjax.training.builder`) and the teacher cache
(:mod:`kdjax.cache.build`) run the same teacher, loaded here.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from flax import nnx
import jax

from kdjax import models

if TYPE_CHECKING:
  from kdjax.config.spec import TeacherSpec


def path(teacher: TeacherSpec) -> str:
  """The teacher directory, or one sentence on how to get it."""
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
  return models.load(
      path(teacher), dtype=models.dtype_of(teacher.dtype), mesh=mesh
  )
