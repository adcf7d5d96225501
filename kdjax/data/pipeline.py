"""From a TFDS data source to numpy batches: template, tokens, loss mask, grain.

Layout (docs/data.md "Tokens and batch layout"; MiniLLM ``lm_datasets.py``):

* ``prompt_ids = encode(prompt)``; ``response_ids = encode(prompt +
  completion)[len(prompt_ids):] + [EOS]`` (tokenise the concatenation, then
  slice; no EOS is added when the text already ends with it); ``ids =
  prompt_ids ‖ response_ids`` truncated to ``max_length``. The completion is
  the response under a text template and the rest of the answered
  conversation under the chat template (:func:`texts_of`).
* A prompt longer than ``max_prompt_length`` is dropped (policy ``"drop"``,
  MiniLLM) or cut to its first ``max_prompt_length`` tokens (``"truncate"``,
  DistiLLM). Every drop and truncation is counted in :class:`TokenStats`.
* Training rows have length ``L = max_length``: ``input_ids = ids[:-1]`` and
  ``labels = ids[1:]``, right-padded with EOS; ``loss_mask`` is 1 exactly where
  the label is a response token (incl. the final EOS), i.e. on positions
  ``len(prompt_ids)-1 .. len(ids)-2``; ``attention_mask`` is 1 on the
  ``len(ids)-1`` real inputs; ``positions = arange(L)``. Padded labels hold EOS
  (not -100) so they are valid gather indices; ``loss_mask`` is the truth.
* Generation rows are prompts only, truncated to their first
  ``max_prompt_length`` tokens and left-padded with EOS to that length;
  ``positions`` start at 0 on the first real token (``cumsum(mask) - 1``).

Examples are tokenised once, eagerly, so that counts are exact and an epoch has
a known number of steps; grain then does the shuffling, repeating, sharding and
batching by index, which makes the iterator state a few integers that orbax
saves with ``grain.checkpoint.CheckpointSave``.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any, Callable, Literal, Mapping, Sequence

from absl import logging
import grain
import numpy as np

from kdjax.data import chat, template
from kdjax.data.tokenizer import Tokenizer

PromptPolicy = Literal["drop", "truncate"]
_POLICIES = ("drop", "truncate")
# Binds the kept examples to a function giving example i's extra row fields
# (a teacher cache: kdjax.cache.store.Cache.bind).
RowFields = Callable[
    [Sequence["Tokenized"], int], Callable[[int], Mapping[str, np.ndarray]]
]


# ----------------------------------------------------------------------------
# Text.


def to_text(value: Any) -> str:
  """TFDS Text values are bytes when read back (str under mock_data)."""
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def to_texts(values: Any) -> list[str]:
  return [to_text(v) for v in values]


def instruction_of(example: Mapping[str, Any]) -> tuple[str, str]:
  """``(instruction, input)`` of an example (Dolly calls the input
  ``context``)."""
  input_ = example.get("input", example.get("context", ""))
  return to_text(example["instruction"]), to_text(input_)


def _chat_tokenizer(tokenizer: Tokenizer | None) -> Tokenizer:
  if getattr(tokenizer, "chat_template", None) is None:
    raise ValueError(
        "template 'chat' renders the tokenizer's chat template and this "
        "tokenizer has none; load an instruct model's tokenizer directory "
        "(kdjax.data.tokenizer.from_pretrained) or use 'minillm' or "
        "'compact'."
    )
  return tokenizer


def _messages(
    example: Mapping[str, Any], system_prompt: str
) -> list[dict[str, str]]:
  instruction, input_ = instruction_of(example)
  if not instruction.strip():
    raise ValueError(
        "an example has no instruction, only a prompt written in the MiniLLM "
        "template, and the chat template renders instruction and input; "
        "give the file instruction/input fields or use template 'minillm'."
    )
  return chat.conversation(instruction, input_, system_prompt)


def prompt_of(
    example: Mapping[str, Any],
    style: str = "minillm",
    tokenizer: Tokenizer | None = None,
    system_prompt: str = "",
) -> str:
  """The templated prompt of a dataset example (any of the kdjax builders).

  ``style="chat"``: the tokenizer's chat template renders
  ``[system?, user]`` with ``add_generation_prompt=True`` (the user turn is
  the instruction and the input; the system turn is ``system_prompt``
  when set). Otherwise a non-empty ``prompt`` field (instruct_jsonl, already
  templated) wins, else the text template ``style``
  (:data:`template.STYLES`) is applied to ``instruction`` and ``input``.
  """
  if style == template.CHAT:
    return _chat_tokenizer(tokenizer).apply_chat_template(
        _messages(example, system_prompt), add_generation_prompt=True
    )
  given = to_text(example.get("prompt", ""))
  if given:
    return given
  return template.prompt(*instruction_of(example), style)


def texts_of(
    example: Mapping[str, Any],
    style: str = "minillm",
    tokenizer: Tokenizer | None = None,
    system_prompt: str = "",
) -> tuple[str, str]:
  """``(prompt, completion)``: the prompt (:func:`prompt_of`) and the text
  after it.

  Under a text template the completion is the response; under the chat
  template it is the rest of the rendered conversation answered with the
  response: the response, the end-of-turn token(s) and whatever the template
  writes after them (:func:`kdjax.data.chat.split`).
  """
  response = to_text(example["response"])
  if style != template.CHAT:
    return prompt_of(example, style), response
  apply = _chat_tokenizer(tokenizer).apply_chat_template
  return chat.split(apply, _messages(example, system_prompt), response)


def references_of(example: Mapping[str, Any]) -> list[str]:
  """Reference answers: ``references``, else ``valid_answers``, else ``[response]``."""
  for key in ("references", "valid_answers"):
    if key in example and len(example[key]):
      return to_texts(example[key])
  return [to_text(example["response"])]


# ----------------------------------------------------------------------------
# Tokenisation.


@dataclasses.dataclass
class TokenStats:
  """What happened to each example of a split (all drops/truncations counted)."""

  total: int = 0
  kept: int = 0
  dropped_empty_response: int = 0
  dropped_long_prompt: int = 0
  truncated_prompt: int = 0
  truncated_length: int = 0

  def log(self, name: str) -> None:
    logging.info("%s: %s", name, dataclasses.asdict(self))


@dataclasses.dataclass(frozen=True)
class Tokenized:
  """``ids = prompt ‖ response ‖ EOS`` (maybe truncated); the first
  ``prompt_len`` of them are prompt."""

  ids: np.ndarray
  prompt_len: int


def _encode_all(tokenizer: Tokenizer, texts: Sequence[str]):
  # encode_batch_fast skips offset tracking (2x faster); same ids.
  encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
  return [e.ids for e in encode(list(texts), add_special_tokens=False)]


def _read_all(source, chunk: int = 1024) -> list[Mapping[str, Any]]:
  """Every example of a data source, in order (batched reads when supported)."""
  if not hasattr(source, "__getitems__"):
    return [source[i] for i in range(len(source))]
  return [
      ex
      for start in range(0, len(source), chunk)
      for ex in source.__getitems__(
          list(range(start, min(start + chunk, len(source))))
      )
  ]


def _check_lengths(max_length: int, max_prompt_length: int) -> None:
  if not 0 < max_prompt_length < max_length:
    raise ValueError(
        f"need 0 < max_prompt_length < max_length, got max_prompt_length="
        f"{max_prompt_length}, max_length={max_length}; lower the prompt limit."
    )


def tokenize_split(
    source,
    tokenizer: Tokenizer,
    *,
    eos_id: int,
    max_length: int = 512,
    max_prompt_length: int = 256,
    prompt_policy: PromptPolicy = "drop",
    name: str = "split",
    template_style: str = "minillm",
    system_prompt: str = "",
) -> tuple[list[Tokenized], TokenStats]:
  """Tokenises every example of ``source`` for teacher-forced training."""
  _check_lengths(max_length, max_prompt_length)
  if prompt_policy not in _POLICIES:
    raise ValueError(
        f"prompt_policy must be one of {_POLICIES}, got " f"{prompt_policy!r}."
    )
  stats = TokenStats(total=len(source))
  prompts, completions = [], []
  for example in _read_all(source):
    if not to_text(example["response"]).strip():
      stats.dropped_empty_response += 1
      continue
    prompt, completion = texts_of(
        example, template_style, tokenizer, system_prompt
    )
    prompts.append(prompt)
    completions.append(completion)
  prompt_ids_all = _encode_all(tokenizer, prompts)
  full_ids_all = _encode_all(
      tokenizer, [p + c for p, c in zip(prompts, completions)]
  )
  out = []
  for prompt_ids, full_ids in zip(prompt_ids_all, full_ids_all):
    response_ids = full_ids[len(prompt_ids) :]
    if response_ids[-1:] != [eos_id]:
      response_ids.append(eos_id)
    if len(prompt_ids) > max_prompt_length:
      if prompt_policy == "drop":
        stats.dropped_long_prompt += 1
        continue
      stats.truncated_prompt += 1
      prompt_ids = prompt_ids[:max_prompt_length]
    ids = prompt_ids + response_ids
    if len(ids) > max_length:
      stats.truncated_length += 1
      ids = ids[:max_length]
    out.append(Tokenized(np.asarray(ids, np.int32), len(prompt_ids)))
  stats.kept = len(out)
  stats.log(name)
  return out, stats


def train_row(
    example: Tokenized, *, max_length: int, eos_id: int
) -> dict[str, np.ndarray]:
  """One right-padded training row of length ``max_length`` (module docstring)."""
  ids, n = example.ids, len(example.ids)
  row = {
      "input_ids": np.full(max_length, eos_id, np.int32),
      "labels": np.full(max_length, eos_id, np.int32),
      "loss_mask": np.zeros(max_length, np.float32),
      "attention_mask": np.zeros(max_length, np.int32),
      "positions": np.arange(max_length, dtype=np.int32),
  }
  row["input_ids"][: n - 1] = ids[:-1]
  row["labels"][: n - 1] = ids[1:]
  row["loss_mask"][example.prompt_len - 1 : n - 1] = 1.0
  row["attention_mask"][: n - 1] = 1
  return row


def _stack(rows: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


# ----------------------------------------------------------------------------
# Training batches.


def _process(process_index: int | None, process_count: int | None):
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top

    process_index = (
        jax.process_index() if process_index is None else process_index
    )
    process_count = (
        jax.process_count() if process_count is None else process_count
    )
  if not 0 <= process_index < process_count:
    raise ValueError(
        f"process_index {process_index} not in " f"[0, {process_count})."
    )
  return process_index, process_count


@dataclasses.dataclass(frozen=True)
class TrainData:
  """This process's training batches.

  ``dataset[s]`` is step ``s``'s local batch (dict of ``[local_batch, L]``
  numpy arrays); ``iterator()`` gives a checkpointable grain iterator.
  """

  dataset: grain.MapDataset
  steps_per_epoch: int
  num_steps: int | None  # None: repeats forever
  local_batch_size: int
  stats: TokenStats

  def iterator(self) -> grain.DatasetIterator:
    """Save/restore with ``get_state``/``set_state`` or grain.checkpoint + orbax."""
    return iter(self.dataset.to_iter_dataset())


def train_batches(
    source,
    tokenizer: Tokenizer,
    *,
    eos_id: int,
    batch_size: int,
    seed: int,
    max_length: int = 512,
    max_prompt_length: int = 256,
    prompt_policy: PromptPolicy = "drop",
    num_epochs: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    template_style: str = "minillm",
    system_prompt: str = "",
    row_fields: RowFields | None = None,
) -> TrainData:
  """Shuffled, repeated, sharded training batches.

  Epoch structure (as the reference loaders, ``drop_last=True``): every epoch
  is a fresh seeded permutation of the kept examples, cut into
  ``steps_per_epoch = kept // batch_size`` global batches; the remainder of
  each epoch is dropped, so no batch straddles two epochs. ``batch_size`` is
  global; process ``p`` of ``P`` gets rows ``p*b:(p+1)*b`` (``b = batch_size /
  P``) of every global batch, so all processes run the same number of steps.
  ``row_fields(examples, max_length)`` (a teacher cache) returns a function
  of an example's index whose fields are added to its row; the shuffle picks
  indices, so the fields follow their example through epochs and resumes.
  """
  process_index, process_count = _process(process_index, process_count)
  if batch_size % process_count:
    raise ValueError(
        f"batch_size {batch_size} is not divisible by the "
        f"{process_count} processes; use a multiple."
    )
  examples, stats = tokenize_split(
      source,
      tokenizer,
      eos_id=eos_id,
      max_length=max_length,
      max_prompt_length=max_prompt_length,
      prompt_policy=prompt_policy,
      name="train",
      template_style=template_style,
      system_prompt=system_prompt,
  )
  steps_per_epoch = len(examples) // batch_size
  if steps_per_epoch == 0:
    dropped = stats.dropped_long_prompt
    fix = (
        f"{dropped} had prompts over max_prompt_length={max_prompt_length}: "
        "raise it or use prompt_policy='truncate'"
        if dropped
        else "lower batch_size or add data"
    )
    raise ValueError(
        f"only {len(examples)} usable examples for batch_size "
        f"{batch_size} ({fix})."
    )
  local = batch_size // process_count
  per_epoch = steps_per_epoch * batch_size
  extra = None if row_fields is None else row_fields(examples, max_length)
  # Per-epoch permutations of the example indices: shuffle-then-repeat
  # reshuffles each epoch.
  shuffled = (
      grain.MapDataset.range(len(examples))
      .shuffle(seed=seed)
      .repeat(num_epochs)
  )
  num_steps = None if num_epochs is None else num_epochs * steps_per_epoch
  num_rows = (
      sys.maxsize // batch_size if num_steps is None else num_steps
  ) * local

  def pick(i: int) -> int:
    step, k = divmod(i, local)
    epoch, j = divmod(step * batch_size + process_index * local + k, per_epoch)
    return int(shuffled[epoch * len(examples) + j])

  def row(index: int) -> dict[str, np.ndarray]:
    out = train_row(examples[index], max_length=max_length, eos_id=eos_id)
    if extra is not None:
      out.update(extra(index))
    return out

  dataset = (
      grain.MapDataset.range(num_rows)
      .map(pick)
      .map(row)
      .batch(local, drop_remainder=True, batch_fn=_stack)
  )
  logging.info(
      "train: %d examples, %d steps/epoch of %d (local %d), " "epochs %s",
      len(examples),
      steps_per_epoch,
      batch_size,
      local,
      num_epochs,
  )
  return TrainData(dataset, steps_per_epoch, num_steps, local, stats)


def eval_batches(
    source,
    tokenizer: Tokenizer,
    *,
    eos_id: int,
    batch_size: int,
    max_length: int = 512,
    max_prompt_length: int = 256,
    prompt_policy: PromptPolicy = "drop",
    process_index: int | None = None,
    process_count: int | None = None,
    template_style: str = "minillm",
    system_prompt: str = "",
    row_fields: RowFields | None = None,
) -> grain.MapDataset:
  """One unshuffled pass of teacher-forced rows (validation loss).

  Nothing is dropped for batching: the last batch is filled up with copies of
  its first row whose ``loss_mask`` is 0, so every batch has the same shape.
  Process ``p`` of ``P`` takes examples ``p::P``. ``row_fields`` adds fields
  to each row as in :func:`train_batches`.
  """
  process_index, process_count = _process(process_index, process_count)
  examples, _ = tokenize_split(
      source,
      tokenizer,
      eos_id=eos_id,
      max_length=max_length,
      max_prompt_length=max_prompt_length,
      prompt_policy=prompt_policy,
      name="eval",
      template_style=template_style,
      system_prompt=system_prompt,
  )
  if not examples:
    raise ValueError("no usable evaluation examples; check the split.")
  mine = list(range(process_index, len(examples), process_count))
  num_batches = _num_batches(len(examples), process_count, batch_size)
  extra = None if row_fields is None else row_fields(examples, max_length)

  def row(index: int) -> dict[str, np.ndarray]:
    out = train_row(examples[index], max_length=max_length, eos_id=eos_id)
    if extra is not None:
      out.update(extra(index))
    return out

  def make(b: int) -> dict[str, np.ndarray]:
    rows = [row(i) for i in mine[b * batch_size : (b + 1) * batch_size]]
    first = rows[0] if rows else row(0)
    filler = dict(first, loss_mask=np.zeros(max_length, np.float32))
    return _stack(rows + [filler] * (batch_size - len(rows)))

  return grain.MapDataset.range(num_batches).map(make)


def _num_batches(n: int, process_count: int, batch_size: int) -> int:
  """Equal on every process: ceil(ceil(n / P) / batch_size)."""
  return -(-(-(-n // process_count)) // batch_size)


# ----------------------------------------------------------------------------
# Generation prompts.


@dataclasses.dataclass(frozen=True)
class EvalPrompts:
  """Left-padded prompt batches plus what evaluation needs to score them.

  ``dataset[b]`` holds ``input_ids``, ``attention_mask``, ``positions``
  (``[batch, max_prompt_length]``), ``index`` (position in ``examples``, -1 on
  filler rows) and ``valid`` (False on filler rows, copies of the batch's first
  prompt that keep shapes fixed). ``examples[i]`` has ``prompt``,
  ``references`` and ``task`` ('' when the dataset has none).
  """

  dataset: grain.MapDataset
  examples: list[dict[str, Any]]
  truncated_prompts: int


def left_pad(
    prompt_ids: Sequence[Sequence[int]], *, length: int, eos_id: int
) -> dict[str, np.ndarray]:
  """Left-pads token lists to ``length`` with EOS; positions from 0 per row."""
  batch = len(prompt_ids)
  input_ids = np.full((batch, length), eos_id, np.int32)
  mask = np.zeros((batch, length), np.int32)
  for r, ids in enumerate(prompt_ids):
    if ids:
      input_ids[r, length - len(ids) :] = ids
      mask[r, length - len(ids) :] = 1
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
  return {
      "input_ids": input_ids,
      "attention_mask": mask,
      "positions": positions,
  }


def eval_prompts(
    source,
    tokenizer: Tokenizer,
    *,
    eos_id: int,
    batch_size: int,
    max_prompt_length: int = 256,
    process_index: int | None = None,
    process_count: int | None = None,
    template_style: str = "minillm",
    system_prompt: str = "",
) -> EvalPrompts:
  """Prompt-only generation batches over one split (no shuffle, nothing dropped).

  Prompts are cut to their first ``max_prompt_length`` tokens (the evaluation
  protocol, docs/evaluation.md "The protocol"); the cut ones are counted. Process ``p`` of ``P``
  takes examples ``p::P`` and all processes get the same number of batches.
  """
  process_index, process_count = _process(process_index, process_count)
  examples = []
  for ex in _read_all(source):
    examples.append(
        {
            "prompt": prompt_of(ex, template_style, tokenizer, system_prompt),
            "references": references_of(ex),
            "task": to_text(ex.get("task", "")),
        }
    )
  if not examples:
    raise ValueError("no evaluation examples; check the split.")
  ids_all = _encode_all(tokenizer, [e["prompt"] for e in examples])
  truncated = sum(len(ids) > max_prompt_length for ids in ids_all)
  ids_all = [ids[:max_prompt_length] for ids in ids_all]
  logging.info(
      "eval prompts: %d examples, %d prompts cut to %d tokens",
      len(examples),
      truncated,
      max_prompt_length,
  )
  mine = list(range(process_index, len(examples), process_count))
  num_batches = _num_batches(len(examples), process_count, batch_size)

  def make(b: int) -> dict[str, np.ndarray]:
    index = mine[b * batch_size : (b + 1) * batch_size]
    fill = batch_size - len(index)
    first = index[0] if index else 0  # a process may run out before others
    rows = [ids_all[i] for i in index] + [ids_all[first]] * fill
    batch = left_pad(rows, length=max_prompt_length, eos_id=eos_id)
    batch["index"] = np.asarray(index + [-1] * fill, np.int32)
    batch["valid"] = batch["index"] >= 0
    return batch

  return EvalPrompts(
      grain.MapDataset.range(num_batches).map(make), examples, truncated
  )
