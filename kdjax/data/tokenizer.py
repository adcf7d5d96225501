"""Tokenizers: a config's ``data.tokenizer`` string -> ``(Tokenizer, eos_id)``.

``"byte"`` is the byte-level tokenizer of the embedded tiny models; anything
else is a Hugging Face model directory, a ``tokenizer.json`` file or a hub id
(:func:`from_pretrained`), read as an :class:`HFTokenizer`: the
``tokenizers.Tokenizer`` with the named special tokens and the chat template
of ``tokenizer_config.json`` / ``special_tokens_map.json`` /
``chat_template.jinja`` (docs/data.md "Chat templates") and the EOS ids of
``generation_config.json``. :func:`stop_ids` is the set of ids that end a
generated response.

The byte-level tokenizer:

Ids 0..255 are the raw UTF-8 bytes (token id == byte value), id 256 is
``<|endoftext|>``, the EOS and padding token (vocabulary 257). The byte->symbol
table is GPT-2's, so the ByteLevel pre-tokenizer and decoder of ``tokenizers``
do the work and the result saves to / loads from an ordinary ``tokenizer.json``.
No merges: every byte is one token, which keeps tiny models honest and makes
lengths in bytes and tokens the same.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Mapping, Sequence

import tokenizers
from tokenizers import decoders, models, pre_tokenizers

from kdjax.data import chat
from kdjax.data import template as template_lib

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
_TOKENIZER_FILES = [
    "tokenizer.json",
    "vocab.json",
    "merges.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
]
# The named special tokens transformers passes to a chat template
# (``SPECIAL_TOKENS_ATTRIBUTES``), in the order it adds missing ones.
SPECIAL_TOKEN_NAMES = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)


@dataclasses.dataclass(frozen=True, eq=False)
class HFTokenizer:
  """A ``tokenizers.Tokenizer`` with what the files beside it declare.

  ``special_tokens`` maps the names of :data:`SPECIAL_TOKEN_NAMES` that are
  set to their text; ``chat_template`` is the Jinja source (None: none);
  ``generation_eos_ids`` the ``eos_token_id`` of a ``generation_config.json``
  beside it (:func:`generation_eos_ids`). Every other attribute is the
  wrapped tokenizer's (``encode``, ``decode``, ``token_to_id``, ``save``,
  ...), so an ``HFTokenizer`` goes wherever a ``tokenizers.Tokenizer`` does.
  """

  tokenizer: tokenizers.Tokenizer
  special_tokens: Mapping[str, str] = dataclasses.field(default_factory=dict)
  chat_template: str | None = None
  generation_eos_ids: tuple[int, ...] = ()

  def __getattr__(self, name: str) -> Any:
    if name.startswith("__") or name == "tokenizer":  # copy, pickle
      raise AttributeError(name)
    return getattr(self.tokenizer, name)

  @property
  def bos_token(self) -> str | None:
    return self.special_tokens.get("bos_token")

  @property
  def eos_token(self) -> str | None:
    return self.special_tokens.get("eos_token")

  @property
  def pad_token(self) -> str | None:
    return self.special_tokens.get("pad_token")

  def apply_chat_template(
      self,
      messages: Sequence[Mapping[str, str]],
      *,
      add_generation_prompt: bool = False,
  ) -> str:
    """The text of ``messages`` under the chat template, as transformers'
    ``apply_chat_template(..., tokenize=False)`` renders it.

    Encode it with ``add_special_tokens=False`` (the template writes every
    special token it wants, BOS included).
    """
    if self.chat_template is None:
      raise ValueError(
          "this tokenizer has no chat template (no chat_template.jinja and "
          "no chat_template in tokenizer_config.json); use an instruct "
          "model's tokenizer directory or a text prompt template."
      )
    return chat.render(
        self.chat_template,
        messages,
        add_generation_prompt=add_generation_prompt,
        **self.special_tokens,
    )

  def end_of_turn_id(self) -> int | None:
    """The chat template's end-of-turn token: the first special token it
    writes after an assistant turn's content
    (:func:`kdjax.data.chat.after_answer`: Qwen's ``<|im_end|>``, Llama 3's
    ``<|eot_id|>``, Gemma's ``<end_of_turn>``); None without a template or
    such a token."""
    if self.chat_template is None:
      return None
    tail = chat.after_answer(self.apply_chat_template)
    special = {
        i for i, t in self.get_added_tokens_decoder().items() if t.special
    }
    ids = self.encode(tail, add_special_tokens=False).ids
    return next((i for i in ids if i in special), None)


# What the data pipeline and evaluation take: a bare tokenizer (the byte-level
# one) or an HF directory's.
Tokenizer = tokenizers.Tokenizer | HFTokenizer


def _local(path_or_hub_id: str, revision: str = "") -> str:
  """A local file or directory, downloading a hub id's tokenizer files (at
  ``revision``: a commit hash, tag or branch; '': the default branch).

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
      revision=revision,
  )


