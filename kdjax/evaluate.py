r"""ROUGE-L evaluation of instruction following: the MiniLLM / AKL protocol.

kd_losses.md section 5 (``evaluate_main.py`` + ``rouge_metric.py`` of LMOps,
distillm and DSKD):

* prompts templated, cut to their first 256 tokens, left-padded with EOS;
* up to 256 new tokens sampled with temperature 1, top-k and top-p off,
  ``no_repeat_ngram_size=6``, stopping at EOS;
* responses decoded without special tokens, cut at ``<|endoftext|>``, stripped;
* ROUGE-L F1 (``rouge_score``, Porter stemmer), max over the references, mean
  over examples x 100; exact match after SQuAD normalisation next to it;
* one full evaluation per seed 10, 20, 30, 40, 50; mean and std over seeds.

Datasets whose examples list every valid answer (``synthetic_instruct``) also
get ``validity``: the share of responses that normalise to one of them.

From Python::

  from kdjax import evaluate
  result = evaluate.evaluate(model, tokenizer, eos_id, source, seeds=(10,),
                             limit=64)
  result.metrics["rougeL"], result.rows[0]["responses"]["10"]

Command line (a HF model directory or a training workdir)::

  python -m kdjax.evaluate --config=kdjax/configs/akl_gpt2.py --checkpoint=WORKDIR \
      [--datasets=dolly,sinst] [--seeds=10,20] [--limit=N] [--outdir=DIR] \
      [--manual_dir=DIR]

writes ``<outdir>/<dataset>.jsonl`` (one line per example), merges the metrics
into ``<outdir>/summary.json`` and prints a markdown table.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import re
import string
import sys
from typing import Any, Iterable, Mapping, NamedTuple, Sequence

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from ml_collections import config_flags
import tqdm

from kdjax import models
from kdjax import sampling
from kdjax import sharding
from kdjax.data import pipeline
from kdjax.data import sources
from kdjax.data import tokenizer as tokenizer_lib

EOS_TEXT = "<|endoftext|>"
METRICS = ("rougeL", "exact_match", "validity")
# Named evaluation sets read by instruct_jsonl from manual_dir.
JSONL_SETS = ("sinst", "vicuna", "sni", "unni", "dolly_test")
DATASETS = ("dolly", "synthetic_instruct") + JSONL_SETS


# ----------------------------------------------------------------------------
# Scoring.


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
  return max(scorer.score(target=ref, prediction=prediction)["rougeL"].fmeasure
             for ref in references)


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize(text: str) -> str:
  """SQuAD normalisation: lowercase, no punctuation, no a/an/the, one space."""
  text = text.lower().translate(_PUNCTUATION)
  return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, references: Sequence[str]) -> bool:
  """Whether the normalised prediction equals some normalised reference."""
  return normalize(prediction) in {normalize(r) for r in references}


def score(response: str, references: Sequence[str],
          valid_answers: Sequence[str] | None = None) -> dict[str, float]:
  """Per-example scores in [0, 1]: rougeL, exact_match and (with a valid
  answer list) validity, i.e. :func:`exact_match` against every valid answer.

  On ``synthetic_instruct`` the references are the valid answers, so validity
  equals exact match there; it is kept as its own column because it is the
  task-level success rate whatever the references are.
  """
  out = {"rougeL": rouge_l(response, references),
         "exact_match": float(exact_match(response, references))}
  if valid_answers is not None:
    out["validity"] = float(exact_match(response, valid_answers))
  return out


def postprocess(token_ids: Iterable[int], tokenizer, eos_id: int) -> str:
  """Generated ids -> response text: cut at the first EOS, decode without
  special tokens, cut at ``<|endoftext|>``, strip."""
  ids = [int(t) for t in token_ids]
  if eos_id in ids:
    ids = ids[:ids.index(eos_id)]
  text = tokenizer.decode(ids, skip_special_tokens=True)
  return text.split(EOS_TEXT, 1)[0].strip()


# ----------------------------------------------------------------------------
# Generation.


class Protocol(NamedTuple):
  """Decoding settings; the defaults are the paper protocol (kd_losses.md 5)."""
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  no_repeat_ngram_size: int = 6
  max_new_tokens: int = 256
  max_prompt_length: int = 256
  greedy: bool = False
  seeds: tuple[int, ...] = (10, 20, 30, 40, 50)
  template: str = "minillm"  # prompt template (kdjax.data.template.STYLES)

  def sampling_settings(self, eos_id: int) -> dict[str, Any]:
    """Keyword arguments of :func:`kdjax.sampling.generate`."""
    return dict(max_new_tokens=self.max_new_tokens, greedy=self.greedy,
                temperature=self.temperature, top_k=self.top_k,
                top_p=self.top_p,
                no_repeat_ngram_size=self.no_repeat_ngram_size,
                eos_id=eos_id, pad_id=eos_id)


def _eval_view(model: nnx.Module) -> nnx.Module:
  """An eval-mode (dropout off) copy of ``model`` sharing its arrays.

  ``split`` + ``merge`` builds new module objects over the same jax arrays
  (no copy), so ``eval()`` on it leaves the caller's model in whatever mode
  it was in.
  """
  view = nnx.merge(*nnx.split(model))
  view.eval()
  return view


def _check_positions(model: nnx.Module, protocol: Protocol) -> None:
  # GPT-2's learned positions stop at n_positions; gathers past it would clamp.
  limit = getattr(getattr(model, "config", None), "n_positions", None)
  need = protocol.max_prompt_length + protocol.max_new_tokens
  if limit is not None and need > limit:
    raise ValueError(
        f"max_prompt_length + max_new_tokens = {need} exceeds the model's "
        f"n_positions={limit}; lower max_new_tokens or max_prompt_length.")


def _head(source, limit: int | None) -> list[Mapping[str, Any]]:
  """The first ``limit`` examples of ``source`` (all when None)."""
  if limit is not None and limit <= 0:
    raise ValueError(f"limit={limit} must be positive (or None for all).")
  n = len(source) if limit is None else min(limit, len(source))
  if hasattr(source, "__getitems__"):  # TFDS: one batched read
    return list(source.__getitems__(list(range(n))))
  return [source[i] for i in range(n)]


def _valid_answers(examples: Sequence[Mapping[str, Any]]):
  """Each example's ``valid_answers`` list, or None if the dataset has none."""
  if not examples or "valid_answers" not in examples[0]:
    return None
  return [pipeline.to_texts(ex["valid_answers"]) for ex in examples]


