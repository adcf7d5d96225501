r"""``make demo``: distillation end to end on the embedded benchmark, on a CPU.

    python -m experiments.demo            # ~10 minutes on a 2-core CPU

Stage 1 fine-tunes the tiny teacher on all of ``synthetic_instruct``
(``kdjax/configs/sft_gpt2.py:tiny_teacher``; cached in ``workdirs/tiny/teacher`` and
skipped when present). Stage 2 trains the ~6x smaller student four ways on a
slice of the training set -- plain SFT, FKL, RKL and AKL
(``kdjax/configs/<method>_gpt2.py:tiny``). Stage 3 scores the teacher and the
students on the test split (greedy decoding) and prints one table, and draws
the training curves into ``experiments/figures/tiny_demo.png``.
"""

from __future__ import annotations

import os
import time

from absl import app, flags, logging
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

from kdjax.configs import common, sft_gpt2
from experiments import run_table
from kdjax import metrics, trainer

STUDENTS = ("sft", "fkl", "rkl", "akl")
FIGURE = os.path.join(os.path.dirname(__file__), "figures", "tiny_demo.png")

_ROOT = flags.DEFINE_string("root", common.TINY_ROOT, "Where the runs live.")
_LIMIT = flags.DEFINE_integer("limit", 500, "Test examples scored per model.")


def teacher_stage(root: str):
  config = sft_gpt2.get_config("tiny_teacher")
  workdir = os.path.join(root, "teacher")
  if os.path.exists(os.path.join(workdir, "hf", "config.json")):
    print(f"stage 1: teacher cached in {workdir}/hf, skipped")
  else:
    print("stage 1: fine-tuning the tiny teacher")
    trainer.train_and_evaluate(config, workdir)
  return config, workdir


def student_stage(root: str) -> dict:
  runs = {}
  for method in STUDENTS:
    print(f"stage 2: student with {method.upper()}")
    config = run_table.config_for(method, "tiny", seed=10)
    runs[method] = (config, run_table.train(
        config, os.path.join(root, run_table.run_name(method, 10))))
  return runs


def curves(runs: dict, path: str) -> None:
  """Training CE (smoothed) and validation CE per method, step on x."""
  fig, (ax_train, ax_val) = plt.subplots(1, 2, figsize=(10, 3.6))
  for name, (_, workdir) in runs.items():
    rows = metrics.read(workdir)
    steps = [r["step"] for r in rows]
    ax_train.plot(steps, [r["ce"] for r in rows], label=name)
    val = [(r["step"], r["val_ce"]) for r in rows if "val_ce" in r]
    if val:
      ax_val.plot(*zip(*val), marker="o", label=name)
  ax_train.set(title="training cross-entropy (response tokens)",
               xlabel="step", ylabel="nats / token")
  ax_val.set(title="validation cross-entropy", xlabel="step")
  for ax in (ax_train, ax_val):
    ax.grid(alpha=0.3)
    ax.legend()
  fig.tight_layout()
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fig.savefig(path, dpi=120)
  plt.close(fig)


def summary_table(scores: dict, val_ce: dict) -> str:
  lines = ["| model | val CE | test ROUGE-L | test validity % |",
           "|---|---|---|---|"]
  for name, m in scores.items():
    ce = f"{val_ce[name]:.3f}" if name in val_ce else "–"
    lines.append(f"| {name} | {ce} | {m['rougeL']:.1f} | "
                 f"{m.get('validity', float('nan')):.1f} |")
  return "\n".join(lines)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  t0 = time.perf_counter()
  root = _ROOT.value
  teacher_config, teacher_dir = teacher_stage(root)
  t1 = time.perf_counter()
  runs = student_stage(root)
  t2 = time.perf_counter()
  print("stage 3: scoring on the test split")
  dataset = "synthetic_instruct"
  scores, val_ce = {}, {}
  for name, (config, workdir) in {"teacher": (teacher_config, teacher_dir),
                                  **runs}.items():
    scores[name] = run_table.score(config, workdir, datasets=dataset,
                                   limit=_LIMIT.value)[dataset]
    rows = [r for r in metrics.read(workdir) if "val_ce" in r]
    if rows:
      val_ce[name] = rows[-1]["val_ce"]
  curves(runs, FIGURE)
  t3 = time.perf_counter()
  print(summary_table(scores, val_ce))
  print(f"\nfigure: {FIGURE}")
  print(f"time: teacher {t1 - t0:.0f} s, students {t2 - t1:.0f} s, "
        f"scoring {t3 - t2:.0f} s, total {t3 - t0:.0f} s")


if __name__ == "__main__":
  app.run(main)
