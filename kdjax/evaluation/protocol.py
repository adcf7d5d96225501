"""The decoding protocol of an evaluation (MiniLLM / AKL).

Defaults: prompts cut to their first 256 tokens, up to 256 new tokens sampled
at temperature 1 with top-k and top-p off, ``no_repeat_ngram_size=6``, five
seeds 10..50 (docs/evaluation.md). :func:`kdjax.config.spec.protocol_from_config`
reads one from a config.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence


class Protocol(NamedTuple):
  """Decoding settings; the defaults are the paper protocol."""

  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  no_repeat_ngram_size: int = 6
  max_new_tokens: int = 256
  max_prompt_length: int = 256
  greedy: bool = False
  seeds: tuple[int, ...] = (10, 20, 30, 40, 50)
  template: str = "minillm"  # prompt template (kdjax.data.template.CHOICES)
  system_prompt: str = ""  # the chat template's system message ('': none)

  def sampling_settings(
      self, eos_id: int, stop_ids: Sequence[int]
  ) -> dict[str, Any]:
    """Keyword arguments of :func:`kdjax.sampling.generate`: a response ends
    at any of ``stop_ids``, and ``eos_id`` pads."""
    return dict(
        max_new_tokens=self.max_new_tokens,
        greedy=self.greedy,
        temperature=self.temperature,
        top_k=self.top_k,
        top_p=self.top_p,
        no_repeat_ngram_size=self.no_repeat_ngram_size,
        stop_ids=tuple(stop_ids),
        pad_id=eos_id,
    )
