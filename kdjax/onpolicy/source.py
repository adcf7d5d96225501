"""The sequence source: per step, the batch from the dataset or the student.

:class:`Source` is a pure function of ``(params, rest, teacher_state, batch,
state, step)``, jitted once per run, run between fetching the dataset batch
and the train step on the same mesh. It returns the batch to train on (same
keys, dtypes, shape and layout as the dataset's), the new source state and
per-step metrics. Its kinds (docs/on_policy.md):

* ``dataset``: the batch unchanged (off-policy KD, the default);
* ``gkd``: with probability ``lmbda`` the responses are the student's samples
  to the batch's prompts (GKD, Agarwal et al. 2024; ``seq_kd`` first swaps the
  dataset responses for the teacher's, every step, as TRL's GKDTrainer);
* ``distillm``: DistiLLM's adaptive schedule with a replay buffer
  (:mod:`kdjax.onpolicy.distillm`);
* ``skd``: with probability ``lmbda`` the responses come from speculative KD
  decoding (:mod:`kdjax.onpolicy.skd`);
* ``minillm``: responses from the teacher-mixed policy with their rollout
  log-probs (fresh every ``minillm_ppo_epochs`` steps, reused in between),
  and the step's dataset batch under ``lm_*`` keys, for MiniLLM's
  policy-gradient objective (:mod:`kdjax.onpolicy.minillm`).

Randomness: the step's key is ``fold_in(key, step)``, split into the choice,
generation and replay keys, so the batch of step ``s`` depends only on the
saved state and ``s``; resuming at ``s`` replays it exactly. The choice is
``u < lmbda`` with ``u ~ U[0, 1)``, so ``lmbda = 0`` never and ``lmbda = 1``
always generates; ``gkd``/``skd`` with ``lmbda = 0`` return the dataset
batch bit for bit.

Configured by ``config.onpolicy`` (:class:`kdjax.config.spec.OnPolicySpec`,
added by :func:`kdjax.config.recipe.add_onpolicy`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections

from kdjax import sampling, sharding
from kdjax.config import checks
from kdjax.config import spec as config_spec
from kdjax.onpolicy import batches, distillm, minillm, skd

Array = jax.Array
KINDS = ("dataset", "gkd", "distillm", "skd", "minillm")


def new_tokens(cfg, max_length: int, max_prompt_length: int) -> int:
  return cfg.max_new_tokens or max_length - max_prompt_length


def settings(
    cfg, *, eos_id: int, max_length: int, max_prompt_length: int
) -> sampling.Settings:
  """Sampling settings of the generated responses (EOS ends a row)."""
  return sampling.Settings(
      max_new_tokens=new_tokens(cfg, max_length, max_prompt_length),
      greedy=False,
      temperature=float(cfg.temperature),
      top_k=int(cfg.top_k),
      top_p=float(cfg.top_p),
      eos_id=eos_id,
      pad_id=eos_id,
  )


class State(NamedTuple):
  """What the source carries between steps (saved in the checkpoint).

  Attributes:
    key: raw key data (``jax.random.key_data``) of the run's source key.
    threshold: DistiLLM's ``tau`` (float32 scalar; 0 for other kinds).
    prev_loss: the validation loss ``tau`` was last raised at (float32).
    buffer: DistiLLM's replay buffer (None for other kinds).
    rollout: MiniLLM's current rollout, the rows and their ``rollout_*``
      log-probs, reused for ``minillm_ppo_epochs`` updates (None otherwise).
  """

  key: Array
  threshold: Array
  prev_loss: Array
  buffer: distillm.Buffer | None
  rollout: dict[str, Array] | None = None


def step_keys(key_data: Array, step: Array) -> tuple[Array, ...]:
  """``(choice, generation, teacher, replay)`` keys of update ``step``."""
  step_key = jax.random.fold_in(jax.random.wrap_key_data(key_data), step)
  return tuple(jax.random.split(step_key, 4))


def uses_generated(key_data: Array, step: Array, lmbda: float) -> Array:
  """GKD/SKD's choice at ``step``: ``u < lmbda``, ``u ~ U[0, 1)``."""
  return jax.random.uniform(step_keys(key_data, step)[0]) < lmbda