def _read_json(path: str) -> dict[str, Any]:
  if not os.path.exists(path):
    return {}
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _text(token: Any) -> str | None:
  """A special token as saved: a string, an AddedToken dict or null."""
  return token.get("content") if isinstance(token, dict) else token


def special_tokens(directory: str) -> dict[str, str]:
  """The named special tokens of a tokenizer directory.

  ``tokenizer_config.json`` first, ``special_tokens_map.json`` for the names
  it does not set.
  """
  config = _read_json(os.path.join(directory, "tokenizer_config.json"))
  legacy = _read_json(os.path.join(directory, "special_tokens_map.json"))
  out = {}
  for name in SPECIAL_TOKEN_NAMES:
    text = _text(config.get(name)) or _text(legacy.get(name))
    if text:
      out[name] = text
  return out


def _extra_special_tokens(directory: str) -> list[str]:
  """``extra_special_tokens`` (``additional_special_tokens`` before v5)."""
  out = []
  for name in ("tokenizer_config.json", "special_tokens_map.json"):
    config = _read_json(os.path.join(directory, name))
    for key in ("extra_special_tokens", "additional_special_tokens"):
      extra = config.get(key) or []
      extra = extra.values() if isinstance(extra, dict) else extra
      out += [_text(t) for t in extra]
  return out


def chat_template(directory: str) -> str | None:
  """The chat template of a tokenizer directory, as transformers finds it.

  ``chat_template.jinja`` wins over ``tokenizer_config.json``'s
  ``chat_template`` (a string, or a list of named templates of which the one
  named ``default`` is taken); None when there is none.
  """
  jinja = os.path.join(directory, "chat_template.jinja")
  if os.path.exists(jinja):
    with open(jinja, encoding="utf-8") as f:
      return f.read()
  template = _read_json(os.path.join(directory, "tokenizer_config.json")).get(
      "chat_template"
  )
  if isinstance(template, list):
    named = {t["name"]: t["template"] for t in template}
    return named.get("default")
  return template


def generation_eos_ids(directory: str) -> tuple[int, ...]:
  """``eos_token_id`` of a model directory's ``generation_config.json``, one
  id or a list (Llama 3.1 Instruct: 128001, 128008, 128009); ``()`` without
  the file or the key."""
  path = os.path.join(directory, "generation_config.json")
  ids = _read_json(path).get("eos_token_id")
  ids = [ids] if isinstance(ids, int) else ids or []
  if not isinstance(ids, list) or not all(
      isinstance(i, int) and not isinstance(i, bool) for i in ids
  ):
    raise ValueError(
        f"{path} has eos_token_id={ids!r}; it must be a token id or a list "
        "of token ids."
    )
  return tuple(ids)


