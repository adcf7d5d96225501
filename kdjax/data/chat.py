"""Chat templates: an instruct model's Jinja template, rendered as
transformers renders it, and the conversation of an instruction example.

:func:`render` runs a template in the environment of transformers'
``utils/chat_template_utils.py``: an immutable sandbox with ``trim_blocks``
and ``lstrip_blocks``, the ``loopcontrols`` extension and the
``{% generation %}`` block (rendered as its body); the ``tojson`` filter
without HTML escaping, with its ``indent``, ``separators`` and ``sort_keys``
options; the globals ``raise_exception``, ``strftime_now``, a ``dict`` that
only builds dicts and a ``namespace`` that refuses underscore names. The
template sees ``messages``, ``add_generation_prompt``, ``tools`` and
``documents`` (None) and the tokenizer's named special tokens
(``bos_token``, ``eos_token``, ...).

An example becomes the messages ``[system?, user, assistant]``
(:func:`conversation`); :func:`split` cuts the answered conversation into the
prompt, rendered with ``add_generation_prompt=True`` without the answer, and
the rest (docs/data.md "Chat templates"). :func:`after_answer` is what a
template writes after an answer: its end-of-turn token, where generation
stops.
"""

from __future__ import annotations

import datetime
import functools
import json
from typing import Any, Callable, Mapping, Sequence

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox
import jinja2.utils

Message = Mapping[str, str]
# ``apply(messages, add_generation_prompt=...) -> text``, e.g.
# ``HFTokenizer.apply_chat_template``.
Apply = Callable[..., str]


class _Generation(jinja2.ext.Extension):
  """``{% generation %}...{% endgeneration %}``: the body, unchanged.

  transformers uses the block to find assistant tokens; kdjax splits at the
  generation prompt instead, so only the text matters.
  """

  tags = {"generation"}

  def parse(self, parser):
    lineno = next(parser.stream).lineno
    body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
    return jinja2.nodes.CallBlock(
        self.call_method("_body"), [], [], body
    ).set_lineno(lineno)

  def _body(self, caller):
    return caller()


class _Dict:
  """``dict(...)`` and ``dict.fromkeys(...)``, nothing else of the type."""

  def __call__(self, *args, **kwargs):
    return dict(*args, **kwargs)

  def fromkeys(self, *args, **kwargs):
    return dict.fromkeys(*args, **kwargs)


class _Namespace(jinja2.utils.Namespace):
  """Jinja's ``namespace`` without underscore attributes."""

  def __init__(*args, **kwargs):  # pylint: disable=no-method-argument
    self, args = args[0], args[1:]
    attrs = dict(*args, **kwargs)
    for name in attrs:
      _Namespace._check(name)
    jinja2.utils.Namespace.__init__(self, attrs)

  def __setitem__(self, name, value):
    _Namespace._check(name)
    jinja2.utils.Namespace.__setitem__(self, name, value)

  @staticmethod
  def _check(name):
    if isinstance(name, str) and name.startswith("_"):
      raise jinja2.exceptions.SecurityError(
          f"a chat template may not set the underscore attribute {name!r}."
      )


def _raise_exception(message: str):
  raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any, ensure_ascii=False, indent=None, separators=None, sort_keys=False
) -> str:
  return json.dumps(
      x,
      ensure_ascii=ensure_ascii,
      indent=indent,
      separators=separators,
      sort_keys=sort_keys,
  )


def _strftime_now(format: str) -> str:  # pylint: disable=redefined-builtin
  return datetime.datetime.now().strftime(format)


@functools.cache
def _environment() -> jinja2.sandbox.ImmutableSandboxedEnvironment:
  env = jinja2.sandbox.ImmutableSandboxedEnvironment(
      trim_blocks=True,
      lstrip_blocks=True,
      extensions=[_Generation, jinja2.ext.loopcontrols],
  )
  env.filters["tojson"] = _tojson
  env.globals.update(
      raise_exception=_raise_exception,
      strftime_now=_strftime_now,
      dict=_Dict(),
      namespace=_Namespace,
  )
  return env


@functools.lru_cache(maxsize=16)
def _compile(source: str) -> jinja2.Template:
  return _environment().from_string(source)


def render(
    source: str,
    messages: Sequence[Message],
    *,
    add_generation_prompt: bool = False,
    **variables: str,
) -> str:
  """The text of ``messages`` under the template ``source``.

  ``variables`` are the tokenizer's named special tokens (``bos_token=...``).
  A template that raises (``raise_exception``: a system message it does not
  take, roles that do not alternate) is one sentence.
  """
  try:
    return _compile(source).render(
        messages=[dict(m) for m in messages],
        tools=None,
        documents=None,
        add_generation_prompt=add_generation_prompt,
        **variables,
    )
  except jinja2.exceptions.TemplateError as e:
    raise ValueError(
        f"the chat template cannot render this conversation ({e}); drop what "
        "it refuses (a system prompt it does not take, a turn out of order)."
    ) from None


def conversation(
    instruction: str,
    input: str = "",  # pylint: disable=redefined-builtin
    system: str = "",
) -> list[dict[str, str]]:
  """``[system?, user]``: the user turn is the instruction, then a blank line
  and the input when there is one; the system turn only when ``system``."""
  user = f"{instruction}\n\n{input}" if input else instruction
  turns = [{"role": "system", "content": system}] if system else []
  return turns + [{"role": "user", "content": user}]


def split(
    apply: Apply, messages: Sequence[Message], response: str
) -> tuple[str, str]:
  """``(prompt, completion)`` of ``messages`` answered with ``response``.

  ``prompt`` is ``apply(messages, add_generation_prompt=True)``;
  ``prompt + completion`` is ``apply(messages + [assistant: response])``, so
  the completion is the response and what the template writes after it
  (its end-of-turn token, a newline).
  """
  prompt = apply(messages, add_generation_prompt=True)
  answered = [*messages, {"role": "assistant", "content": response}]
  full = apply(answered, add_generation_prompt=False)
  if not full.startswith(prompt):
    raise ValueError(
        "the chat template does not render the prompt (with "
        "add_generation_prompt) as the start of the answered conversation, "
        "so the response cannot be split off; use a template whose "
        "generation prompt is a prefix of the answered conversation, or a "
        "text template ('minillm', 'compact')."
    )
  return prompt, full[len(prompt) :]


# A placeholder answer: plain words that no template trims, splits or escapes.
_PROBE_ANSWER = "kdjax probe answer"


def after_answer(apply: Apply) -> str:
  """The text the template writes after the content of an assistant turn.

  The rendering of ``[user, assistant]`` after the assistant's content, e.g.
  ``"<|im_end|>\\n"`` (ChatML, Qwen), ``"<|eot_id|>"`` (Llama 3),
  ``"<end_of_turn>\\n"`` (Gemma); ``""`` when the template does not write the
  content verbatim.
  """
  text = apply(
      [
          {"role": "user", "content": "Hello."},
          {"role": "assistant", "content": _PROBE_ANSWER},
      ],
      add_generation_prompt=False,
  )
  at = text.rfind(_PROBE_ANSWER)
  return "" if at < 0 else text[at + len(_PROBE_ANSWER) :]
