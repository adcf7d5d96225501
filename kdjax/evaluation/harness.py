"""Evaluating a model on one dataset: a response per example and seed, scored.

Example::

  from kdjax import evaluation
  result = evaluation.evaluate(model, tokenizer, eos_id, source, seeds=(10,),
                               limit=64)
  result.metrics["rougeL"], result.rows[0]["responses"]["10"]
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

from flax import nnx
import jax

from kdjax.data import pipeline
from kdjax.data.tokenizer import Tokenizer
from kdjax.evaluation import generation, scoring
from kdjax.evaluation.protocol import Protocol


@dataclasses.dataclass
class Result:
  """``metrics``: see :func:`~kdjax.evaluation.scoring.aggregate`; ``rows``:
  one dict per example with prompt, references, task, (valid_answers,) and
  per seed (string keys) the response and its scores in [0, 1]."""

  metrics: dict[str, Any]
  rows: list[dict[str, Any]]


def _valid_answers(
    examples: Sequence[Mapping[str, Any]],
) -> list[list[str]] | None:
  """Each example's ``valid_answers`` list, or None if the dataset has none."""
  if not examples or "valid_answers" not in examples[0]:
    return None
  return [pipeline.to_texts(ex["valid_answers"]) for ex in examples]


def evaluate(
    model: nnx.Module,
    tokenizer: Tokenizer,
    eos_id: int,
    source: generation.Source,
    *,
    protocol: Protocol = Protocol(),
    seeds: Sequence[int] | None = None,
    limit: int | None = None,
    batch_size: int = 32,
    mesh: jax.sharding.Mesh | None = None,
    progress: bool = True,
    name: str = "eval",
) -> Result:
  """Generates a response per example and seed and scores it.

  Args:
    model: a kdjax causal LM; used through an eval-mode view (dropout off),
      the caller's model is left as it was.
    tokenizer: from ``kdjax.data.tokenizer.load`` (an HF directory's carries
      the chat template ``protocol.template='chat'`` renders).
    eos_id: its EOS id (also the left-padding id); responses end at the
      first of :func:`~kdjax.evaluation.generation.stop_ids` (the EOS, the
      tokenizer's other EOS ids and, under the chat template, its
      end-of-turn token).
    source: random-access examples (``len``, ``[i]``): a TFDS data source from
      ``kdjax.data.sources.load_source`` or a list of dicts with
      instruction/input (or prompt) and references/valid_answers/response.
    protocol: decoding settings (paper defaults).
    seeds: overrides ``protocol.seeds``.
    limit: evaluate the first ``limit`` examples only (periodic validation).
    batch_size: prompts per generation call (fixed shape, compiled once).
    mesh: optional mesh to split batches over (see
      :func:`~kdjax.evaluation.generation.generate_token_ids`).
    progress: show a tqdm bar per seed.
    name: label of the progress bar.
  """
  seeds = tuple(protocol.seeds if seeds is None else seeds)
  if not seeds:
    raise ValueError("seeds is empty; pass at least one seed, e.g. (10,).")
  examples = generation.head(source, limit)
  valid = _valid_answers(examples)
  prompts = generation.prompts(
      examples, tokenizer, eos_id, protocol, batch_size
  )
  stops = generation.stop_ids(tokenizer, eos_id, protocol)
  rows = [dict(ex, responses={}, scores={}) for ex in prompts.examples]
  if valid is not None:
    for row, answers in zip(rows, valid):
      row["valid_answers"] = answers
  for seed in seeds:
    texts = generation.responses(
        model,
        tokenizer,
        eos_id,
        stops,
        prompts,
        protocol,
        seed,
        mesh,
        progress,
        f"{name} seed {seed}",
    )
    for row, text in zip(rows, texts):
      row["responses"][str(seed)] = text
      row["scores"][str(seed)] = scoring.score(
          text, row["references"], row.get("valid_answers")
      )
  metrics = scoring.aggregate(rows, seeds)
  metrics["truncated_prompts"] = prompts.truncated_prompts
  return Result(metrics, rows)
