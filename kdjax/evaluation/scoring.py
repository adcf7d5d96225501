"""Scoring responses: ROUGE-L F1, exact match, validity, and their aggregation.

* responses are cut at the first stop id, decoded without special tokens,
  cut at ``<|endoftext|>``, stripped (:func:`postprocess`);
* ROUGE-L F1 (``rouge_score``, Porter stemmer), max over the references;
  exact match after SQuAD normalisation; validity (datasets listing every
  valid answer) is exact match against those answers;
* per seed: the mean over examples x 100; then mean and std over seeds
  (:func:`aggregate`).
"""

from __future__ import annotations

import functools
import re
import string
from typing import Any, Collection, Iterable, Mapping, Sequence

import numpy as np

from kdjax.data.tokenizer import Tokenizer

EOS_TEXT = "<|endoftext|>"
METRICS = ("rougeL", "exact_match", "validity")


@functools.cache
def _rouge_scorer():
  # Imported on first use: it pulls in nltk, which trainers need not load.
  from rouge_score import rouge_scorer  # pylint: disable=g-import-not-at-top

  return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, references: Sequence[str]) -> float:
  """ROUGE-L F1 in [0, 1], the max over ``references``.

  ``RougeScorer(["rougeL"], use_stemmer=True).score(target=ref,
  prediction=prediction).fmeasure``: lowercased alphanumeric tokens, Porter
  stemmed. An empty prediction (or no reference) scores 0. The x100 of the
  published numbers is applied when averaging (:func:`aggregate`).
  """
  if not prediction.strip() or not references:
    return 0.0
  scorer = _rouge_scorer()
  return max(
      scorer.score(target=ref, prediction=prediction)["rougeL"].fmeasure
      for ref in references
  )


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize(text: str) -> str:
  """SQuAD normalisation: lowercase, no punctuation, no a/an/the, one space."""
  text = text.lower().translate(_PUNCTUATION)
  return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, references: Sequence[str]) -> bool:
  """Whether the normalised prediction equals some normalised reference."""
  return normalize(prediction) in {normalize(r) for r in references}


def score(
    response: str,
    references: Sequence[str],
    valid_answers: Sequence[str] | None = None,
) -> dict[str, float]:
  """Per-example scores in [0, 1]: rougeL, exact_match and (with a valid
  answer list) validity, i.e. :func:`exact_match` against every valid answer.

  On ``synthetic_instruct`` the references are the valid answers, so validity
  equals exact match there; it is kept as its own column because it is the
  task-level success rate whatever the references are.
  """
  out = {
      "rougeL": rouge_l(response, references),
      "exact_match": float(exact_match(response, references)),
  }
  if valid_answers is not None:
    out["validity"] = float(exact_match(response, valid_answers))
  return out


def postprocess(
    token_ids: Iterable[int], tokenizer: Tokenizer, stop_ids: Collection[int]
) -> str:
  """Generated ids -> response text: cut at the first of ``stop_ids`` (the
  EOS, an end-of-turn token), decode without special tokens, cut at
  ``<|endoftext|>``, strip."""
  stops = {int(i) for i in stop_ids}
  ids = [int(t) for t in token_ids]
  ids = ids[: next((j for j, t in enumerate(ids) if t in stops), len(ids))]
  text = tokenizer.decode(ids, skip_special_tokens=True)
  return text.split(EOS_TEXT, 1)[0].strip()


def aggregate(
    rows: Sequence[Mapping[str, Any]], seeds: Sequence[int]
) -> dict[str, Any]:
  """Per-seed means x100, then mean and std (``np.std``, ddof 0) over seeds.

  Returns ``{"num_examples", "seeds", "<metric>", "<metric>_std",
  "per_seed": {seed: {metric: value}}, "per_task": {task: {metric: mean over
  seeds}}}`` for every metric in :data:`METRICS` the rows have.
  """
  names = [m for m in METRICS if rows and m in rows[0]["scores"][str(seeds[0])]]

  def per_seed(subset):
    return {
        str(s): {
            m: 100.0 * float(np.mean([r["scores"][str(s)][m] for r in subset]))
            for m in names
        }
        for s in seeds
    }

  table = per_seed(rows)
  metrics: dict[str, Any] = {"num_examples": len(rows), "seeds": list(seeds)}
  for m in names:
    values = [table[str(s)][m] for s in seeds]
    metrics[m] = float(np.mean(values))
    metrics[f"{m}_std"] = float(np.std(values))
  metrics["per_seed"] = table
  tasks = sorted({r["task"] for r in rows if r["task"]})
  if tasks:
    metrics["per_task"] = {}
    for task in tasks:
      t = per_seed([r for r in rows if r["task"] == task])
      metrics["per_task"][task] = {
          m: float(np.mean([t[str(s)][m] for s in seeds])) for m in names
      }
  return metrics
