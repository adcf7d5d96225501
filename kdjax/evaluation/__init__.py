"""ROUGE-L evaluation of instruction following: the MiniLLM / AKL protocol.

=================  =======================================================
module             concern
=================  =======================================================
``protocol``       :class:`Protocol`, the decoding settings
``generation``     prompts -> responses (:func:`generate_responses`)
``scoring``        ROUGE-L, exact match, validity; :func:`aggregate`
``harness``        :func:`evaluate`: generation x seeds, scored
``datasets``       the evaluation sets by name (:func:`load_dataset`)
``files``          ``<dataset>.jsonl``, ``summary.json``, the table
``suite``          :func:`run`: a checkpoint on a suite (the CLI's work)
=================  =======================================================

A config becomes a :class:`Protocol` in :func:`kdjax.config.spec.protocol_from_config`.

The protocol (docs/evaluation.md): prompts templated, cut to their first 256
tokens, left-padded with EOS; up to 256 new tokens sampled with temperature 1,
top-k and top-p off, ``no_repeat_ngram_size=6``, stopping at EOS; responses
decoded without special tokens, cut at ``<|endoftext|>``, stripped; ROUGE-L F1
(``rouge_score``, Porter stemmer), max over the references, mean over
examples x 100, exact match after SQuAD normalisation next to it; one full
evaluation per seed 10, 20, 30, 40, 50; mean and std over seeds. Datasets
whose examples list every valid answer (``synthetic_instruct``) also get
``validity``: the share of responses that normalise to one of them.
"""

from kdjax.evaluation.datasets import DATASETS, JSONL_SETS, load_dataset
from kdjax.evaluation.files import markdown_table, resolve_checkpoint, write
from kdjax.evaluation.generation import generate_responses, generate_token_ids
from kdjax.evaluation.harness import Result, evaluate
from kdjax.evaluation.protocol import Protocol
from kdjax.evaluation.scoring import (
    EOS_TEXT,
    METRICS,
    aggregate,
    exact_match,
    normalize,
    postprocess,
    rouge_l,
    score,
)
from kdjax.evaluation.suite import run

__all__ = [
    "Protocol",
    "EOS_TEXT",
    "METRICS",
    "aggregate",
    "exact_match",
    "normalize",
    "postprocess",
    "rouge_l",
    "score",
    "generate_responses",
    "generate_token_ids",
    "Result",
    "evaluate",
    "DATASETS",
    "JSONL_SETS",
    "load_dataset",
    "markdown_table",
    "resolve_checkpoint",
    "write",
    "run",
]
