"""The AKL paper's three claims, checked on the table's numbers."""

from __future__ import annotations

import dataclasses

import numpy as np

from experiments.table import methods
from experiments.table.scoring import METRIC
from experiments.table.stats import (
    Results,
    Runs,
    comparisons,
    mean_curve,
    paired_bootstrap,
    pooled_examples,
)


@dataclasses.dataclass(frozen=True)
class Claim:
  name: str
  reproduced: bool | None  # None: the methods it needs were not run
  evidence: str

  def __str__(self) -> str:
    verdict = {
        True: "reproduced",
        False: "not reproduced",
        None: "not checked",
    }[self.reproduced]
    return f"- **{self.name}**: {verdict} at this scale. {self.evidence}"


def _seed_means(runs: Runs, dataset: str) -> dict:
  return {s: r.sampled[dataset][METRIC] for s, r in runs.items()}


def claims(
    results: Results, dataset: str, *, num_samples: int = 10_000
) -> list[Claim]:
  """The AKL paper's three claims, checked on sampled ROUGE-L.

  1. KD beats SFT: every KD student of the paper's table
     (:data:`~experiments.table.methods.PAPER_GPT2`: SeqKD and the
     token-level divergences) has a paired bootstrap against SFT that is
     significantly positive (95 % interval above 0). Rows the paper does not
     have (ABKD, TAID, on-policy, cached teachers) are in the table but not
     in the claim.
  2. AKL >= FKL and AKL >= RKL: on the mean over training seeds.
  3. FKL and RKL converge to the same target: the validation-CE gap between
     them shrinks from the first to the last evaluation and their ROUGE-L
     difference is not significant.
  """
  return [
      _kd_beats_sft(results, dataset, num_samples),
      _akl_above_fkl_and_rkl(results, dataset, num_samples),
      _fkl_and_rkl_converge(results, num_samples),
  ]


def _seeds(results: Results, method: str) -> str:
  return ",".join(map(str, results[method]))


def _mean(results: Results, method: str, dataset: str) -> float:
  return float(np.mean(list(_seed_means(results[method], dataset).values())))


def _kd_beats_sft(results: Results, dataset: str, num_samples: int) -> Claim:
  name = "KD students beat SFT on ROUGE-L"
  kd = [m for m in results if m in methods.PAPER_GPT2 and methods.is_kd(m)]
  if "sft" not in results or not kd:
    return Claim(name, None, "needs sft and a KD method.")
  vs = comparisons(results, "sft", num_samples=num_samples)
  wins = [m for m in kd if vs[m].significant and vs[m].delta > 0]
  above = [m for m in kd if vs[m].delta > 0]
  detail = "; ".join(f"{m} {vs[m]}" for m in kd)
  return Claim(
      name,
      len(wins) == len(kd),
      f"SFT {_mean(results, 'sft', dataset):.2f} (seeds "
      f"{_seeds(results, 'sft')}); {len(above)} of the paper's {len(kd)} KD "
      f"students above it on the mean, {len(wins)} significantly (paired "
      f"bootstrap, 95 %): {detail}.",
  )


def _akl_above_fkl_and_rkl(
    results: Results, dataset: str, num_samples: int
) -> Claim:
  name = "AKL ≥ FKL and AKL ≥ RKL"
  if not all(m in results for m in ("akl", "fkl", "rkl")):
    return Claim(name, None, "needs akl, fkl, rkl.")
  akl = _seed_means(results["akl"], dataset)
  per_seed = []
  for other in ("fkl", "rkl"):
    o = _seed_means(results[other], dataset)
    common_seeds = [s for s in akl if s in o]
    per_seed.append(
        f"AKL ≥ {other.upper()} in "
        f"{sum(akl[s] >= o[s] for s in common_seeds)} of "
        f"{len(common_seeds)} seeds"
    )
  vs = {
      o: paired_bootstrap(
          pooled_examples(results["akl"]),
          pooled_examples(results[o]),
          num_samples=num_samples,
      )
      for o in ("fkl", "rkl")
  }
  mean = {m: _mean(results, m, dataset) for m in ("akl", "fkl", "rkl")}
  return Claim(
      name,
      mean["akl"] >= mean["fkl"] and mean["akl"] >= mean["rkl"],
      f"AKL {mean['akl']:.2f}, FKL {mean['fkl']:.2f}, RKL {mean['rkl']:.2f} "
      f"(seeds {_seeds(results, 'akl')}); AKL−FKL {vs['fkl']}, AKL−RKL "
      f"{vs['rkl']}; {', '.join(per_seed)}.",
  )


def _fkl_and_rkl_converge(results: Results, num_samples: int) -> Claim:
  name = "FKL and RKL converge to the same target"
  if not all(m in results for m in ("fkl", "rkl")):
    return Claim(name, None, "needs fkl and rkl.")
  gaps = _ce_gaps(results["fkl"], results["rkl"])
  vs = paired_bootstrap(
      pooled_examples(results["fkl"]),
      pooled_examples(results["rkl"]),
      num_samples=num_samples,
  )
  if gaps is None:
    return Claim(name, None, "no validation curves.")
  (s0, g0), (s1, g1) = gaps
  return Claim(
      name,
      abs(g1) < abs(g0) and not vs.significant,
      f"validation CE, FKL − RKL (mean over seeds {_seeds(results, 'fkl')}): "
      f"{g0:+.3f} at step {s0}, {g1:+.3f} at step {s1}; ROUGE-L "
      f"FKL − RKL {vs}.",
  )


def _ce_gaps(a: Runs, b: Runs):
  """``((first step, gap), (last step, gap))`` of mean val CE a − b."""
  ca, cb = mean_curve(a), mean_curve(b)
  steps = sorted(set(ca) & set(cb))
  if not steps:
    return None
  return tuple((s, ca[s] - cb[s]) for s in (steps[0], steps[-1]))
