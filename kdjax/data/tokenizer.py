"""Tokenizers: a config's ``data.tokenizer`` string -> ``(Tokenizer, eos_id)``.

``"byte"`` is the byte-level tokenizer of the embedded tiny models; anything
else is a Hugging Face model directory, a ``tokenizer.json`` file or a hub id
(:func:`from_pretrained`).

The byte-level tokenizer:

Ids 0..255 are the raw UTF-8 bytes (token id == byte value), id 256 is
``<|endoftext|>``, the EOS and padding token (vocabulary 257). The byte->symbol
table is GPT-2's, so the ByteLevel pre-tokenizer and decoder of ``tokenizers``
do the work and the result saves to / loads from an ordinary ``tokenizer.json``.
No merges: every byte is one token, which keeps tiny models honest and makes
lengths in bytes and tokens the same.
"""

from __future__ import annotations

import functools
import os

import tokenizers
from tokenizers import decoders, models, pre_tokenizers

EOS_TOKEN = "<|endoftext|>"
EOS_ID = 256
VOCAB_SIZE = 257


@functools.cache
def _bytes_to_symbols() -> tuple[str, ...]:
  """GPT-2's reversible byte -> printable unicode symbol table, indexed by byte."""
  printable = (
      list(range(ord("!"), ord("~") + 1))
      + list(range(ord("¡"), ord("¬") + 1))
      + list(range(ord("®"), ord("ÿ") + 1))
  )
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
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(
      add_prefix_space=False, use_regex=False
  )
  tok.decoder = decoders.ByteLevel()
  tok.add_special_tokens([EOS_TOKEN])
  assert tok.token_to_id(EOS_TOKEN) == EOS_ID
  return tok


# Files a hub snapshot needs for a tokenizer (no weights).
_TOKENIZER_FILES = ["tokenizer.json", "vocab.json", "merges.txt"]


def _local(path_or_hub_id: str) -> str:
  """A local file or directory, downloading a hub id's tokenizer files.

  Offline (:func:`kdjax.hub.hub_reachable` is False) only the local cache is
  looked at, so the answer comes in seconds.
  """
  if os.path.exists(path_or_hub_id):
    return path_or_hub_id
  from kdjax import hub  # pylint: disable=g-import-not-at-top

  return hub.snapshot(
      path_or_hub_id,
      _TOKENIZER_FILES,
      f"tokenizer {path_or_hub_id!r} is not a local path",
      hint_files=_TOKENIZER_FILES,
  )


def from_pretrained(path_or_hub_id: str) -> tokenizers.Tokenizer:
  """A ``tokenizers.Tokenizer`` from ``tokenizer.json`` or GPT-2's
  ``vocab.json`` + ``merges.txt`` (byte-level BPE), in a directory, as a
  file, or from the hub."""
  path = _local(path_or_hub_id)
  if os.path.isfile(path):
    return tokenizers.Tokenizer.from_file(path)
  tj = os.path.join(path, "tokenizer.json")
  if os.path.exists(tj):
    return tokenizers.Tokenizer.from_file(tj)
  vocab, merges = (os.path.join(path, n) for n in ("vocab.json", "merges.txt"))
  if os.path.exists(vocab) and os.path.exists(merges):
    tok = tokenizers.Tokenizer(models.BPE.from_file(vocab, merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok
  raise FileNotFoundError(
      f"no tokenizer.json or vocab.json + merges.txt in " f"{path}."
  )


def load(spec: str) -> tuple[tokenizers.Tokenizer, int]:
  """``(tokenizer, eos_id)`` for a config's ``data.tokenizer`` string.

  ``"byte"`` is :func:`byte_level`; anything else is read by
  :func:`from_pretrained`, whose EOS is ``<|endoftext|>`` (GPT-2), ``</s>``
  (LLaMA) or ``<|end_of_text|>`` (LLaMA 3).
  """
  if spec == "byte":
    return byte_level(), EOS_ID
  tok = from_pretrained(spec)
  for eos in (EOS_TOKEN, "</s>", "<|end_of_text|>"):
    eos_id = tok.token_to_id(eos)
    if eos_id is not None:
      return tok, eos_id
  raise ValueError(
      f"tokenizer {spec!r} has none of the EOS tokens "
      f"{EOS_TOKEN!r}, '</s>', '<|end_of_text|>'; use a GPT-2 or "
      "LLaMA tokenizer."
  )
