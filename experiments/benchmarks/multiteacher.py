"""What each added teacher costs: the objective's gradient with 1, 2 and 4 teachers.

    python -m experiments.benchmarks.multiteacher            # 4x128, V=16384
    python -m experiments.benchmarks.multiteacher --quick    # tiny

Compiles the gradient (with respect to the student) of the objective's CE and
KD sums (:func:`kdjax.objective.sums`, FKL) on one-block GPT-2 models whose
cost is all in the ``[B, T, V]`` logits, with one teacher and with
:class:`kdjax.models.teacher.Teachers` of 2 and 4 mixed per token
(``teacher.combine``), and reports XLA's temporaries in units of one
``[B, T, V]`` float32 array and the median wall time after compilation.
Writes JSON to experiments/benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform

from flax import nnx
import jax
import jax.numpy as jnp

from experiments import benchmarks
from kdjax import models, objective
from kdjax.models import teacher as teacher_lib

RESULTS = os.path.join(os.path.dirname(__file__), "results")
LOSS = dict(
    name="fkl",
    kd_ratio=0.5,
    impl="auto",
    chunk_size=1024,
    temperature=1.0,
    hp={},
    select=dict(fraction=1.0, by="student_entropy"),
    features=dict(weight=0.0),
    attention=dict(weight=0.0),
)


def _model(seed: int, vocab: int) -> nnx.Module:
  model = models.create(
      "tiny-gpt2",
      rngs=nnx.Rngs(seed),
      vocab_size=vocab,
      n_embd=32,
      n_layer=1,
      n_head=2,
  )
  model.eval()
  return model


def _case(student, teacher, batch, repeats: int) -> dict:
  graph_s, params, rest = nnx.split(student, nnx.Param, ...)
  graph_t, state_t = nnx.split(teacher)

  def loss(params, state_t, batch):
    s = nnx.merge(graph_s, params, rest)
    t = nnx.merge(graph_t, state_t)
    sums = objective.sums(LOSS, s, t, batch)
    return sums.ce + sums.kd

  return benchmarks.compiled_case(
      jax.grad(loss), (params, state_t, batch), repeats
  )


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--length", type=int, default=128)
  p.add_argument("--vocab", type=int, default=16384)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--quick", action="store_true")
  a = p.parse_args()
  if a.quick:
    a.batch, a.length, a.vocab, a.repeats = 2, 16, 257, 1
  b, t, v = a.batch, a.length, a.vocab
  batch = dict(
      input_ids=jax.random.randint(jax.random.key(0), (b, t), 0, v),
      positions=jnp.broadcast_to(jnp.arange(t), (b, t)),
      attention_mask=jnp.ones((b, t), jnp.int32),
      labels=jax.random.randint(jax.random.key(1), (b, t), 0, v),
      loss_mask=jnp.ones((b, t), jnp.float32),
  )
  student = _model(0, v)
  unit = b * t * v * 4
  rows = []
  for k in (1, 2, 4):
    for combine in ("fixed", "confidence") if k > 1 else ("fixed",):
      members = [_model(seed, v) for seed in range(1, k + 1)]
      teacher = (
          members[0]
          if k == 1
          else teacher_lib.Teachers(members, [1.0] * k, combine)
      )
      r = _case(student, teacher, batch, a.repeats)
      row = dict(
          teachers=k,
          combine=combine,
          time_s=r["time_s"],
          temp_logit_arrays=r["temp_bytes"] / unit,
      )
      rows.append(row)
      print(
          f"{k} teacher(s) {combine:10s} {row['time_s'] * 1e3:8.2f} ms  "
          f"temporaries {row['temp_logit_arrays']:.2f} x [B, T, V] float32"
      )
  out = dict(
      backend=jax.default_backend(),
      machine=platform.machine(),
      shape=dict(batch=b, length=t, vocab=v),
      rows=rows,
  )
  if not a.quick:
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(
        RESULTS, f"multiteacher_{jax.default_backend()}_{b}x{t}x{v}.json"
    )
    with open(path, "w") as f:
      json.dump(out, f, indent=2)
    print(f"wrote {path}")


if __name__ == "__main__":
  main()
