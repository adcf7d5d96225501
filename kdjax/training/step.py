"""The train state and the jitted train / eval steps.

One ``jax.jit`` step per optimizer update: the teacher (frozen, its own dtype)
and the student run on the same batch (or the batch carries the teacher's
cached sparse distributions and only the student runs), :mod:`kdjax.objective` turns their
outputs into global masked token sums, the gradient of
``(1 - kd_ratio)·CE_sum / tokens + kd_ratio·KD_sum / kd_tokens`` (``kd_tokens``
= ``tokens`` unless ``loss.select`` keeps fewer) is accumulated over
``grad_accum`` micro-batches, and the optimizer applies it. A TAID run also
carries its schedule in the state and moves ``t`` after each step; a run with
a feature term carries its projections (:mod:`kdjax.transfer`), trained by
the same optimizer. The state is
donated; its shardings never change (FSDP shards params and optimizer state
alike; the batch is split over ``data``/``fsdp``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, NamedTuple

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from kdjax import objective, sharding
from kdjax import taid as taid_lib
from kdjax.onpolicy import minillm as minillm_lib

# The arrays of a batch the step reads: the text, a cached sparse teacher's
# fields when the run reads one (kdjax.cache), and a cross-tokenizer
# teacher's rows and alignment (kdjax.data.crosstok).
TEXT_KEYS = ("input_ids", "labels", "loss_mask", "attention_mask", "positions")
CACHE_KEYS = ("teacher_ids", "teacher_log_probs", "teacher_weights")
CROSS_TOKENIZER_KEYS = objective.TEACHER_ROW_KEYS + objective.ALIGNMENT_KEYS
BATCH_KEYS = TEXT_KEYS + CACHE_KEYS + CROSS_TOKENIZER_KEYS
Batch = dict[str, jax.Array]


class TrainState(NamedTuple):
  """What the step updates (and a checkpoint holds), besides the data position.

  Attributes:
    step: the number of optimizer updates done (int32 scalar).
    params: the student's ``nnx.Param`` variables (float32); a LoRA
      student's include its frozen base (:attr:`Step.trainable`).
    rest: the student's other state: dropout RNG keys and counters.
    opt_state: the optimizer's state over the trained params, sharded like
      them.
    taid: TAID's schedule (:class:`kdjax.taid.State`) in a TAID run, else
      None; kept here, and so in every checkpoint, a resumed run continues
      the same ``t``.

  A run with a feature term holds a :class:`TransferState` instead.
  """

  step: jax.Array
  params: nnx.State
  rest: nnx.State
  opt_state: optax.OptState
  taid: taid_lib.State | None = None


class TransferState(NamedTuple):
  """:class:`TrainState` plus the feature term's projections.

  A separate type, so the state (and the checkpoints) of every other run
  keep :class:`TrainState`'s tree.

  Attributes:
    projection: the projections student width -> teacher width, by layer
      pair (:func:`kdjax.transfer.init_projection`): trained with the params
      (``opt_state`` covers ``(params, projection)``), checkpointed, never
      part of the exported student.
  """

  step: jax.Array
  params: nnx.State
  rest: nnx.State
  opt_state: optax.OptState
  taid: taid_lib.State | None
  projection: dict[str, jax.Array]


def projection_of(state: TrainState | TransferState) -> dict | None:
  """The feature projections of ``state`` (None in a :class:`TrainState`)."""
  return getattr(state, "projection", None)


class Health(NamedTuple):
  """What the host reads about the steps so far, only now and then.

  Carried from step to step on the devices, so a run checks it at its log,
  checkpoint and validation boundaries without a sync per step.

  Attributes:
    first_bad: the step (0-based) at which the run must stop, -1 while it
      need not: the first non-finite step under ``on_nonfinite="stop"``,
      the step that made ``max_skips`` skipped updates in a row under
      ``"skip"`` (int32).
    loss_bad: whether that step's loss (not only its gradient) was not
      finite (bool).
    skipped: updates skipped so far (int32; ``"skip"`` only).
    streak: consecutive updates skipped up to the last step (int32).
  """

  first_bad: jax.Array
  loss_bad: jax.Array
  skipped: jax.Array
  streak: jax.Array

  @classmethod
  def init(cls) -> Health:
    return cls(
        jnp.asarray(-1, jnp.int32),
        jnp.asarray(False),
        jnp.asarray(0, jnp.int32),
        jnp.asarray(0, jnp.int32),
    )


def init_taid(loss_cfg: Mapping[str, Any]) -> taid_lib.State | None:
  """The initial :attr:`TrainState.taid` of a run with this loss config."""
  if loss_cfg["name"] != "taid" or loss_cfg["kd_ratio"] == 0:
    return None
  return taid_lib.init(loss_cfg["taid"])


def _taid_t(state: TrainState) -> jax.Array | None:
  return None if state.taid is None else state.taid.t


def put_batch(
    batch: Mapping[str, np.ndarray], mesh: jax.sharding.Mesh
) -> Batch:
  """The arrays of a host batch the step reads (:data:`BATCH_KEYS`), placed
  on the batch axes (:func:`kdjax.sharding.put_batch`)."""
  return sharding.put_batch(
      {k: v for k, v in batch.items() if k in BATCH_KEYS}, mesh
  )


def _microbatches(batch: Batch, n: int) -> Batch:
  """``[B, ...]`` -> ``[n, B/n, ...]`` taking rows ``i, i+n, ...`` for micro ``i``.

  Strided, not blocked: each device holds a contiguous block of rows, so every
  micro-batch keeps rows on every device and the split moves no data.
  """
  if n == 1:
    return jax.tree.map(lambda x: x[None], batch)

  def split(x):
    x = x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1)
    return sharding.constrain(x, (None, "batch") + (None,) * (x.ndim - 2))

  return jax.tree.map(split, batch)


@dataclasses.dataclass(frozen=True)
class Step:
  """The jitted train and eval steps of one run (static parts held here).

  Attributes:
    loss_cfg: the loss part of the spec, as :mod:`kdjax.objective` reads it.
    graphdef: the student's graph definition.
    teacher_graphdef: the teacher's, or None without a teacher.
    tx: the optimizer.
    grad_accum: micro-batches per step.
    num_steps: the run's length (TAID's schedule ramps over it).
    minillm: the on-policy strategy's ``objective``, MiniLLM's constants:
      the step then trains on :func:`kdjax.onpolicy.minillm.minillm_loss`
      (rollout rows plus the dataset batch under ``lm_*`` keys), else None.
    trainable: the params the optimizer updates, an ``nnx`` filter: every
      ``nnx.Param``, or a LoRA student's adapters
      (:data:`kdjax.models.lora.TRAINABLE`). The others are frozen: no
      gradient, no optimizer state, not in checkpoints (:meth:`saved`).
    on_nonfinite: ``"stop"`` (the host stops the run) or ``"skip"`` (the
      update is dropped) for a step whose loss or gradient is not finite.
    max_skips: under ``"skip"``, the updates skipped in a row that stop
      the run.
    matched: GOLD's matched vocabulary entries of a cross-tokenizer run,
      ``(student_ids_M, teacher_ids_M)`` (:func:`kdjax.data.crosstok.
      matched_vocab`), else None.
  """

  loss_cfg: Mapping[str, Any]
  graphdef: nnx.GraphDef
  teacher_graphdef: nnx.GraphDef | None
  tx: optax.GradientTransformation
  grad_accum: int
  num_steps: int = 0
  minillm: minillm_lib.Config | None = None
  trainable: Any = nnx.Param
  on_nonfinite: str = "stop"
  max_skips: int = 1
  matched: tuple[np.ndarray, np.ndarray] | None = None

  def trained(self, params: nnx.State) -> nnx.State:
    """The part of ``params`` the optimizer updates."""
    return nnx.filter_state(params, self.trainable)

  def saved(self, state: TrainState) -> TrainState:
    """What a checkpoint holds of ``state``: the frozen base of a LoRA
    student is left out (it is rebuilt from ``student.init`` at resume)."""
    return state._replace(params=self.trained(state.params))

  def restored(self, saved: TrainState, state: TrainState) -> TrainState:
    """``state`` (the live one) with the checkpointed parts of ``saved``."""
    return saved._replace(params=nnx.merge_state(state.params, saved.params))

  def _student(self, params: nnx.State, rest: nnx.State) -> nnx.Module:
    return nnx.merge(self.graphdef, params, rest)

  def _teacher(self, teacher_state: nnx.State | None) -> nnx.Module | None:
    if self.teacher_graphdef is None:
      return None
    return nnx.merge(self.teacher_graphdef, teacher_state)

  def optimized(self, state: TrainState) -> Any:
    """What the optimizer updates: the trained params, paired with the
    feature projections when the run has them."""
    trained = self.trained(state.params)
    projection = projection_of(state)
    return trained if projection is None else (trained, projection)

  def grads(
      self,
      state: TrainState,
      batch: Batch,
      teacher_state: nnx.State | None,
      weights: Mapping[str, jax.Array] | None = None,
  ) -> tuple[Any, dict[str, jax.Array], nnx.State]:
    """Gradient of the objective on ``batch``, its metrics and the new RNG state.

    The objective is the global token mean, so each micro-batch's sums are
    divided by the whole batch's token counts (the KD term's: those
    ``loss.select`` keeps) and the gradients simply add up. The gradient
    has the structure of :meth:`optimized`. ``weights``: the transfer
    terms' weights as arrays (:func:`kdjax.transfer.weights`), so a new
    value reuses the compiled step; None: the config's, as constants.
    """
    if self.minillm is not None:
      return self._minillm_grads(state, batch, teacher_state)
    teacher = self._teacher(teacher_state)
    total_tokens = jnp.maximum(jnp.sum(batch["loss_mask"]), 1.0)
    kd_tokens = jnp.maximum(
        objective.kd_tokens(self.loss_cfg, objective.kd_base_mask(batch)), 1.0
    )
    same_tokens = "aligned_mask" not in batch

    def loss_fn(student, micro, projection=None):
      s = objective.sums(
          self.loss_cfg,
          student,
          teacher,
          micro,
          taid_t=_taid_t(state),
          matched=self.matched,
          projection=projection,
      )
      loss = objective.micro_loss(
          self.loss_cfg,
          s,
          total_tokens,
          kd_tokens,
          same_tokens=same_tokens,
          weights=weights,
      )
      return loss, s

    none = objective.zero_sums(self.loss_cfg, jnp.zeros((), jnp.float32))
    grads, totals, rest = self._accumulate(state, batch, loss_fn, none)
    _, m = objective.combine(self.loss_cfg, totals, weights)
    if not same_tokens:  # the response rows a cross-tokenizer teacher pairs
      m["aligned_fraction"] = totals.kd_tokens / jnp.maximum(totals.tokens, 1)
    m["grad_norm"] = optax.tree.norm(grads)
    return grads, m, rest

  def _accumulate(self, state: TrainState, batch: Batch, loss_fn, zero_aux):
    """Gradients of ``loss_fn(student, micro[, projection]) -> (loss,
    aux)`` summed over the micro-batches (with respect to :meth:`optimized`),
    with the summed ``aux`` and the new RNG state."""
    # nnx.value_and_grad (gradient w.r.t. the trained variables only: a
    # frozen base gets no cotangent buffers): dropout advances the student's
    # RNG counters, which a module merged inside jax.grad may not do
    # (TraceContextError on any dropout > 0).
    student_arg = nnx.DiffState(0, self.trainable)
    projection = projection_of(state)
    projected = projection is not None
    grad_fn = nnx.value_and_grad(
        loss_fn,
        argnums=(student_arg, 2) if projected else student_arg,
        has_aux=True,
    )

    def accumulate(carry, micro):
      # params ride in the carry: nnx refuses a module built from values of
      # an outer trace (the jit's) inside the scan body.
      grads, params, rest, totals = carry
      student = self._student(params, rest)
      extra = (projection,) if projected else ()
      (_, s), g = grad_fn(student, micro, *extra)
      rest = nnx.state(student, nnx.Not(nnx.Param))
      grads = jax.tree.map(jnp.add, grads, g)
      return (grads, params, rest, jax.tree.map(jnp.add, totals, s)), None

    zeros = jax.tree.map(jnp.zeros_like, self.optimized(state))
    (grads, _, rest, totals), _ = jax.lax.scan(
        accumulate,
        (zeros, state.params, state.rest, zero_aux),
        _microbatches(batch, self.grad_accum),
    )
    return grads, totals, rest

  def _minillm_grads(self, state, batch, teacher_state):
    """MiniLLM: the rollout rows' policy-gradient loss plus the dataset's.

    Advantages are whitened over the whole batch before it is split into
    micro-batches, and every share is divided by the whole batch's counts,
    so the micro-batch gradients add up to the batch's.
    """
    cfg = self.minillm
    teacher = self._teacher(teacher_state)
    lm = minillm_lib.lm_batch(batch)
    lm_tokens = jnp.maximum(jnp.sum(lm["loss_mask"]), 1.0)
    lm_kd_tokens = jnp.maximum(
        objective.kd_tokens(self.loss_cfg, lm["loss_mask"]), 1.0
    )
    tokens = jnp.maximum(jnp.sum(batch["loss_mask"]), 1.0)
    rollout = minillm_lib.rollout_from_batch(batch)
    batch = dict(
        batch,
        advantage=minillm_lib.advantages(rollout, batch["loss_mask"], cfg),
    )

    def loss_fn(student, micro):
      pt = objective.sums(
          self.loss_cfg, student, teacher, minillm_lib.lm_batch(micro)
      )
      pt_loss = objective.micro_loss(self.loss_cfg, pt, lm_tokens, lm_kd_tokens)
      inputs = (micro["input_ids"], micro["positions"], micro["attention_mask"])
      loss, m = minillm_lib.minillm_loss(
          student(*inputs),
          jax.lax.stop_gradient(teacher(*inputs)),
          minillm_lib.rollout_from_batch(micro),
          micro["loss_mask"],
          cfg,
          advantages_BxT=micro["advantage"],
          pt_loss=pt_loss,
          tokens=tokens,
      )
      return loss, (pt, dict(m, loss=jax.lax.stop_gradient(loss)))

    zero = (
        objective.Sums(*(jnp.zeros((), jnp.float32),) * 4),
        dict(minillm_lib.metric_zeros(), loss=jnp.zeros((), jnp.float32)),
    )
    grads, (pt, m), rest = self._accumulate(state, batch, loss_fn, zero)
    pt_loss, parts = objective.combine(self.loss_cfg, pt)
    m = dict(parts, **m, pt_loss=pt_loss, grad_norm=optax.tree.norm(grads))
    return grads, m, rest

  def train(
      self,
      state: TrainState,
      batch: Batch,
      teacher_state: nnx.State | None,
      health: Health,
      weights: Mapping[str, jax.Array] | None = None,
  ) -> tuple[TrainState, dict[str, jax.Array], Health]:
    """One optimizer update; returns ``(state, metrics, health)``.

    A step whose loss or gradient is not finite is recorded in ``health``
    for the host to stop at (:attr:`on_nonfinite` ``"stop"``), or has its
    update dropped (``"skip"``: parameters, optimizer state and TAID's
    schedule stay as they were; the ``skipped`` metric counts such steps)
    until :attr:`max_skips` come in a row. ``weights``: as in
    :meth:`grads`.
    """
    grads, m, rest = self.grads(state, batch, teacher_state, weights)
    optimized = self.optimized(state)
    updates, opt_state = self.tx.update(grads, state.opt_state, optimized)
    new = optax.apply_updates(optimized, updates)
    projection = projection_of(state)
    if projection is not None:
      new, projection = new
    params = nnx.merge_state(state.params, new)
    loss_ok = jnp.isfinite(m["loss"])
    finite = loss_ok & jnp.isfinite(m["grad_norm"])
    schedule = state.taid
    if schedule is not None:  # TAID: log the t this step used, then move it
      m["taid_t"] = schedule.t
      schedule = taid_lib.update(
          schedule, m["kd"], state.step, self.num_steps, self.loss_cfg["taid"]
      )
    streak = jnp.where(finite, 0, health.streak + 1)
    skipped = health.skipped
    if self.on_nonfinite == "skip":
      keep = lambda new, old: jax.tree.map(
          lambda a, b: jnp.where(finite, a, b), new, old
      )
      params = keep(params, state.params)
      projection = keep(projection, projection_of(state))
      opt_state = keep(opt_state, state.opt_state)
      schedule = keep(schedule, state.taid)
      skipped = skipped + (~finite).astype(jnp.int32)
      m["skipped"] = skipped.astype(jnp.float32)
      stops = streak >= self.max_skips
    else:
      stops = ~finite
    first = (health.first_bad < 0) & stops
    health = Health(
        jnp.where(first, state.step, health.first_bad),
        jnp.where(first, ~loss_ok, health.loss_bad),
        skipped,
        streak,
    )
    updated = dict(opt_state=opt_state, taid=schedule)
    if projection is not None:
      updated["projection"] = projection
    state = state._replace(
        step=state.step + 1, params=params, rest=rest, **updated
    )
    return state, m, health

  def eval(
      self, state: TrainState, batch: Batch, teacher_state: nnx.State | None
  ) -> objective.Sums:
    """Masked token sums of the student (dropout off) on one batch."""
    student = self._student(state.params, state.rest)
    student.eval()
    return objective.sums(
        self.loss_cfg,
        student,
        self._teacher(teacher_state),
        batch,
        taid_t=_taid_t(state),
        matched=self.matched,
        projection=projection_of(state),
    )
