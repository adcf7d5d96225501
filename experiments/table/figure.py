"""The method table's figure: Δ ROUGE-L against SFT and validation curves."""

from __future__ import annotations

import os

import numpy as np

from experiments.table import methods
from experiments.table.scoring import METRIC, RunResult
from experiments.table.stats import Results, comparisons, mean_curve, mean_score

FAMILY_STYLE = {  # colour of the bars, line style of the curves
    "SFT": ("0.45", "-"),
    "off-policy": ("C0", "-"),
    "on-policy": ("C1", "--"),
    "cached teacher": ("C2", ":"),
}


def figure(
    results: Results,
    dataset: str,
    path: str,
    *,
    teacher: RunResult | None = None,
    num_samples: int = 10_000,
) -> None:
  """Left: Δ sampled ROUGE-L against SFT per method with its paired-bootstrap
  95 % interval (absolute SFT and teacher scores in the title). Right: mean
  validation-CE curves, one style per family."""
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, (ax_bar, ax_ce) = plt.subplots(
      1, 2, figsize=(12, 0.28 * len(results) + 2.2)
  )
  families = {m: methods.family(m) for m in results}
  _deltas(ax_bar, results, dataset, families, teacher, num_samples)
  _curves(ax_ce, results, families, plt.get_cmap("tab20"))
  for ax in (ax_bar, ax_ce):
    ax.grid(alpha=0.3)
  fig.tight_layout()
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _deltas(ax, results, dataset, families, teacher, num_samples) -> None:
  """Horizontal bars of Δ ROUGE-L vs SFT with their intervals."""
  from matplotlib import patches  # pylint: disable=g-import-not-at-top

  vs = comparisons(results, "sft", num_samples=num_samples)
  if not vs:
    return
  names = [m for m in results if m != "sft"]
  y = np.arange(len(names))[::-1]
  err = np.array(
      [[vs[m].delta - vs[m].low, vs[m].high - vs[m].delta] for m in names]
  ).T
  ax.barh(
      y,
      [vs[m].delta for m in names],
      xerr=err,
      capsize=2,
      color=[FAMILY_STYLE[families[m]][0] for m in names],
  )
  ax.set_yticks(y, names)
  ax.axvline(0, c="k", lw=0.8)
  title = f"Δ test ROUGE-L vs SFT ({mean_score(results['sft'], dataset):.2f})"
  if teacher is not None:
    title += f"; teacher {teacher.sampled[dataset][METRIC]:.2f}"
  ax.set(title=title, xlabel="sampled ROUGE-L, 95 % paired bootstrap")
  handles = [
      patches.Patch(color=FAMILY_STYLE[f][0], label=f)
      for f in FAMILY_STYLE
      if f != "SFT" and f in families.values()
  ]
  ax.legend(handles=handles, fontsize=8, loc="upper left")


def _curves(ax, results, families, colours) -> None:
  """Mean validation CE per method, styled by family."""
  for i, m in enumerate(results):
    curve = mean_curve(results[m])
    if not curve:
      continue
    ax.plot(
        list(curve),
        list(curve.values()),
        ls=FAMILY_STYLE[families[m]][1],
        c="0.2" if m == "sft" else colours(i % 20),
        lw=2.0 if m in ("sft", "fkl") else 1.2,
        label=m,
    )
  ax.set(
      title="validation cross-entropy (mean over seeds)",
      xlabel="step",
      ylabel="nats / token",
  )
  ax.legend(fontsize=7, ncol=2)