def _with_config(tok: tokenizers.Tokenizer, directory: str) -> HFTokenizer:
  """``tok`` with the directory's special tokens, each a special token.

  As transformers does on loading, named and extra special tokens that
  ``tokenizer.json`` does not list as added tokens are added, so that they
  tokenize as one special token in rendered text.
  """
  special = special_tokens(directory)
  added = {t.content for t in tok.get_added_tokens_decoder().values()}
  missing = [
      t
      for t in [*special.values(), *_extra_special_tokens(directory)]
      if t not in added
  ]
  tok.add_special_tokens(
      [tokenizers.AddedToken(t, special=True) for t in dict.fromkeys(missing)]
  )
  return HFTokenizer(
      tok, special, chat_template(directory), generation_eos_ids(directory)
  )


def _bare(path: str) -> tokenizers.Tokenizer:
  """The ``tokenizers.Tokenizer`` of a file or directory."""
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


def from_pretrained(path_or_hub_id: str, revision: str = "") -> HFTokenizer:
  """An :class:`HFTokenizer` from ``tokenizer.json`` or GPT-2's
  ``vocab.json`` + ``merges.txt`` (byte-level BPE), in a directory, as a
  file, or from the hub.

  A directory's ``tokenizer_config.json``, ``special_tokens_map.json`` and
  ``chat_template.jinja`` give the special tokens and the chat template, its
  ``generation_config.json`` the generation EOS ids; a lone file has none.
  """
  path = _local(path_or_hub_id, revision)
  tok = _bare(path)
  if os.path.isfile(path):
    return HFTokenizer(tok)
  return _with_config(tok, path)


def load(spec: str, revision: str = "") -> tuple[Tokenizer, int]:
  """``(tokenizer, eos_id)`` for a config's ``data.tokenizer`` string.

  ``"byte"`` is :func:`byte_level`; anything else is read by
  :func:`from_pretrained`, whose EOS is the first of ``<|endoftext|>``
  (GPT-2, Qwen), ``</s>`` (LLaMA) and ``<|end_of_text|>`` (LLaMA 3) it has,
  else the ``eos_token`` of its ``tokenizer_config.json`` (Gemma's
  ``<eos>``). ``revision`` pins a hub id's commit, tag or branch.
  """
  if spec == "byte":
    return byte_level(), EOS_ID
  tok = from_pretrained(spec, revision)
  for eos in (EOS_TOKEN, "</s>", "<|end_of_text|>", tok.eos_token):
    eos_id = None if eos is None else tok.token_to_id(eos)
    if eos_id is not None:
      return tok, eos_id
  raise ValueError(
      f"tokenizer {spec!r} has none of the EOS tokens "
      f"{EOS_TOKEN!r}, '</s>', '<|end_of_text|>' and no eos_token in its "
      "tokenizer_config.json; use a GPT-2 or LLaMA tokenizer or declare "
      "its eos_token."
  )


def stop_ids(
    tokenizer: Tokenizer, eos_id: int, template: str
) -> tuple[int, ...]:
  """The ids that end a generated response, ``eos_id`` first.

  ``eos_id`` (:func:`load`'s EOS), then, for an :class:`HFTokenizer`, the id
  of its ``eos_token`` (``tokenizer_config.json``: Qwen2.5 Instruct's
  ``<|im_end|>``, Llama 3 Instruct's ``<|eot_id|>``), the ids of its
  directory's ``generation_config.json`` ``eos_token_id``, and with
  ``template="chat"`` the chat template's end-of-turn token
  (:meth:`HFTokenizer.end_of_turn_id`). Generation (evaluation, SeqKD,
  on-policy sampling) stops at the first of them; duplicates are dropped
  (docs/data.md "Stop ids").
  """
  ids = [eos_id]
  if isinstance(tokenizer, HFTokenizer):
    if tokenizer.eos_token is not None:
      ids.append(tokenizer.token_to_id(tokenizer.eos_token))
    ids += tokenizer.generation_eos_ids
    if template == template_lib.CHAT:
      ids.append(tokenizer.end_of_turn_id())
  return tuple(dict.fromkeys(int(i) for i in ids if i is not None))
