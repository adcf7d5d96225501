"""The config schema: how a field is declared and what follows from it.

Each config group is a frozen dataclass (the parts in
:mod:`kdjax.config.spec`). A config field is a dataclass field declared with
:func:`field`: its default, a one-line help, whether it belongs to the run's
identity, and its rule (choices, bounds, values with a special meaning, a
parser). A nested group is declared with :func:`group`. Everything else is
derived from those declarations:

* :func:`defaults`: the ``ml_collections.ConfigDict`` of a group's defaults;
* :func:`table`: every field and group by dotted key (the identity, the docs
  reference);
* :func:`problem`: the one-sentence refusal of a value that breaks its rule;
* :func:`build`: a group's frozen part from a config node.

A field's config type is its default's type (``int``, ``float``, ``str``,
``bool``, or a free ``dict``); ``resolve`` turns the config value into the
part's value (``"10,20"`` into ``(10, 20)``) and its ``ValueError`` is a
refusal.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
import dataclasses
import math
from typing import Any

import ml_collections

_FIELD = "kdjax.config.field"
_GROUP = "kdjax.config.group"


@dataclasses.dataclass(frozen=True)
class Field:
  """One config value: its default, help, identity and rule.

  ``choices`` may be a function returning them (names a registry knows);
  ``at_least`` / ``above`` / ``at_most`` / ``below`` bound numbers;
  ``special`` maps values to what they mean (``{0: "every example"}``), which
  admits them even outside the bounds.
  """

  default: Any
  help: str
  key: str = ""  # dotted, set by table()
  identity: bool = False
  choices: Sequence[Any] | Callable[[], Sequence[Any]] | None = None
  at_least: float | None = None
  above: float | None = None
  at_most: float | None = None
  below: float | None = None
  special: Mapping[Any, str] = dataclasses.field(default_factory=dict)
  resolve: Callable[[Any], Any] | None = None

  @property
  def kind(self) -> type:
    return type(self.default)

  def allowed(self) -> tuple[Any, ...] | None:
    c = self.choices() if callable(self.choices) else self.choices
    return None if c is None else tuple(c)


@dataclasses.dataclass(frozen=True)
class Group:
  """A nested group of fields, declared by the dataclass ``cls``.

  ``identity``: every field of the group, and any key under it the schema
  does not know, defines the run. ``optional``: absent from the defaults,
  added by the configs that use it. ``as_dict``: the part holds the group as
  a plain mapping (its consumers read keys the schema leaves open).
  """

  cls: type
  help: str
  key: str = ""
  identity: bool = False
  optional: bool = False
  as_dict: bool = False


def field(default: Any, help: str, **rule: Any) -> Any:  # pylint: disable=redefined-builtin
  """A dataclass field declaring a config value (see :class:`Field`)."""
  f = Field(default, help, **rule)
  value = f.resolve(default) if f.resolve else default
  if isinstance(value, dict):
    return dataclasses.field(
        default_factory=lambda: dict(value), metadata={_FIELD: f}
    )
  return dataclasses.field(default=value, metadata={_FIELD: f})


def group(cls: type, help: str, **flags: Any) -> Any:  # pylint: disable=redefined-builtin
  """A dataclass field declaring the nested group ``cls`` (see :class:`Group`)."""
  g = Group(cls, help, **flags)
  if g.as_dict:
    make = lambda: dataclasses.asdict(cls())
  else:
    make = cls
  return dataclasses.field(default_factory=make, metadata={_GROUP: g})


def table(cls: type, prefix: str = "", identity: bool = False) -> dict:
  """Every :class:`Field` and :class:`Group` under ``cls`` by dotted key.

  A field inherits the identity of an enclosing identity group.
  """
  out = {}
  for f in dataclasses.fields(cls):
    key = prefix + f.name
    if _FIELD in f.metadata:
      decl = f.metadata[_FIELD]
      out[key] = dataclasses.replace(
          decl, key=key, identity=decl.identity or identity
      )
    elif _GROUP in f.metadata:
      g = f.metadata[_GROUP]
      inner = g.identity or identity
      out[key] = dataclasses.replace(g, key=key, identity=inner)
      out.update(table(g.cls, key + ".", inner))
  return out


def defaults(cls: type, *, optional: bool = False) -> ml_collections.ConfigDict:
  """The ConfigDict of ``cls``'s defaults (optional groups only if asked)."""
  c = ml_collections.ConfigDict()
  for f in dataclasses.fields(cls):
    if _FIELD in f.metadata:
      default = f.metadata[_FIELD].default
      if isinstance(default, dict):  # free keys of any type (hp, overrides)
        default = ml_collections.ConfigDict(default, type_safe=False)
      c[f.name] = default
    elif _GROUP in f.metadata:
      g = f.metadata[_GROUP]
      if not g.optional or optional:
        c[f.name] = defaults(g.cls, optional=optional)
  return c


def build(cls: type, node: Any, prefix: str = "", **given: Any) -> Any:
  """The frozen part ``cls`` from a config node (a ConfigDict or dict).

  Keys missing from ``node`` take their defaults (a config written before
  they existed); ``given`` supplies the fields a config does not hold.
  """
  values = dict(given)
  for f in dataclasses.fields(cls):
    if f.name in values or f.name not in node:
      continue
    if _FIELD in f.metadata:
      decl = f.metadata[_FIELD]
      values[f.name] = _resolved(decl, prefix + f.name, node[f.name])
    elif _GROUP in f.metadata:
      g, sub = f.metadata[_GROUP], node[f.name]
      if g.as_dict:
        values[f.name] = _plain(sub)
      else:
        values[f.name] = build(g.cls, sub, f"{prefix}{f.name}.")
  return cls(**values)


