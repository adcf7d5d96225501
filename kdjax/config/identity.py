"""What makes two configs the same run: the resume identity.

A workdir remembers the config it was started with (``config.json``). A
restart resumes when the *identity* fields are unchanged and is refused (one
sentence naming the changed fields) when they differ, because continuing
would silently mix two experiments. Everything outside the identity may change
between restarts: a researcher extends a run (``:tiny,steps=60`` on a finished
30-step run), evaluates more often, keeps more checkpoints or moves to another
mesh.

Which fields are identity is declared with each field in
:mod:`kdjax.config.spec` (``identity=True``; the identity column of
docs/config.md): the seed and the global batch; what the data is and how it
is cut (not where it lives), the tokenizer and its hub revision; the teacher's path, dtype and source (``"live"``
in a workdir started before the key existed), the other teachers, their
weights and how they combine (``teacher.others``, ``teacher.weights``,
``teacher.combine``: one teacher, ``"fixed"``, in such a workdir); the student's initialisation and its hub revision,
dtype, model overrides and LoRA adapters (``student.lora.rank``, ``alpha``,
``targets``, ``dropout``); every field of ``loss`` (divergence,
hyper-parameters, ratio, implementation) and of ``optim``.

Not part of it (free to change on resume): the length (``num_steps``,
``num_epochs``: the cosine schedule is recomputed for the new length),
everything derived from it (``eval.every_steps`` of the tiny configs),
``eval.*``, ``ckpt.*``, ``log_every``, ``mesh.*``, ``grad_accum`` (same
gradient, split differently), ``student.remat`` (same math, other memory),
``export_hf``, ``student.lora.export_adapter``, ``force_new_run``, ``onpolicy.*``, and where inputs live
(``data.data_dir``, ``data.manual_dir``, ``data.val_split``,
``teacher.hub_id``, ``teacher.cache_dir``, ``teacher.cache``: the cache
directory's own metadata is checked against the config at every start).

A key the schema does not declare (added by a newer config, or a sub-key of
a free mapping such as ``loss.hp`` or ``student.model_overrides``) takes the
identity of its nearest declared ancestor: it is part of the identity under
``loss``, ``optim`` and the two ``model_overrides`` and free elsewhere.
"""

from __future__ import annotations

from typing import Any, Mapping

from kdjax.config import schema, spec

# Every declared identity field, dotted.
IDENTITY = tuple(k for k, f in spec.FIELDS.items() if f.identity)

# Values of identity keys added after runs were started without them: what
# those runs used.
_ADDED = {
    "teacher.source": "live",
    "teacher.others": "",
    "teacher.weights": "",
    "teacher.combine": "fixed",
    "student.revision": "",
    "data.tokenizer_revision": "",
    **{
        k: f.default
        for k, f in spec.FIELDS.items()
        if k.startswith("student.lora.") and f.identity
    },
    **{
        k: f.default
        for k, f in spec.FIELDS.items()
        if k.startswith(("loss.features.", "loss.attention."))
        and not isinstance(f, schema.Group)
    },
}


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
  out = {}
  for k, v in d.items():
    if isinstance(v, Mapping):
      out.update(flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def is_identity(key: str) -> bool:
  """Whether the dotted ``key`` belongs to the resume identity."""
  parts = key.split(".")
  for n in range(len(parts), 0, -1):
    declared = spec.FIELDS.get(".".join(parts[:n]))
    if declared is not None:
      return declared.identity
  return False


def changed(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
  """Identity keys whose values differ between two resolved configs."""
  a, b = {**_ADDED, **flatten(old)}, {**_ADDED, **flatten(new)}
  return sorted(
      k for k in a.keys() | b.keys() if is_identity(k) and a.get(k) != b.get(k)
  )
