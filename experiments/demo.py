r"""``make demo``: distillation end to end on the embedded benchmark, on a CPU.

    python -m experiments.demo                    # students + scoring, < 10 min
    python -m experiments.demo --retrain-teacher  # + the teacher (~10 min more)

Stage 1 loads the tiny teacher shipped in ``experiments/assets/tiny_teacher``
(``configs/sft_gpt2.py:tiny_teacher``: 516k parameters, 1,500 steps of
32 on the 24,000 ``synthetic_instruct`` training examples); with
``--retrain-teacher`` it trains it again in ``<root>/teacher`` and replaces the
shipped files with the new ones. Stage 2 trains the 5.6x smaller student
(92k parameters) on the same 24,000 examples and budget four ways -- SFT,
FKL, RKL and AKL (``configs/<method>_gpt2.py:tiny``, 300 steps of 16).
Stage 3 scores the teacher and the students on the 500 test examples with the
papers' protocol (sampled at temperature 1, seeds 10-50; greedy validity
beside it), prints the table (± over the sampling seeds) and the three claims
for this one training seed, and draws the training and validation curves into
``experiments/figures/tiny_demo.png``. ``experiments/run_table.py`` is the same
with every method and three training seeds (:mod:`experiments.table`).
"""

from __future__ import annotations

import json
import os
import shutil
import time

from absl import app, flags, logging
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

from experiments.table import report, runs, scoring
from experiments.table.methods import config_for
from kdjax import metrics, training
from kdjax.config import files as config_files
from kdjax.config import recipe

sft_gpt2 = config_files.experiment("sft_gpt2")

STUDENTS = ("sft", "fkl", "rkl", "akl")
SEED = 10
FIGURE = os.path.join(os.path.dirname(__file__), "figures", "tiny_demo.png")
# What --retrain-teacher copies from the teacher's workdir into the asset dir.
TEACHER_FILES = {
    "model.safetensors": "hf/model.safetensors",
    "config.json": "hf/config.json",
    "train_config.json": "config.json",
    "metrics.jsonl": "metrics.jsonl",
}
TEACHER_COMMAND = (
    "python -m kdjax.train "
    "--config=configs/sft_gpt2.py:tiny_teacher "
    "--workdir=workdirs/tiny/teacher"
)

_ROOT = flags.DEFINE_string("root", recipe.TINY_ROOT, "Where the runs live.")
_LIMIT = flags.DEFINE_integer(
    "limit", 0, "Test examples scored per model " "(0: all 500)."
)
_RETRAIN = flags.DEFINE_bool(
    "retrain-teacher",
    False,
    "Train the teacher again and replace the "
    f"shipped one in {recipe.TINY_TEACHER} (its training command: "
    f"{TEACHER_COMMAND}).",
)


def retrain_teacher(root: str, asset_dir: str = recipe.TINY_TEACHER) -> str:
  """Trains ``sft_gpt2.py:tiny_teacher`` in ``<root>/teacher`` and copies its
  final export, config and metrics into ``asset_dir``."""
  workdir = os.path.join(root, "teacher")
  training.train_and_evaluate(sft_gpt2.get_config("tiny_teacher"), workdir)
  os.makedirs(asset_dir, exist_ok=True)
  for name, source in TEACHER_FILES.items():
    shutil.copyfile(
        os.path.join(workdir, source), os.path.join(asset_dir, name)
    )
  describe_teacher(asset_dir)
  return asset_dir


def describe_teacher(asset_dir: str) -> None:
  """Writes ``asset_dir/README.md``: how the files were made, what they score."""
  rows = [r for r in metrics.read(asset_dir) if "val_ce" in r]
  last = rows[-1] if rows else {}
  with open(os.path.join(asset_dir, "train_config.json")) as f:
    config = json.load(f)
  model = config["student"]["model_overrides"]
  lines = [
      "# The tiny teacher of the embedded benchmark",
      "",
      (
          "A byte-level GPT-2 "
          f"(n_embd={model['n_embd']}, n_layer={model['n_layer']}, "
          f"n_head={model['n_head']}) fine-tuned on all "
          "24,000 `synthetic_instruct` training examples "
          f"({config['num_steps']} steps of {config['batch_size']}, lr "
          f"{config['optim']['lr']}, seed {config['seed']}). Made by"
      ),
      "",
      f"    {TEACHER_COMMAND}",
      "",
      (
          "(what `python -m experiments.demo --retrain-teacher` runs before "
          "copying the final `hf/` export here)."
      ),
      "",
      "- `model.safetensors`, `config.json`: the model (`kdjax.models.load`)",
      "- `train_config.json`: the full training config",
      "- `metrics.jsonl`: the training log",
      "",
      (
          f"Last validation: CE {last.get('val_ce', float('nan')):.3f}, "
          f"greedy validity {last.get('val_validity', float('nan')):.1f} % "
          f"({int(last.get('val_num_examples', 0))} examples, step "
          f"{last.get('step', '?')})."
      ),
  ]
  with open(os.path.join(asset_dir, "README.md"), "w") as f:
    f.write("\n".join(lines) + "\n")


