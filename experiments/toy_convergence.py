"""FKL, RKL and AKL share their optimum on discrete distributions (AKL paper, Figure 2).

A learnable logit vector q over V classes is fitted to a fixed teacher p (peaked,
long-tailed, multi-modal) under each divergence, all from the same initial q, one
full-batch Adam step per epoch. Printed per teacher and method: KL(p‖q), the head
error and the tail error (head = top classes with cumulative teacher mass ≤ 0.5)
after epoch 1 and after the last epoch. Figure: p vs q per teacher and epoch.

    python -m experiments.toy_convergence [--quick] [--epochs 200] [--out DIR]
"""

from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # `python experiments/toy_convergence.py`
  sys.path.insert(
      0, os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  )

from experiments import toy

METHODS = ("fkl", "rkl", "akl")
VOCAB, QUICK_VOCAB = 50, 32
EPOCHS = 200
LEARNING_RATE = 0.1  # Adam


def run(
    vocab: int = VOCAB,
    epochs: int = EPOCHS,
    seed: int = 0,
    shapes=toy.TEACHER_SHAPES,
    methods=METHODS,
    learning_rate: float = LEARNING_RATE,
) -> dict:
  """Fits every (teacher shape, method); returns ``{(shape, method): record}``.

  A record holds ``p`` and ``q`` (all epochs, float64) and the measures at epoch 1
  and ``epochs``: ``kl_1, kl_last, head_1, tail_1, head_last, tail_last``.
  """
  tx = toy.optimizer("adam", learning_rate)
  init = toy.student_logits(vocab, seed + 1)
  results = {}
  for shape in shapes:
    teacher = toy.teacher_logits(shape, vocab, seed)
    p = toy.probs(teacher)
    for method in methods:
      q = toy.probs(toy.fit(method, init, teacher, epochs, tx))
      head, tail = toy.head_tail_errors(p, q)
      kls = toy.kl(p, q)
      results[shape, method] = dict(
          p=p,
          q=q,
          kl_1=float(kls[1]),
          kl_last=float(kls[-1]),
          head_1=float(head[1]),
          tail_1=float(tail[1]),
          head_last=float(head[-1]),
          tail_last=float(tail[-1]),
      )
  return results


def table(results: dict, epochs: int) -> str:
  rows = [
      (
          shape,
          method.upper(),
          r["kl_1"],
          r["head_1"],
          r["tail_1"],
          r["kl_last"],
          r["head_last"],
          r["tail_last"],
      )
      for (shape, method), r in results.items()
  ]
  e = str(epochs)
  return toy.format_table(
      [
          "teacher",
          "method",
          "KL@1",
          "head@1",
          "tail@1",
          f"KL@{e}",
          f"head@{e}",
          f"tail@{e}",
      ],
      rows,
  )


def figure(results: dict, epochs: int, out_dir: str | None) -> str:
  plt = toy.pyplot()
  shapes = sorted({s for s, _ in results}, key=toy.TEACHER_SHAPES.index)
  fig, axes = plt.subplots(
      len(shapes), 2, figsize=(9, 2.2 * len(shapes)), squeeze=False
  )
  for row, shape in enumerate(shapes):
    recs = {m: r for (s, m), r in results.items() if s == shape}
    p = next(iter(recs.values()))["p"]
    for col, epoch in enumerate((1, epochs)):
      toy.plot_bars(
          axes[row, col],
          p,
          {m: r["q"][epoch] for m, r in recs.items()},
          f"{shape}, epoch {epoch}",
      )
  axes[0, 0].legend(fontsize=7, ncol=4)
  fig.tight_layout()
  return toy.save_figure(fig, out_dir, "toy_convergence")


def main(argv=None) -> dict:
  args = toy.parser(__doc__.splitlines()[0], EPOCHS).parse_args(argv)
  vocab = QUICK_VOCAB if args.quick else VOCAB
  epochs = args.epochs or EPOCHS
  results = run(vocab=vocab, epochs=epochs, seed=args.seed)
  print(
      f"toy convergence: V={vocab}, Adam lr={LEARNING_RATE}, same initial q, "
      f"errors = Σ|p − q| over head / tail"
  )
  print(table(results, epochs))
  print("figure:", figure(results, epochs, args.out))
  return results


if __name__ == "__main__":
  main()
