"""Everything a run builds before its first step: data, models, initial state.

:func:`build` checks what can be checked in seconds first (the loss, the
teacher's presence, the batch split) and only then reads data and weights.
With ``teacher.source="cache"`` the teacher is never loaded: the training
rows carry its cached sparse distributions (:mod:`kdjax.cache`), after the
cache is checked against the config and the tokenised examples. With
``teacher.tokenizer`` set the rows also carry the teacher's own tokens and
their alignment with the student's (:mod:`kdjax.data.crosstok`).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from kdjax import models, objective, sharding, transfer
from kdjax.cache import store as cache_store
from kdjax.config import spec as spec_lib
from kdjax.data import crosstok, inputs, pipeline, seqkd
from kdjax.data import tokenizer as tokenizer_lib
from kdjax.evaluation import generation
from kdjax.models import lora
from kdjax.models import teacher as teacher_lib
from kdjax.onpolicy import strategies
from kdjax.onpolicy import strategy as onpolicy_strategy
from kdjax.training import optimizer
from kdjax.training.step import Step, TrainState, TransferState, init_taid


@dataclasses.dataclass
class Run:
  """Everything a run builds before its first step (handy in notebooks)."""

  spec: spec_lib.TrainSpec
  workdir: str
  mesh: jax.sharding.Mesh
  tokenizer: tokenizer_lib.Tokenizer
  eos_id: int
  # The ids that end a generated response (evaluation, SeqKD, on-policy).
  stop_ids: tuple[int, ...]
  train_data: pipeline.TrainData
  val_source: Any
  student: nnx.Module
  teacher: nnx.Module | None
  step: Step
  state: TrainState
  num_steps: int
  # The on-policy strategy making each step's batch (kdjax.onpolicy); None:
  # the dataset's batches.
  source: onpolicy_strategy.Strategy | None = None
  # Extra fields of every row (a teacher cache's, a cross-tokenizer
  # teacher's), as pipeline.train_batches / eval_batches take them.
  row_fields: pipeline.RowFields | None = None


def make_student(
    student: spec_lib.StudentSpec, mesh: jax.sharding.Mesh
) -> nnx.Module:
  """A preset initialised from the seed, or a HF checkpoint to fine-tune.

  Either way in training mode (dropout on): ``models.load`` returns eval mode.
  With ``student.lora.rank > 0`` the adapters are added
  (:func:`kdjax.models.lora.apply`; ``A`` from seed + 2) and placed on the
  mesh, replicated.
  """
  dtype = models.dtype_of(student.dtype)
  overrides = dict(student.model_overrides)
  if student.init.startswith("preset:"):
    model = models.create(
        student.init.removeprefix("preset:"),
        dtype=dtype,
        param_dtype=jnp.float32,
        rngs=nnx.Rngs(params=student.seed, dropout=student.seed + 1),
        **overrides,
    )
    model = sharding.shard_model(model, mesh)
  else:
    model = models.load(
        student.init,
        dtype=dtype,
        param_dtype=jnp.float32,
        mesh=mesh,
        seed=student.seed + 1,
        revision=student.revision,
        **overrides,
    )
  adapters = student.lora
  if adapters.rank:
    lora.apply(
        model,
        rank=adapters.rank,
        alpha=adapters.alpha,
        targets=adapters.targets,
        dropout=adapters.dropout,
        rngs=nnx.Rngs(params=student.seed + 2, dropout=student.seed + 3),
    )
    model = sharding.shard_model(model, mesh)
  model.train()
  return model


def trainable(student: spec_lib.StudentSpec) -> Any:
  """The params a run trains (:attr:`kdjax.training.step.Step.trainable`):
  a LoRA student's adapters, else every ``nnx.Param``."""
  return lora.TRAINABLE if student.lora.rank else nnx.Param


def _vocab(model: nnx.Module) -> int:
  return model.head_weight().shape[0]


