"""A run's train step on abstract arguments: what :mod:`fit` compiles.

Nothing is loaded or allocated: the student and teacher are ``kdjax.models``
presets built with ``nnx.eval_shape``, and every argument of the step is a
``ShapeDtypeStruct`` tree carrying the sharding that
:func:`kdjax.training.build` gives the live arrays. A LoRA student
(``student.lora.rank > 0``) carries its adapters, and the optimizer state
covers them alone, as in training.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from flax import nnx, traverse_util
import jax
import jax.numpy as jnp

from kdjax import models, sharding
from kdjax.config import spec as spec_lib
from kdjax.models import lora
from kdjax.training import builder, optimizer
from kdjax.training.step import (
    TEXT_KEYS,
    Health,
    Step,
    TrainState,
    init_taid,
)

P = jax.sharding.PartitionSpec


def abstract_state(
    model: nnx.Module, mesh: jax.sharding.Mesh, *filters: Any
) -> tuple[Any, ...]:
  """``nnx.split(model, *filters)`` with ``ShapeDtypeStruct`` leaves on ``mesh``."""
  shardings = sharding.state_shardings(model, mesh)
  graphdef, *states = nnx.split(model, *filters)
  for state in states:
    flat = traverse_util.flatten_dict(nnx.to_pure_dict(state))
    nnx.replace_by_pure_dict(
        state,
        traverse_util.unflatten_dict(
            {
                p: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=shardings[p])
                for p, v in flat.items()
            }
        ),
    )
  return graphdef, *states


def abstract_run(
    config: Any,
    mesh: jax.sharding.Mesh,
    *,
    student_preset: str,
    teacher_preset: str | None,
    teacher_overrides: Mapping[str, Any] | None = None,
    num_steps: int = 1000,
) -> tuple[Step, tuple]:
  """``(step, args)`` such that ``jax.jit(step.train).lower(*args)`` is the run's step.

  The student and teacher are the presets standing in for ``config``'s
  checkpoints, ``args = (state, batch, teacher_state, health)`` and the
  batch is ``config.batch_size`` x ``config.data.max_length``.
  ``teacher_overrides`` replace teacher config fields (the student's come
  from ``config``). ``config`` is an experiment ConfigDict or its
  :class:`~kdjax.config.spec.TrainSpec`. Call under ``jax.set_mesh(mesh)``.
  """
  s = (
      config
      if isinstance(config, spec_lib.TrainSpec)
      else spec_lib.from_config(config)
  )
  adapters = s.student.lora

  def make_student():
    model = models.create(
        student_preset,
        dtype=models.dtype_of(s.student.dtype),
        param_dtype=jnp.float32,
        rngs=nnx.Rngs(params=0, dropout=1),
        **s.student.model_overrides,
    )
    if adapters.rank:  # as builder.make_student
      lora.apply(
          model,
          rank=adapters.rank,
          alpha=adapters.alpha,
          targets=adapters.targets,
          dropout=adapters.dropout,
          rngs=nnx.Rngs(params=2, dropout=3),
      )
    return model

  student = nnx.eval_shape(make_student)
  graphdef, params, rest = abstract_state(student, mesh, nnx.Param, ...)
  trainable = builder.trainable(s.student)
  tx = optimizer.make_optimizer(s.optim, num_steps)
  opt_state = optimizer.abstract_opt_state(
      tx, nnx.filter_state(params, trainable), mesh
  )
  replicated = jax.sharding.NamedSharding(mesh, P())
  schedule = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
      init_taid(s.loss),
  )
  state = TrainState(
      jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated),
      params,
      rest,
      opt_state,
      schedule,
  )
  teacher_graphdef = teacher_state = None
  live = not s.teacher.cached  # a cached teacher is never loaded
  if teacher_preset is not None and s.loss["kd_ratio"] > 0 and live:
    dtype = models.dtype_of(s.teacher.dtype)
    teacher = nnx.eval_shape(
        lambda: models.create(
            teacher_preset,
            dtype=dtype,
            param_dtype=dtype,
            rngs=nnx.Rngs(0),
            **(teacher_overrides or {}),
        )
    )
    teacher.eval()  # as models.teacher.load: frozen, dropout off
    teacher_graphdef, teacher_state = abstract_state(teacher, mesh, ...)
  shape = (s.batch_size, s.data.max_length)
  batch = {
      k: jax.ShapeDtypeStruct(
          shape,
          jnp.float32 if k == "loss_mask" else jnp.int32,
          sharding=sharding.batch_sharding(mesh),
      )
      for k in TEXT_KEYS
  }
  if s.teacher.cached and s.loss["kd_ratio"] > 0:
    batch.update(_cache_fields(s, mesh, shape))
  step = Step(
      s.loss,
      graphdef,
      teacher_graphdef,
      tx,
      s.grad_accum,
      num_steps,
      trainable=trainable,
  )
  health = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
      Health.init(),
  )
  return step, (state, batch, teacher_state, health)


def _cache_fields(
    s: spec_lib.TrainSpec, mesh: jax.sharding.Mesh, shape: tuple[int, int]
) -> dict[str, jax.ShapeDtypeStruct]:
  """The batch fields of a cached teacher: ``[B, L, k]`` (docs/cached_teacher.md)."""
  from kdjax.cache import store  # pylint: disable=g-import-not-at-top

  settings = store.cache_settings(
      {"cache": dataclasses.asdict(s.teacher.cache)}
  )
  width = settings.get("k") or settings["num_samples"]
  dtypes = {
      "teacher_ids": jnp.int32,
      "teacher_log_probs": jnp.float32,
      "teacher_weights": jnp.float32,
  }
  return {
      k: jax.ShapeDtypeStruct(
          (*shape, width), dtypes[k], sharding=sharding.batch_sharding(mesh, 3)
      )
      for k in store.FIELDS[settings["encoding"]]
  }