def _plain(node: Any) -> Any:
  return node.to_dict() if hasattr(node, "to_dict") else dict(node)


def _resolved(f: Field, key: str, value: Any) -> Any:
  if isinstance(value, Mapping) or hasattr(value, "to_dict"):
    value = _plain(value)
  if f.resolve is None:
    return value
  try:
    return f.resolve(value)
  except ValueError as e:
    raise ValueError(_sentence(key, value, str(e), _fix(f, key))) from None


# ----------------------------------------------------------------------------
# Rules.


def _sentence(key: str, value: Any, problem_: str, fix: str) -> str:
  return f"{key}={value!r} {problem_}; {fix}."


def _fix(f: Field, key: str) -> str:
  return f"pass --config.{key}={f.default}"


def is_int(v: Any) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
  return (
      isinstance(v, (int, float))
      and not isinstance(v, bool)
      and math.isfinite(v)
  )


def _within(f: Field, v: Any) -> bool:
  return (
      (f.at_least is None or v >= f.at_least)
      and (f.above is None or v > f.above)
      and (f.at_most is None or v <= f.at_most)
      and (f.below is None or v < f.below)
  )


def _typed(f: Field, v: Any) -> bool:
  if f.kind is bool:
    return isinstance(v, bool)
  if f.kind is int:
    return is_int(v)
  if f.kind is float:
    return is_number(v)
  if f.kind is dict:
    return isinstance(v, Mapping) or hasattr(v, "to_dict")
  return isinstance(v, f.kind)


def _num(x: float) -> str:
  return str(int(x)) if float(x).is_integer() else str(x)


def _bounds(f: Field) -> str:
  """``>= 0``, ``in [0, 1)``, ... ('' when unbounded)."""
  low = (
      ("[", f.at_least)
      if f.at_least is not None
      else ("(", f.above)
      if f.above is not None
      else None
  )
  high = (
      ("]", f.at_most)
      if f.at_most is not None
      else (")", f.below)
      if f.below is not None
      else None
  )
  if low and high:
    return f"in {low[0]}{_num(low[1])}, {_num(high[1])}{high[0]}"
  if low:
    return f"{'>=' if low[0] == '[' else '>'} {_num(low[1])}"
  if high:
    return f"{'<=' if high[0] == ']' else '<'} {_num(high[1])}"
  return ""


def _base(f: Field) -> str:
  """What a plain (non-special) value must be."""
  bounds = _bounds(f)
  if f.kind is int:
    if bounds == "> 0":
      return "a positive integer"
    return f"an integer {bounds}".rstrip()
  if f.kind is float:
    return bounds or "a number"
  return {bool: "true or false", str: "a string", dict: "a mapping"}.get(
      f.kind, f.kind.__name__
  )


def requirement(f: Field) -> str:
  """The rule in words: ``-1 (every epoch), 0 (never) or a positive integer``."""
  allowed = f.allowed()
  if allowed is not None:
    return "one of " + ", ".join(map(repr, allowed))
  base = _base(f)
  outside = [(v, m) for v, m in f.special.items() if not _within(f, v)]
  inside = [(v, m) for v, m in f.special.items() if _within(f, v)]
  if outside:
    alts = [f"{_num(v)} ({m})" for v, m in outside]
    base = (
        (", ".join(alts) + f" or {base}")
        if len(alts) == 1
        else (", ".join(alts[:-1]) + f", {alts[-1]} or {base}")
    )
  if inside:
    base += " (" + "; ".join(f"{_num(v)}: {m}" for v, m in inside) + ")"
  return base


def problem(f: Field, value: Any) -> str | None:
  """The sentence refusing ``value`` for ``f`` (None: it is allowed)."""
  allowed = f.allowed()
  if allowed is not None:
    if value in allowed:
      return None
    leaf = f.key.rsplit(".", 1)[-1]
    return _sentence(
        f.key,
        value,
        f"is unknown: {leaf} must be one of {allowed}",
        _fix(f, f.key),
    )
  if not _typed(f, value):
    return _sentence(f.key, value, f"must be {requirement(f)}", _fix(f, f.key))
  if f.kind in (int, float) and not (value in f.special or _within(f, value)):
    return _sentence(f.key, value, f"must be {requirement(f)}", _fix(f, f.key))
  if f.resolve is not None:
    try:
      f.resolve(value)
    except ValueError as e:
      return _sentence(f.key, value, str(e), _fix(f, f.key))
  return None


def first_problem(cls: type, node: Any, prefix: str = "") -> str | None:
  """The first value under ``node`` that breaks its field's rule, in words.

  Keys absent from ``node`` are skipped (their defaults are allowed).
  """
  for key, decl in table(cls, prefix).items():
    if not isinstance(decl, Field):
      continue
    value = _lookup(node, key[len(prefix) :])
    if value is not _ABSENT:
      sentence = problem(decl, value)
      if sentence:
        return sentence
  return None


_ABSENT = object()


def _lookup(node: Any, key: str) -> Any:
  for part in key.split("."):
    if not (isinstance(node, Mapping) or hasattr(node, "to_dict")):
      return _ABSENT
    if part not in node:
      return _ABSENT
    node = node[part]
  return node