def _prompts(examples, tokenizer, eos_id: int, protocol: Protocol,
             batch_size: int) -> pipeline.EvalPrompts:
  if batch_size <= 0:
    raise ValueError(f"batch_size={batch_size} must be positive.")
  # One process sees every example: outputs are gathered on the host.
  return pipeline.eval_prompts(
      examples, tokenizer, eos_id=eos_id, batch_size=batch_size,
      max_prompt_length=protocol.max_prompt_length, process_index=0,
      process_count=1, template_style=protocol.template)


def _check_mesh_batch(batch_size: int, mesh: jax.sharding.Mesh) -> None:
  n = int(np.prod([mesh.shape[a] for a in sharding.BATCH]))
  if batch_size % n:
    raise ValueError(f"batch_size={batch_size} is not a multiple of the "
                     f"mesh's {n} batch shards; use a multiple of {n}.")


def generate_token_ids(model: nnx.Module, prompts: pipeline.EvalPrompts, *,
                       protocol: Protocol, seed: int, eos_id: int,
                       mesh: jax.sharding.Mesh | None = None,
                       progress: bool = True,
                       desc: str = "generate") -> list[np.ndarray]:
  """Generated token ids of every example of ``prompts``, in order.

  Batch ``b`` is sampled with ``fold_in(key(seed), b)`` and a row's logits see
  only its own prompt, so a response depends on its prompt, the seed and its
  place in the example list given the batch size, nothing else. Every batch
  has the same shape, so generation compiles once per (model, protocol,
  batch size). With ``mesh``, batches are split over its batch axes (the
  batch size must be a multiple of their size) and the model should already
  be placed on it (``sharding.shard_model``).

  Returns:
    one ``[max_new_tokens]`` int array per example; after EOS comes EOS.
  """
  _check_positions(model, protocol)
  if mesh is not None:
    _check_mesh_batch(prompts.dataset[0]["input_ids"].shape[0], mesh)
  settings = protocol.sampling_settings(eos_id)
  model = _eval_view(model)
  place = (lambda x: x) if mesh is None else functools.partial(
      jax.device_put, device=sharding.batch_sharding(mesh))
  base = jax.random.key(seed)
  out: list[np.ndarray | None] = [None] * len(prompts.examples)
  bar = tqdm.tqdm(total=len(out), desc=desc, unit="ex", disable=not progress,
                  leave=False)
  with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
    for b in range(len(prompts.dataset)):
      batch = prompts.dataset[b]
      tokens = sampling.generate(
          model, place(batch["input_ids"]),
          place(batch["attention_mask"].astype(bool)),
          jax.random.fold_in(base, b), **settings)
      tokens = np.asarray(jax.device_get(tokens))
      for row, i in enumerate(batch["index"]):
        if i >= 0:
          out[i] = tokens[row]
      bar.update(int(batch["valid"].sum()))
  bar.close()
  return out


