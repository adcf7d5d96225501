r"""The method table: every method x training seed, scored by the papers' protocol.

    python -m experiments.run_table                       # tiny scale, every method, 3 seeds
    python -m experiments.run_table --methods=sft,fkl,rkl,akl --seeds=10,20,30
    python -m experiments.run_table --write               # + results file, README/docs block
    python -m experiments.run_table --scale=paper --root=workdirs/paper \
        --override=teacher.path=workdirs/gpt2_xl_sft/hf

Each (method, seed) trains ``configs/<method>_gpt2.py`` in
``<root>/<method>_s<seed>``. A run whose ``hf/`` export exists is not trained
again and a finished evaluation is read back from disk, so an interrupted
table resumes where it stopped. Every student is scored twice on the test
split:

* **sampled** (the headline, the MiniLLM / AKL protocol): temperature 1, top-k
  and top-p off, ``no_repeat_ngram_size=6``, sampling seeds 10, 20, 30, 40, 50;
  ROUGE-L and validity are means over the sampling seeds;
* **greedy**: one argmax decode, its validity a secondary column.

Table cells are mean ± std (``np.std``, ddof 0) over training seeds. The
``Δ`` columns are paired bootstraps over test examples (:func:`paired_bootstrap`)
of the per-example ROUGE-L, averaged over training and sampling seeds, against
SFT and against FKL. :func:`claims` checks the AKL paper's three claims on the
numbers. At the paper scale the AKL paper's published GPT-2 row is printed
beside each method.

New methods register one line in :data:`METHODS`; a method whose config
module does not exist (yet) is left out of the default table.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
import copy
import dataclasses
import json
import os
import re
import time
from typing import Any

from absl import app, flags
import numpy as np

from kdjax import evaluate, metrics, training
from kdjax.config import files as config_files
from kdjax.config import recipe


@dataclasses.dataclass(frozen=True)
class Method:
  """A table row: its config module, whether it distils from a teacher, and
  the teacher cache it trains from instead of the live teacher (if any)."""

  module: str  # configs/<module>.py
  kd: bool = True  # False for the SFT baseline
  cache: tuple[tuple[str, Any], ...] = ()  # teacher.cache.* settings


# The registry: method name -> config. Add a line to add a row.
METHODS: dict[str, Method] = {
    "sft": Method("sft_gpt2", kd=False),
    "seqkd": Method("seqkd_gpt2"),
    "fkl": Method("fkl_gpt2"),
    "rkl": Method("rkl_gpt2"),
    "fkl_rkl": Method("fkl_rkl_gpt2"),
    "skl": Method("skl_gpt2"),
    "srkl": Method("srkl_gpt2"),
    "jsd": Method("jsd_gpt2"),
    "tvd": Method("tvd_gpt2"),
    "akl": Method("akl_gpt2"),
    "abkd": Method("abkd_gpt2"),
    "taid": Method("taid_gpt2"),
    "sinkhorn": Method("sinkhorn_gpt2"),
    # On-policy sequence sources (docs/on_policy.md).
    "gkd": Method("gkd_gpt2"),
    "distillm": Method("distillm_gpt2"),
    "skd": Method("skd_gpt2"),
    "minillm": Method("minillm_gpt2"),
    # FKL from a teacher cache (docs/cached_teacher.md) instead of the live
    # teacher: its top-16 / top-64 with the tail bucket, RS-KD's 12 draws.
    "fkl_top16": Method("fkl_gpt2", cache=(("encoding", "topk"), ("k", 16))),
    "fkl_top64": Method("fkl_gpt2", cache=(("encoding", "topk"), ("k", 64))),
    "fkl_sampled": Method(
        "fkl_gpt2", cache=(("encoding", "sampled"), ("num_samples", 12))
    ),
}
# The default rows, in table order (sinkhorn is autodiff-only and slow).
TABLE = (
    "sft",
    "seqkd",
    "fkl",
    "rkl",
    "fkl_rkl",
    "skl",
    "srkl",
    "jsd",
    "tvd",
    "akl",
    "abkd",
    "taid",
    "gkd",
    "distillm",
    "skd",
    "minillm",
    "fkl_top16",
    "fkl_top64",
    "fkl_sampled",
)
SEEDS = (10, 20, 30)
SAMPLING_SEEDS = "10,20,30,40,50"
METRIC = "rougeL"
RESULTS = os.path.join(os.path.dirname(__file__), "results", "tiny_table.md")
FIGURE = os.path.join(os.path.dirname(__file__), "figures", "tiny_table.png")
# README.md / docs/benchmark.md: the block between these markers is replaced.
BLOCK = ("<!-- tiny-table:begin -->", "<!-- tiny-table:end -->")

# AKL paper (arXiv 2404.02657), GPT-2 1.5B -> 120M, ROUGE-L on Dolly / S-NI / UnNI.
PAPER_GPT2 = {
    "teacher": (26.98, 27.25, 31.61),
    "sft": (23.01, 16.48, 18.43),
    "seqkd": (23.30, 16.35, 18.51),
    "fkl": (23.46, 16.63, 19.27),
    "rkl": (22.62, 17.88, 19.35),
    "skl": (23.47, 16.51, 18.46),
    "srkl": (23.25, 17.54, 19.31),
    "fkl_rkl": (23.36, 17.83, 20.37),
    "akl": (23.88, 19.15, 21.97),
}
PAPER_DATASETS = ("dolly", "sni", "unni")


def available(methods: Sequence[str]) -> list[str]:
  """``methods`` whose config module exists (rows of divergences not yet in
  the package drop out)."""
  return [
      m
      for m in methods
      if config_files.find(METHODS[m].module) is not None
  ]


def config_for(
    method: str, scale: str, seed: int, overrides: Sequence[str] = ()
):
  """``configs/<method>_gpt2.py`` at ``scale`` with the seed and overrides."""
  if method not in METHODS:
    raise ValueError(
        f"method {method!r} is unknown; use some of " f"{', '.join(METHODS)}."
    )
  module = config_files.experiment(METHODS[method].module)
  c = module.get_config("tiny" if scale == "tiny" else None)
  c.seed = seed
  if METHODS[method].cache:
    c.teacher.source = "cache"
    recipe.override(
        c, {f"teacher.cache.{k}": v for k, v in METHODS[method].cache}
    )
  recipe.override(c, dict(item.partition("=")[::2] for item in overrides))
  return c


def run_name(method: str, seed: int) -> str:
  return f"{method}_s{seed}"


def _exported(workdir: str) -> bool:
  return os.path.exists(os.path.join(workdir, "hf", "model.safetensors"))


def final_export(workdir: str) -> str:
  """The model the table scores: the run's last step (``hf/``).

  Every student is scored after the same budget. The trainer's ``best_hf``
  is chosen on a few dozen greedy validation answers, too few to rank
  checkpoints (early checkpoints that repeat one frequent answer win).
  """
  return os.path.join(workdir, "hf")


def cache_dir(config, root: str) -> str:
  """Where the table keeps the teacher cache a cached-teacher run reads.

  One per encoding and size, shared by the training seeds (a sampled cache
  draws with the run's seed, so it is one per seed).
  """
  t = config.teacher.cache
  name = f"{t.encoding}{t.k if t.encoding == 'topk' else t.num_samples}"
  if t.encoding == "sampled":
    name += f"_s{config.seed}"
  return os.path.join(root, "caches", name)


def train(config, workdir: str) -> str:
  """Trains (or finishes) the run; a run with an ``hf/`` export is kept.

  A run with ``teacher.source="cache"`` and no ``teacher.cache_dir`` first
  builds (or finishes) its cache beside the runs (:func:`cache_dir`).
  """
  if _exported(workdir):
    return workdir
  if config.teacher.source == "cache" and not config.teacher.cache_dir:
    from kdjax.cache import build  # pylint: disable=g-import-not-at-top

    config = copy.deepcopy(config)
    config.teacher.cache_dir = cache_dir(config, os.path.dirname(workdir))
    build.build(config, config.teacher.cache_dir)
  training.train_and_evaluate(config, workdir)
  return workdir


# ----------------------------------------------------------------------------
# Scoring.


def protocol_config(config, kind: str):
  """``config`` with the evaluation protocol ``kind``: "sampled" (temperature
  1, seeds 10-50) or "greedy" (argmax, one seed)."""
  if kind not in ("sampled", "greedy"):
    raise ValueError(f"protocol {kind!r} is unknown; use sampled or greedy.")
  c = copy.deepcopy(config)
  recipe.override(
      c,
      {
          "eval.greedy": kind == "greedy",
          "eval.seeds": SAMPLING_SEEDS if kind == "sampled" else "10",
      },
  )
  return c


def score(
    config,
    checkpoint: str,
    *,
    kind: str = "sampled",
    outdir: str | None = None,
    limit: int | None = None,
) -> dict:
  """``{dataset: metrics}`` of ``checkpoint`` (a workdir or HF dir) under
  protocol ``kind``; cached in ``<outdir>`` (default
  ``<checkpoint>/eval_<kind>``) with one JSONL of responses per dataset."""
  c = protocol_config(config, kind)
  outdir = outdir or os.path.join(checkpoint, f"eval_{kind}")
  path = os.path.join(outdir, "summary.json")
  wanted = c.eval.datasets.split(",")
  if os.path.exists(path):
    with open(path) as f:
      done = json.load(f)
    if all(
        d in done and os.path.exists(os.path.join(outdir, f"{d}.jsonl"))
        for d in wanted
    ):
      return {d: done[d] for d in wanted}
  return evaluate.run(c, checkpoint, limit=limit, outdir=outdir, progress=False)


def example_scores(
    outdir: str, dataset: str, metric: str = METRIC
) -> np.ndarray:
  """Per test example, ``metric`` x 100 averaged over the sampling seeds."""
  with open(os.path.join(outdir, f"{dataset}.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return np.array(
      [100.0 * np.mean([s[metric] for s in r["scores"].values()]) for r in rows]
  )


def val_curve(workdir: str) -> list[tuple[int, float]]:
  """``(step, validation CE)`` of a run's metrics log."""
  return [
      (r["step"], r["val_ce"]) for r in metrics.read(workdir) if "val_ce" in r
  ]


@dataclasses.dataclass
class RunResult:
  """One trained student: metrics per protocol and dataset, per-example
  ROUGE-L of the headline dataset (sampled), its validation-CE curve and
  its training time (``summary.json``; NaN for a model trained elsewhere)."""

  sampled: dict[str, dict[str, Any]]
  greedy: dict[str, dict[str, Any]]
  examples: np.ndarray
  curve: list[tuple[int, float]]
  train_seconds: float = float("nan")

  @property
  def val_ce(self) -> float:
    return self.curve[-1][1] if self.curve else float("nan")


def evaluate_run(
    config,
    checkpoint: str,
    *,
    outdir: str | None = None,
    limit: int | None = None,
    workdir: str | None = None,
) -> RunResult:
  """Both protocols on ``checkpoint``; ``workdir`` holds the metrics log."""
  sampled_dir = os.path.join(outdir or checkpoint, "eval_sampled")
  greedy_dir = os.path.join(outdir or checkpoint, "eval_greedy")
  sampled = score(
      config, checkpoint, kind="sampled", outdir=sampled_dir, limit=limit
  )
  greedy = score(
      config, checkpoint, kind="greedy", outdir=greedy_dir, limit=limit
  )
  first = config.eval.datasets.split(",")[0]
  return RunResult(
      sampled,
      greedy,
      example_scores(sampled_dir, first),
      val_curve(workdir or checkpoint),
      train_seconds(workdir or checkpoint),
  )


def train_seconds(workdir: str) -> float:
  """The trainer's own ``seconds`` in ``<workdir>/summary.json`` (NaN if none)."""
  path = os.path.join(workdir, "summary.json")
  if not os.path.exists(path):
    return float("nan")
  with open(path) as f:
    return float(json.load(f).get("seconds", float("nan")))


ConfigFn = Callable[[str, int], Any]


def run_all(
    methods: Sequence[str],
    seeds: Sequence[int],
    root: str,
    *,
    config_fn: ConfigFn,
    limit: int | None = None,
    finished_only: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, dict[int, RunResult]]:
  """Trains and scores every (method, seed), methods outermost.

  With ``finished_only`` runs without an export are left out instead of
  trained (a table of what has finished so far).

  Returns ``{method: {seed: RunResult}}``.
  """
  results: dict[str, dict[int, RunResult]] = {}
  for method in methods:
    for seed in seeds:
      workdir = os.path.join(root, run_name(method, seed))
      if finished_only and not _exported(workdir):
        continue
      log(
          f"{run_name(method, seed)}: "
          f"{'cached' if _exported(workdir) else 'training'}"
      )
      config = config_fn(method, seed)
      train(config, workdir)
      results.setdefault(method, {})[seed] = evaluate_run(
          config,
          final_export(workdir),
          outdir=workdir,
          workdir=workdir,
          limit=limit,
      )
  return results


# ----------------------------------------------------------------------------
# Statistics.


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


def _pm(mean: float, std: float, digits: int = 2) -> str:
  return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _metric(
    runs: Mapping[int, RunResult], kind: str, dataset: str, name: str
) -> list[float]:
  return [
      getattr(r, kind)[dataset][name]
      for r in runs.values()
      if name in getattr(r, kind)[dataset]
  ]


def pooled_examples(runs: Mapping[int, RunResult]) -> np.ndarray:
  """Per-example ROUGE-L averaged over the training seeds."""
  return np.mean([r.examples for r in runs.values()], axis=0)


def comparisons(
    results: Mapping[str, Mapping[int, RunResult]], reference: str, **kw
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


# ----------------------------------------------------------------------------
# Reporting.


def table(
    results: Mapping[str, Mapping[int, RunResult]],
    dataset: str,
    *,
    teacher: RunResult | None = None,
    spread: str = "training",
    num_samples: int = 10_000,
) -> str:
  """Markdown, one row per method.

  ``spread="training"``: ± is the std over training seeds of the per-seed
  means; ``"sampling"`` (one training seed, the demo): the std over the
  sampling seeds of that run.
  """
  vs_sft = comparisons(results, "sft", num_samples=num_samples)
  vs_fkl = comparisons(results, "fkl", num_samples=num_samples)
  head = [
      "model",
      "seeds",
      "ROUGE-L (sampled)",
      "validity % (sampled)",
      "validity % (greedy)",
      "val CE",
      "Δ ROUGE-L vs SFT",
      "Δ ROUGE-L vs FKL",
  ]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

  def cells(runs: Mapping[int, RunResult]) -> list[str]:
    out = [",".join(map(str, runs))]
    for kind, name in (
        ("sampled", METRIC),
        ("sampled", "validity"),
        ("greedy", "validity"),
    ):
      values = _metric(runs, kind, dataset, name)
      if not values:
        out.append("–")
      elif spread == "sampling" or len(values) == 1:
        run = next(iter(runs.values()))
        m = getattr(run, kind)[dataset]
        out.append(_pm(m[name], m.get(f"{name}_std", 0.0)))
      else:
        out.append(_pm(*mean_std(values)))
    ces = [r.val_ce for r in runs.values()]
    out.append(
        _pm(*mean_std(ces), digits=3)
        if len(ces) > 1 and spread == "training"
        else f"{np.mean(ces):.3f}"
    )
    return out

  if teacher is not None:
    lines.append(
        "| teacher | – | " + " | ".join(cells({0: teacher})[1:]) + " | – | – |"
    )
  for method, runs in results.items():
    row = [method] + cells(runs)
    row += [
        str(vs_sft[method]) if method in vs_sft else "–",
        str(vs_fkl[method]) if method in vs_fkl else "–",
    ]
    lines.append("| " + " | ".join(row) + " |")
  return "\n".join(lines)


def paper_table(
    results: Mapping[str, Mapping[int, RunResult]], datasets: Sequence[str]
) -> str:
  """Paper scale: sampled ROUGE-L per dataset beside the published row."""
  head = (
      ["method"]
      + [f"{d} ROUGE-L" for d in datasets]
      + [f"paper {d}" for d in PAPER_DATASETS]
  )
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for method, runs in results.items():
    row = [method]
    for d in datasets:
      values = _metric(runs, "sampled", d, METRIC)
      row.append(_pm(*mean_std(values)) if values else "–")
    row += (
        [f"{v:.2f}" for v in PAPER_GPT2[method]]
        if method in PAPER_GPT2
        else ["–"] * len(PAPER_DATASETS)
    )
    lines.append("| " + " | ".join(row) + " |")
  return "\n".join(lines)


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


def _seed_means(runs: Mapping[int, RunResult], dataset: str) -> dict:
  return {s: r.sampled[dataset][METRIC] for s, r in runs.items()}


def claims(
    results: Mapping[str, Mapping[int, RunResult]],
    dataset: str,
    *,
    num_samples: int = 10_000,
) -> list[Claim]:
  """The AKL paper's three claims, checked on sampled ROUGE-L.

  1. KD beats SFT: every KD student of the paper's table (:data:`PAPER_GPT2`:
     SeqKD and the token-level divergences) has a paired bootstrap against
     SFT that is significantly positive (95 % interval above 0). Rows the
     paper does not have (ABKD, TAID, on-policy, cached teachers) are in the
     table but not in the claim.
  2. AKL >= FKL and AKL >= RKL: on the mean over training seeds.
  3. FKL and RKL converge to the same target: the validation-CE gap between
     them shrinks from the first to the last evaluation and their ROUGE-L
     difference is not significant.
  """
  out = []
  seeds = lambda m: ",".join(map(str, results[m]))
  mean = lambda m: float(
      np.mean(list(_seed_means(results[m], dataset).values()))
  )
  kd = [m for m in results if m in PAPER_GPT2 and METHODS.get(m, Method("")).kd]
  if "sft" in results and kd:
    vs = comparisons(results, "sft", num_samples=num_samples)
    wins = [m for m in kd if vs[m].significant and vs[m].delta > 0]
    above = [m for m in kd if vs[m].delta > 0]
    detail = "; ".join(f"{m} {vs[m]}" for m in kd)
    out.append(
        Claim(
            "KD students beat SFT on ROUGE-L",
            len(wins) == len(kd),
            f"SFT {mean('sft'):.2f} (seeds {seeds('sft')}); {len(above)} of "
            f"the paper's {len(kd)} KD students above it on the mean, {len(wins)} "
            f"significantly (paired bootstrap, 95 %): {detail}.",
        )
    )
  else:
    out.append(
        Claim(
            "KD students beat SFT on ROUGE-L",
            None,
            "needs sft and a KD method.",
        )
    )
  if all(m in results for m in ("akl", "fkl", "rkl")):
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
    ok = mean("akl") >= mean("fkl") and mean("akl") >= mean("rkl")
    out.append(
        Claim(
            "AKL ≥ FKL and AKL ≥ RKL",
            ok,
            f"AKL {mean('akl'):.2f}, FKL {mean('fkl'):.2f}, RKL {mean('rkl'):.2f} "
            f"(seeds {seeds('akl')}); AKL−FKL {vs['fkl']}, AKL−RKL {vs['rkl']}; "
            f"{', '.join(per_seed)}.",
        )
    )
  else:
    out.append(Claim("AKL ≥ FKL and AKL ≥ RKL", None, "needs akl, fkl, rkl."))
  if all(m in results for m in ("fkl", "rkl")):
    gaps = _ce_gaps(results["fkl"], results["rkl"])
    vs = paired_bootstrap(
        pooled_examples(results["fkl"]),
        pooled_examples(results["rkl"]),
        num_samples=num_samples,
    )
    if gaps is None:
      out.append(
          Claim(
              "FKL and RKL converge to the same target",
              None,
              "no validation curves.",
          )
      )
    else:
      (s0, g0), (s1, g1) = gaps
      ok = abs(g1) < abs(g0) and not vs.significant
      out.append(
          Claim(
              "FKL and RKL converge to the same target",
              ok,
              f"validation CE, FKL − RKL (mean over seeds {seeds('fkl')}): "
              f"{g0:+.3f} at step {s0}, {g1:+.3f} at step {s1}; ROUGE-L "
              f"FKL − RKL {vs}.",
          )
      )
  else:
    out.append(
        Claim(
            "FKL and RKL converge to the same target",
            None,
            "needs fkl and rkl.",
        )
    )
  return out


def _ce_gaps(a: Mapping[int, RunResult], b: Mapping[int, RunResult]):
  """``((first step, gap), (last step, gap))`` of mean val CE a − b."""

  def mean_curve(runs):
    curves = [dict(r.curve) for r in runs.values() if r.curve]
    steps = (
        sorted(set.intersection(*(set(c) for c in curves))) if curves else []
    )
    return {s: float(np.mean([c[s] for c in curves])) for s in steps}

  ca, cb = mean_curve(a), mean_curve(b)
  steps = sorted(set(ca) & set(cb))
  if not steps:
    return None
  return tuple((s, ca[s] - cb[s]) for s in (steps[0], steps[-1]))


def family(method: str) -> str:
  """``"SFT"``, ``"off-policy"``, ``"on-policy"`` or ``"cached teacher"``."""
  m = METHODS.get(method, Method(""))
  if not m.kd:
    return "SFT"
  if m.cache:
    return "cached teacher"
  if method not in METHODS:
    return "off-policy"
  c = config_for(method, "tiny", SEEDS[0])
  on = "onpolicy" in c and c.onpolicy.source != "dataset"
  return "on-policy" if on else "off-policy"


FAMILY_STYLE = {  # colour of the bars, line style of the curves
    "SFT": ("0.45", "-"),
    "off-policy": ("C0", "-"),
    "on-policy": ("C1", "--"),
    "cached teacher": ("C2", ":"),
}


def figure(
    results: Mapping[str, Mapping[int, RunResult]],
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
  names = [m for m in results if m != "sft"]
  families = {m: family(m) for m in results}
  vs = comparisons(results, "sft", num_samples=num_samples)
  if vs:
    y = np.arange(len(names))[::-1]
    deltas = [vs[m].delta for m in names]
    err = np.array(
        [[vs[m].delta - vs[m].low, vs[m].high - vs[m].delta] for m in names]
    ).T
    ax_bar.barh(
        y,
        deltas,
        xerr=err,
        capsize=2,
        color=[FAMILY_STYLE[families[m]][0] for m in names],
    )
    ax_bar.set_yticks(y, names)
    ax_bar.axvline(0, c="k", lw=0.8)
    sft = mean_std(_metric(results["sft"], "sampled", dataset, METRIC))[0]
    title = f"Δ test ROUGE-L vs SFT ({sft:.2f})"
    if teacher is not None:
      title += f"; teacher {teacher.sampled[dataset][METRIC]:.2f}"
    ax_bar.set(title=title, xlabel="sampled ROUGE-L, 95 % paired bootstrap")
    handles = [
        matplotlib.patches.Patch(color=FAMILY_STYLE[f][0], label=f)
        for f in FAMILY_STYLE
        if f != "SFT" and f in families.values()
    ]
    ax_bar.legend(handles=handles, fontsize=8, loc="upper left")
  colours = plt.get_cmap("tab20")
  for i, m in enumerate(results):
    curves = [dict(r.curve) for r in results[m].values() if r.curve]
    if not curves:
      continue
    steps = sorted(set.intersection(*(set(c) for c in curves)))
    ax_ce.plot(
        steps,
        [np.mean([c[s] for c in curves]) for s in steps],
        ls=FAMILY_STYLE[families[m]][1],
        c="0.2" if m == "sft" else colours(i % 20),
        lw=2.0 if m in ("sft", "fkl") else 1.2,
        label=m,
    )
  ax_ce.set(
      title="validation cross-entropy (mean over seeds)",
      xlabel="step",
      ylabel="nats / token",
  )
  ax_ce.legend(fontsize=7, ncol=2)
  for ax in (ax_bar, ax_ce):
    ax.grid(alpha=0.3)
  fig.tight_layout()
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)


def report(
    results,
    dataset: str,
    *,
    teacher: RunResult | None = None,
    spread: str = "training",
    figure_path: str | None = None,
    seconds: float | None = None,
    num_samples: int = 10_000,
) -> str:
  """The Markdown block: table, significance note, claims, figure, time."""
  parts = [
      table(
          results,
          dataset,
          teacher=teacher,
          spread=spread,
          num_samples=num_samples,
      ),
      "",
      (
          "Δ: paired bootstrap over the test examples (10,000 resamples) "
          "of per-example ROUGE-L averaged over training and sampling "
          "seeds; [95 % interval], * = interval excludes 0."
      ),
      "",
  ]
  if teacher is not None and "sft" in results:
    t = teacher.sampled[dataset][METRIC]
    s = mean_std(_metric(results["sft"], "sampled", dataset, METRIC))[0]
    parts += [f"Teacher − SFT student: {t - s:+.2f} ROUGE-L.", ""]
  parts += [str(c) for c in claims(results, dataset, num_samples=num_samples)]
  if figure_path:
    parts += ["", f"![method table]({figure_path})"]
  trained = [
      r.train_seconds
      for runs in results.values()
      for r in runs.values()
      if np.isfinite(r.train_seconds)
  ]
  if trained:
    parts += [
        "",
        (
            f"Training time summed over the {len(trained)} runs: "
            f"{sum(trained) / 60:.1f} min (each run's `summary.json`; "
            "scoring and teacher caches not included)."
        ),
    ]
  if seconds is not None:
    parts += [
        "",
        (
            f"Wall time of this command: {seconds / 60:.1f} min "
            "(finished runs and evaluations are reused)."
        ),
    ]
  return "\n".join(parts)


def replace_block(path: str, block: str) -> bool:
  """Replaces the text between :data:`BLOCK`'s markers in ``path``; False
  when the file or the markers are missing."""
  if not os.path.exists(path):
    return False
  with open(path) as f:
    text = f.read()
  pattern = re.compile(
      re.escape(BLOCK[0]) + ".*?" + re.escape(BLOCK[1]), re.DOTALL
  )
  if not pattern.search(text):
    return False
  text = pattern.sub(lambda _: f"{BLOCK[0]}\n{block}\n{BLOCK[1]}", text)
  with open(path, "w") as f:
    f.write(text)
  return True


# ----------------------------------------------------------------------------
# Command line.


def _define_flags():
  """Flags exist only when this file is the program (demo.py imports it)."""
  flags.DEFINE_string(
      "methods",
      ",".join(TABLE),
      f"Comma-separated methods (of {', '.join(METHODS)}); "
      "those without a config module are skipped.",
  )
  flags.DEFINE_enum("scale", "tiny", ["tiny", "paper"], "Config arg.")
  flags.DEFINE_string("seeds", ",".join(map(str, SEEDS)), "Training seeds.")
  flags.DEFINE_string(
      "root",
      recipe.TINY_ROOT,
      "Run directories (the tiny " "default shares make demo's runs).",
  )
  flags.DEFINE_integer(
      "limit",
      0,
      "Evaluate on the first N examples of each " "dataset (0: all).",
  )
  flags.DEFINE_multi_string(
      "override", [], "key=value config overrides " "applied to every run."
  )
  flags.DEFINE_bool(
      "finished_only",
      False,
      "Table the runs that have " "finished; train nothing.",
  )
  flags.DEFINE_bool(
      "write",
      False,
      f"Write {RESULTS}, {FIGURE} and the "
      "README.md / docs/benchmark.md block.",
  )


def main(argv):
  del argv
  f = flags.FLAGS
  t0 = time.perf_counter()
  wanted = [m for m in f.methods.split(",") if m]
  for m in wanted:
    if m not in METHODS:
      raise app.UsageError(
          f"method {m!r} is unknown; use some of " f"{', '.join(METHODS)}."
      )
  methods = available(wanted)
  if skipped := [m for m in wanted if m not in methods]:
    print(f"no config yet, skipped: {', '.join(skipped)}")
  seeds = [int(s) for s in f.seeds.split(",")]
  config_fn = lambda m, s: config_for(m, f.scale, s, f.override)
  results = run_all(
      methods,
      seeds,
      f.root,
      config_fn=config_fn,
      limit=f.limit or None,
      finished_only=f.finished_only,
  )
  if not results:
    raise app.UsageError(
        f"no finished run in {f.root}; drop --finished_only " "to train them."
    )
  datasets = config_fn(methods[0], seeds[0]).eval.datasets.split(",")
  if f.scale == "paper":
    print(paper_table(results, datasets))
    return
  teacher_config = config_for("sft", "tiny", seeds[0])
  teacher = evaluate_run(
      teacher_config,
      recipe.TINY_TEACHER,
      outdir=os.path.join(f.root, "teacher_eval"),
      limit=f.limit or None,
  )
  # --finished_only trains and scores nothing: no wall time worth printing.
  seconds = None if f.finished_only else time.perf_counter() - t0
  fig = FIGURE if f.write else os.path.join(f.root, "tiny_table.png")
  figure(results, datasets[0], fig, teacher=teacher)
  # The figure's link is relative to the file the block lands in.
  text_in = lambda where: report(
      results,
      datasets[0],
      teacher=teacher,
      figure_path=os.path.relpath(fig, where),
      seconds=seconds,
  )
  text = text_in(os.curdir)
  print(text)
  if f.write:
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w") as out:
      out.write(text_in(os.path.dirname(RESULTS)) + "\n")
    for doc in ("README.md", os.path.join("docs", "benchmark.md")):
      if replace_block(doc, text_in(os.path.dirname(doc) or os.curdir)):
        print(f"updated {doc}")
  runs = sum(len(r) for r in results.values())
  print(
      f"\nwall time {time.perf_counter() - t0:.0f} s ({runs} runs of "
      f"{len(results)} methods)"
  )


if __name__ == "__main__":
  _define_flags()
  app.run(main)
