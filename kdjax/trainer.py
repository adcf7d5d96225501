"""Knowledge-distillation training: state, the sharded jitted step, the loop.

```python
from kdjax import trainer
from kdjax.configs import akl_gpt2
summary = trainer.train_and_evaluate(akl_gpt2.get_config("tiny"), "/tmp/akl")
```

One ``jax.jit`` step per optimizer update, on a ``("data", "fsdp", "tensor")``
mesh set with ``jax.set_mesh``: the teacher (frozen, its own dtype) and the
student run on the same batch, :mod:`kdjax.objective` turns their outputs into
global masked token sums, the gradient of
``((1 - kd_ratio)·CE_sum + kd_ratio·KD_sum) / tokens`` is accumulated over
``grad_accum`` micro-batches, and optax applies clipped AdamW with a cosine
schedule. The train state is donated; its shardings never change (FSDP shards
params and optimizer state alike; the batch is split over ``data``/``fsdp``).

Around it: resume from the latest orbax checkpoint in ``workdir`` (same batches
and RNG thereafter), periodic validation (loss, plus sampled ROUGE-L through
:mod:`kdjax.evaluate`), ``metrics.jsonl`` + TensorBoard + a progress bar, a
stop on the first non-finite loss or gradient, and the final and best students
exported as Hugging Face checkpoints (``workdir/hf``, ``workdir/best_hf``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from typing import Any, NamedTuple

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from flax import traverse_util
import tqdm

from kdjax import checkpoint
from kdjax import metrics as metrics_lib
from kdjax import models
from kdjax import objective
from kdjax import sharding
from kdjax import taid as taid_lib
from kdjax.data import pipeline, sources, tokenizer as tokenizer_lib

P = jax.sharding.PartitionSpec
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16,
           "float16": jnp.float16}
# Config keys that may differ between a run and its resumption.
_RESUMABLE_KEYS = ("force_new_run", "num_steps", "num_epochs")


class TrainState(NamedTuple):
  step: jax.Array
  params: Any     # nnx.State of the student's nnx.Param variables (float32)
  rest: Any       # the student's other state: dropout RNG keys and counters
  opt_state: Any
  taid: Any = None  # taid.State of a TAID run (its schedule resumes exactly)


class TrainingError(RuntimeError):
  """A run stopped for a reason the user must act on (message says which)."""


# ----------------------------------------------------------------------------
# Set-up.


def _dtype(name: str):
  if name not in _DTYPES:
    raise ValueError(f"dtype {name!r} is unknown; use one of {sorted(_DTYPES)}.")
  return _DTYPES[name]


def maybe_initialize_distributed() -> None:
  """``jax.distributed.initialize()`` when launched as one of several processes.

  Recognised launchers: explicit ``JAX_COORDINATOR_ADDRESS`` (+
  ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``), SLURM with more than one task,
  and multi-host TPU slices (``TPU_WORKER_HOSTNAMES`` lists several hosts).
  """
  env = os.environ
  if jax.distributed.is_initialized():
    return
  if "JAX_COORDINATOR_ADDRESS" in env:
    jax.distributed.initialize(env["JAX_COORDINATOR_ADDRESS"],
                               int(env["JAX_NUM_PROCESSES"]),
                               int(env["JAX_PROCESS_ID"]))
  elif int(env.get("SLURM_NTASKS", "1")) > 1 or "," in env.get(
      "TPU_WORKER_HOSTNAMES", ""):
    jax.distributed.initialize()


def check_workdir(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Writes ``workdir/config.json``, refusing a workdir started differently.

  A restart with the same config resumes. A different config would silently
  mix two experiments, so it stops unless ``force_new_run`` is set, which
  deletes the old checkpoints and metrics first.
  """
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, "config.json")
  new = json.loads(config.to_json_best_effort())
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    changed = sorted(k for k in _flat(old).keys() | _flat(new).keys()
                     if k.split(".")[0] not in _RESUMABLE_KEYS
                     and _flat(old).get(k) != _flat(new).get(k))
    if changed and not config.force_new_run:
      raise TrainingError(
          f"workdir {workdir} holds a run with a different config (changed: "
          f"{', '.join(changed)}); use another --workdir or pass "
          "--config.force_new_run=True to delete that run and start over.")
    if changed:
      for name in ("ckpt", "best", "tb", "hf", "best_hf", "metrics.jsonl"):
        target = os.path.join(workdir, name)
        if os.path.isdir(target):
          shutil.rmtree(target)
        elif os.path.exists(target):
          os.remove(target)
  if jax.process_index() == 0:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(new, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


def _flat(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def _teacher_path(config) -> str:
  """The teacher directory, or one sentence on how to get it."""
  path = os.path.expanduser(config.teacher.path)
  if os.path.isdir(path):
    return path
  if config.teacher.hub_id:
    fix = (f"download or fine-tune it (base model: `huggingface-cli download "
           f"{config.teacher.hub_id} --local-dir DIR`, then SFT it with "
           "kdjax/configs/sft_gpt2.py:teacher) and pass --config.teacher.path=DIR")
  else:
    fix = ("train it first: python -m kdjax.train "
           "--config=kdjax/configs/sft_gpt2.py:tiny_teacher --workdir="
           f"{os.path.dirname(config.teacher.path.rstrip('/'))}")
  raise TrainingError(f"teacher checkpoint {config.teacher.path} not found; "
                      f"{fix}.")


def load_teacher(config, mesh) -> nnx.Module | None:
  """The frozen teacher in eval mode, or None for SFT (kd_ratio 0)."""
  if config.loss.kd_ratio == 0:
    return None
  teacher = models.load(_teacher_path(config),
                        dtype=_dtype(config.teacher.dtype), mesh=mesh)
  teacher.eval()
  return teacher


def make_student(config, mesh) -> nnx.Module:
  """A preset initialised from the seed, or a HF checkpoint to fine-tune."""
  overrides = dict(config.student.model_overrides)
  overrides["remat"] = config.student.remat
  dtype = _dtype(config.student.dtype)
  init = config.student.init
  if init.startswith("preset:"):
    student = models.create(
        init.removeprefix("preset:"), dtype=dtype, param_dtype=jnp.float32,
        rngs=nnx.Rngs(params=config.seed, dropout=config.seed + 1), **overrides)
    return sharding.shard_model(student, mesh)
  return models.load(init, dtype=dtype, param_dtype=jnp.float32, mesh=mesh,
                     seed=config.seed + 1, **overrides)


def _vocab(model) -> int:
  return model.head_weight().shape[0]


def make_schedule(optim, total_steps: int) -> optax.Schedule:
  """Linear warmup (if any), then cosine decay from lr to lr_min at the last step."""
  if optim.warmup_steps:
    return optax.warmup_cosine_decay_schedule(
        0.0, optim.lr, optim.warmup_steps,
        max(total_steps, optim.warmup_steps + 1), end_value=optim.lr_min)
  return optax.cosine_decay_schedule(optim.lr, max(total_steps, 1),
                                     alpha=optim.lr_min / optim.lr)


def make_optimizer(optim, total_steps: int) -> optax.GradientTransformation:
  """Global-norm clipping, then AdamW on :func:`make_schedule`.

  Weight decay applies to matrices only: biases and norm scales (1-D) are not
  decayed, the rule of the reference trainers (no decay on bias/LayerNorm).
  """
  schedule = make_schedule(optim, total_steps)
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
  return optax.chain(
      optax.clip_by_global_norm(optim.clip),
      optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                  weight_decay=optim.weight_decay, mask=decay_mask))


# ----------------------------------------------------------------------------
# The step.


def _microbatches(batch: dict, n: int) -> dict:
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
  """The jitted train and eval steps of one run (static parts held here)."""
  loss_cfg: Any
  graphdef: Any
  teacher_graphdef: Any
  tx: optax.GradientTransformation
  grad_accum: int
  num_steps: int = 0  # the run's length (TAID's schedule ramps over it)

  def _student(self, params, rest):
    return nnx.merge(self.graphdef, params, rest)

  def _teacher(self, teacher_state):
    if self.teacher_graphdef is None:
      return None
    return nnx.merge(self.teacher_graphdef, teacher_state)

  def grads(self, state: TrainState, batch: dict, teacher_state):
    """Gradient of the objective on ``batch``, its metrics and the new RNG state.

    The objective is the global token mean, so each micro-batch's sums are
    divided by the whole batch's token count and the gradients simply add up.
    """
    teacher = self._teacher(teacher_state)
    total_tokens = jnp.maximum(jnp.sum(batch["loss_mask"]), 1.0)
    kd_tokens = jnp.maximum(
        objective.kd_tokens(self.loss_cfg, batch["loss_mask"]), 1.0)

    def loss_fn(student, micro):
      s = objective.sums(self.loss_cfg, student, teacher, micro,
                         taid_t=_taid_t(state))
      return objective.micro_loss(self.loss_cfg, s, total_tokens, kd_tokens), s

    # nnx.value_and_grad (gradient w.r.t. the nnx.Param variables): dropout
    # advances the student's RNG counters, which a module merged inside
    # jax.grad may not do (TraceContextError on any dropout > 0).
    grad_fn = nnx.value_and_grad(loss_fn, has_aux=True)

    def accumulate(carry, micro):
      # params ride in the carry: nnx refuses a module built from values of
      # an outer trace (the jit's) inside the scan body.
      grads, params, rest, totals = carry
      student = self._student(params, rest)
      (_, s), g = grad_fn(student, micro)
      rest = nnx.state(student, nnx.Not(nnx.Param))
      grads = jax.tree.map(jnp.add, grads, g)
      return (grads, params, rest, jax.tree.map(jnp.add, totals, s)), None

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    none = objective.Sums(*(jnp.zeros((), jnp.float32),) * 4)
    (grads, _, rest, totals), _ = jax.lax.scan(
        accumulate, (zeros, state.params, state.rest, none),
        _microbatches(batch, self.grad_accum))
    _, m = objective.combine(self.loss_cfg, totals)
    m["grad_norm"] = optax.tree.norm(grads)
    return grads, m, rest

  def train(self, state: TrainState, batch: dict, teacher_state,
            first_bad: jax.Array):
    """One optimizer update; returns ``(state, metrics, first_bad)``.

    ``first_bad`` records the first step whose loss or gradient was not
    finite (-1: none yet), so the host can check it only now and then.
    """
    grads, m, rest = self.grads(state, batch, teacher_state)
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    finite = jnp.isfinite(m["loss"]) & jnp.isfinite(m["grad_norm"])
    first_bad = jnp.where((first_bad < 0) & ~finite, state.step, first_bad)
    schedule = state.taid
    if schedule is not None:  # TAID: the t this step used, then the next one
      m["taid_t"] = schedule.t
      schedule = taid_lib.update(schedule, m["kd"], state.step, self.num_steps,
                                 self.loss_cfg["taid"])
    state = TrainState(state.step + 1, params, rest, opt_state, schedule)
    return state, m, first_bad

  def eval(self, state: TrainState, batch: dict, teacher_state):
    """Masked token sums of the student (dropout off) on one batch."""
    student = self._student(state.params, state.rest)
    student.eval()
    return objective.sums(self.loss_cfg, student, self._teacher(teacher_state),
                          batch, taid_t=_taid_t(state))


def _taid_t(state: TrainState):
  return None if state.taid is None else state.taid.t


def _init_taid(loss_cfg):
  """TAID's schedule state for a TAID run, else None."""
  if loss_cfg["name"] != "taid" or loss_cfg["kd_ratio"] == 0:
    return None
  return taid_lib.init(loss_cfg["taid"])


def _put(batch: dict, mesh) -> dict:
  """Host batch (this process's rows) -> global arrays sharded on the batch axes."""
  return {k: jax.make_array_from_process_local_data(
      sharding.batch_sharding(mesh, np.ndim(v)), np.asarray(v))
          for k, v in batch.items() if k in _BATCH_KEYS}


_BATCH_KEYS = ("input_ids", "labels", "loss_mask", "attention_mask", "positions")


# ----------------------------------------------------------------------------
# The run.


@dataclasses.dataclass
class Run:
  """Everything a run builds before its first step (handy in notebooks)."""
  config: ml_collections.ConfigDict
  workdir: str
  mesh: jax.sharding.Mesh
  tokenizer: Any
  eos_id: int
  train_data: pipeline.TrainData
  val_source: Any
  student: nnx.Module
  teacher: nnx.Module | None
  step: Step
  state: TrainState
  num_steps: int


def _source(config, split: str):
  """``data.name`` as a source: a registered dataset or a JSONL file path."""
  data_dir = os.path.expanduser(config.data.data_dir)
  manual = os.path.expanduser(config.data.manual_dir) or None
  name = config.data.name
  if name.endswith(".jsonl"):  # one file: instruct_jsonl puts it all in "test"
    stem = os.path.splitext(os.path.basename(name))[0]
    return sources.load_source(f"instruct_jsonl/{stem}", "test", data_dir,
                               path=os.path.expanduser(name))
  return sources.load_source(name, split, data_dir, manual_dir=manual)


def _data(config, workdir, mesh):
  tok, eos_id = tokenizer_lib.load(config.data.tokenizer)
  if config.data.seqkd_teacher:
    train_src = _seqkd_source(config, workdir, tok, eos_id, mesh)
  else:
    train_src = sources.head(_source(config, config.data.train_split),
                             config.data.train_limit)
  common = dict(eos_id=eos_id, max_length=config.data.max_length,
                max_prompt_length=config.data.max_prompt_length,
                prompt_policy=config.data.prompt_policy,
                template_style=config.data.template)
  train = pipeline.train_batches(
      train_src, tok, batch_size=config.batch_size, seed=config.seed,
      num_epochs=None if config.num_steps else config.num_epochs, **common)
  return tok, eos_id, train, _source(config, config.data.val_split)


def _seqkd_source(config, workdir, tok, eos_id, mesh):
  """SeqKD: the training prompts with the teacher's responses (cached)."""
  from kdjax import evaluate  # pylint: disable=g-import-not-at-top
  out = os.path.join(workdir, "seqkd", "train.jsonl")
  if not os.path.exists(out):
    src = sources.head(_source(config, config.data.train_split),
                       config.data.train_limit)
    teacher = models.load(os.path.expanduser(config.data.seqkd_teacher),
                          dtype=_dtype(config.teacher.dtype), mesh=mesh)
    protocol = evaluate.protocol_from_config(config)._replace(
        max_new_tokens=config.data.max_length - config.data.max_prompt_length)
    rows = evaluate.generate_responses(
        teacher, tok, eos_id, src, protocol=protocol, seed=config.seed,
        batch_size=config.eval.batch_size, mesh=mesh)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out + ".tmp", "w") as f:
      for r in rows:
        f.write(json.dumps({"prompt": r["prompt"], "output": r["response"]})
                + "\n")
    os.replace(out + ".tmp", out)
  return sources.load_source("instruct_jsonl/seqkd_train", "test",
                             os.path.join(workdir, "seqkd", "tfds"), path=out)


