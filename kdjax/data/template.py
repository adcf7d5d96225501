"""The MiniLLM / Alpaca prompt template (kd_losses.md 4.1), exact text."""

from __future__ import annotations

PREAMBLE = "Below is an instruction that describes a task"
NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that "
    "appropriately completes the request.\n\n### Instruction:\n{instruction}"
    "\n\n### Response:\n")
WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that "
    "provides further context. Write a response that appropriately completes "
    "the request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}"
    "\n\n### Response:\n")


def prompt(instruction: str, input: str = "") -> str:  # pylint: disable=redefined-builtin
  """The templated prompt; the input section appears only if input is non-empty."""
  if input:
    return WITH_INPUT.format(instruction=instruction, input=input)
  return NO_INPUT.format(instruction=instruction)


def is_templated(text: str) -> bool:
  """Whether ``text`` is already a full templated prompt."""
  return text.startswith(PREAMBLE)
