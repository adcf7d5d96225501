"""``onpolicy.source`` to its strategy: the one place that knows the methods.

* ``dataset``: :class:`kdjax.onpolicy.strategy.Dataset`, the batch unchanged
  (off-policy KD, the default);
* ``gkd``: :class:`kdjax.onpolicy.gkd.GKD`;
* ``distillm``: :class:`kdjax.onpolicy.distillm.DistiLLM`;
* ``skd``: :class:`kdjax.onpolicy.skd.SKD`;
* ``minillm``: :class:`kdjax.onpolicy.minillm.MiniLLM`.

Configured by ``config.onpolicy`` (:class:`kdjax.config.spec.OnPolicySpec`,
added by :func:`kdjax.config.recipe.add_onpolicy`; checked by
:func:`kdjax.config.checks.check_onpolicy`).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import ml_collections

from kdjax.config import checks
from kdjax.config import spec as config_spec
from kdjax.onpolicy import distillm, gkd, minillm, sampler, skd, strategy

STRATEGIES: dict[str, type[strategy.Strategy]] = {
    "dataset": strategy.Dataset,
    "gkd": gkd.GKD,
    "distillm": distillm.DistiLLM,
    "skd": skd.SKD,
    "minillm": minillm.MiniLLM,
}
KINDS = tuple(STRATEGIES)

_SAMPLER = frozenset(f.name for f in dataclasses.fields(sampler.Sampler))
_FIELDS = frozenset(
    f.name for cls in STRATEGIES.values() for f in dataclasses.fields(cls)
) - {"sampler"}


def make(kind: str, **fields) -> strategy.Strategy:
  """The strategy of ``kind`` from flat fields.

  ``fields`` are :class:`kdjax.onpolicy.sampler.Sampler`'s and any strategy's
  (as one config block holds every method's); each strategy takes those it
  reads.
  """
  if kind not in STRATEGIES:
    raise ValueError(f"onpolicy.source={kind!r} must be one of {KINDS}.")
  unknown = sorted(set(fields) - _SAMPLER - _FIELDS)
  if unknown:
    raise TypeError(f"no on-policy strategy reads {unknown}.")
  cls = STRATEGIES[kind]
  own = {f.name for f in dataclasses.fields(cls)}
  return cls(
      sampler=sampler.Sampler(
          **{k: v for k, v in fields.items() if k in _SAMPLER}
      ),
      **{k: v for k, v in fields.items() if k in own},
  )


def from_spec(
    cfg: config_spec.OnPolicySpec,
    *,
    batch_size: int,
    max_length: int,
    max_prompt_length: int,
    eos_id: int,
    stop_ids: Sequence[int],
    total_steps: int,
    student_graphdef,
    teacher_graphdef=None,
) -> strategy.Strategy:
  """The strategy of a run's checked ``config.onpolicy``.

  ``eos_id`` pads; any of ``stop_ids`` (:func:`kdjax.data.tokenizer.stop_ids`)
  ends a generated response. Fails in one sentence when it decodes with a teacher the run does not have.
  """
  if cfg.needs_teacher and teacher_graphdef is None:
    raise ValueError(
        f"onpolicy.source={cfg.source!r} needs the teacher; set "
        "loss.kd_ratio > 0 and teacher.path."
    )
  return make(
      cfg.source,
      settings=sampler.settings(
          cfg,
          eos_id=eos_id,
          stop_ids=stop_ids,
          max_length=max_length,
          max_prompt_length=max_prompt_length,
      ),
      prompt_length=max_prompt_length,
      max_length=max_length,
      eos_id=eos_id,
      student_graphdef=student_graphdef,
      teacher_graphdef=teacher_graphdef,
      total_steps=total_steps,
      batch_size=int(batch_size),
      lmbda=float(cfg.lmbda),
      seq_kd=bool(cfg.seq_kd),
      capacity=int(cfg.buffer_size),
      replay_ratio=cfg.replay_ratio,
      loss_eps=float(cfg.loss_eps),
      init_threshold=float(cfg.init_threshold),
      skd_top_k=int(cfg.skd_top_k),
      skd_resample=cfg.skd_resample,
      objective=minillm.Config.from_spec(cfg),
      minillm_ppo_epochs=int(cfg.minillm_ppo_epochs),
  )


def from_config(
    config: ml_collections.ConfigDict,
    *,
    eos_id: int,
    stop_ids: Sequence[int],
    total_steps: int,
    student_graphdef,
    teacher_graphdef=None,
) -> strategy.Strategy:
  """:func:`from_spec` of ``config.onpolicy`` with the config's lengths, after
  :func:`kdjax.config.checks.check_onpolicy`."""
  cfg = config_spec.onpolicy_from_config(config)
  checks.check_onpolicy(
      cfg,
      batch_size=config.batch_size,
      max_length=config.data.max_length,
      max_prompt_length=config.data.max_prompt_length,
  )
  return from_spec(
      cfg,
      batch_size=config.batch_size,
      max_length=config.data.max_length,
      max_prompt_length=config.data.max_prompt_length,
      eos_id=eos_id,
      stop_ids=stop_ids,
      total_steps=total_steps,
      student_graphdef=student_graphdef,
      teacher_graphdef=teacher_graphdef,
  )
