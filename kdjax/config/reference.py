"""docs/config.md, the config reference, rendered from the schema.

``python -m kdjax.config.reference > docs/config.md`` rewrites the page;
tests/test_schema.py fails when the page and :func:`markdown` differ.
"""

from __future__ import annotations

from kdjax.config import schema, spec

_INTRO = """\
# Config reference

Every field of an experiment config: its default (the paper setup), what it
accepts, whether it belongs to the run's identity (a workdir refuses to resume
when an identity field changed: [Resuming](training.md#resuming)) and what it
means. Set any of them with `--config.<key>=<value>` or
`kdjax.config.recipe.override` ([Overrides](training.md#overrides)); a value
outside its rule stops the run before anything is written, with one sentence
naming the value and the fix.

Open keys: `loss.hp` holds the divergence's hyper-parameters, checked against
its signature ([Divergences](divergences.md)); `student.model_overrides` holds
model config fields; `loss.taid` is TAID's schedule (`configs/taid_gpt2.py`).
A key the schema does not declare is part of the identity under `loss`,
`optim` and `student.model_overrides`, and free elsewhere. The `onpolicy`
group is present only in the on-policy configs, which add it with
`kdjax.config.recipe.add_onpolicy` ([On-policy distillation](on_policy.md)).

This page is generated from the declarations in `kdjax/config/spec.py`:
`python -m kdjax.config.reference > docs/config.md`.
"""


def _default(f: schema.Field) -> str:
  return repr(f.default) if isinstance(f.default, str) else str(f.default)


def _accepts(f: schema.Field) -> str:
  text = schema.requirement(f)
  if f.kind is float and f.allowed() is None and text != "a number":
    text = "a number " + text
  return text


def _row(f: schema.Field) -> str:
  cells = (
      f"`{f.key}`",
      f"`{_default(f)}`",
      _accepts(f).replace("|", "\\|"),
      "yes" if f.identity else "",
      f.help,
  )
  return "| " + " | ".join(cells) + " |"


def _section(title: str, help_: str, rows: list[schema.Field]) -> str:
  head = (
      "| key | default | accepts | identity | meaning |\n|---|---|---|---|---|"
  )
  lines = [f"## {title}", "", help_ + ".", "", head]
  return "\n".join(lines + [_row(f) for f in rows])


def markdown() -> str:
  """The page: the run's own fields, then one table per top-level group."""
  top = [
      d
      for k, d in spec.FIELDS.items()
      if "." not in k and isinstance(d, schema.Field)
  ]
  sections = [_section("run", "The run as a whole", top)]
  for key, decl in spec.FIELDS.items():
    if "." in key or not isinstance(decl, schema.Group):
      continue
    rows = [
        d
        for k, d in spec.FIELDS.items()
        if k.startswith(key + ".") and isinstance(d, schema.Field)
    ]
    sections.append(_section(f"`{key}`", decl.help.capitalize(), rows))
  return _INTRO + "\n" + "\n\n".join(sections) + "\n"


if __name__ == "__main__":
  print(markdown(), end="")