def teacher_stage(root: str, retrain: bool) -> str:
  if retrain:
    print("stage 1: training the tiny teacher")
    return retrain_teacher(root)
  path = recipe.TINY_TEACHER
  if not os.path.exists(os.path.join(path, "model.safetensors")):
    raise FileNotFoundError(
        f"the shipped teacher {path}/model.safetensors is missing; run from "
        "the repository root or pass --retrain-teacher."
    )
  print(f"stage 1: teacher shipped in {path} (retrain: --retrain-teacher)")
  return path


def curves(
    workdirs: dict[str, str], path: str, teacher_dir: str | None = None
) -> None:
  """Training CE (as logged) and validation CE per run, step on x; the
  teacher's final validation CE as a dashed line."""
  fig, (ax_train, ax_val) = plt.subplots(1, 2, figsize=(10, 3.6))
  for name, workdir in workdirs.items():
    rows = metrics.read(workdir)
    ax_train.plot(
        [r["step"] for r in rows], [r["ce"] for r in rows], label=name, lw=0.8
    )
    val = scoring.val_curve(workdir)
    if val:
      ax_val.plot(*zip(*val), marker="o", label=name)
  teacher_val = scoring.val_curve(teacher_dir or "")
  if teacher_val:
    ax_val.axhline(teacher_val[-1][1], ls="--", c="k", label="teacher")
  ax_train.set(
      title="training cross-entropy (response tokens)",
      xlabel="step",
      ylabel="nats / token",
  )
  ax_val.set(title="validation cross-entropy", xlabel="step")
  for ax in (ax_train, ax_val):
    ax.grid(alpha=0.3)
    ax.legend()
  fig.tight_layout()
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  t0 = time.perf_counter()
  root, limit = _ROOT.value, _LIMIT.value or None
  teacher_dir = teacher_stage(root, _RETRAIN.value)
  t1 = time.perf_counter()
  config_fn = lambda m, s: config_for(m, "tiny", s)
  for method in STUDENTS:
    workdir = os.path.join(root, runs.run_name(method, SEED))
    print(f"stage 2: student with {method.upper()}")
    runs.train(config_fn(method, SEED), workdir)
  t2 = time.perf_counter()
  print("stage 3: scoring on the test split (sampled x 5 seeds, greedy)")
  results = runs.run_all(
      STUDENTS,
      [SEED],
      root,
      config_fn=config_fn,
      limit=limit,
      log=lambda _: None,
  )
  teacher = scoring.evaluate_run(
      config_fn("sft", SEED),
      teacher_dir,
      outdir=os.path.join(root, "teacher_eval"),
      limit=limit,
  )
  curves(
      {m: os.path.join(root, runs.run_name(m, SEED)) for m in STUDENTS},
      FIGURE,
      teacher_dir,
  )
  t3 = time.perf_counter()
  dataset = config_fn("sft", SEED).eval.datasets.split(",")[0]
  print(report.report(results, dataset, teacher=teacher, spread="sampling"))
  print(f"\nfigure: {FIGURE}")
  print(
      f"time: teacher {t1 - t0:.0f} s, students {t2 - t1:.0f} s, "
      f"scoring {t3 - t2:.0f} s, total {t3 - t0:.0f} s"
  )
  with open(os.path.join(root, "demo_time.json"), "w") as f:
    json.dump(
        {
            "teacher_s": t1 - t0,
            "students_s": t2 - t1,
            "scoring_s": t3 - t2,
            "total_s": t3 - t0,
        },
        f,
    )


if __name__ == "__main__":
  app.run(main)
