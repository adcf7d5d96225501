r"""Every kdjax divergence on one small teacher/student pair (what `make demo` runs).

    python experiments/divergence_showcase.py [--out experiments/figures/divergence_showcase.png]

The teacher is a confident next-token distribution over a toy vocabulary; each
student gets one thing wrong (a missing head, a missing tail, a flattened or a
sharpened copy). The table shows how each divergence scores each mistake and
the share of the AKL loss that goes to the head; the figure shows the
distributions.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from kdjax import divergences as kd  # pylint: disable=g-import-not-at-top

VOCAB = ("the", "a", "this", "one", "my", "its", "our", "no", "every", "that")
TEACHER_P = np.array(
    [0.46, 0.22, 0.11, 0.06, 0.05, 0.04, 0.03, 0.015, 0.01, 0.005]
)


def students(p: np.ndarray) -> dict[str, np.ndarray]:
  """Student distributions, each wrong in one way."""
  uniform = np.full_like(p, 1 / p.size)
  missing_head = p.copy()
  missing_head[:2] = missing_head[:2][::-1]  # swaps the two most likely tokens
  missing_tail = np.where(np.arange(p.size) < 4, p, 1e-4)
  return {
      "exact copy": p,
      "head swapped": missing_head,
      "tail dropped": missing_tail / missing_tail.sum(),
      "flattened (T=3)": _temper(p, 3.0),
      "sharpened (T=0.4)": _temper(p, 0.4),
      "uniform": uniform,
  }


def _temper(p: np.ndarray, t: float) -> np.ndarray:
  x = np.log(p) / t
  return np.exp(x - np.logaddexp.reduce(x))


def table(p: np.ndarray) -> tuple[list[str], list[list[float]]]:
  """Rows of (divergence values..., AKL head weight) for every student."""
  # SinKD compares rows of a sequence, GOLD needs two vocabularies' matches.
  names = [n for n in kd.names() if n not in ("sinkhorn", "gold")]
  teacher = jnp.log(jnp.asarray(p, jnp.float32))
  rows = []
  for label, q in students(p).items():
    student = jnp.log(jnp.asarray(q, jnp.float32))
    values = [float(kd.get(n)(student, teacher)) for n in names]
    w_head, _ = kd.akl_weights(jnp.asarray(p), jnp.asarray(q))
    rows.append([label, *values, float(w_head)])
  return names, rows


def plot(p: np.ndarray, out: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  cases = students(p)
  fig, axes = plt.subplots(
      1, len(cases), figsize=(3 * len(cases), 2.8), sharey=True
  )
  x = np.arange(p.size)
  for ax, (label, q) in zip(axes, cases.items()):
    ax.bar(x - 0.2, p, 0.4, label="teacher p")
    ax.bar(x + 0.2, q, 0.4, label="student q")
    ax.set_title(label, fontsize=9)
    ax.set_xticks(x, VOCAB, rotation=90, fontsize=7)
  axes[0].legend(fontsize=7)
  fig.tight_layout()
  os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
  fig.savefig(out, dpi=90)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument(
      "--out", default="experiments/figures/divergence_showcase.png"
  )
  args = parser.parse_args(argv)

  print(f"devices: {jax.devices()}")
  print(
      "teacher p: "
      + ", ".join(f"{w}={v:.3f}" for w, v in zip(VOCAB, TEACHER_P))
  )
  names, rows = table(TEACHER_P)
  header = ["student"] + names + ["AKL w_head"]
  print("| " + " | ".join(header) + " |")
  print("|" + "---|" * len(header))
  for label, *values in rows:
    print(f"| {label} | " + " | ".join(f"{v:.4f}" for v in values) + " |")

  # SinKD compares whole rows: a batch of 4 positions of the pairs above.
  teacher = jnp.log(jnp.asarray(np.stack([TEACHER_P] * 4), jnp.float32))
  student = jnp.log(
      jnp.asarray(
          np.stack(list(students(TEACHER_P).values())[1:5]), jnp.float32
      )
  )
  for solver in ("ott", "sinkd", "debiased"):
    rows_cost = kd.sinkhorn(student, teacher, solver=solver)
    print(
        f"sinkhorn[{solver}] per-row cost: "
        + ", ".join(f"{float(v):.4f}" for v in rows_cost)
    )
  plot(TEACHER_P, args.out)
  print(f"figure: {args.out}")


if __name__ == "__main__":
  main()
