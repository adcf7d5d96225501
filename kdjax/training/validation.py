"""Periodic validation: the objective on the validation split, + sampled scores.

The loss is the same global token mean as training's (dropout off), over the
first ``eval.val_batches`` batches (all when <= 0). A run that reads a teacher
cache has no teacher on the validation split (the cache covers the training
split only): its ``val_loss`` is the student's CE, and no ``val_kd`` is logged.
With ``eval.num_examples`` > 0, the student also answers that many validation
prompts under the evaluation protocol and is scored (ROUGE-L, exact match,
validity).
"""

from __future__ import annotations

from typing import Callable

from flax import nnx
import jax
import jax.numpy as jnp

from kdjax import evaluation, objective
from kdjax.data import pipeline
from kdjax.training import step as step_lib
from kdjax.training.builder import Run
from kdjax.training.step import TrainState

EvalFn = Callable[
    [TrainState, step_lib.Batch, nnx.State | None], objective.Sums
]


def validate(
    run: Run,
    state: TrainState,
    teacher_state: nnx.State | None,
    eval_fn: EvalFn,
) -> dict[str, float]:
  """``val_<metric>`` of ``state``: loss, ce, kd (+ sampled scores if enabled)."""
  s = run.spec
  batches = pipeline.eval_batches(
      run.val_source,
      run.tokenizer,
      batch_size=s.eval.batch_size // jax.process_count(),
      row_fields=run.row_fields,
      **s.data.row_settings(run.eos_id),
  )
  n = (
      len(batches)
      if s.eval.val_batches <= 0
      else min(s.eval.val_batches, len(batches))
  )
  totals = objective.zero_sums(s.loss)
  for i in range(n):
    sums = eval_fn(
        state, step_lib.put_batch(batches[i], run.mesh), teacher_state
    )
    totals = jax.tree.map(lambda a, b: a + float(b), totals, sums)
  cached = s.teacher.cached and s.loss["kd_ratio"] > 0
  loss_cfg = dict(s.loss, kd_ratio=0.0) if cached else s.loss
  _, m = objective.combine(loss_cfg, jax.tree.map(jnp.asarray, totals))
  drop = ("tokens", "kd") if cached else ("tokens",)
  out = {f"val_{k}": float(v) for k, v in m.items() if k not in drop}
  if s.eval.num_examples > 0:
    out.update(sampled_scores(run, state))
  return out


def sampled_scores(run: Run, state: TrainState) -> dict[str, float]:
  """``val_rougeL`` etc. of the student's responses to the first
  ``eval.num_examples`` validation prompts (the config's first seed)."""
  s = run.spec
  student = nnx.merge(run.step.graphdef, state.params, state.rest)
  result = evaluation.evaluate(
      student,
      run.tokenizer,
      run.eos_id,
      run.val_source,
      protocol=s.eval.protocol,
      seeds=(s.seed,),
      limit=s.eval.num_examples,
      batch_size=s.eval.batch_size,
      mesh=run.mesh,
      progress=False,
  )
  return {
      f"val_{k}": float(v)
      for k, v in result.metrics.items()
      if isinstance(v, (int, float)) and not k.startswith("seed")
  }