def build(config: ml_collections.ConfigDict, workdir: str,
          mesh: jax.sharding.Mesh) -> Run:
  """Data, models, optimizer and initial state (call under ``jax.set_mesh``)."""
  objective.check(config.loss)
  if config.loss.kd_ratio > 0:
    _teacher_path(config)  # before any data download: fail in seconds
  n_batch = int(np.prod([mesh.shape[a] for a in sharding.BATCH]))
  if config.batch_size % (config.grad_accum * n_batch):
    raise ValueError(
        f"batch_size {config.batch_size} must be a multiple of grad_accum "
        f"({config.grad_accum}) x the {n_batch} data-parallel devices.")
  tok, eos_id, train, val_src = _data(config, workdir, mesh)
  num_steps = config.num_steps or train.num_steps
  teacher = load_teacher(config, mesh)
  student = make_student(config, mesh)
  if teacher is not None and _vocab(teacher) != _vocab(student) and (
      config.loss.name != "uld"):
    raise ValueError(
        f"teacher vocabulary {_vocab(teacher)} != student vocabulary "
        f"{_vocab(student)}; distil between models sharing a tokenizer or use "
        "--config.loss.name=uld.")
  tx = make_optimizer(config.optim, num_steps)
  graphdef, params, rest = nnx.split(student, nnx.Param, ...)
  opt_shardings = jax.tree.map(lambda x: x.sharding,
                               _abstract_opt_state(tx, params, mesh))
  opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
  state = TrainState(jnp.zeros((), jnp.int32), params, rest, opt_state,
                     _init_taid(config.loss))
  teacher_graphdef = None if teacher is None else nnx.graphdef(teacher)
  step = Step(config.loss.to_dict(), graphdef, teacher_graphdef, tx,
              config.grad_accum, num_steps)
  return Run(config, workdir, mesh, tok, eos_id, train, val_src, student,
             teacher, step, state, num_steps)