def _responses(model, tokenizer, eos_id, prompts, protocol, seed, mesh,
               progress, desc) -> list[str]:
  ids = generate_token_ids(model, prompts, protocol=protocol, seed=seed,
                           eos_id=eos_id, mesh=mesh, progress=progress,
                           desc=desc)
  return [postprocess(t, tokenizer, eos_id) for t in ids]


def generate_responses(model: nnx.Module, tokenizer, eos_id: int, source, *,
                       protocol: Protocol = Protocol(), seed: int,
                       limit: int | None = None, batch_size: int = 32,
                       mesh: jax.sharding.Mesh | None = None,
                       progress: bool = True) -> list[dict[str, Any]]:
  """One response per example of ``source`` (e.g. SeqKD teacher outputs).

  Returns:
    ``[{"prompt", "references", "task", "response"}]`` in source order.
  """
  prompts = _prompts(_head(source, limit), tokenizer, eos_id, protocol,
                     batch_size)
  texts = _responses(model, tokenizer, eos_id, prompts, protocol, seed, mesh,
                     progress, f"seed {seed}")
  return [dict(ex, response=r) for ex, r in zip(prompts.examples, texts)]


# ----------------------------------------------------------------------------
# Evaluation.


@dataclasses.dataclass
class Result:
  """``metrics``: see :func:`aggregate`; ``rows``: one dict per example with
  prompt, references, task, (valid_answers,) and per seed (string keys) the
  response and its scores in [0, 1]."""
  metrics: dict[str, Any]
  rows: list[dict[str, Any]]


def aggregate(rows: Sequence[Mapping[str, Any]],
              seeds: Sequence[int]) -> dict[str, Any]:
  """Per-seed means x100, then mean and std (``np.std``, ddof 0) over seeds.

  Returns ``{"num_examples", "seeds", "<metric>", "<metric>_std",
  "per_seed": {seed: {metric: value}}, "per_task": {task: {metric: mean over
  seeds}}}`` for every metric in :data:`METRICS` the rows have.
  """
  names = [m for m in METRICS if rows and m in rows[0]["scores"][str(seeds[0])]]

  def per_seed(subset):
    return {str(s): {m: 100.0 * float(np.mean([r["scores"][str(s)][m]
                                               for r in subset]))
                     for m in names} for s in seeds}

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
          m: float(np.mean([t[str(s)][m] for s in seeds])) for m in names}
  return metrics


def evaluate(model: nnx.Module, tokenizer, eos_id: int, source, *,
             protocol: Protocol = Protocol(),
             seeds: Sequence[int] | None = None, limit: int | None = None,
             batch_size: int = 32, mesh: jax.sharding.Mesh | None = None,
             progress: bool = True, name: str = "eval") -> Result:
  """Generates a response per example and seed and scores it (module docstring).

  Args:
    model: a kdjax causal LM; used through an eval-mode view (dropout off),
      the caller's model is left as it was.
    tokenizer: a ``tokenizers.Tokenizer`` (``kdjax.data.tokenizer.load``).
    eos_id: its EOS id (also the left-padding id).
    source: random-access examples (``len``, ``[i]``): a TFDS data source from
      ``kdjax.data.sources.load_source`` or a list of dicts with
      instruction/input (or prompt) and references/valid_answers/response.
    protocol: decoding settings (paper defaults).
    seeds: overrides ``protocol.seeds``.
    limit: evaluate the first ``limit`` examples only (periodic validation).
    batch_size: prompts per generation call (fixed shape, compiled once).
    mesh: optional mesh to split batches over (see
      :func:`generate_token_ids`).
    progress: show a tqdm bar per seed.
    name: label of the progress bar.
  """
  seeds = tuple(protocol.seeds if seeds is None else seeds)
  if not seeds:
    raise ValueError("seeds is empty; pass at least one seed, e.g. (10,).")
  examples = _head(source, limit)
  valid = _valid_answers(examples)
  prompts = _prompts(examples, tokenizer, eos_id, protocol, batch_size)
  rows = [dict(ex, responses={}, scores={}) for ex in prompts.examples]
  if valid is not None:
    for row, answers in zip(rows, valid):
      row["valid_answers"] = answers
  for seed in seeds:
    texts = _responses(model, tokenizer, eos_id, prompts, protocol, seed,
                       mesh, progress, f"{name} seed {seed}")
    for row, text in zip(rows, texts):
      row["responses"][str(seed)] = text
      row["scores"][str(seed)] = score(text, row["references"],
                                       row.get("valid_answers"))
  metrics = aggregate(rows, seeds)
  metrics["truncated_prompts"] = prompts.truncated_prompts
  return Result(metrics, rows)


