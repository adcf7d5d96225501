"""What entropy-based token selection saves: the objective's fwd+bwd by fraction.

    python -m experiments.benchmarks.token_selection               # 4x512, V=50257
    python -m experiments.benchmarks.token_selection --divergence akl
    python -m experiments.benchmarks.token_selection --quick       # tiny, CI

For ``loss.select.fraction`` in 1, 0.5, 0.2 it times the gradient of CE + KD
sums over ``[B, T, V]`` float32 logits, the objective's own per-device function
(``objective._local_sums``: CE on every masked token, the entropy ranking, the
KD on the kept rows), and, as the alternative it replaces, the same selection
applied as a mask to a KD computed on every row. Median wall time over repeats
after compilation, and XLA temporaries in units of one ``[B, T, V]`` float32
array. A quarter of each row is unmasked (a prompt), as in instruction data.
Writes JSON to experiments/benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform

import jax
import jax.numpy as jnp

from experiments import benchmarks
from kdjax import divergences as kd
from kdjax import objective

RESULTS = os.path.join(os.path.dirname(__file__), "results")


def objective_grad(cfg: dict, labels, mask):
  """Gradient of CE + KD sums the way the trainer's objective computes them."""

  def loss(s, t):
    sums = objective._local_sums(cfg, True, s, t, labels, mask)  # pylint: disable=protected-access
    return sums.ce + sums.kd

  return jax.grad(loss)


def masked_grad(cfg: dict, labels, mask):
  """The same objective with the KD on every row and the selection as a mask."""
  per_token = kd.get(cfg["name"], cfg["impl"])

  def loss(s, t):
    keep = objective.kd_mask(cfg, s, mask)
    kd_sum = jnp.sum(jnp.where(keep > 0, per_token(s, t), 0.0))
    return jnp.sum(objective._token_ce(s, labels) * mask) + kd_sum  # pylint: disable=protected-access

  return jax.grad(loss)


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--length", type=int, default=512)
  parser.add_argument("--vocab", type=int, default=50257)
  parser.add_argument("--divergence", default="fkl")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--quick", action="store_true")
  a = parser.parse_args(argv)
  if a.quick:
    a.batch, a.length, a.vocab, a.repeats = 2, 64, 512, 2
  b, t, v = a.batch, a.length, a.vocab
  k_s, k_t = jax.random.split(jax.random.key(0))
  student = 2.0 * jax.random.normal(k_s, (b, t, v), jnp.float32)
  teacher = (
      (2.0 * jax.random.normal(k_t, (b, t, v), jnp.float32))
      .at[..., :4]
      .add(12.0)
  )
  labels = jnp.zeros((b, t), jnp.int32)
  mask = jnp.ones((b, t), jnp.float32).at[:, : t // 4].set(0.0)
  unit = b * t * v * 4
  rows = []
  for fraction in (1.0, 0.5, 0.2):
    cfg = dict(
        name=a.divergence,
        impl="auto",
        kd_ratio=0.5,
        chunk_size=512,
        hp={},
        select=dict(fraction=fraction, by="student_entropy"),
    )
    row = {
        "fraction": fraction,
        "objective": benchmarks.compiled_case(
            objective_grad(cfg, labels, mask), (student, teacher), a.repeats
        ),
    }
    if fraction < 1.0:
      row["masked"] = benchmarks.compiled_case(
          masked_grad(cfg, labels, mask), (student, teacher), a.repeats
      )
    rows.append(row)
  base = rows[0]["objective"]["time_s"]
  print(
      f"{a.divergence}, B={b} T={t} V={v}, {jax.default_backend()}: "
      "fwd+bwd of CE + KD (x all tokens / temporaries in [B,T,V] f32)"
  )
  for row in rows:
    o = row["objective"]
    line = (
        f"  fraction {row['fraction']:<4} kept rows "
        f"{o['time_s'] * 1e3:7.0f} ms  {o['time_s'] / base:5.2f}x  "
        f"{o['temp_bytes'] / unit:4.2f}"
    )
    if "masked" in row:
      m = row["masked"]
      line += (
          f"   | as a mask {m['time_s'] * 1e3:7.0f} ms  "
          f"{m['time_s'] / base:5.2f}x  {m['temp_bytes'] / unit:4.2f}"
      )
    print(line)
  out = {
      "divergence": a.divergence,
      "shape": [b, t, v],
      "backend": jax.default_backend(),
      "machine": platform.processor(),
      "rows": rows,
  }
  if not a.quick:
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(
        RESULTS,
        f"token_selection_{jax.default_backend()}_"
        f"{a.divergence}_{b}x{t}x{v}.json",
    )
    with open(path, "w") as f:
      json.dump(out, f, indent=2)
  return out


if __name__ == "__main__":
  main()