def _validate(run: Run, state: TrainState, teacher_state, eval_fn) -> dict:
  """Validation loss over ``eval.val_batches`` batches, + ROUGE-L if enabled."""
  c = run.config
  batches = pipeline.eval_batches(
      run.val_source, run.tokenizer, eos_id=run.eos_id,
      batch_size=c.eval.batch_size // jax.process_count(),
      max_length=c.data.max_length, max_prompt_length=c.data.max_prompt_length,
      prompt_policy=c.data.prompt_policy, template_style=c.data.template)
  n = len(batches) if c.eval.val_batches <= 0 else min(c.eval.val_batches,
                                                       len(batches))
  totals = objective.Sums(0.0, 0.0, 0.0, 0.0)
  for i in range(n):
    s = eval_fn(state, _put(batches[i], run.mesh), teacher_state)
    totals = jax.tree.map(lambda a, b: a + float(b), totals, s)
  _, m = objective.combine(c.loss, objective.Sums(*map(jnp.asarray, totals)))
  out = {f"val_{k}": float(v) for k, v in m.items() if k != "tokens"}
  if c.eval.num_examples > 0:
    out.update(_sampled_scores(run, state))
  return out


def _sampled_scores(run: Run, state: TrainState) -> dict:
  from kdjax import evaluate  # pylint: disable=g-import-not-at-top
  c = run.config
  student = nnx.merge(run.step.graphdef, state.params, state.rest)
  protocol = evaluate.protocol_from_config(c)
  result = evaluate.evaluate(student, run.tokenizer, run.eos_id, run.val_source,
                             protocol=protocol, seeds=(c.seed,),
                             limit=c.eval.num_examples,
                             batch_size=c.eval.batch_size, mesh=run.mesh,
                             progress=False)
  return {f"val_{k}": float(v) for k, v in result.metrics.items()
          if isinstance(v, (int, float)) and not k.startswith("seed")}


