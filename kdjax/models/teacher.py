"""A run's teacher: its checkpoint found, then loaded frozen on the mesh.

Training (:mod:`kdjax.training.builder`) and the teacher cache
(:mod:`kdjax.cache.build`) run the same teacher, loaded here. A
``preset:NAME`` path builds the preset with random weights from a fixed seed:
a teacher of the right family and shape for smoke runs and sizing, which
knows nothing. With ``teacher.others`` set, :func:`load` returns
:class:`Teachers`: every teacher, each loaded like the first (same dtype and
model overrides), with the prior weights and the rule that mixes them
(:mod:`kdjax.divergences.mixture`).
"""

from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING, Sequence

from flax import nnx
import jax

from kdjax import models, sharding

PRESET = "preset:"
SEED = 1  # of a preset teacher's random weights (students start from seed 0)

if TYPE_CHECKING:
  from kdjax.config.spec import TeacherSpec


class Teachers(nnx.Module):
  """Several frozen teachers over one vocabulary, mixed per token.

  Attributes:
    members: the teachers, ``teacher.path`` first.
    prior: their prior weights ``π_k`` (not normalised).
    combine: the rule of :data:`kdjax.divergences.mixture.COMBINE` that
      sets the per-token weights.
  """

  def __init__(
      self, members: Sequence[nnx.Module], prior: Sequence[float], combine: str
  ):
    self.members = nnx.List(members)
    self.prior = tuple(float(w) for w in prior)
    self.combine = combine


def path(teacher: TeacherSpec) -> str:
  """The teacher directory (or ``preset:NAME``), or one sentence on how to
  get it."""
  if teacher.path.startswith(PRESET):
    return teacher.path
  directory = os.path.expanduser(teacher.path)
  if os.path.isdir(directory):
    return directory
  raise FileNotFoundError(missing(teacher.path, teacher.hub_id))


def check_paths(teacher: TeacherSpec) -> None:
  """Every teacher's checkpoint is there, or one sentence on the first that
  is not."""
  path(teacher)
  for other in teacher.paths[1:]:
    if not (
        other.startswith(PRESET) or os.path.isdir(os.path.expanduser(other))
    ):
      raise FileNotFoundError(
          f"teacher.others names {other}, which is not a directory; pass "
          "Hugging Face model directories or preset:NAME."
      )


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
  """The frozen teacher in eval mode (dropout off), placed on ``mesh``; a
  :class:`Teachers` of them all when ``teacher.others`` is set."""
  if len(teacher.paths) == 1:
    return _load_one(teacher, mesh)
  members = [
      _load_one(dataclasses.replace(teacher, path=p, others=""), mesh)
      for p in teacher.paths
  ]
  return Teachers(members, teacher.prior, teacher.combine)


def _load_one(teacher: TeacherSpec, mesh: jax.sharding.Mesh) -> nnx.Module:
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