def after_validation(state: State, val_loss: float, loss_eps: float) -> State:
  """DistiLLM's update (:func:`distillm.after_validation`) on ``state``.

  The schedule lives in the state as float32, read and written back the same
  way whether or not the run was resumed in between.
  """
  schedule = distillm.after_validation(
      distillm.Schedule(float(state.threshold), float(state.prev_loss)),
      val_loss,
      loss_eps,
  )
  return state._replace(
      threshold=jnp.asarray(schedule.threshold, jnp.float32),
      prev_loss=jnp.asarray(schedule.prev_loss, jnp.float32),
  )


@dataclasses.dataclass(frozen=True)
class Source:
  """One run's sequence source (static parts; hashable for ``jax.jit``)."""

  kind: str
  settings: sampling.Settings
  prompt_length: int
  max_length: int
  eos_id: int
  total_steps: int
  student_graphdef: Any
  teacher_graphdef: Any = None
  lmbda: float = 0.0
  seq_kd: bool = False
  capacity: int = 0
  replay_ratio: str = "decreasing"
  loss_eps: float = 0.1
  skd_top_k: int = 25
  skd_resample: str = "top_k"
  minillm_alpha: float = 0.2
  minillm_ppo_epochs: int = 1
  batch_size: int = 0

  @classmethod
  def from_spec(
      cls,
      cfg: config_spec.OnPolicySpec,
      *,
      batch_size: int,
      max_length: int,
      max_prompt_length: int,
      eos_id: int,
      total_steps: int,
      student_graphdef,
      teacher_graphdef=None,
  ) -> "Source":
    """The source of a run; fails in one sentence on settings that cannot run."""
    checks.check_onpolicy(
        cfg,
        batch_size=batch_size,
        max_length=max_length,
        max_prompt_length=max_prompt_length,
    )
    if cfg.needs_teacher and teacher_graphdef is None:
      raise ValueError(
          f"onpolicy.source={cfg.source!r} needs the teacher; set "
          "loss.kd_ratio > 0 and teacher.path."
      )
    return cls(
        kind=cfg.source,
        settings=settings(
            cfg,
            eos_id=eos_id,
            max_length=max_length,
            max_prompt_length=max_prompt_length,
        ),
        prompt_length=max_prompt_length,
        max_length=max_length,
        eos_id=eos_id,
        total_steps=total_steps,
        student_graphdef=student_graphdef,
        teacher_graphdef=teacher_graphdef,
        lmbda=float(cfg.lmbda),
        seq_kd=bool(cfg.seq_kd),
        capacity=int(cfg.buffer_size) if cfg.source == "distillm" else 0,
        replay_ratio=cfg.replay_ratio,
        loss_eps=float(cfg.loss_eps),
        skd_top_k=int(cfg.skd_top_k),
        skd_resample=cfg.skd_resample,
        minillm_alpha=float(cfg.minillm_alpha),
        minillm_ppo_epochs=int(cfg.minillm_ppo_epochs),
        batch_size=int(batch_size),
    )

  @classmethod
  def from_config(
      cls,
      config: ml_collections.ConfigDict,
      *,
      eos_id: int,
      total_steps: int,
      student_graphdef,
      teacher_graphdef=None,
  ) -> "Source":
    """:meth:`from_spec` of ``config.onpolicy`` with the config's lengths."""
    return cls.from_spec(
        config_spec.onpolicy_from_config(config),
        batch_size=config.batch_size,
        max_length=config.data.max_length,
        max_prompt_length=config.data.max_prompt_length,
        eos_id=eos_id,
        total_steps=total_steps,
        student_graphdef=student_graphdef,
        teacher_graphdef=teacher_graphdef,
    )

  def init(
      self, seed: int, threshold: float = 0.0, initial_val_loss: float = 0.0
  ) -> State:
    """The state before step 0.

    DistiLLM starts from ``tau = threshold`` (``onpolicy.init_threshold``) and
    the validation loss measured before training.
    """
    key = jax.random.key_data(jax.random.key(seed))
    buffer = (
        distillm.empty(self.capacity, self.max_length, self.eos_id)
        if self.kind == "distillm"
        else None
    )
    rollout = None
    if self.kind == "minillm" and self.minillm_ppo_epochs > 1:
      shape = (self.batch_size, self.max_length)
      rollout = {k: jnp.zeros(shape, dt) for k, dt in batches.DTYPES.items()}
      for name in minillm.RECORDS:
        rollout[f"rollout_{name}"] = jnp.zeros(shape, jnp.float32)
    return State(
        key,
        jnp.asarray(threshold, jnp.float32),
        jnp.asarray(initial_val_loss, jnp.float32),
        buffer,
        rollout,
    )

  # --------------------------------------------------------------------------

  def _student(self, params, rest) -> nnx.Module:
    student = nnx.merge(self.student_graphdef, params, rest)
    student.eval()
    return student

  def _teacher(self, teacher_state) -> nnx.Module:
    return nnx.merge(self.teacher_graphdef, teacher_state)

  def _rows(self, prompt_BxP, mask_BxP, tokens_BxN) -> batches.Rows:
    return batches.response_rows(
        prompt_BxP,
        mask_BxP,
        tokens_BxN,
        max_length=self.max_length,
        eos_id=self.eos_id,
    )

  def sample_rows(
      self, params, rest, teacher_state, batch, key, *, by: str = "student"
  ) -> tuple[batches.Rows, Array]:
    """Rows answering ``batch``'s prompts, sampled ``by`` student/teacher/skd.

    Returns the rows and the per-token replaced mask (all False except SKD).
    """
    prompt_BxP, mask_BxP = batches.prompts_from_batch(
        batch, self.prompt_length, self.eos_id
    )
    kw = self.settings._asdict()
    if by == "skd":
      tokens_BxN, replaced_BxN = skd.generate(
          self._student(params, rest),
          self._teacher(teacher_state),
          prompt_BxP,
          mask_BxP,
          key,
          teacher_top_k=self.skd_top_k,
          resample=self.skd_resample,
          **kw,
      )
    else:
      model = (
          self._student(params, rest)
          if by == "student"
          else self._teacher(teacher_state)
      )
      tokens_BxN = sampling.generate(model, prompt_BxP, mask_BxP, key, **kw)
      replaced_BxN = jnp.zeros(tokens_BxN.shape, bool)
    rows = self._rows(prompt_BxP, mask_BxP, tokens_BxN)
    rows = jax.tree.map(
        lambda x: sharding.constrain(x, ("batch",) + (None,) * (x.ndim - 1)),
        rows,
    )
    return rows, replaced_BxN

  def _as_batch(self, rows: batches.Rows, like: dict) -> dict:
    out = batches.to_batch(rows, self.eos_id)
    return {
        k: sharding.constrain(out[k].astype(like[k].dtype), ("batch", None))
        for k in like
    }

  def __call__(
      self, params, rest, teacher_state, batch: dict, state: State, step: Array
  ) -> tuple[dict, State, dict]:
    """``(batch, state, metrics)`` for the update ``step`` (0-based).

    Metrics (float32 scalars): ``onpolicy`` 1 when the batch is not the
    dataset's, ``generated`` 1 when responses were sampled this step,
    ``gen_len`` their mean length in tokens (0 when none), ``skd_replaced``
    the fraction of SKD tokens the teacher replaced.
    """
    batch = {k: batch[k] for k in batches.DTYPES}
    zero = jnp.zeros((), jnp.float32)
    info = dict(onpolicy=zero, generated=zero, gen_len=zero, skd_replaced=zero)
    if self.kind == "dataset":
      return batch, state, info
    k_choice, k_gen, k_teacher, k_replay = step_keys(state.key, step)
    u = jax.random.uniform(k_choice)
    if self.kind == "distillm":
      return self._distillm(
          params, rest, batch, state, step, u, k_gen, k_replay, info
      )
    if self.kind == "minillm":
      return self._minillm_step(
          params, rest, teacher_state, batch, state, step, k_gen, info
      )
    by = "skd" if self.kind == "skd" else "student"
    base = batch
    if self.seq_kd:
      rows, _ = self.sample_rows(
          params, rest, teacher_state, batch, k_teacher, by="teacher"
      )
      base = self._as_batch(rows, batch)

    def generated(_):
      rows, replaced_BxN = self.sample_rows(
          params, rest, teacher_state, batch, k_gen, by=by
      )
      n_tokens = jnp.maximum(jnp.sum(rows.length_B - rows.prompt_len_B), 1)
      stats = dict(
          onpolicy=zero + 1,
          generated=zero + 1,
          gen_len=jnp.mean(
              rows.length_B - rows.prompt_len_B, dtype=jnp.float32
          ),
          skd_replaced=jnp.sum(replaced_BxN) / n_tokens,
      )
      return self._as_batch(rows, batch), stats

    def offpolicy(_):
      return base, info

    if self.lmbda <= 0.0:
      return base, state, info
    if self.lmbda >= 1.0:
      out, stats = generated(None)
    else:
      out, stats = jax.lax.cond(
          uses_generated(state.key, step, self.lmbda),
          generated,
          offpolicy,
          None,
      )
    return out, state, jax.tree.map(lambda x: x.astype(jnp.float32), stats)

  def _minillm_step(
      self, params, rest, teacher_state, batch, state, step, key, info
  ):
    """A fresh rollout every ``minillm_ppo_epochs`` steps, else the last one.

    Either way the dataset batch of this step rides along under ``lm_*``.
    """
    fresh = lambda _: self._minillm(params, rest, teacher_state, batch, key)
    if self.minillm_ppo_epochs <= 1:
      rollout, stats = fresh(None)
    else:
      reuse = lambda _: (
          state.rollout,
          dict(info, onpolicy=info["onpolicy"] + 1),
      )
      rollout, stats = jax.lax.cond(
          step % self.minillm_ppo_epochs == 0, fresh, reuse, None
      )
      state = state._replace(rollout=rollout)
    out = dict(rollout)
    out.update({minillm.LM_PREFIX + k: v for k, v in batch.items()})
    return out, state, dict(info, **stats)

  def _minillm(self, params, rest, teacher_state, batch, key):
    """Teacher-mixed rows and their rollout log-probs (``rollout_*``)."""
    prompt_BxP, mask_BxP = batches.prompts_from_batch(
        batch, self.prompt_length, self.eos_id
    )
    tokens_BxN, records = minillm.generate(
        self._student(params, rest),
        self._teacher(teacher_state),
        prompt_BxP,
        mask_BxP,
        key,
        alpha=self.minillm_alpha,
        **self.settings._asdict(),
    )
    rows = self._rows(prompt_BxP, mask_BxP, tokens_BxN)
    out = self._as_batch(rows, batch)
    L = self.max_length
    for name in minillm.RECORDS:
      values = minillm.align(records[name], rows.prompt_len_B, rows.length_B, L)
      out[f"rollout_{name}"] = sharding.constrain(values, ("batch", None))
    one = jnp.ones((), jnp.float32)
    gen_B = rows.length_B - rows.prompt_len_B
    return out, dict(
        onpolicy=one,
        generated=one,
        gen_len=jnp.mean(gen_B, dtype=jnp.float32),
        skd_replaced=jnp.zeros((), jnp.float32),
    )

  def _distillm(
      self, params, rest, batch, state, step, u, k_gen, k_replay, info
  ):
    buffer = state.buffer
    tau = state.threshold
    gen_tau = distillm.generate_threshold(
        tau, step + 1, self.total_steps, self.replay_ratio
    )
    act = distillm.action(u, tau, gen_tau, buffer.count, self.capacity)
    B = batch["input_ids"].shape[0]
    one = jnp.ones((), jnp.float32)

    def dataset(_):
      return batch, buffer, info

    def generate(_):
      rows, _ = self.sample_rows(params, rest, None, batch, k_gen)
      stats = dict(
          info,
          onpolicy=one,
          generated=one,
          gen_len=jnp.mean(
              rows.length_B - rows.prompt_len_B, dtype=jnp.float32
          ),
      )
      return self._as_batch(rows, batch), distillm.push(buffer, rows), stats

    def replay(_):
      rows = distillm.sample(buffer, k_replay, B)
      return self._as_batch(rows, batch), buffer, dict(info, onpolicy=one)

    out, buffer, stats = jax.lax.switch(act, (dataset, generate, replay), None)
    return out, state._replace(buffer=buffer), stats
