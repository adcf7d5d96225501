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
top-k and top-p off, ``no_repeat_ngram_size=6``, stopping at the first stop
id (EOS; an instruct tokenizer's other EOS ids and end-of-turn token:
:func:`kdjax.data.tokenizer.stop_ids`); responses cut there, decoded without
special tokens, cut at ``<|endoftext|>``, stripped; ROUGE-L F1
(``rouge_score``, Porter stemmer), max over the references, mean over
examples x 100, exact match after SQuAD normalisation next to it; one full
evaluation per seed 10, 20, 30, 40, 50; mean and std over seeds. Datasets
whose examples list every valid answer (``synthetic_instruct``) also get
``validity``: the share of responses that normalise to one of them.
"""

import importlib

# Public name -> the submodule defining it. Submodules are imported on first
# use, so reading the protocol (kdjax.config does) loads no model code.
_WHERE = {
    "Protocol": "protocol",
    "EOS_TEXT": "scoring",
    "METRICS": "scoring",
    "aggregate": "scoring",
    "exact_match": "scoring",
    "normalize": "scoring",
    "postprocess": "scoring",
    "rouge_l": "scoring",
    "score": "scoring",
    "generate_responses": "generation",
    "generate_token_ids": "generation",
    "Result": "harness",
    "evaluate": "harness",
    "DATASETS": "datasets",
    "JSONL_SETS": "datasets",
    "load_dataset": "datasets",
    "markdown_table": "files",
    "resolve_checkpoint": "files",
    "write": "files",
    "run": "suite",
}
_SUBMODULES = (
    "protocol",
    "generation",
    "scoring",
    "harness",
    "datasets",
    "files",
    "suite",
)


def __getattr__(name):
  if name in _WHERE:
    module = importlib.import_module(f"kdjax.evaluation.{_WHERE[name]}")
    return getattr(module, name)
  if name in _SUBMODULES:
    return importlib.import_module(f"kdjax.evaluation.{name}")
  raise AttributeError(f"module 'kdjax.evaluation' has no attribute {name!r}")


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