def _export(run: Run, state: TrainState, ckpts: checkpoint.Checkpoints) -> None:
  """Process 0 writes the HF students; every process joins the collectives.

  Params sharded over devices of several processes reach the host only
  through ``process_allgather``, and orbax restores are collective too.
  """
  if not run.config.export_hf:
    return
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  best = ckpts.restore_best(state.params)
  for name, params in (("hf", state.params),
                       ("best_hf", None if best is None else best[1])):
    if params is None:
      continue
    if jax.process_count() > 1:  # one process: save_hf fetches tensor by tensor
      params = multihost_utils.process_allgather(params, tiled=True)
    if jax.process_index() == 0:
      student = nnx.merge(run.step.graphdef, params, state.rest)
      models.save_hf(student, os.path.join(run.workdir, name))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       stop_at: int | None = None,
                       devices=None) -> dict[str, float]:
  """Trains (or resumes) the run ``config`` in ``workdir``; returns its last metrics.

  Args:
    config: an experiment config (``kdjax/configs/*.py:get_config(arg)``).
    workdir: run directory; a checkpoint there is resumed.
    stop_at: stop after this step with a checkpoint, as a preemption would;
      calling again continues the same run (notebooks training in pieces).
    devices: devices for the mesh (default: all).
  """
  maybe_initialize_distributed()
  workdir = os.path.expanduser(workdir)
  fresh = not os.path.exists(os.path.join(workdir, "config.json"))
  check_workdir(config, workdir)
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp,
                            devices=devices)
  with jax.set_mesh(mesh):
    try:
      run = build(config, workdir, mesh)
    except Exception:
      # Nothing ran: a corrected config must not be refused as "different".
      if fresh and jax.process_index() == 0:
        os.remove(os.path.join(workdir, "config.json"))
      raise
    return _loop(run, stop_at)


