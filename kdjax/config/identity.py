"""What makes two configs the same run: the resume identity.

A workdir remembers the config it was started with (``config.json``). A
restart resumes when the *identity* fields are unchanged and is refused (one
sentence naming the changed fields) when they differ, because continuing
would silently mix two experiments. Everything outside the identity may change
between restarts: a researcher extends a run (``:tiny,steps=60`` on a finished
30-step run), evaluates more often, keeps more checkpoints or moves to another
mesh.

The identity (dotted config keys; a key listed here covers its sub-keys):

* ``seed``, ``batch_size``;
* ``data``: ``name``, ``tokenizer``, ``template``, ``max_length``,
  ``max_prompt_length``, ``prompt_policy``, ``train_split``, ``train_limit``,
  ``seqkd_teacher``;
* ``teacher``: ``path``, ``dtype``, ``source`` (``"live"`` in a workdir
  started before the key existed);
* ``student``: ``init``, ``dtype``, ``model_overrides``;
* ``loss`` (every field: divergence, hyper-parameters, ratio, implementation);
* ``optim`` (every field: learning rate, schedule shape, AdamW constants).

Not part of it (free to change on resume): the length (``num_steps``,
``num_epochs``: the cosine schedule is recomputed for the new length),
everything derived from it (``eval.every_steps`` of the tiny configs),
``eval.*``, ``ckpt.*``, ``log_every``, ``mesh.*``, ``grad_accum`` (same
gradient, split differently), ``student.remat`` (same math, other memory),
``export_hf``, ``force_new_run``, and where inputs live (``data.data_dir``,
``data.manual_dir``, ``data.val_split``, ``teacher.hub_id``,
``teacher.cache_dir``, ``teacher.cache``: the cache directory's own
metadata is checked against the config at every start). A key this
module does not know (added by a newer config) is part of the identity when it
sits under ``loss`` or ``optim`` and free otherwise.
"""

from __future__ import annotations

from typing import Any, Mapping

IDENTITY = (
    "seed",
    "batch_size",
    "data.name",
    "data.tokenizer",
    "data.template",
    "data.max_length",
    "data.max_prompt_length",
    "data.prompt_policy",
    "data.train_split",
    "data.train_limit",
    "data.seqkd_teacher",
    "teacher.path",
    "teacher.dtype",
    "teacher.source",
    "student.init",
    "student.dtype",
    "student.model_overrides",
    "loss",
    "optim",
)


# Values of identity keys added after runs were started without them.
_ADDED = {"teacher.source": "live"}


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
  return any(key == k or key.startswith(k + ".") for k in IDENTITY)


def changed(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
  """Identity keys whose values differ between two resolved configs."""
  a, b = {**_ADDED, **flatten(old)}, {**_ADDED, **flatten(new)}
  return sorted(
      k for k in a.keys() | b.keys() if is_identity(k) and a.get(k) != b.get(k)
  )
