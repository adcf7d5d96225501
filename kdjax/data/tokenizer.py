"""A byte-level HF ``tokenizers`` Tokenizer for the embedded tiny models.

Ids 0..255 are the raw UTF-8 bytes (token id == byte value), id 256 is
``<|endoftext|>``, the EOS and padding token (vocabulary 257). The byte->symbol
table is GPT-2's, so the ByteLevel pre-tokenizer and decoder of ``tokenizers``
do the work and the result saves to / loads from an ordinary ``tokenizer.json``.
No merges: every byte is one token, which keeps tiny models honest and makes
lengths in bytes and tokens the same.
"""

from __future__ import annotations

import functools

import tokenizers
from tokenizers import decoders, models, pre_tokenizers

EOS_TOKEN = "<|endoftext|>"
EOS_ID = 256
VOCAB_SIZE = 257


@functools.cache
def _bytes_to_symbols() -> tuple[str, ...]:
  """GPT-2's reversible byte -> printable unicode symbol table, indexed by byte."""
  printable = (list(range(ord("!"), ord("~") + 1))
               + list(range(ord("¡"), ord("¬") + 1))
               + list(range(ord("®"), ord("ÿ") + 1)))
  symbols = {b: chr(b) for b in printable}
  shifted = 0
  for b in range(256):
    if b not in symbols:  # control bytes and space move above 255
      symbols[b] = chr(256 + shifted)
      shifted += 1
  return tuple(symbols[b] for b in range(256))


def byte_level() -> tokenizers.Tokenizer:
  """Returns a fresh byte-level tokenizer: byte b -> id b, EOS -> 256."""
  vocab = {symbol: b for b, symbol in enumerate(_bytes_to_symbols())}
  tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[]))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False,
                                               use_regex=False)
  tok.decoder = decoders.ByteLevel()
  tok.add_special_tokens([EOS_TOKEN])
  assert tok.token_to_id(EOS_TOKEN) == EOS_ID
  return tok


def load(spec: str) -> tuple[tokenizers.Tokenizer, int]:
  """``(tokenizer, eos_id)`` for a config's ``data.tokenizer`` string.

  ``"byte"`` is :func:`byte_level`; anything else is a HF model directory or
  hub id read by :func:`kdjax.models.load_tokenizer`, whose EOS is
  ``<|endoftext|>`` (GPT-2) or ``</s>`` (LLaMA).
  """
  if spec == "byte":
    return byte_level(), EOS_ID
  from kdjax import models  # pylint: disable=g-import-not-at-top
  tok = models.load_tokenizer(spec)
  for eos in (EOS_TOKEN, "</s>", "<|end_of_text|>"):
    eos_id = tok.token_to_id(eos)
    if eos_id is not None:
      return tok, eos_id
  raise ValueError(f"tokenizer {spec!r} has none of the EOS tokens "
                   f"{EOS_TOKEN!r}, '</s>', '<|end_of_text|>'; use a GPT-2 or "
                   "LLaMA tokenizer.")