def _loop(run: Run, stop_at: int | None = None) -> dict[str, float]:
  c = run.config
  writer = metrics_lib.Writer(run.workdir, enabled=jax.process_index() == 0)
  ckpts = checkpoint.Checkpoints(run.workdir, every_steps=c.ckpt.every_steps,
                                 max_to_keep=c.ckpt.max_to_keep)
  data_iter = run.train_data.iterator()
  state = run.state
  start = ckpts.latest_step()
  if start is not None:
    state, _ = ckpts.restore(start, state, data_iter)
    if jax.process_index() == 0:
      tqdm.tqdm.write(f"resumed {run.workdir} from step {start}")
  start = start or 0
  # Rows past the checkpoint (or any row, if none was committed before a kill)
  # are rewritten by this run.
  writer.truncate(after_step=start)
  shardings = jax.tree.map(lambda x: x.sharding, state)
  teacher_state = None if run.teacher is None else nnx.state(run.teacher)
  train_fn = jax.jit(run.step.train, donate_argnums=(0, 3),
                     out_shardings=(shardings, None, None))
  eval_fn = jax.jit(run.step.eval)
  first_bad = jnp.asarray(-1, jnp.int32)
  schedule = make_schedule(c.optim, run.num_steps)
  last: dict[str, float] = {}
  tokens_per_step = c.batch_size * c.data.max_length
  bar = tqdm.tqdm(total=run.num_steps, initial=start, desc="train",
                  disable=jax.process_index() != 0, dynamic_ncols=True)
  t0, since = time.perf_counter(), start
  every_eval = (run.train_data.steps_per_epoch if c.eval.every_steps < 0
                else c.eval.every_steps)
  try:
    end = run.num_steps if stop_at is None else min(stop_at, run.num_steps)
    for step in range(start, end):
      batch = _put(next(data_iter), run.mesh)
      state, m, first_bad = train_fn(state, batch, teacher_state, first_bad)
      done = step + 1
      bar.update(1)
      boundary = (done % c.log_every == 0 or done == end
                  or (c.ckpt.every_steps and done % c.ckpt.every_steps == 0)
                  or (every_eval and done % every_eval == 0))
      if not boundary:
        continue
      _check_finite(int(first_bad), run.workdir, ckpts)
      dt = time.perf_counter() - t0
      last = {k: float(v) for k, v in m.items()}
      last.update(lr=float(schedule(done - 1)), step_time=dt / max(done - since, 1),
                  tokens_per_s=tokens_per_step * (done - since) / max(dt, 1e-9))
      t0, since = time.perf_counter(), done
      if every_eval and (done % every_eval == 0 or done == run.num_steps):
        val = _validate(run, state, teacher_state, eval_fn)
        last.update(val)
        score = val.get("val_rougeL", -val["val_loss"])
        ckpts.save_best(done, state.params, score)
      writer.write(done, last)
      bar.set_postfix(loss=f"{last['loss']:.4f}")
      _save(ckpts, done, state, data_iter, force=done == end)
    if end == run.num_steps:
      _export(run, state, ckpts)
  finally:
    bar.close()
    ckpts.close()
    writer.close()
  return last


