"""The training loop: resume, step, log, validate, checkpoint, export.

Resume from the latest orbax checkpoint in ``workdir`` (same batches and RNG
thereafter, the on-policy strategy's state included:
:mod:`kdjax.onpolicy`), periodic validation (:mod:`kdjax.training.validation`),
``metrics.jsonl`` + TensorBoard + a progress bar, a stop on the first
non-finite loss or gradient, and the final and best students exported as
Hugging Face checkpoints (``workdir/hf``, ``workdir/best_hf``).

The whole config is checked first (:func:`kdjax.config.checks.validate`), before
the workdir is touched or anything compiles. Stdout gets one line per
validation and a summary at the end (best step and metric, final metrics,
where the exports are; also ``workdir/summary.json``). The first Ctrl-C stops
at the end of the step in progress (a checkpoint being written is never cut
short), saves that step and prints one sentence naming the checkpoint that is
kept and how to resume; a second Ctrl-C stops at once.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from typing import Any, Sequence

from flax import nnx
import grain
import jax
import jax.numpy as jnp
import ml_collections
import tqdm

from kdjax import checkpoint, fs, models, sharding
from kdjax import metrics as metrics_lib
from kdjax.config import checks as config_checks
from kdjax.config import spec as spec_lib
from kdjax.models import lora
from kdjax.onpolicy import runner as runner_lib
from kdjax.training import builder, validation
from kdjax.training import step as step_lib
from kdjax.training import workdir as workdir_lib
from kdjax.training.distributed import maybe_initialize_distributed
from kdjax.training.errors import TrainingError
from kdjax.training.optimizer import make_schedule
from kdjax.training.step import TrainState


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    stop_at: int | None = None,
    devices: Sequence[jax.Device] | None = None,
) -> dict[str, float]:
  """Trains (or resumes) the run ``config`` in ``workdir``; returns its last metrics.

  Args:
    config: an experiment config (``configs/*.py:get_config(arg)``).
    workdir: run directory; a checkpoint there is resumed.
    stop_at: stop after this step with a checkpoint, as a preemption would;
      calling again continues the same run (notebooks training in pieces).
    devices: devices for the mesh (default: all).

  Raises:
    kdjax.config.checks.ConfigError: the config cannot run (nothing written).
    TrainingError: the run stopped for a reason the user must act on.
  """
  config_checks.validate(config)
  spec = spec_lib.from_config(config)
  maybe_initialize_distributed()
  workdir = fs.local(workdir)
  created = not fs.path(workdir).exists()
  fresh = workdir_lib.claim(
      workdir, spec.identity, force_new_run=spec.force_new_run
  )
  try:
    mesh = sharding.make_mesh(spec.mesh.data, spec.mesh.fsdp, devices=devices)
    with jax.set_mesh(mesh):
      run = builder.build(spec, workdir, mesh)
  except Exception:
    if fresh:
      workdir_lib.release(workdir, created=created)
    raise
  with jax.set_mesh(mesh):
    return loop(run, stop_at)


def _every_eval(run: builder.Run) -> int:
  """Steps between validations (0: never; the config's -1: each epoch)."""
  every = run.spec.eval.every_steps
  return run.train_data.steps_per_epoch if every < 0 else every


def _policy(run: builder.Run) -> checkpoint.BestPolicy:
  e = run.spec.eval
  return checkpoint.best_policy(
      e.best_metric,
      e.best_after_steps,
      num_steps=run.num_steps,
      warmup_steps=run.spec.optim.warmup_steps,
  )


def _say(text: str) -> None:
  """A line on stdout from process 0 (through tqdm: the bar stays intact)."""
  if jax.process_index() == 0:
    tqdm.tqdm.write(text, file=sys.stdout)


class Interrupted(TrainingError, KeyboardInterrupt):
  """Ctrl-C during training; the message names the checkpoint that is kept.

  ``kept`` is that sentence without the way to resume, which the message
  gives for Python callers: a command line prints its own resume command
  after ``kept`` (:func:`kdjax.cli.interrupted_message`).
  """

  exit_code = 130

  def __init__(self, kept: str):
    super().__init__(
        f"{kept}; call train_and_evaluate again with the same config and "
        "workdir to resume."
    )
    self.kept = kept


class _StopRequested(KeyboardInterrupt):
  """The loop reached a step boundary after a first Ctrl-C."""


class _CtrlC:
  """Turns the first SIGINT into a request the loop honours between steps.

  A KeyboardInterrupt raised at an arbitrary bytecode can land inside orbax's
  asynchronous save and leave its threads failing at exit; a flag read between
  steps cannot. The second Ctrl-C raises at once, for a step that hangs.
  Signal handlers can only be installed from the main thread; elsewhere
  (a notebook's worker thread) Ctrl-C keeps Python's default behaviour.
  """

  def __init__(self):
    self.requested = False
    self._installed = False
    self._previous = None

  def install(self) -> None:
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGINT, self._handle)
      self._installed = True

  def _handle(self, signum, frame) -> None:
    del signum, frame
    if self.requested:
      raise KeyboardInterrupt
    self.requested = True
    if jax.process_index() == 0:
      tqdm.tqdm.write(
          "stopping after this step (Ctrl-C again to stop at once)",
          file=sys.stderr,
      )

  def restore(self) -> None:
    if self._installed:
      signal.signal(signal.SIGINT, self._previous or signal.default_int_handler)


def loop(run: builder.Run, stop_at: int | None = None) -> dict[str, float]:
  """Runs ``run`` from its latest checkpoint to ``num_steps`` (or ``stop_at``)."""
  s = run.spec
  writer = metrics_lib.Writer(run.workdir, enabled=jax.process_index() == 0)
  ckpts = checkpoint.Checkpoints(
      run.workdir,
      every_steps=s.ckpt.every_steps,
      max_to_keep=s.ckpt.max_to_keep,
  )
  data_iter = run.train_data.iterator()
  state = run.state
  runner = None
  if run.source is not None:  # on-policy: its state is checkpointed too
    runner = runner_lib.Runner(
        run.source, run.source.init(s.seed + 2), mesh=run.mesh
    )
  start = ckpts.latest_step()
  if start is not None:
    saved = run.step.saved(state)
    if runner is None:
      saved, _ = ckpts.restore(start, saved, data_iter)
    else:
      (saved, runner.state), _ = ckpts.restore(
          start, (saved, runner.state), data_iter
      )
    state = run.step.restored(saved, state)
    _say(f"resumed {run.workdir} from step {start}")
  start = start or 0
  # Rows past the checkpoint (or any row, if none was committed before a kill)
  # are rewritten by this run.
  writer.truncate(after_step=start)
  shardings = jax.tree.map(lambda x: x.sharding, state)
  teacher_state = None if run.teacher is None else nnx.state(run.teacher)
  train_fn = jax.jit(
      run.step.train,
      donate_argnums=(0, 3),
      out_shardings=(shardings, None, None),
  )
  eval_fn = jax.jit(run.step.eval)
  first_bad = jnp.asarray(-1, jnp.int32)
  schedule = make_schedule(s.optim, run.num_steps)
  policy = _policy(run)
  last: dict[str, float] = {}
  tokens_per_step = s.batch_size * s.data.max_length
  bar = tqdm.tqdm(
      total=run.num_steps,
      initial=start,
      desc="train",
      disable=jax.process_index() != 0,
      dynamic_ncols=True,
  )
  t_start = t0 = time.perf_counter()
  since = start
  every_eval = _every_eval(run)
  done = start
  end = run.num_steps if stop_at is None else min(stop_at, run.num_steps)
  if runner is not None and start == 0:
    runner.before_training(
        lambda: validation.validate(run, state, teacher_state, eval_fn)[
            "val_loss"
        ]
    )
  ctrl_c = _CtrlC()
  ctrl_c.install()
  try:
    for step in range(start, end):
      batch = step_lib.put_batch(next(data_iter), run.mesh)
      if runner is not None:
        batch = runner(state, teacher_state, batch)
      state, m, first_bad = train_fn(state, batch, teacher_state, first_bad)
      done = step + 1
      bar.update(1)
      if ctrl_c.requested:
        raise _StopRequested
      boundary = (
          done % s.log_every == 0
          or done == end
          or (s.ckpt.every_steps and done % s.ckpt.every_steps == 0)
          or (every_eval and done % every_eval == 0)
      )
      if not boundary:
        continue
      _check_finite(int(first_bad), run.workdir, ckpts)
      dt = time.perf_counter() - t0
      last = {k: float(v) for k, v in m.items()}
      last.update(
          lr=float(schedule(done - 1)),
          step_time=dt / max(done - since, 1),
          tokens_per_s=tokens_per_step * (done - since) / max(dt, 1e-9),
      )
      t0, since = time.perf_counter(), done
      if runner is not None:
        last.update(runner.log())
        if "gen_time_s" in last:
          last["gen_share"] = last["gen_time_s"] / max(last["step_time"], 1e-9)
      if every_eval and (done % every_eval == 0 or done == run.num_steps):
        val = validation.validate(run, state, teacher_state, eval_fn)
        last.update(val)
        if runner is not None:
          runner.after_validation(val["val_loss"])
        _keep_if_best(ckpts, policy, done, run.step.trained(state.params), val)
        best = ckpts.best_record()
        _say(
            metrics_lib.validation_line(
                done, run.num_steps, val, best and best["step"]
            )
        )
      writer.write(done, last)
      bar.set_postfix(loss=f"{last['loss']:.4f}")
      _save(
          ckpts,
          done,
          _saved(run, state, runner),
          data_iter,
          force=done == end,
      )
    if end == run.num_steps:
      exports = export(run, state, ckpts)
      if jax.process_index() == 0:
        bar.close()
        _say(
            metrics_lib.summary(
                run.workdir,
                steps=run.num_steps,
                seconds=time.perf_counter() - t_start,
                best=ckpts.best_record(),
                last=last,
                exports=exports,
            )
        )
  except KeyboardInterrupt as e:
    bar.close()
    if (
        isinstance(e, _StopRequested)
        and jax.process_count() == 1  # a save is collective; SIGINT may not be
        and done != ckpts.latest_step()
    ):
      _check_finite(int(first_bad), run.workdir, ckpts)
      _save(
          ckpts,
          done,
          _saved(run, state, runner),
          data_iter,
          force=True,
      )
    ckpts.close()  # waits for a checkpoint being written to commit
    kept = ckpts.latest_step()
    where = (
        f"the checkpoint of step {kept} in {run.workdir}/ckpt is kept "
        "(the steps after it are recomputed identically)"
        if kept is not None
        else "no checkpoint had been written yet"
    )
    raise Interrupted(f"interrupted at step {done}; {where}") from None
  finally:
    ctrl_c.restore()
    bar.close()
    ckpts.close()
    writer.close()
  return last


def _saved(
    run: builder.Run, state: TrainState, runner: runner_lib.Runner | None
) -> Any:
  """What a checkpoint holds: the train state without a frozen LoRA base
  (:meth:`~kdjax.training.step.Step.saved`), with the on-policy state."""
  saved = run.step.saved(state)
  return saved if runner is None else (saved, runner.state)


def _keep_if_best(
    ckpts: checkpoint.Checkpoints,
    policy: checkpoint.BestPolicy,
    step: int,
    params: Any,
    val: dict[str, float],
) -> None:
  """Keeps the trained ``params`` when this validation is the best."""
  score = policy.score(step, val)
  if score is not None:
    ckpts.save_best(
        step,
        params,
        score,
        {"metric": policy.metric, "value": val[policy.metric]},
    )


def export(
    run: builder.Run, state: TrainState, ckpts: checkpoint.Checkpoints
) -> dict[str, str]:
  """Writes the final (``hf/``) and best (``best_hf/``) students as HF checkpoints.

  Each holds the weights, the configs and the run's tokenizer
  (:func:`kdjax.models.save_hf`; a LoRA student's adapters merged into its
  weights). A LoRA run with ``student.lora.export_adapter`` also writes the
  adapters alone in peft's layout (``hf_adapter/``, ``best_hf_adapter/``:
  :func:`kdjax.models.lora.save_adapter`). Process 0 writes; every process
  joins the collectives: params sharded over devices of several processes
  reach the host only through ``process_allgather``, and orbax restores are
  collective too. Returns ``{"final": dir, "best": dir, ...}`` of what was
  written.
  """
  if not run.spec.export_hf:
    return {}
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  best = ckpts.restore_best(run.step.trained(state.params))
  if best is not None:  # the frozen base of a LoRA student is the live one
    best = nnx.merge_state(state.params, best[1])
  adapters = run.spec.student.lora
  written = {}
  for name, key, params in (
      ("hf", "final", state.params),
      ("best_hf", "best", best),
  ):
    if params is None:
      continue
    if jax.process_count() > 1:  # one process: save_hf fetches tensor by tensor
      params = multihost_utils.process_allgather(params, tiled=True)
    target = str(fs.path(run.workdir) / name)
    student = nnx.merge(run.step.graphdef, params, state.rest)
    if jax.process_index() == 0:
      models.save_hf(student, target, tokenizer=run.tokenizer)
    written[key] = target
    if adapters.rank and adapters.export_adapter:
      if jax.process_index() == 0:
        lora.save_adapter(
            student,
            target + "_adapter",
            base_model=_base_model(run.spec.student.init),
            dropout=adapters.dropout,
        )
      written[key + "_adapter"] = target + "_adapter"
  return written


def _base_model(init: str) -> str | None:
  """The adapters' base in their peft config: the checkpoint the student was
  loaded from (none for a preset initialised from the seed)."""
  return None if init.startswith("preset:") else init


def _save(
    ckpts: checkpoint.Checkpoints,
    step: int,
    state: Any,
    data_iter: grain.DatasetIterator,
    *,
    force: bool,
) -> None:
  """A checkpoint, or one sentence when the disk (or bucket) refuses it.

  ``state`` is the train state, paired with the on-policy strategy's state
  (:class:`kdjax.onpolicy.strategy.State`) on on-policy runs.

  Orbax writes into a temporary directory and renames it on commit, so a
  failed save leaves the previous checkpoint as the latest.
  """
  try:
    ckpts.save(step, state, data_iter, {"step": step}, force=force)
  except OSError as e:
    good = ckpts.latest_step()
    raise TrainingError(
        f"saving the step-{step} checkpoint failed ({e.strerror or e}); the "
        f"last good checkpoint (step {good}) is kept. Free space in the "
        "workdir (or lower ckpt.max_to_keep) and re-run the same command to "
        "resume."
    ) from e


def _check_finite(
    first_bad: int, workdir: str, ckpts: checkpoint.Checkpoints
) -> None:
  if first_bad < 0:
    return
  good = ckpts.latest_step()
  kept = (
      f"the last good checkpoint (step {good}) is kept in {workdir}/ckpt"
      if good is not None
      else "no checkpoint had been written yet"
  )
  raise TrainingError(
      f"loss or gradient became non-finite at step {first_bad + 1}; {kept}. "
      "Lower optim.lr, check the data, or use a float32 teacher."
  )