# ----------------------------------------------------------------------------
# Output.


def write(result: Result, outdir: str, dataset_name: str) -> str:
  """Writes ``<outdir>/<dataset>.jsonl`` and merges the metrics into
  ``<outdir>/summary.json``; returns the JSONL path."""
  os.makedirs(outdir, exist_ok=True)
  path = os.path.join(outdir, f"{dataset_name}.jsonl")
  with open(path, "w") as f:
    for row in result.rows:
      f.write(json.dumps(row, ensure_ascii=False) + "\n")
  summary_path = os.path.join(outdir, "summary.json")
  summary = {}
  if os.path.exists(summary_path):
    with open(summary_path) as f:
      summary = json.load(f)
  summary[dataset_name] = result.metrics
  tmp = summary_path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(summary, f, indent=2, sort_keys=True)
  os.replace(tmp, summary_path)  # a reader never sees half a file
  return path


def markdown_table(summaries: Mapping[str, Mapping[str, Any]]) -> str:
  """One row per dataset: examples, seeds and mean ± std of each metric."""
  lines = ["| dataset | examples | seeds | ROUGE-L | EM | validity |",
           "|---|---|---|---|---|---|"]
  for name, m in summaries.items():
    cells = [f"{m[k]:.2f} ± {m[k + '_std']:.2f}" if k in m else "–"
             for k in METRICS]
    lines.append(f"| {name} | {m['num_examples']} | {len(m['seeds'])} | "
                 + " | ".join(cells) + " |")
  return "\n".join(lines)


# ----------------------------------------------------------------------------
# Command line.


def resolve_checkpoint(path: str) -> tuple[str, str]:
  """``(hf_dir, default_outdir)`` for a HF model dir or a training workdir.

  A workdir's model is ``best_hf`` if the trainer exported one, else ``hf``;
  outputs default to ``<workdir or model dir>/eval``.
  """
  path = os.path.expanduser(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"checkpoint {path} does not exist; pass a HF "
                            "model directory or a training workdir.")
  # A workdir also holds a config.json (the trainer's), so its exports win.
  for hf_dir in (os.path.join(path, "best_hf"), os.path.join(path, "hf"),
                 path):
    if os.path.exists(os.path.join(hf_dir, "model.safetensors.index.json")) or (
        os.path.exists(os.path.join(hf_dir, "model.safetensors"))):
      return hf_dir, os.path.join(path, "eval")
  raise FileNotFoundError(
      f"checkpoint {path} has no safetensors model, best_hf/ or hf/; pass a HF "
      "model directory or a workdir the trainer exported to.")


def load_dataset(name: str, data_dir: str, manual_dir: str | None = None):
  """``(source, output name)`` for a dataset name of the ``--datasets`` flag."""
  if name.endswith(".jsonl"):
    path = os.path.expanduser(name)
    return (sources.load_source("instruct_jsonl", "test", data_dir, path=path),
            os.path.splitext(os.path.basename(path))[0])
  if name == "dolly":
    return sources.load_source("dolly", "test", data_dir,
                               manual_dir=manual_dir), name
  if name == "synthetic_instruct":
    return sources.load_source("synthetic_instruct", "test", data_dir), name
  if name in JSONL_SETS:
    return sources.load_source(f"instruct_jsonl/{name}", "test", data_dir,
                               manual_dir=manual_dir), name
  raise ValueError(f"unknown dataset {name!r}; use one of "
                   f"{', '.join(DATASETS)} or a path ending in .jsonl.")