def _seqkd_train_source(
    s: spec_lib.TrainSpec,
    workdir: str,
    tok: tokenizer_lib.Tokenizer,
    eos_id: int,
    mesh: jax.sharding.Mesh,
) -> Any:
  """SeqKD: the training prompts with the teacher's responses (cached)."""

  def respond():
    teacher = models.load(
        os.path.expanduser(s.data.seqkd_teacher),
        dtype=models.dtype_of(s.teacher.dtype),
        mesh=mesh,
    )
    protocol = s.eval.protocol._replace(
        max_new_tokens=s.data.max_length - s.data.max_prompt_length
    )
    return generation.generate_responses(
        teacher,
        tok,
        eos_id,
        inputs.train_source(s.data),
        protocol=protocol,
        seed=s.seed,
        batch_size=s.eval.batch_size,
        mesh=mesh,
    )

  return seqkd.train_source(os.path.join(workdir, "seqkd"), respond)


def _check(s: spec_lib.TrainSpec, mesh: jax.sharding.Mesh) -> None:
  """What can be refused before any download or compilation."""
  objective.check(s.loss)
  if s.teacher.cross_tokenizer and s.loss["kd_ratio"] > 0:
    supported = (
        s.loss["name"] in objective.CROSS_TOKENIZER
        and not s.teacher.cached
        and s.onpolicy.source == "dataset"
    )
    if not supported:
      raise ValueError(
          f"teacher.tokenizer={s.teacher.tokenizer!r} needs a live teacher on "
          "the dataset's batches and a cross-tokenizer loss "
          f"({', '.join(objective.CROSS_TOKENIZER)}), not loss.name="
          f"{s.loss['name']!r}, teacher.source={s.teacher.source!r}, "
          f"onpolicy.source={s.onpolicy.source!r}; change them."
      )
  if s.loss["kd_ratio"] > 0 and not s.teacher.cached:
    teacher_lib.check_paths(s.teacher)
  n_batch = int(np.prod([mesh.shape[a] for a in sharding.BATCH]))
  if s.batch_size % (s.grad_accum * n_batch):
    raise ValueError(
        f"batch_size {s.batch_size} must be a multiple of grad_accum "
        f"({s.grad_accum}) x the {n_batch} data-parallel devices."
    )


def _models(
    s: spec_lib.TrainSpec, mesh: jax.sharding.Mesh
) -> tuple[nnx.Module, nnx.Module | None]:
  live = s.loss["kd_ratio"] > 0 and not s.teacher.cached
  teacher = teacher_lib.load(s.teacher, mesh) if live else None
  student = make_student(s.student, mesh)
  if teacher is not None and not s.teacher.cross_tokenizer:
    members = getattr(teacher, "members", [teacher])  # teacher_lib.Teachers
    for where, member in zip(s.teacher.paths, members):
      if _vocab(member) != _vocab(student):
        raise ValueError(
            f"teacher vocabulary {_vocab(member)} != student vocabulary "
            f"{_vocab(student)} ({where}); the trainer feeds the same token "
            "ids to the teachers and the student, so distil between models "
            "that share a tokenizer, or set teacher.tokenizer (one teacher) "
            "for a cross-tokenizer loss "
            f"({', '.join(objective.CROSS_TOKENIZER)})."
        )
  return student, teacher


def _cross_tokenizer(
    s: spec_lib.TrainSpec, tok: tokenizer_lib.Tokenizer, eos_id: int
) -> tuple[pipeline.RowFields | None, tuple[np.ndarray, np.ndarray] | None]:
  """A cross-tokenizer run's row fields and GOLD's matched vocabulary."""
  if not (s.teacher.cross_tokenizer and s.loss["kd_ratio"] > 0):
    return None, None
  teacher_tok, teacher_eos = tokenizer_lib.load(s.teacher.tokenizer)
  teacher = crosstok.TeacherTokens(
      teacher_tok, teacher_eos, s.teacher.row_length(s.data)
  )
  fields = crosstok.row_fields(tok, eos_id, teacher)
  matched = None
  if s.loss["name"] == "gold":
    matched = crosstok.matched_vocab(tok, teacher_tok)
  return fields, matched


def _cache(s: spec_lib.TrainSpec) -> cache_store.Cache | None:
  """The checked teacher cache of a run that reads one, else None."""
  if not (s.teacher.cached and s.loss["kd_ratio"] > 0):
    return None
  return cache_store.Cache(
      s.teacher.cache_dir, cache_store.check_config(s.identity)
  )


