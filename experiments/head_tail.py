"""Early in training FKL fits the head and RKL the tail (AKL paper, Section 3).

A learnable logit vector q is fitted to a long-tailed (Zipf) teacher under FKL, RKL
and AKL from the same initial q with plain full-batch SGD (one step per epoch; SGD
keeps the gradients' shape, which Adam's per-coordinate scaling would flatten).
Head = top classes with cumulative teacher mass ≤ 0.5; error = Σ|p − q| over the
head and over the tail. The claim depends on the regime, so four settings are run:
vocabulary V ∈ {50, 500} × initial logit scale ∈ {1, 3} (a larger scale puts more
student mass on classes the teacher finds rare, as a fresh LLM student does).
Figure: head and tail error curves per method for V=500/scale 3 and V=50/scale 1.

    python -m experiments.head_tail [--quick] [--epochs 100] [--out DIR]
"""

from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # `python experiments/head_tail.py`
  sys.path.insert(
      0, os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  )

from experiments import toy

METHODS = ("fkl", "rkl", "akl")
SETTINGS = ((500, 3.0), (500, 1.0), (50, 3.0), (50, 1.0))  # (vocab, init scale)
EPOCHS, QUICK_EPOCHS = 100, 30
LEARNING_RATE = 5.0  # SGD
REPORT_EPOCHS = (1, 3, 10)


def run(
    settings=SETTINGS,
    epochs: int = EPOCHS,
    seed: int = 0,
    methods=METHODS,
    shape: str = "long_tailed",
    learning_rate: float = LEARNING_RATE,
) -> dict:
  """Returns ``{(vocab, scale, method): {"head": [E+1], "tail": [E+1], "kl": [E+1]}}``."""
  tx = toy.optimizer("sgd", learning_rate)
  curves = {}
  for vocab, scale in settings:
    teacher = toy.teacher_logits(shape, vocab, seed)
    p = toy.probs(teacher)
    init = toy.student_logits(vocab, seed + 1, scale)
    for method in methods:
      q = toy.probs(toy.fit(method, init, teacher, epochs, tx))
      head, tail = toy.head_tail_errors(p, q)
      curves[vocab, scale, method] = dict(head=head, tail=tail, kl=toy.kl(p, q))
  return curves


def claim_at(
    curves: dict, vocab: int, scale: float, epoch: int
) -> tuple[bool, bool]:
  """(FKL head error < RKL head error, RKL tail error < FKL tail error) at ``epoch``."""
  fkl, rkl = curves[vocab, scale, "fkl"], curves[vocab, scale, "rkl"]
  return (
      bool(fkl["head"][epoch] < rkl["head"][epoch]),
      bool(rkl["tail"][epoch] < fkl["tail"][epoch]),
  )


def table(curves: dict, epochs=REPORT_EPOCHS) -> str:
  rows = []
  for (vocab, scale, method), c in curves.items():
    row = [vocab, scale, method.upper()]
    for e in epochs:
      row += [float(c["head"][e]), float(c["tail"][e])]
    rows.append(row)
  header = ["V", "scale", "method"]
  for e in epochs:
    header += [f"head@{e}", f"tail@{e}"]
  return toy.format_table(header, rows)


def claims_table(curves: dict, settings, epochs=REPORT_EPOCHS) -> str:
  rows = []
  for vocab, scale in settings:
    for e in epochs:
      head_ok, tail_ok = claim_at(curves, vocab, scale, e)
      rows.append(
          [
              vocab,
              scale,
              e,
              "yes" if head_ok else "NO",
              "yes" if tail_ok else "NO",
          ]
      )
  return toy.format_table(
      ["V", "scale", "epoch", "FKL head < RKL head", "RKL tail < FKL tail"],
      rows,
  )


def figure(curves: dict, settings, out_dir: str | None) -> str:
  plt = toy.pyplot()
  shown = [s for s in ((500, 3.0), (50, 1.0)) if s in settings] or list(
      settings
  )[:1]
  fig, axes = plt.subplots(
      1, len(shown), figsize=(5 * len(shown), 3.2), squeeze=False
  )
  for ax, (vocab, scale) in zip(axes[0], shown):
    lines = {}
    for (v, s, method), c in curves.items():
      if (v, s) == (vocab, scale):
        lines[f"{method} head"] = c["head"]
        lines[f"{method} tail"] = c["tail"]
    toy.plot_curves(
        ax,
        lines,
        f"long-tailed teacher, V={vocab}, init scale {scale}",
        "Σ|p − q| (solid head, dashed tail)",
    )
  axes[0, 0].legend(fontsize=7, ncol=3)
  fig.tight_layout()
  return toy.save_figure(fig, out_dir, "head_tail")


def main(argv=None) -> dict:
  args = toy.parser(__doc__.splitlines()[0], EPOCHS).parse_args(argv)
  epochs = args.epochs or (QUICK_EPOCHS if args.quick else EPOCHS)
  curves = run(epochs=epochs, seed=args.seed)
  report = tuple(e for e in REPORT_EPOCHS if e <= epochs)
  print(
      f"head/tail errors, long-tailed teacher, SGD lr={LEARNING_RATE}, same initial q"
  )
  print(table(curves, report))
  print()
  print(claims_table(curves, SETTINGS, report))
  print("figure:", figure(curves, SETTINGS, args.out))
  return curves


if __name__ == "__main__":
  main()
