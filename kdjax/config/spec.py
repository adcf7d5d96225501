"""An experiment config resolved once into typed, frozen parts.

The ``ml_collections.ConfigDict`` of ``configs/*.py`` is read here and
nowhere else: :func:`from_config` turns it into a :class:`TrainSpec` whose
parts go each to the one module that needs it (:class:`DataSpec` to the data
pipeline, :class:`TeacherSpec` / :class:`StudentSpec` to model building,
``loss`` to :mod:`kdjax.objective`, :class:`OptimSpec` to the optimizer,
:class:`CkptSpec` to checkpointing, :class:`EvalSpec` and its
:class:`~kdjax.evaluation.protocol.Protocol` to validation). The evaluation
command line reads the smaller :class:`SuiteSpec` (:func:`suite_from_config`).

```python
from kdjax.config import files, spec
s = spec.from_config(files.load("configs/akl_gpt2.py:tiny"))
s.data.max_length, s.optim.lr, s.loss["name"], s.eval.protocol.seeds
```
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

import ml_collections

from kdjax.evaluation.protocol import Protocol
from kdjax.onpolicy import source as onpolicy_source


def _path(p: str) -> str:
  return os.path.expanduser(p)


def int_list(text: str, what: str) -> tuple[int, ...]:
  """``"10,20"`` -> ``(10, 20)``, or one sentence naming the bad field."""
  try:
    return tuple(int(s) for s in text.split(",") if s.strip())
  except ValueError:
    raise ValueError(
        f"{what}={text!r} is not a comma-separated list of "
        "integers, e.g. 10,20,30."
    ) from None


def names(text: str) -> tuple[str, ...]:
  """``"dolly, sinst"`` -> ``("dolly", "sinst")`` (empty items dropped)."""
  return tuple(n.strip() for n in text.split(",") if n.strip())


@dataclasses.dataclass(frozen=True)
class DataSpec:
  """What to read and how to turn it into rows (``config.data``).

  ``name`` is a registered dataset or a ``.jsonl`` path; ``manual_dir`` is
  None when unset; ``train_limit`` 0 means every example; ``seqkd_teacher``
  "" means train on the references, else on that teacher's responses.
  """

  name: str
  data_dir: str
  manual_dir: str | None
  train_split: str
  val_split: str
  tokenizer: str
  template: str
  max_length: int
  max_prompt_length: int
  prompt_policy: str
  train_limit: int
  seqkd_teacher: str

  def row_settings(self, eos_id: int) -> dict[str, Any]:
    """Keyword arguments shared by ``pipeline.train_batches`` / ``eval_batches``."""
    return dict(
        eos_id=eos_id,
        max_length=self.max_length,
        max_prompt_length=self.max_prompt_length,
        prompt_policy=self.prompt_policy,
        template_style=self.template,
    )


@dataclasses.dataclass(frozen=True)
class TeacherSpec:
  """The frozen teacher: a HF directory, the hub id it came from, its dtype.

  ``source`` is ``"live"`` (run it each step) or ``"cache"`` (read its sparse
  distributions from ``cache_dir``; ``cache`` holds ``encoding``, ``k`` and
  ``num_samples``: docs/cached_teacher.md).
  """

  path: str
  hub_id: str
  dtype: str
  source: str = "live"
  cache_dir: str = ""
  cache: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def cached(self) -> bool:
    return self.source == "cache"


@dataclasses.dataclass(frozen=True)
class StudentSpec:
  """``init``: a HF directory / hub id, or ``"preset:<name>"`` (from ``seed``).

  ``model_overrides`` replace model config fields (``remat`` included).
  """

  init: str
  dtype: str
  model_overrides: Mapping[str, Any]
  seed: int


@dataclasses.dataclass(frozen=True)
class OptimSpec:
  """Clipped AdamW on a warmup + cosine schedule (``config.optim``)."""

  lr: float
  lr_min: float
  warmup_steps: int
  weight_decay: float
  clip: float
  b1: float
  b2: float
  eps: float


@dataclasses.dataclass(frozen=True)
class CkptSpec:
  """Checkpoint every ``every_steps`` steps, keeping the ``max_to_keep`` latest."""

  every_steps: int
  max_to_keep: int


@dataclasses.dataclass(frozen=True)
class EvalSpec:
  """Periodic validation (``config.eval``).

  ``every_steps``: -1 each epoch, 0 never; ``val_batches`` <= 0: the whole
  validation split; ``num_examples`` > 0 adds sampled scores on that many
  examples, decoded with ``protocol``. The best checkpoint is the best
  ``best_metric`` among validations from step ``best_after_steps`` on (-1:
  :func:`kdjax.checkpoint.best_policy` chooses).
  """

  every_steps: int
  val_batches: int
  num_examples: int
  batch_size: int
  protocol: Protocol
  datasets: tuple[str, ...]
  best_metric: str = "val_ce"
  best_after_steps: int = -1


@dataclasses.dataclass(frozen=True)
class MeshSpec:
  """Mesh axis sizes (-1: the devices left), ``sharding.make_mesh``'s arguments."""

  data: int
  fsdp: int