def _projection(
    s: spec_lib.TrainSpec, student, teacher, mesh: jax.sharding.Mesh
) -> dict[str, jax.Array] | None:
  """The feature term's projections (seed + 4), replicated; None without
  it. Checks the transfer terms' layer maps and head counts against the
  two models first."""
  if teacher is None or not transfer.active(s.loss):
    return None
  plan = transfer.plan(s.loss, student, teacher)
  projection = transfer.init_projection(
      s.loss, plan, student, teacher, jax.random.key(s.student.seed + 4)
  )
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return jax.device_put(projection, replicated)


def build(
    config: ml_collections.ConfigDict | spec_lib.TrainSpec,
    workdir: str,
    mesh: jax.sharding.Mesh,
) -> Run:
  """Data, models, optimizer and initial state (call under ``jax.set_mesh``).

  Args:
    config: an experiment config that passed
      :func:`kdjax.config.checks.validate` (as ``train_and_evaluate``'s
      do), or the spec resolved from one.
    workdir: the run directory (SeqKD caches its responses there).
    mesh: the run's mesh.
  """
  s = (
      config
      if isinstance(config, spec_lib.TrainSpec)
      else spec_lib.from_config(config)
  )
  _check(s, mesh)
  cache = _cache(s)
  tok, eos_id = tokenizer_lib.load(s.data.tokenizer, s.data.tokenizer_revision)
  stop_ids = generation.stop_ids(tok, eos_id, s.eval.protocol)
  row_fields, matched = _cross_tokenizer(s, tok, eos_id)
  if cache is not None:
    row_fields = cache.bind
  train_src = (
      _seqkd_train_source(s, workdir, tok, eos_id, mesh)
      if s.data.seqkd_teacher
      else inputs.train_source(s.data)
  )
  train = pipeline.train_batches(
      train_src,
      tok,
      batch_size=s.batch_size,
      seed=s.seed,
      num_epochs=None if s.num_steps else s.num_epochs,
      row_fields=row_fields,
      **s.data.row_settings(eos_id),
  )
  val_src = inputs.source(s.data, s.data.val_split)
  num_steps = s.num_steps or train.num_steps
  student, teacher = _models(s, mesh)
  if cache is not None and cache.vocab_size != _vocab(student):
    raise ValueError(
        f"teacher cache {s.teacher.cache_dir} has a vocabulary of "
        f"{cache.vocab_size} but the student has {_vocab(student)}; distil "
        "between models that share a tokenizer."
    )
  projection = _projection(s, student, teacher, mesh)
  tx = optimizer.make_optimizer(s.optim, num_steps)
  graphdef, params, rest = nnx.split(student, nnx.Param, ...)
  teacher_graphdef = None if teacher is None else nnx.graphdef(teacher)
  source = strategies.from_spec(
      s.onpolicy,
      batch_size=s.batch_size,
      max_length=s.data.max_length,
      max_prompt_length=s.data.max_prompt_length,
      eos_id=eos_id,
      stop_ids=stop_ids,
      total_steps=num_steps,
      student_graphdef=graphdef,
      teacher_graphdef=teacher_graphdef,
  )
  step = Step(
      s.loss,
      graphdef,
      teacher_graphdef,
      tx,
      s.grad_accum,
      num_steps,
      minillm=source.objective,
      trainable=trainable(s.student),
      on_nonfinite=s.on_nonfinite,
      max_skips=s.max_skips,
      matched=matched,
  )
  fields = (jnp.zeros((), jnp.int32), params, rest, None, init_taid(s.loss))
  if projection is None:
    state = TrainState(*fields)
  else:
    state = TransferState(*fields, projection)
  state = state._replace(
      opt_state=optimizer.init_opt_state(tx, step.optimized(state), mesh)
  )
  return Run(
      s,
      workdir,
      mesh,
      tok,
      eos_id,
      stop_ids,
      train,
      val_src,
      student,
      teacher,
      step,
      state,
      num_steps,
      source if source.generates else None,
      None if cache is not None else row_fields,
  )
