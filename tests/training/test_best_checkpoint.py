"""Which checkpoint is "best": a configurable metric that a near-untrained
student cannot win, recorded in best.json."""

import jax.numpy as jnp
import numpy as np

from kdjax import checkpoint

# A 30-step run as measured on the tiny config: sampled ROUGE-L peaked at
# step 5 (a near-untrained student) while validation CE fell steadily.
HISTORY = [
    (5, {"val_ce": 5.38, "val_rougeL": 0.52}),
    (10, {"val_ce": 4.61, "val_rougeL": 0.0}),
    (15, {"val_ce": 4.10, "val_rougeL": 0.0}),
    (20, {"val_ce": 3.80, "val_rougeL": 0.31}),
    (25, {"val_ce": 3.60, "val_rougeL": 0.35}),
    (30, {"val_ce": 3.57, "val_rougeL": 0.33}),
]


def _best(policy):
  scored = [(policy.score(step, m), step) for step, m in HISTORY]
  return max((s, step) for s, step in scored if s is not None)[1]


def test_default_is_validation_ce_lowest():
  policy = checkpoint.best_policy("val_ce", -1, num_steps=30, warmup_steps=20)
  assert policy.after_step == 0 and not policy.higher_is_better
  assert _best(policy) == 30


def test_rouge_counts_only_after_warmup():
  policy = checkpoint.best_policy(
      "val_rougeL", -1, num_steps=30, warmup_steps=20
  )
  assert policy.after_step == 20 and policy.higher_is_better
  assert _best(policy) == 25
  # Without the warm-up rule the near-untrained step 5 would win.
  assert _best(checkpoint.BestPolicy("val_rougeL", 0)) == 5
  # The automatic start is at least a quarter of the run.
  assert (
      checkpoint.best_policy(
          "val_rougeL", -1, num_steps=400, warmup_steps=20
      ).after_step
      == 100
  )


def test_non_finite_or_missing_metrics_cannot_win():
  policy = checkpoint.BestPolicy("val_ce")
  assert policy.score(3, {"val_ce": float("nan")}) is None
  assert policy.score(3, {"val_loss": 1.0}) is None


def test_save_best_records_the_winner(tmp_path):
  ckpts = checkpoint.Checkpoints(str(tmp_path), every_steps=0, max_to_keep=1)
  policy = checkpoint.BestPolicy("val_ce")
  for step, m in HISTORY[:3] + [(20, {"val_ce": 9.0})]:
    params = {"w": jnp.full((2,), float(step))}
    ckpts.save_best(
        step,
        params,
        policy.score(step, m),
        {"metric": "val_ce", "value": m["val_ce"]},
    )
  ckpts.best.wait_until_finished()
  assert ckpts.best_record() == {
      "step": 15,
      "score": -4.10,
      "metric": "val_ce",
      "value": 4.10,
  }
  step, params = ckpts.restore_best({"w": jnp.zeros((2,))})
  assert step == 15
  np.testing.assert_array_equal(params["w"], [15.0, 15.0])
  ckpts.close()
