"""Responses of a model to a dataset's prompts, under a :class:`Protocol`.

Prompts are templated as for training (:func:`kdjax.data.pipeline.prompt_of`,
the chat template included), cut to their first ``max_prompt_length`` tokens
and left-padded with EOS; :func:`kdjax.sampling.generate` samples up to
``max_new_tokens`` tokens per prompt, stopping at the first stop id (the EOS,
the tokenizer's ``eos_token`` and generation EOS ids, and under the chat
template its end-of-turn token: :func:`kdjax.data.tokenizer.stop_ids`), on an
eval-mode (dropout off) view of the model.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Mapping, Sequence

from flax import nnx
import jax
import numpy as np
import tqdm

from kdjax import sampling, sharding
from kdjax.data import pipeline
from kdjax.data import tokenizer as tokenizer_lib
from kdjax.data.tokenizer import Tokenizer
from kdjax.evaluation.protocol import Protocol
from kdjax.evaluation.scoring import postprocess

# Random-access examples (``len``, ``[i]``): a TFDS data source or a list of
# dicts with instruction/input (or prompt) and references/valid_answers.
Source = Any


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
        f"n_positions={limit}; lower max_new_tokens or max_prompt_length."
    )


def head(source: Source, limit: int | None) -> list[Mapping[str, Any]]:
  """The first ``limit`` examples of ``source`` (all when None)."""
  if limit is not None and limit <= 0:
    raise ValueError(f"limit={limit} must be positive (or None for all).")
  n = len(source) if limit is None else min(limit, len(source))
  if hasattr(source, "__getitems__"):  # TFDS: one batched read
    return list(source.__getitems__(list(range(n))))
  return [source[i] for i in range(n)]


def prompts(
    examples: Sequence[Mapping[str, Any]],
    tokenizer: Tokenizer,
    eos_id: int,
    protocol: Protocol,
    batch_size: int,
) -> pipeline.EvalPrompts:
  """The protocol's generation rows of ``examples``, all on this process."""
  if batch_size <= 0:
    raise ValueError(f"batch_size={batch_size} must be positive.")
  # One process sees every example: outputs are gathered on the host.
  return pipeline.eval_prompts(
      examples,
      tokenizer,
      eos_id=eos_id,
      batch_size=batch_size,
      max_prompt_length=protocol.max_prompt_length,
      process_index=0,
      process_count=1,
      template_style=protocol.template,
      system_prompt=protocol.system_prompt,
  )


def _check_mesh_batch(batch_size: int, mesh: jax.sharding.Mesh) -> None:
  n = int(np.prod([mesh.shape[a] for a in sharding.BATCH]))
  if batch_size % n:
    raise ValueError(
        f"batch_size={batch_size} is not a multiple of the "
        f"mesh's {n} batch shards; use a multiple of {n}."
    )


def generate_token_ids(
    model: nnx.Module,
    prompts: pipeline.EvalPrompts,
    *,
    protocol: Protocol,
    seed: int,
    eos_id: int,
    stop_ids: Sequence[int],
    mesh: jax.sharding.Mesh | None = None,
    progress: bool = True,
    desc: str = "generate",
) -> list[np.ndarray]:
  """Generated token ids of every example of ``prompts``, in order.

  Batch ``b`` is sampled with ``fold_in(key(seed), b)`` and a row's logits see
  only its own prompt, so a response depends on its prompt, the seed and its
  place in the example list given the batch size, nothing else. Every batch
  has the same shape, so generation compiles once per (model, protocol,
  batch size). With ``mesh``, batches are split over its batch axes (the
  batch size must be a multiple of their size) and the model should already
  be placed on it (``sharding.shard_model``). A response ends at the first
  of ``stop_ids`` (:func:`stop_ids`); ``eos_id`` pads.

  Returns:
    one ``[max_new_tokens]`` int array per example; after the stop id comes
    EOS.
  """
  _check_positions(model, protocol)
  if mesh is not None:
    _check_mesh_batch(prompts.dataset[0]["input_ids"].shape[0], mesh)
  settings = protocol.sampling_settings(eos_id, stop_ids)
  model = _eval_view(model)
  place = (
      (lambda x: x)
      if mesh is None
      else functools.partial(
          jax.device_put, device=sharding.batch_sharding(mesh)
      )
  )
  base = jax.random.key(seed)
  out: list[np.ndarray | None] = [None] * len(prompts.examples)
  bar = tqdm.tqdm(
      total=len(out), desc=desc, unit="ex", disable=not progress, leave=False
  )
  with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
    for b in range(len(prompts.dataset)):
      batch = prompts.dataset[b]
      tokens = sampling.generate(
          model,
          place(batch["input_ids"]),
          place(batch["attention_mask"].astype(bool)),
          jax.random.fold_in(base, b),
          **settings,
      )
      tokens = np.asarray(jax.device_get(tokens))
      for row, i in enumerate(batch["index"]):
        if i >= 0:
          out[i] = tokens[row]
      bar.update(int(batch["valid"].sum()))
  bar.close()
  return out


def stop_ids(
    tokenizer: Tokenizer, eos_id: int, protocol: Protocol
) -> tuple[int, ...]:
  """The ids that end a response: :func:`kdjax.data.tokenizer.stop_ids` under
  the protocol's template (the run's ``data.template``), the set on-policy
  sampling uses too."""
  return tokenizer_lib.stop_ids(tokenizer, eos_id, protocol.template)


def responses(
    model: nnx.Module,
    tokenizer: Tokenizer,
    eos_id: int,
    stops: Sequence[int],
    prompts: pipeline.EvalPrompts,
    protocol: Protocol,
    seed: int,
    mesh: jax.sharding.Mesh | None,
    progress: bool,
    desc: str,
) -> list[str]:
  """The response text to every prompt (:func:`generate_token_ids`, cut at
  the first of ``stops`` and decoded)."""
  ids = generate_token_ids(
      model,
      prompts,
      protocol=protocol,
      seed=seed,
      eos_id=eos_id,
      stop_ids=stops,
      mesh=mesh,
      progress=progress,
      desc=desc,
  )
  return [postprocess(t, tokenizer, stops) for t in ids]


def generate_responses(
    model: nnx.Module,
    tokenizer: Tokenizer,
    eos_id: int,
    source: Source,
    *,
    protocol: Protocol = Protocol(),
    seed: int,
    limit: int | None = None,
    batch_size: int = 32,
    mesh: jax.sharding.Mesh | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
  """One response per example of ``source`` (e.g. SeqKD teacher outputs),
  each ending at its first stop id (:func:`stop_ids`).

  Returns:
    ``[{"prompt", "references", "task", "instruction", "input",
    "response"}]`` in source order (instruction and input as
    :func:`kdjax.data.pipeline.instruction_of` reads them, so the prompt can
    be rendered again).
  """
  examples = head(source, limit)
  rows = prompts(examples, tokenizer, eos_id, protocol, batch_size)
  texts = responses(
      model,
      tokenizer,
      eos_id,
      stop_ids(tokenizer, eos_id, protocol),
      rows,
      protocol,
      seed,
      mesh,
      progress,
      f"seed {seed}",
  )
  return [
      dict(ex, **_instruction(src), response=r)
      for ex, src, r in zip(rows.examples, examples, texts)
  ]


def _instruction(example: Mapping[str, Any]) -> dict[str, str]:
  if "instruction" not in example:  # a given prompt only
    return {}
  instruction, input_ = pipeline.instruction_of(example)
  return {"instruction": instruction, "input": input_}