def _save(ckpts: checkpoint.Checkpoints, step: int, state, data_iter, *,
          force: bool) -> None:
  """A checkpoint, or one sentence when the disk (or bucket) refuses it.

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
        "resume.") from e


def _check_finite(first_bad: int, workdir: str,
                  ckpts: checkpoint.Checkpoints) -> None:
  if first_bad < 0:
    return
  good = ckpts.latest_step()
  kept = (f"the last good checkpoint (step {good}) is kept in {workdir}/ckpt"
          if good is not None else "no checkpoint had been written yet")
  raise TrainingError(
      f"loss or gradient became non-finite at step {first_bad + 1}; {kept}. "
      "Lower optim.lr, check the data, or use a float32 teacher.")


# ----------------------------------------------------------------------------
# Ahead-of-time: the step on abstract arguments (memory and FLOP estimates).


def _abstract_state(model: nnx.Module, mesh, *filters):
  """``nnx.split(model, *filters)`` with ``ShapeDtypeStruct`` leaves on ``mesh``."""
  shardings = sharding.state_shardings(model, mesh)
  graphdef, *states = nnx.split(model, *filters)
  for state in states:
    flat = traverse_util.flatten_dict(nnx.to_pure_dict(state))
    nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict({
        p: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=shardings[p])
        for p, v in flat.items()}))
  return graphdef, *states


def _abstract_opt_state(tx, params, mesh):
  """``tx.init(params)`` as ``ShapeDtypeStruct`` leaves with their shardings.

  A per-parameter buffer (Adam's ``mu``, ``nu``) is sharded like its parameter,
  found by path suffix and shape; the rest (step counts) is replicated. Left
  to sharding propagation, ``jax.jit(tx.init)`` replicates every buffer (zeros
  do not depend on the sharded input), so FSDP would not shard the optimizer.
  """
  keystr = jax.tree_util.keystr
  by_path = {keystr(p): x for p, x in
             jax.tree_util.tree_flatten_with_path(params)[0]}
  replicated = jax.sharding.NamedSharding(mesh, P())

  def place(path, leaf):
    for i in range(len(path)):
      param = by_path.get(keystr(path[i:]))
      if param is not None and param.shape == leaf.shape:
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype,
                                    sharding=param.sharding)
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=replicated)
  return jax.tree_util.tree_map_with_path(place, jax.eval_shape(tx.init,
                                                                params))


def abstract_run(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                 *, student_preset: str, teacher_preset: str | None,
                 teacher_overrides: dict | None = None,
                 num_steps: int = 1000) -> tuple[Step, tuple]:
  """``(step, args)`` such that ``jax.jit(step.train).lower(*args)`` is the run's step.

  Nothing is loaded or allocated: the student and teacher are the
  ``kdjax.models`` presets standing in for ``config``'s checkpoints (built
  with ``nnx.eval_shape``), ``args = (state, batch, teacher_state, first_bad)``
  are ``ShapeDtypeStruct`` trees carrying the shardings :func:`build` gives
  the live arrays, and the batch is ``config.batch_size`` x
  ``config.data.max_length``. ``teacher_overrides`` replace teacher config
  fields (the student's come from ``config``). Call under ``jax.set_mesh(mesh)``.
  """
  overrides = dict(config.student.model_overrides, remat=config.student.remat)
  student = nnx.eval_shape(lambda: models.create(
      student_preset, dtype=_dtype(config.student.dtype),
      param_dtype=jnp.float32, rngs=nnx.Rngs(params=0, dropout=1),
      **overrides))
  graphdef, params, rest = _abstract_state(student, mesh, nnx.Param, ...)
  tx = make_optimizer(config.optim, num_steps)
  opt_state = _abstract_opt_state(tx, params, mesh)
  replicated = jax.sharding.NamedSharding(mesh, P())
  schedule = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
      _init_taid(config.loss))
  state = TrainState(jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated),
                     params, rest, opt_state, schedule)
  teacher_graphdef = teacher_state = None
  if teacher_preset is not None and config.loss.kd_ratio > 0:
    dtype = _dtype(config.teacher.dtype)
    teacher = nnx.eval_shape(lambda: models.create(
        teacher_preset, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0),
        **(teacher_overrides or {})))
    teacher.eval()  # as load_teacher: frozen, dropout off
    teacher_graphdef, teacher_state = _abstract_state(teacher, mesh, ...)
  shape = (config.batch_size, config.data.max_length)
  batch = {k: jax.ShapeDtypeStruct(
      shape, jnp.float32 if k == "loss_mask" else jnp.int32,
      sharding=sharding.batch_sharding(mesh)) for k in _BATCH_KEYS}
  step = Step(config.loss.to_dict(), graphdef, teacher_graphdef, tx,
              config.grad_accum, num_steps)
  first_bad = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)
  return step, (state, batch, teacher_state, first_bad)
