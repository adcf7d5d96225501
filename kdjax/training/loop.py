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
where the exports are; also ``workdir/summary.json``). Ctrl-C and ``SIGTERM``
(a preemption notice) stop at the end of the step in progress, on every
process at the same step (a checkpoint being written is never cut short),
save that step and raise :class:`Interrupted` naming the checkpoint kept and
how to resume; a second signal stops at once
(:mod:`kdjax.training.preemption`).
"""

from __future__ import annotations

import contextlib
import signal
import sys
import time
from typing import Any, Iterator, Sequence

from absl import logging
from flax import nnx
import grain
import jax
import ml_collections
import tqdm

from kdjax import checkpoint, fs, models, sharding, transfer
from kdjax import metrics as metrics_lib
from kdjax.config import checks as config_checks
from kdjax.config import spec as spec_lib
from kdjax.models import lora
from kdjax.onpolicy import runner as runner_lib
from kdjax.training import builder, preemption, validation
from kdjax.training import lock as lock_lib
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
  with preemption.during_setup():
    holder = lock_lib.acquire(workdir)  # one trainer per workdir
    fresh = unbound = False
    try:
      fresh = workdir_lib.claim(
          workdir, spec.identity, force_new_run=spec.force_new_run
      )
      try:
        mesh = sharding.make_mesh(
            spec.mesh.data, spec.mesh.fsdp, devices=devices
        )
        with jax.set_mesh(mesh):
          run = builder.build(spec, workdir, mesh)
      except BaseException:  # a failure or a stop signal: unbind a first start
        if fresh:
          lock_lib.release(workdir, holder)
          holder = None
          workdir_lib.release(workdir, created=created)
          unbound = True
        raise
      with jax.set_mesh(mesh):
        return loop(run, stop_at)
    except preemption.SetupInterrupted as e:
      if fresh and not unbound:  # in the loop, before its first step
        lock_lib.release(workdir, holder)
        holder = None
        workdir_lib.release(workdir, created=created)
      left = "holds no run" if fresh else "keeps what it held"
      raise Interrupted(
          f"interrupted before the first step; nothing was saved and "
          f"{workdir} {left}",
          e.signum,
      ) from None
    finally:
      lock_lib.release(workdir, holder)


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
  """A stop signal during training; the message names the checkpoint kept.

  ``kept`` is that sentence without the way to resume, which the message
  gives for Python callers: a command line prints its own resume command
  after ``kept`` (:func:`kdjax.cli.interrupted_message`). ``exit_code`` is
  ``128 + signal``: 130 for Ctrl-C, 143 for ``SIGTERM``.
  """

  def __init__(self, kept: str, signum: int = signal.SIGINT):
    super().__init__(
        f"{kept}; call train_and_evaluate again with the same config and "
        "workdir to resume."
    )
    self.kept = kept
    self.exit_code = preemption.exit_code(signum)


class _StopRequested(KeyboardInterrupt):
  """Every process reached the agreed step after a stop signal, and saved it."""


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
  saved = run.step.saved(state)  # a LoRA student's checkpoint: adapters
  target = saved if runner is None else (saved, runner.state)
  start, target, notes = ckpts.restore_latest(target, data_iter)
  if runner is None:
    saved = target
  else:
    saved, runner.state = target
  state = run.step.restored(saved, state)
  for note in notes:  # a corrupt step, and the step used instead
    _say(note)
  if start is not None:
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
  weights = transfer.weights(s.loss)  # traced: a new value, same program
  health = step_lib.Health.init()
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
  position = start, data_iter.get_state()
  stop = preemption.Signals(run.mesh)
  stop.install()
  try:
    for step in range(start, end):
      position = step, data_iter.get_state()  # where step `step` reads
      batch = step_lib.put_batch(next(data_iter), run.mesh)
      if runner is not None:
        batch = runner(state, teacher_state, batch)
      state, m, health = train_fn(state, batch, teacher_state, health, weights)
      done = step + 1
      bar.update(1)
      # A stop is a boundary: the step is checked, logged and saved.
      stopping = stop.poll()
      boundary = (
          stopping
          or done % s.log_every == 0
          or done == end
          or (s.ckpt.every_steps and done % s.ckpt.every_steps == 0)
          or (every_eval and done % every_eval == 0)
      )
      if not boundary:
        continue
      _check_finite(health, run, ckpts)
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
      with stop.deferred():
        _save(
            ckpts,
            done,
            _saved(run, state, runner),
            data_iter,
            force=done == end or stopping,
        )
      if stopping and done < end:
        raise _StopRequested
    ckpts.wait()  # the last step is committed before anything else is written
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
  except checkpoint.SaveFailed as e:
    raise TrainingError(str(e)) from e
  except KeyboardInterrupt as e:
    bar.close()
    stopped = done
    if isinstance(e, preemption.Abandoned) and runner is None:
      stopped = _save_abandoned(
          ckpts, run, state, data_iter, position, health, done
      )
    ckpts.close()  # waits for a checkpoint being written to commit
    kept = ckpts.latest_step()
    where = (
        f"the checkpoint of step {kept} in {run.workdir}/ckpt is kept "
        "(the steps after it are recomputed identically)"
        if kept is not None
        else "no checkpoint had been written yet"
    )
    # No signal here: another process received one (most likely SIGTERM).
    raise Interrupted(
        f"interrupted at step {stopped}; {where}",
        stop.signum or signal.SIGTERM,
    ) from None
  finally:
    stop.restore()
    bar.close()
    _close_all(ckpts.close, writer.close, failing=sys.exc_info()[1] is not None)
  return last


def _close_all(*closers, failing: bool) -> None:
  """Calls every closer, then raises the first failure.

  While the run is already failing, a closer's failure is logged instead:
  a full disk that stopped a save fails the TensorBoard flush too, and the
  sentence naming the checkpoint kept must stay the error.
  """
  first = None
  for close in closers:
    try:
      close()
    except Exception as e:  # pylint: disable=broad-except
      if failing:
        logging.warning("%s also failed: %s", close.__qualname__, e)
      elif first is None:
        first = e
  if first is not None:
    raise first


def _saved(
    run: builder.Run, state: TrainState, runner: runner_lib.Runner | None
) -> Any:
  """What a checkpoint holds: the train state without a frozen LoRA base
  (:meth:`~kdjax.training.step.Step.saved`), with the on-policy state."""
  saved = run.step.saved(state)
  return saved if runner is None else (saved, runner.state)


def _save_abandoned(
    ckpts: checkpoint.Checkpoints,
    run: builder.Run,
    state: TrainState,
    data_iter: grain.DatasetIterator,
    position: tuple[int, Any],
    health: step_lib.Health,
    done: int,
) -> int:
  """Saves the newest whole state after a second stop signal; its step.

  The step in flight when the signal came may have consumed (donated) the
  state: then nothing newer than the last checkpoint exists. The step number
  is read from the state itself, which the interrupted bookkeeping may not
  have counted yet; if the step in flight had taken its batch, the data
  iterator goes back to ``position`` (``(step, iterator state)`` before that
  batch). Not on several processes (a save is collective and the others
  may not have stopped) nor on on-policy runs (the sequence source may
  have moved on): they keep the last checkpoint.
  """
  leaves = jax.tree.leaves(state)
  if jax.process_count() > 1 or any(x.is_deleted() for x in leaves):
    return done
  step = int(state.step)
  if step == ckpts.latest_step():
    return step
  if step == position[0]:
    data_iter.set_state(position[1])
  _check_finite(health, run, ckpts)
  _save(ckpts, step, run.step.saved(state), data_iter, force=True)
  return step


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
    with _export_errors(key, target, ckpts):
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


@contextlib.contextmanager
def _export_errors(
    key: str, target: str, ckpts: checkpoint.Checkpoints
) -> Iterator[None]:
  """One sentence when the storage refuses an export.

  The export is unfinished without its ``config.json``, which
  :func:`kdjax.models.save_hf` writes last; the checkpoint it came from is
  kept, so re-running the same command writes it again.
  """
  try:
    yield
  except OSError as e:
    fix = fs.refused_fix(e)
    raise TrainingError(
        f"exporting the {key} student to {target} failed "
        f"({e.strerror or e}); the step-{ckpts.latest_step()} checkpoint in "
        f"{ckpts.latest.directory} is kept; {fix} and re-run the same "
        "command to write the export."
    ) from e


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
  """A checkpoint of ``step`` (at the cadence, or when ``force``).

  ``state`` is the train state, paired with the on-policy strategy's state
  (:class:`kdjax.onpolicy.strategy.State`) on on-policy runs. Orbax writes
  into a temporary directory and renames it on commit, so a failed save
  (:class:`kdjax.checkpoint.SaveFailed`) leaves the previous checkpoint as
  the latest.
  """
  ckpts.save(step, state, data_iter, {"step": step}, force=force)


def _check_finite(
    health: step_lib.Health, run: builder.Run, ckpts: checkpoint.Checkpoints
) -> None:
  """Stops the run (one sentence) if ``health`` says it must."""
  h = jax.device_get(health)
  if h.first_bad < 0:
    return
  good = ckpts.latest_step()
  kept = (
      f"the last good checkpoint (step {good}) is kept in {run.workdir}/ckpt"
      if good is not None
      else "no checkpoint had been written yet"
  )
  what = "loss" if h.loss_bad else "gradient norm"
  step = int(h.first_bad) + 1
  if run.spec.on_nonfinite == "skip":
    raise TrainingError(
        f"{run.spec.max_skips} updates in a row were skipped up to step "
        f"{step}, whose {what} was not finite ({int(h.skipped)} skipped in "
        f"all); {kept}. Lower optim.lr, check the data, or raise max_skips."
    )
  raise TrainingError(
      f"the {what} became non-finite at step {step}; {kept}. Lower optim.lr, "
      "check the data, use a float32 teacher, or pass "
      "--config.on_nonfinite=skip to drop such updates."
  )
