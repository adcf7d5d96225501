"""Prompt templates: the MiniLLM / Alpaca one and a compact one; ``chat``.

The MiniLLM text is exact (docs/data.md "The prompt template"); the compact
one is for the tiny byte-level models. ``chat`` is the tokenizer's own chat
template (:mod:`kdjax.data.chat`, docs/data.md "Chat templates"), rendered by
the pipeline, which has the tokenizer.

The MiniLLM preamble alone is ~150 bytes, most of a synthetic_instruct
sequence; a byte-level tiny model would spend two thirds of its compute on it.
``compact`` keeps instruction, input and an answer cue, nothing else.
"""

from __future__ import annotations

PREAMBLE = "Below is an instruction that describes a task"
NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that "
    "appropriately completes the request.\n\n### Instruction:\n{instruction}"
    "\n\n### Response:\n"
)
WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that "
    "provides further context. Write a response that appropriately completes "
    "the request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}"
    "\n\n### Response:\n"
)


COMPACT_NO_INPUT = "{instruction}\nAnswer: "
COMPACT_WITH_INPUT = "{instruction}\nInput: {input}\nAnswer: "
STYLES = ("minillm", "compact")  # text templates: :func:`prompt`
CHAT = "chat"
CHOICES = STYLES + (CHAT,)  # what data.template may be


def prompt(
    instruction: str,
    input: str = "",  # pylint: disable=redefined-builtin
    style: str = "minillm",
) -> str:
  """The templated prompt; the input section appears only if input is non-empty."""
  if style == CHAT:
    raise ValueError(
        "template 'chat' renders the tokenizer's chat template; build the "
        "prompt with kdjax.data.pipeline.prompt_of and the tokenizer."
    )
  if style not in STYLES:
    raise ValueError(
        f"prompt template {style!r} is unknown; use one of " f"{CHOICES}."
    )
  if style == "compact":
    return (COMPACT_WITH_INPUT if input else COMPACT_NO_INPUT).format(
        instruction=instruction, input=input
    )
  if input:
    return WITH_INPUT.format(instruction=instruction, input=input)
  return NO_INPUT.format(instruction=instruction)


def is_templated(text: str) -> bool:
  """Whether ``text`` is already a full templated prompt."""
  return text.startswith(PREAMBLE)
