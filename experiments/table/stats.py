"""The table's statistics: mean ± std over seeds, the paired bootstrap over
test examples, mean validation curves.

Table cells are mean ± std (``np.std``, ddof 0) over training seeds. The
``Δ`` columns are paired bootstraps over test examples
(:func:`paired_bootstrap`) of the per-example ROUGE-L, averaged over
training and sampling seeds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import dataclasses

import numpy as np

from experiments.table.scoring import METRIC, RunResult

Runs = Mapping[int, RunResult]  # training seed -> result
Results = Mapping[str, Runs]  # method -> its runs


@dataclasses.dataclass(frozen=True)
class Comparison:
  """Paired bootstrap of mean(a - b): the observed difference, its 95 %
  percentile interval and the two-sided p-value."""

  delta: float
  low: float
  high: float
  p: float

  @property
  def significant(self) -> bool:
    return self.low > 0 or self.high < 0

  def __str__(self) -> str:
    return (
        f"{self.delta:+.2f} [{self.low:+.2f}, {self.high:+.2f}]"
        f"{'*' if self.significant else ''}"
    )


def resample_indices(n: int, num_samples: int, seed: int = 0) -> np.ndarray:
  """``[num_samples, n]`` example indices drawn with replacement."""
  return np.random.default_rng(seed).integers(0, n, size=(num_samples, n))


def paired_bootstrap(
    a_N: np.ndarray,
    b_N: np.ndarray,
    *,
    num_samples: int = 10_000,
    seed: int = 0,
    indices_BxN: np.ndarray | None = None,
) -> Comparison:
  """Paired bootstrap over examples of ``mean(a) - mean(b)``.

  With ``d_i = a_i - b_i`` and ``B`` resamples ``I_b`` of ``n`` indices drawn
  with replacement, ``D_b = mean(d[I_b])``. The interval is the 2.5 and 97.5
  percentiles of ``D``; ``p = min(1, 2 min(P(D <= 0), P(D >= 0)))``.
  It resamples test examples only: training-seed variance is in the table's
  ± instead.
  """
  a_N, b_N = np.asarray(a_N, np.float64), np.asarray(b_N, np.float64)
  if a_N.shape != b_N.shape or a_N.ndim != 1 or not len(a_N):
    raise ValueError(
        f"paired scores need two equal-length 1-D arrays, got "
        f"shapes {a_N.shape} and {b_N.shape}."
    )
  d_N = a_N - b_N
  if indices_BxN is None:
    indices_BxN = resample_indices(len(d_N), num_samples, seed)
  means_B = d_N[indices_BxN].mean(axis=1)
  low, high = np.percentile(means_B, [2.5, 97.5])
  p = min(1.0, 2.0 * min(np.mean(means_B <= 0), np.mean(means_B >= 0)))
  return Comparison(float(d_N.mean()), float(low), float(high), float(p))


def mean_std(values: Sequence[float]) -> tuple[float, float]:
  """Mean and ``np.std`` (ddof 0) of ``values``."""
  v = np.asarray(values, np.float64)
  return float(v.mean()), float(v.std())


def values(runs: Runs, kind: str, dataset: str, name: str) -> list[float]:
  """Metric ``name`` of protocol ``kind`` per run (runs without it left out)."""
  return [
      getattr(r, kind)[dataset][name]
      for r in runs.values()
      if name in getattr(r, kind)[dataset]
  ]


def mean_score(runs: Runs, dataset: str) -> float:
  """Sampled ROUGE-L averaged over the training seeds."""
  return mean_std(values(runs, "sampled", dataset, METRIC))[0]


def pooled_examples(runs: Runs) -> np.ndarray:
  """Per-example ROUGE-L averaged over the training seeds."""
  return np.mean([r.examples for r in runs.values()], axis=0)


def comparisons(
    results: Results, reference: str, **kw
) -> dict[str, Comparison]:
  """Paired bootstrap of every method against ``reference`` (if present)."""
  if reference not in results:
    return {}
  ref = pooled_examples(results[reference])
  return {
      m: paired_bootstrap(pooled_examples(runs), ref, **kw)
      for m, runs in results.items()
      if m != reference
  }


def mean_curve(runs: Runs) -> dict[int, float]:
  """``{step: validation CE}`` averaged over the runs, on the steps every
  run with a curve has (empty without curves)."""
  curves = [dict(r.curve) for r in runs.values() if r.curve]
  steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
  return {s: float(np.mean([c[s] for c in curves])) for s in steps}