@dataclasses.dataclass(frozen=True)
class TrainSpec:
  """One training run, resolved from its config.

  ``loss`` is the plain mapping :mod:`kdjax.objective` reads
  (``loss["name"]``, ``loss["kd_ratio"]``, ``loss["hp"]`` a dict, ...);
  ``identity`` is the whole config as JSON, what a workdir is bound to.
  ``num_steps`` 0 means ``num_epochs`` epochs.
  """

  seed: int
  batch_size: int
  grad_accum: int
  num_epochs: int
  num_steps: int
  log_every: int
  export_hf: bool
  force_new_run: bool
  data: DataSpec
  teacher: TeacherSpec
  student: StudentSpec
  loss: Mapping[str, Any]
  optim: OptimSpec
  ckpt: CkptSpec
  eval: EvalSpec
  mesh: MeshSpec
  identity: Mapping[str, Any]
  # The sequence source (kdjax.onpolicy); off-policy when absent.
  onpolicy: onpolicy_source.OnPolicySpec = onpolicy_source.OnPolicySpec()


def _fields(cls, node: ml_collections.ConfigDict, **extra) -> Any:
  """``cls`` from the same-named fields of ``node`` (plus ``extra``)."""
  names = [f.name for f in dataclasses.fields(cls) if f.name not in extra]
  return cls(**{n: node[n] for n in names}, **extra)


def protocol_from_config(config: ml_collections.ConfigDict) -> Protocol:
  """The paper protocol with the config's lengths, seeds and (when present)
  ``data.template`` and ``eval.greedy`` / ``temperature`` / ``top_k`` /
  ``top_p`` / ``no_repeat_ngram_size``."""
  fields = dict(
      max_new_tokens=config.eval.max_new_tokens,
      max_prompt_length=config.data.max_prompt_length,
      seeds=int_list(config.eval.seeds, "eval.seeds"),
  )
  if "template" in config.data:
    fields["template"] = config.data.template
  for key in (
      "greedy",
      "temperature",
      "top_k",
      "top_p",
      "no_repeat_ngram_size",
  ):
    if key in config.eval:
      fields[key] = config.eval[key]
  return Protocol(**fields)


def data_from_config(data: ml_collections.ConfigDict) -> DataSpec:
  return _fields(
      DataSpec,
      data,
      data_dir=_path(data.data_dir),
      manual_dir=_path(data.manual_dir) or None,
  )


def _teacher_from_config(t: ml_collections.ConfigDict) -> TeacherSpec:
  return TeacherSpec(
      path=t.path,
      hub_id=t.hub_id,
      dtype=t.dtype,
      source=t.get("source", "live"),
      cache_dir=_path(t.get("cache_dir", "")),
      cache=t.cache.to_dict() if "cache" in t else {},
  )


def from_config(config: ml_collections.ConfigDict) -> TrainSpec:
  """Resolves a training config (``configs/*.py:get_config``)."""
  c = config
  student = StudentSpec(
      init=c.student.init,
      dtype=c.student.dtype,
      seed=c.seed,
      model_overrides=dict(c.student.model_overrides, remat=c.student.remat),
  )
  evaluation = _fields(
      EvalSpec,
      c.eval,
      protocol=protocol_from_config(c),
      datasets=names(c.eval.datasets),
  )
  return TrainSpec(
      seed=c.seed,
      batch_size=c.batch_size,
      grad_accum=c.grad_accum,
      num_epochs=c.num_epochs,
      num_steps=c.num_steps,
      log_every=c.log_every,
      export_hf=c.export_hf,
      force_new_run=c.force_new_run,
      data=data_from_config(c.data),
      teacher=_teacher_from_config(c.teacher),
      student=student,
      loss=c.loss.to_dict(),
      optim=_fields(OptimSpec, c.optim),
      ckpt=_fields(CkptSpec, c.ckpt),
      eval=evaluation,
      mesh=_fields(MeshSpec, c.mesh),
      identity=json.loads(c.to_json_best_effort()),
      onpolicy=onpolicy_source.spec_from_config(c),
  )


@dataclasses.dataclass(frozen=True)
class SuiteSpec:
  """What ``python -m kdjax.evaluate`` reads from a config.

  ``mesh`` holds ``sharding.make_mesh`` keyword arguments (empty:
  data-parallel over every device); ``manual_dir`` is None when unset.
  """

  protocol: Protocol
  datasets: tuple[str, ...]
  data_dir: str
  manual_dir: str | None
  tokenizer: str
  batch_size: int
  dtype: str
  seed: int
  mesh: Mapping[str, int]


def suite_from_config(config: ml_collections.ConfigDict) -> SuiteSpec:
  """Resolves the fields an evaluation needs (any experiment config has them)."""
  return SuiteSpec(
      protocol=protocol_from_config(config),
      datasets=names(config.eval.datasets),
      data_dir=_path(config.data.data_dir),
      manual_dir=_path(config.data.get("manual_dir") or "") or None,
      tokenizer=config.data.tokenizer,
      batch_size=config.eval.batch_size,
      dtype=config.student.dtype,
      seed=config.seed,
      mesh=config.mesh.to_dict() if "mesh" in config else {},
  )