def _ints(text: str, what: str) -> tuple[int, ...]:
  try:
    return tuple(int(s) for s in text.split(",") if s.strip())
  except ValueError:
    raise ValueError(f"{what}={text!r} is not a comma-separated list of "
                     "integers, e.g. 10,20,30.") from None


def protocol_from_config(config) -> Protocol:
  """The paper protocol with the config's lengths, seeds and (when present)
  ``eval.greedy`` / ``temperature`` / ``top_k`` / ``top_p`` /
  ``no_repeat_ngram_size``."""
  fields = dict(max_new_tokens=config.eval.max_new_tokens,
                max_prompt_length=config.data.max_prompt_length,
                seeds=_ints(config.eval.seeds, "eval.seeds"))
  if "template" in config.data:
    fields["template"] = config.data.template
  for key in ("greedy", "temperature", "top_k", "top_p",
              "no_repeat_ngram_size"):
    if key in config.eval:
      fields[key] = config.eval[key]
  return Protocol(**fields)


def run(config, checkpoint: str, *, datasets: str | None = None,
        seeds: str | None = None, limit: int | None = None,
        outdir: str | None = None, manual_dir: str | None = None,
        progress: bool = True) -> dict[str, dict[str, Any]]:
  """What ``python -m kdjax.evaluate`` does; returns ``{dataset: metrics}``
  and prints the markdown table."""
  hf_dir, default_outdir = resolve_checkpoint(checkpoint)
  outdir = os.path.expanduser(outdir or default_outdir)
  protocol = protocol_from_config(config)
  if seeds:
    protocol = protocol._replace(seeds=_ints(seeds, "--seeds"))
  names = [n.strip() for n in (datasets or config.eval.datasets).split(",")
           if n.strip()]
  data_dir = os.path.expanduser(config.data.data_dir)
  manual_dir = manual_dir or config.data.get("manual_dir") or None
  loaded = [load_dataset(n, data_dir, manual_dir) for n in names]  # fail early

  tok, eos_id = tokenizer_lib.load(config.data.tokenizer)
  # config.mesh (data, fsdp, tensor sizes) when the config has one, else
  # data-parallel over every device.
  mesh = sharding.make_mesh(**(config.mesh.to_dict() if "mesh" in config
                               else {}))
  model = models.load(hf_dir, dtype=jnp.dtype(config.student.dtype),
                      mesh=mesh, seed=config.seed)
  summaries = {}
  for source, name in loaded:
    result = evaluate(model, tok, eos_id, source, protocol=protocol,
                      limit=limit, batch_size=config.eval.batch_size,
                      mesh=mesh, progress=progress, name=name)
    write(result, outdir, name)
    summaries[name] = result.metrics
  print(f"{hf_dir} -> {outdir}")
  print(markdown_table(summaries))
  return summaries


def _define_flags():
  """Defined only when run as a script: the trainer imports this module and
  defines its own ``--config``."""
  config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                  lock_config=True)
  flags.DEFINE_string("checkpoint", None, "HF model dir or training workdir.",
                      required=True)
  flags.DEFINE_string("datasets", None, "Comma-separated dataset names "
                      f"({', '.join(DATASETS)}, or *.jsonl); default: "
                      "config.eval.datasets.")
  flags.DEFINE_string("seeds", None, "Comma-separated sampling seeds; "
                      "default: config.eval.seeds.")
  flags.DEFINE_integer("limit", None, "Evaluate the first N examples only.")
  flags.DEFINE_string("outdir", None, "Output dir; default <checkpoint>/eval.")
  flags.DEFINE_string("manual_dir", None, "Dir with the eval JSONL files.")


def main(argv) -> int:
  del argv
  f = flags.FLAGS
  if f.config is None:
    print("error: --config is required, e.g. --config=kdjax/configs/akl_gpt2.py.",
          file=sys.stderr)
    return 1
  try:
    run(f.config, f.checkpoint, datasets=f.datasets, seeds=f.seeds,
        limit=f.limit, outdir=f.outdir, manual_dir=f.manual_dir)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  _define_flags()
  app.run(main)
