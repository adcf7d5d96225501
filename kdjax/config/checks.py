"""Checks a whole experiment config before anything touches disk or compiles.

``validate(config)`` runs first in the train and evaluate entry points. It
reads only small files (``config.json`` of the teacher and of an HF student,
the first line of a JSONL data file) and never loads weights, so a refused
start costs well under a second and leaves the workdir exactly as it was.
Each failure is one :class:`ConfigError` sentence naming the value and the fix.

Each field's own rule (type, range, choices) is declared with the field in
:mod:`kdjax.config.spec` and applied by :func:`kdjax.config.schema.problem`.
What is checked here is what no single field can say:

* ``data.template="chat"`` against the tokenizer: a chat template must be
  there (a local directory's ``chat_template.jinja`` or
  ``tokenizer_config.json``);
* batch size against gradient accumulation, ``optim.lr_min`` against
  ``optim.lr``, ``data.max_length`` against ``data.max_prompt_length``, a
  sampled ``eval.best_metric`` against ``eval.num_examples``, a
  ``preset:<name>`` student against the model presets;
* the divergence's hyper-parameters against the function's own signature
  (``inspect.signature(kdjax.divergences.get(name))``) and their ranges; a
  hyper-parameter the chosen divergence does not take is dropped with a note
  (switching ``loss.name`` on a config written for another divergence);
* shapes against the models, from ``config.json`` or the preset (defaults +
  ``student.model_overrides``): ``data.max_length`` and the generation length
  against the positions of student and teacher, the tokenizer's vocabulary
  against the student's, and the teacher's vocabulary against the student's
  (the trainer feeds the student's token ids to the teacher, so they must
  share a tokenizer, unless ``teacher.tokenizer`` gives the teacher its own);
* a teacher with its own tokenizer (``teacher.tokenizer``): a
  cross-tokenizer loss (``uld``, ``gold``; GOLD needs one), the live
  teacher on the dataset's batches, every token distilled, and the
  teacher's row length against its positions;
* the on-policy block (:func:`check_onpolicy`): the generation length,
  DistiLLM's buffer against the batch, MiniLLM's full-support sampling, that
  a kind decoding with the teacher has one, and that MiniLLM's dataset term
  is not TAID's;
* several teachers (``teacher.others``): one prior weight per teacher,
  each teacher present with the first one's vocabulary and enough positions,
  and not combined with a teacher cache, a teacher tokenizer, on-policy
  batches, ``loss.impl="fused"`` or the feature and attention terms;
* the feature and attention terms (``loss.features``, ``loss.attention``
  with a weight > 0): a live teacher with the student's tokenizer, the
  dataset's batches, ``loss.impl`` other than ``fused`` and
  ``loss.kd_ratio > 0`` (the teacher is loaded for the KD term);
* LoRA (``student.lora.rank > 0``): ``student.lora.targets`` must select
  some linear layer of the (abstract) student;
* presence: the teacher directory, an HF student directory, a JSONL data file
  (and that it is not empty), a dataset name;
* the teacher source: what a cached teacher cannot be combined with
  (on-policy batches, SeqKD, TAID, ``loss.impl="fused"``, ``val_kd``), and
  that ``teacher.cache_dir`` holds a complete cache built from this config
  (:func:`kdjax.cache.store.check_config`: data settings, tokenizer, teacher,
  temperature, encoding); a cached teacher is never loaded, so its directory
  need not exist.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from typing import Any

from absl import logging
import ml_collections

from kdjax import fs
from kdjax.config import schema, spec

DATASETS = ("dolly", "synthetic_instruct")
JSONL_SETS = ("sinst", "vicuna", "sni", "unni", "dolly_test")
BYTE_VOCAB = (
    257  # kdjax.data.tokenizer.VOCAB_SIZE (not imported: no tokenizers)
)
# Hyper-parameters that are mixture weights or masses, per divergence (ABKD's
# alpha and beta are exponents: any real numbers), and those that must be > 0
# by name: the same name means the same thing in every divergence.
UNIT_HPS = {
    "akl": ("mu",),
    "jsd": ("beta",),
    "skl": ("alpha",),
    "srkl": ("alpha",),
    "fkl_rkl": ("weight",),
    "gold": ("beta",),
}
POSITIVE_HPS = (
    "temperature",
    "teacher_temperature",
    "epsilon",
    "threshold",
    "scale",
)
POSITIVE_INT_HPS = ("num_iters", "group_size")
# Not hyper-parameters: the divergence's tensors and what the objective binds.
# The temperature is loss.temperature and the chunking is chosen by the
# divergence itself, so neither is a loss.hp entry.
_TENSOR_ARGS = (
    "student_logits",
    "teacher_logits",
    "student_matched",
    "teacher_matched",
    "mask",
    "temperature",
    "chunk_size",
)
SAMPLED_METRICS = ("val_rougeL", "val_validity", "val_exact_match")


class ConfigError(ValueError):
  """A config value that cannot run; the message says which and the fix."""

  exit_code = 2  # a usage error: the command line must change


class MissingInputError(ConfigError, FileNotFoundError):
  """A file or directory the config names does not exist."""

  exit_code = 1


def _fail(key: str, value: Any, problem: str, fix: str) -> ConfigError:
  return ConfigError(f"{key}={value!r} {problem}; {fix}.")


def validate(
    config: ml_collections.ConfigDict, *, training: bool = True
) -> list[str]:
  """Raises :class:`ConfigError` on the first problem; returns the notes.

  The only change made to ``config``: hyper-parameters the chosen divergence
  does not take are removed from ``loss.hp`` (each removal is a note, also
  logged), so the resolved config records what actually runs.

  Args:
    config: an experiment config (``configs/*.py:get_config(arg)``).
    training: False for ``kdjax.evaluate``, which scores a given checkpoint:
      only the fields' own rules and the cross-field numbers are checked, not
      the teacher, the student's initialisation or the training data.
  """
  notes: list[str] = []
  _check_fields(config)
  _check_numbers(config)
  steps = _get(config, "num_steps", 0)
  warmup = _get(config, "optim.warmup_steps", 0)
  if steps and warmup >= steps:  # a smoke test; the schedule copes
    notes.append(
        f"optim.warmup_steps={warmup} is not below num_steps="
        f"{steps}: the learning rate stays below optim.lr."
    )
  _check_names(config)
  _check_template(config)
  if not training:
    _log(notes)
    return notes
  _check_onpolicy(config)
  _check_transfer(config)
  _check_teachers(config)
  _check_teacher_source(config)
  _check_cross_tokenizer(config)
  dropped = _check_divergence(config)
  _log(dropped)  # before a later check may refuse the config
  notes += dropped
  _check_models(config)
  _check_lora(config)
  _check_data(config)
  _log([n for n in notes if n not in dropped])
  return notes


def _log(notes: list[str]) -> None:
  for note in notes:
    logging.warning("%s", note)


def _get(config, key: str, default: Any = None) -> Any:
  node = config
  for part in key.split("."):
    if not isinstance(node, (ml_collections.ConfigDict, dict)) or (
        part not in node
    ):
      return default
    node = node[part]
  return node


# ----------------------------------------------------------------------------
# Each field's own rule, then the numbers that constrain each other.


def _check_fields(config) -> None:
  sentence = schema.first_problem(spec.TrainSpec, config)
  if sentence:
    raise ConfigError(sentence)


def _check_numbers(config) -> None:
  bs, accum = _get(config, "batch_size"), _get(config, "grad_accum", 1)
  if bs is not None and bs % accum:
    raise _fail(
        "grad_accum",
        accum,
        f"does not divide batch_size={bs}",
        "pick a grad_accum that divides the batch size",
    )
  lr, lr_min = _get(config, "optim.lr"), _get(config, "optim.lr_min", 0.0)
  if lr is not None and lr_min > lr:
    raise _fail(
        "optim.lr_min",
        lr_min,
        f"is above optim.lr={lr}",
        "pass an optim.lr_min below the peak learning rate",
    )
  length = _get(config, "data.max_length")
  prompt = _get(config, "data.max_prompt_length")
  if length is not None and prompt is not None and length <= prompt:
    raise _fail(
        "data.max_length",
        length,
        f"leaves no room for a response after "
        f"data.max_prompt_length={prompt}",
        "make data.max_length larger than data.max_prompt_length",
    )


# ----------------------------------------------------------------------------
# Names that depend on other fields or on the model presets.


def _one_of(key: str, value: Any, allowed) -> None:
  if value not in allowed:
    allowed = tuple(allowed)
    raise _fail(
        key,
        value,
        f"is unknown: {key.split('.')[-1]} must be one of " f"{allowed}",
        f"pass --config.{key}={allowed[0]}",
    )


def _check_names(config) -> None:
  init = _get(config, "student.init", "")
  if init.startswith("preset:"):
    from kdjax import models  # pylint: disable=g-import-not-at-top

    _one_of("student.init", init, [f"preset:{n}" for n in models.PRESETS])
  metric = _get(config, "eval.best_metric")
  if metric in SAMPLED_METRICS and not _get(config, "eval.num_examples", 0):
    raise _fail(
        "eval.best_metric",
        metric,
        "is a sampled score but " "eval.num_examples=0 samples nothing",
        "set eval.num_examples > 0 or use eval.best_metric=val_ce",
    )


def _check_template(config) -> None:
  """``data.template='chat'`` needs a tokenizer with a chat template; a local
  directory's is looked for (two small files), a hub id's at loading."""
  if _get(config, "data.template") != "chat":
    return
  name = config.data.tokenizer
  fix = (
      "point data.tokenizer at an instruct model's tokenizer directory or "
      "use data.template=minillm"
  )
  if name == "byte":
    raise _fail(
        "data.tokenizer",
        name,
        "has no chat template for data.template=chat",
        fix,
    )
  directory = fs.local(name)
  if not os.path.isdir(directory):
    return
  from kdjax.data import tokenizer  # pylint: disable=g-import-not-at-top

  if tokenizer.chat_template(directory) is None:
    raise _fail(
        "data.tokenizer",
        name,
        "has no chat template for data.template=chat (no "
        "chat_template.jinja, no chat_template in tokenizer_config.json)",
        fix,
    )


# ----------------------------------------------------------------------------
# The on-policy sequence source.


def check_onpolicy(
    o: spec.OnPolicySpec,
    *,
    batch_size: int,
    max_length: int,
    max_prompt_length: int,
) -> None:
  """One sentence on the first ``config.onpolicy`` setting that cannot run."""
  sentence = schema.first_problem(
      spec.OnPolicySpec, dataclasses.asdict(o), "onpolicy."
  )
  if sentence:
    raise ConfigError(sentence)
  if (o.max_new_tokens or max_length - max_prompt_length) < 1:
    raise _fail(
        "onpolicy.max_new_tokens",
        o.max_new_tokens,
        f"leaves no tokens to generate (data.max_length={max_length}, "
        f"data.max_prompt_length={max_prompt_length})",
        "pass a positive --config.onpolicy.max_new_tokens",
    )
  if o.source == "distillm" and o.buffer_size < batch_size:
    raise _fail(
        "onpolicy.buffer_size",
        o.buffer_size,
        f"must hold at least one batch ({batch_size} sequences)",
        f"pass --config.onpolicy.buffer_size={batch_size} or more",
    )
  if o.source == "minillm" and (o.top_k != 0 or o.top_p != 1.0):
    raise ConfigError(
        f"onpolicy.top_k={o.top_k}, top_p={o.top_p}: MiniLLM's importance "
        "weights need every token in both models' support; use top_k=0 and "
        "top_p=1.0."
    )


def _check_onpolicy(config) -> None:
  if "onpolicy" not in config:
    return
  o = spec.onpolicy_from_config(config)
  check_onpolicy(
      o,
      batch_size=_get(config, "batch_size"),
      max_length=_get(config, "data.max_length"),
      max_prompt_length=_get(config, "data.max_prompt_length"),
  )
  if o.needs_teacher and not _get(config, "loss.kd_ratio", 0):
    raise _fail(
        "onpolicy.source",
        o.source,
        "decodes with the teacher, which loss.kd_ratio=0 never loads",
        "set --config.loss.kd_ratio=0.5 and teacher.path",
    )
  if o.source == "minillm" and _get(config, "loss.name") == "taid":
    # MiniLLM's dataset term is a plain loss.name term of the step's dataset
    # batch; TAID's moving target belongs to a run whose KD term it is.
    raise _fail(
        "loss.name",
        "taid",
        "cannot drive MiniLLM's dataset term (onpolicy.source='minillm' "
        "trains on its own policy-gradient objective)",
        "use --config.loss.name=fkl, or onpolicy.source='gkd' for an "
        "on-policy TAID run",
    )


# ----------------------------------------------------------------------------
# The teacher source.


def _check_transfer(config) -> None:
  """What the feature and attention terms cannot be combined with."""
  on = [
      f"loss.{g}.weight"
      for g in ("features", "attention")
      if _get(config, f"loss.{g}.weight", 0.0) > 0
  ]
  if not on:
    return
  refusals = (
      (
          _get(config, "teacher.source", "live") == "cache",
          "teacher.source='cache' holds the teacher's output distributions, "
          "not its hidden states or attention; use --config.teacher.source="
          "live",
      ),
      (
          bool(_get(config, "teacher.tokenizer", "")),
          "a teacher with its own tokenizer has no position-by-position "
          "counterpart of the student's layers; unset teacher.tokenizer",
      ),
      (
          _get(config, "onpolicy.source", "dataset") != "dataset",
          f"onpolicy.source={_get(config, 'onpolicy.source')!r} is not wired "
          "to these terms; use --config.onpolicy.source=dataset",
      ),
      (
          _get(config, "loss.impl", "auto") == "fused",
          "loss.impl='fused' does not return the layers these terms read; "
          "use --config.loss.impl=auto",
      ),
      (
          _get(config, "loss.kd_ratio", 0) == 0,
          "loss.kd_ratio=0 never loads the teacher these terms compare with; "
          "set --config.loss.kd_ratio above 0",
      ),
  )
  for refused, why in refusals:
    if refused:
      raise ConfigError(f"{' and '.join(on)} > 0 cannot run here: {why}.")


def _check_teachers(config) -> None:
  """Several live teachers: one prior weight each, and what their mixture
  cannot be combined with."""
  others = spec.names(_get(config, "teacher.others", ""))
  weights = spec.names(_get(config, "teacher.weights", ""))
  if weights and len(weights) != 1 + len(others):
    raise _fail(
        "teacher.weights",
        config.teacher.weights,
        f"gives {len(weights)} weights for {1 + len(others)} teachers "
        "(teacher.path, then teacher.others)",
        "give one weight per teacher, or '' for equal weights",
    )
  if not others or _get(config, "loss.kd_ratio", 0) == 0:
    return
  refusals = (
      (
          _get(config, "teacher.source", "live") == "cache",
          "a teacher cache holds one teacher; use --config.teacher.source=live",
      ),
      (
          bool(_get(config, "teacher.tokenizer", "")),
          "every teacher must read the student's token ids; unset "
          "teacher.tokenizer",
      ),
      (
          _get(config, "onpolicy.source", "dataset") != "dataset",
          f"onpolicy.source={_get(config, 'onpolicy.source')!r} samples from "
          "or scores with one teacher; use --config.onpolicy.source=dataset",
      ),
      (
          _get(config, "loss.impl", "auto") == "fused",
          "loss.impl='fused' never forms the teachers' logits the mixture "
          "needs; use --config.loss.impl=auto",
      ),
      (
          any(
              _get(config, f"loss.{g}.weight", 0.0) > 0
              for g in ("features", "attention")
          ),
          "loss.features and loss.attention compare the student with one "
          "teacher's layers; set their weights to 0",
      ),
  )
  for refused, why in refusals:
    if refused:
      raise ConfigError(
          f"teacher.others={config.teacher.others!r} cannot run here: {why}."
      )


def from_cache(config) -> bool:
  """Whether the KD term reads a teacher cache (the teacher is never loaded)."""
  return (
      _get(config, "teacher.source", "live") == "cache"
      and _get(config, "loss.kd_ratio", 0) > 0
  )


def sparse_names() -> tuple[str, ...]:
  """The divergences ``kd.sparse.divergence`` evaluates on a top-k teacher."""
  from kdjax.divergences import engine  # pylint: disable=g-import-not-at-top

  return tuple(engine.HYPER_PARAMETERS)


def _check_teacher_source(config) -> None:
  if not from_cache(config):
    return
  c = config
  if not c.teacher.cache_dir:
    raise _fail(
        "teacher.cache_dir",
        c.teacher.cache_dir,
        "is empty but teacher.source='cache' reads the teacher from it",
        "pass --config.teacher.cache_dir=DIR (built by python -m "
        "kdjax.cache_teacher --out=DIR)",
    )
  refusals = (
      (
          _get(c, "onpolicy.source", "dataset") != "dataset",
          f"onpolicy.source={_get(c, 'onpolicy.source')!r} generates batches "
          "during training, which need the live teacher",
      ),
      (
          bool(_get(c, "data.seqkd_teacher", "")),
          "data.seqkd_teacher trains on responses generated in the workdir, "
          "which a cache built from the dataset does not cover",
      ),
      (
          c.loss.name == "taid",
          "loss.name='taid' interpolates the teacher's full logits",
      ),
      (
          c.loss.name != "taid" and c.loss.name not in sparse_names(),
          f"loss.name={c.loss.name!r} needs the teacher's full logits (a "
          f"sparse teacher supports {', '.join(sparse_names())})",
      ),
      (
          c.loss.impl == "fused",
          "loss.impl='fused' works from the teacher's hidden states",
      ),
      (
          c.teacher.cache.encoding == "sampled" and c.loss.name != "fkl",
          f"loss.name={c.loss.name!r} has no estimator on sampled tokens "
          "(the sampled encoding supports fkl, the RS-KD estimator)",
      ),
      (
          _get(c, "eval.best_metric") == "val_kd",
          "eval.best_metric='val_kd' needs the teacher on the validation "
          "split, which the cache does not hold",
      ),
  )
  for refused, why in refusals:
    if refused:
      raise ConfigError(
          f"teacher.source='cache' cannot run here: {why}; use "
          "--config.teacher.source=live."
      )


def _check_cache_dir(config, student: ModelShape | None) -> None:
  from kdjax.cache import store  # pylint: disable=g-import-not-at-top

  try:
    meta = store.check_config(config)
  except store.CacheError as e:
    if store.read_metadata(config.teacher.cache_dir) is None:
      raise MissingInputError(str(e)) from None
    raise ConfigError(str(e)) from None
  vocab = meta["identity"]["vocab_size"]
  if student is not None and vocab != student.vocab_size:
    raise ConfigError(
        f"teacher cache {config.teacher.cache_dir} has a vocabulary of {vocab} "
        f"but {student.where} has {student.vocab_size}; distil between models "
        "that share a tokenizer."
    )


# ----------------------------------------------------------------------------
# A teacher with its own tokenizer.


def cross_tokenizer_losses() -> tuple[str, ...]:
  """The losses that distil across tokenizers (``objective.CROSS_TOKENIZER``)."""
  from kdjax import objective  # pylint: disable=g-import-not-at-top

  return objective.CROSS_TOKENIZER


def _check_cross_tokenizer(config) -> None:
  if _get(config, "loss.kd_ratio", 0) == 0:
    return
  name, own = config.loss.name, _get(config, "teacher.tokenizer", "")
  losses = ", ".join(cross_tokenizer_losses())
  if name == "gold" and not own:
    raise _fail(
        "loss.name",
        name,
        "pairs the vocabularies of two tokenizers but teacher.tokenizer is "
        "empty",
        "pass --config.teacher.tokenizer=DIR (the teacher's tokenizer) or "
        "use a same-vocabulary loss",
    )
  if not own:
    return
  if name not in cross_tokenizer_losses():
    raise _fail(
        "loss.name",
        name,
        f"compares the same vocabulary entries of both models, but "
        f"teacher.tokenizer={own!r} gives the teacher its own tokens",
        f"use a cross-tokenizer loss ({losses}) or clear teacher.tokenizer",
    )
  refusals = (
      (
          _get(config, "onpolicy.source", "dataset") != "dataset",
          f"onpolicy.source={_get(config, 'onpolicy.source')!r} generates "
          "batches, which the cross-tokenizer path does not re-tokenise; use "
          "--config.onpolicy.source=dataset",
      ),
      (
          from_cache(config),
          "teacher.source='cache' stores a teacher over the student's "
          "vocabulary; use --config.teacher.source=live",
      ),
      (
          config.loss.impl == "fused",
          "loss.impl='fused' never forms the logits the alignment gathers; "
          "use --config.loss.impl=auto",
      ),
      (
          _get(config, "loss.select.fraction", 1.0) < 1.0,
          "loss.select ranks the student's positions, of which only the "
          "aligned ones are distilled; use --config.loss.select.fraction=1",
      ),
  )
  for refused, why in refusals:
    if refused:
      raise ConfigError(f"teacher.tokenizer={own!r} cannot run here: {why}.")


# ----------------------------------------------------------------------------
# The divergence and its hyper-parameters.


def divergence_params(name: str) -> dict[str, inspect.Parameter]:
  """Keyword hyper-parameters of divergence ``name``, from its signature."""
  from kdjax import divergences as kd  # pylint: disable=g-import-not-at-top
  from kdjax import objective  # pylint: disable=g-import-not-at-top

  params = inspect.signature(kd.get(objective.divergence_of(name))).parameters
  return {
      n: p
      for n, p in params.items()
      if n not in _TENSOR_ARGS
      and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
  }


def takers(hp: str) -> list[str]:
  """Divergences whose signature has the hyper-parameter ``hp``."""
  from kdjax import divergences as kd  # pylint: disable=g-import-not-at-top

  return [n for n in kd.names() if hp in divergence_params(n)]


def _check_divergence(config) -> list[str]:
  name = config.loss.name
  if config.loss.kd_ratio == 0:
    return []  # SFT: the divergence is never evaluated
  params = divergence_params(name)
  hp = config.loss.hp
  notes = []
  dropped = [k for k in hp.keys() if k not in params]
  if dropped:
    with config.unlocked(), hp.unlocked():
      for k in dropped:
        notes.append(
            f"loss.hp.{k}={hp[k]!r} dropped: {name} takes no {k!r} "
            f"(its hyper-parameters: "
            f"{', '.join(params) or 'none'})."
        )
        del hp[k]
  for k, v in hp.items():
    _check_hp(name, k, v, params[k])
  return notes


def _check_hp(name: str, key: str, value: Any, param: inspect.Parameter):
  full = f"loss.hp.{key}"
  default = param.default
  if key in UNIT_HPS.get(name, ()) and not (
      schema.is_number(value) and 0 <= value <= 1
  ):
    raise _fail(
        full,
        value,
        f"is outside [0, 1] for {name}",
        f"pass a value in [0, 1], e.g. --config.{full}={default}",
    )
  if key in POSITIVE_HPS and not (schema.is_number(value) and value > 0):
    raise _fail(
        full,
        value,
        f"must be > 0 for {name}",
        f"pass a positive value, e.g. --config.{full}={default}",
    )
  if (
      key in POSITIVE_INT_HPS
      and value is not None
      and not (schema.is_int(value) and value > 0)
  ):
    raise _fail(
        full,
        value,
        f"must be a positive integer (or None) for " f"{name}",
        f"pass --config.{full}={default}",
    )
  choices = _choices(name, key)
  if choices and value not in choices:
    raise _fail(
        full,
        value,
        f"is unknown for {name}: {key} must be one of " f"{choices}",
        f"pass --config.{full}={default!r}",
    )
  if (
      isinstance(default, (int, float))
      and not isinstance(default, bool)
      and not schema.is_number(value)
  ):
    raise _fail(
        full,
        value,
        f"must be a number for {name}",
        f"pass --config.{full}={default}",
    )


def _choices(name: str, key: str) -> tuple | None:
  from kdjax import divergences as kd  # pylint: disable=g-import-not-at-top

  if key == "rule" and name == "akl":
    return tuple(kd.AKL_RULES)
  if key == "solver" and name == "sinkhorn":
    from kdjax.divergences import ot  # pylint: disable=g-import-not-at-top

    return tuple(ot.SOLVERS)
  return None


# ----------------------------------------------------------------------------
# Models: positions and vocabularies, from config.json or the preset.


@dataclasses.dataclass(frozen=True)
class ModelShape:
  """What the checks need of a model, known without loading it."""

  vocab_size: int
  positions: int
  where: str  # for messages: "the student (preset:tiny-gpt2)"


def _shape_from_hf(cfg: dict, where: str) -> ModelShape:
  positions = cfg.get("n_positions") or cfg.get("max_position_embeddings")
  return ModelShape(int(cfg["vocab_size"]), int(positions or 0), where)


_CONFIG_FIX = "re-download or re-export that model directory"


def _read_config_json(directory: str) -> dict | None:
  path = fs.path(directory) / "config.json"
  if not path.exists():
    return None
  return fs.read_json(path, _CONFIG_FIX)


def _hub_config(hub_id: str, revision: str = "") -> dict | None:
  """``config.json`` of a hub id (at ``revision``) from the local cache only
  (no network)."""
  try:
    import huggingface_hub  # pylint: disable=g-import-not-at-top

    path = huggingface_hub.try_to_load_from_cache(
        hub_id, "config.json", revision=revision or None
    )
  except Exception:  # malformed repo id, no cache: the loader will tell
    return None
  if isinstance(path, str) and os.path.exists(path):
    return fs.read_json(path, _CONFIG_FIX)
  return None


def student_shape(config) -> ModelShape | None:
  """The student's vocabulary and positions (None: not known before loading)."""
  init = config.student.init
  overrides = dict(config.student.model_overrides)
  if init.startswith("preset:"):
    cfg = _preset_fields("student.init", init, overrides)
    return _shape_from_hf(cfg, f"the student ({init})")
  local = fs.local(init)
  cfg = (
      _read_config_json(local)
      if fs.path(local).is_dir()
      else _hub_config(init, config.student.get("revision", ""))
  )
  if cfg is None:
    if fs.path(local).is_dir():
      raise MissingInputError(
          f"student.init={init!r} is a directory without config.json; point "
          "it at a Hugging Face model directory or use preset:<name>."
      )
    return None  # a hub id not cached: models.load fetches or explains
  return _shape_from_hf(
      _with_shape_overrides(cfg, overrides), f"the student ({init})"
  )


def _with_shape_overrides(cfg: dict, overrides: dict) -> dict:
  """A ``config.json`` dict (a multimodal one's ``text_config`` lifted) with
  the overridden vocabulary and positions."""
  shape_keys = ("vocab_size", "n_positions", "max_position_embeddings")
  return {
      **cfg,
      **cfg.get("text_config", {}),
      **{k: v for k, v in overrides.items() if k in shape_keys},
  }


def _preset_fields(key: str, init: str, overrides: dict) -> dict:
  """The config fields of ``init`` (``preset:NAME``, the value of ``key``)
  with the model overrides of ``key``'s group."""
  from kdjax import models  # pylint: disable=g-import-not-at-top

  role = key.split(".")[0]
  name = init.removeprefix("preset:")
  _one_of(key, init, [f"preset:{n}" for n in models.PRESETS])
  cfg_cls, _, fields = models.PRESETS[name]
  known = {f.name for f in dataclasses.fields(cfg_cls)}
  bad = sorted(set(overrides) - known)
  if bad:
    raise _fail(
        f"{role}.model_overrides.{bad[0]}",
        overrides[bad[0]],
        f"is not a field of {cfg_cls.__name__}",
        f"use one of {sorted(known - {'dtype', 'param_dtype'})}",
    )
  return dataclasses.asdict(cfg_cls(**{**fields, **overrides}))


def teacher_config(config) -> dict:
  """The teacher's ``config.json`` (a preset's fields); one sentence on how
  to get a missing one."""
  path = config.teacher.path
  overrides = dict(_get(config, "teacher.model_overrides", {}))
  if path.startswith("preset:"):
    return _preset_fields("teacher.path", path, overrides)
  if path:
    fs.check_kind(
        fs.local(path),
        "non-empty directory",
        "teacher.path",
        "point it at a Hugging Face model directory (config.json + "
        "safetensors)",
    )
  cfg = _read_config_json(fs.local(path)) if path else None
  if cfg is not None:
    return _with_shape_overrides(cfg, overrides)
  if not path:
    raise _fail(
        "teacher.path",
        path,
        "is empty but loss.kd_ratio=" f"{config.loss.kd_ratio} needs a teacher",
        "pass --config.teacher.path=DIR (an HF model directory), or "
        "--config.loss.kd_ratio=0 for plain SFT",
    )
  if fs.path(fs.local(path)).is_dir():
    raise MissingInputError(
        f"teacher.path={path!r} has no config.json; point it at a Hugging "
        "Face model directory (config.json + safetensors)."
    )
  from kdjax.models import teacher  # pylint: disable=g-import-not-at-top

  raise MissingInputError(
      teacher.missing(path, _get(config, "teacher.hub_id", ""))
  )


def tokenizer_vocab(config, spec: str | None = None) -> int | None:
  """The vocabulary size of tokenizer ``spec`` (default ``data.tokenizer``)
  when it is cheap to know."""
  spec = config.data.tokenizer if spec is None else spec
  if spec == "byte":
    return BYTE_VOCAB
  candidates = [fs.path(fs.local(spec)) / "tokenizer.json"]
  for path in candidates:
    if path.exists():
      import tokenizers  # pylint: disable=g-import-not-at-top

      return tokenizers.Tokenizer.from_str(path.read_text()).get_vocab_size()
  return None


def _check_models(config) -> None:
  student = student_shape(config)
  length = config.data.max_length
  gen = config.data.max_prompt_length + _get(config, "eval.max_new_tokens", 0)
  if student is not None:
    _check_positions(student, length, gen, config)
    vocab = tokenizer_vocab(config)
    if vocab is not None and vocab > student.vocab_size:
      raise _fail(
          "data.tokenizer",
          config.data.tokenizer,
          f"has {vocab} tokens but {student.where} has a vocabulary "
          f"of {student.vocab_size}",
          "use the student's own tokenizer or set "
          f"student.model_overrides.vocab_size={vocab} (presets only)",
      )
  if config.loss.kd_ratio == 0 or "teacher" not in config:
    return
  if from_cache(config):
    _check_cache_dir(config, student)
    return
  teacher = _shape_from_hf(
      teacher_config(config), f"the teacher ({config.teacher.path})"
  )
  own = _get(config, "teacher.tokenizer", "")
  if own:
    _check_teacher_rows(config, teacher)
  else:
    _check_positions(teacher, length, None, config)
  from kdjax.models import safetensors_check  # pylint: disable=g-import-not-at-top

  safetensors_check.check_directory(fs.local(config.teacher.path))
  _check_other_teachers(config, teacher, length)
  if (
      not own
      and student is not None
      and teacher.vocab_size != student.vocab_size
  ):
    raise ConfigError(
        f"teacher vocabulary {teacher.vocab_size} != student vocabulary "
        f"{student.vocab_size} (loss.name={config.loss.name!r}); the trainer "
        "feeds the same token ids to both, so distil between models that "
        "share a tokenizer (a teacher fine-tuned from the student's family, "
        "or a preset student with student.model_overrides.vocab_size="
        f"{teacher.vocab_size}), or give the teacher its own tokenizer with "
        "--config.teacher.tokenizer=DIR and a cross-tokenizer loss "
        f"({', '.join(cross_tokenizer_losses())})."
    )


def _check_other_teachers(config, first: ModelShape, length: int) -> None:
  """``teacher.others``: each one there, its positions enough and its
  vocabulary the first teacher's (checked against the student's)."""
  from kdjax.models import safetensors_check  # pylint: disable=g-import-not-at-top

  overrides = dict(_get(config, "teacher.model_overrides", {}))
  for other in spec.names(_get(config, "teacher.others", "")):
    if other.startswith("preset:"):
      cfg = _preset_fields("teacher.others", other, overrides)
    else:
      cfg = _read_config_json(fs.local(other))
      if cfg is None:
        raise MissingInputError(
            f"teacher.others names {other}, which holds no config.json; pass "
            "Hugging Face model directories (config.json + safetensors) or "
            "preset:NAME."
        )
      safetensors_check.check_directory(fs.local(other))
      cfg = _with_shape_overrides(cfg, overrides)
    shape = _shape_from_hf(cfg, f"the teacher ({other})")
    _check_positions(shape, length, None, config)
    if shape.vocab_size != first.vocab_size:
      raise ConfigError(
          f"teacher.others names {other}, with a vocabulary of "
          f"{shape.vocab_size}, but {first.where} has {first.vocab_size}; "
          "every teacher reads the student's token ids, so mix teachers that "
          "share the student's tokenizer."
      )


def _check_teacher_rows(config, teacher: ModelShape) -> None:
  """A teacher with its own tokenizer: its rows fit its positions and its
  tokenizer its vocabulary."""
  rows = _get(config, "teacher.max_length", 0) or config.data.max_length
  if teacher.positions and rows > teacher.positions:
    raise _fail(
        "teacher.max_length",
        rows,
        f"exceeds the {teacher.positions} positions of {teacher.where}",
        f"pass --config.teacher.max_length={teacher.positions} or less",
    )
  vocab = tokenizer_vocab(config, config.teacher.tokenizer)
  if vocab is not None and vocab > teacher.vocab_size:
    raise _fail(
        "teacher.tokenizer",
        config.teacher.tokenizer,
        f"has {vocab} tokens but {teacher.where} has a vocabulary of "
        f"{teacher.vocab_size}",
        "pass the teacher's own tokenizer",
    )


def _student_model_config(config) -> Any:
  """The student's model config dataclass, or None before it is loaded."""
  from kdjax import models  # pylint: disable=g-import-not-at-top
  from kdjax.models import hf  # pylint: disable=g-import-not-at-top

  init = config.student.init
  overrides = dict(config.student.model_overrides)
  if init.startswith("preset:"):
    return models.preset_config(init.removeprefix("preset:"), **overrides)
  local = fs.local(init)
  cfg = (
      _read_config_json(local)
      if fs.path(local).is_dir()
      else _hub_config(init, config.student.get("revision", ""))
  )
  return None if cfg is None else hf.config_from_hf(cfg, **overrides)


def _check_lora(config) -> None:
  """LoRA targets that select some of the student's linear layers (found on
  the abstract student: nothing is allocated)."""
  adapters = config.student.get("lora")
  if adapters is None or not adapters.rank:
    return
  from flax import nnx  # pylint: disable=g-import-not-at-top

  from kdjax.models import hf, lora  # pylint: disable=g-import-not-at-top

  targets = adapters.targets  # a valid pattern: the field's own rule
  model_cfg = _student_model_config(config)
  if model_cfg is None:
    return
  cls = hf.family(model_cfg).cls
  paths = lora.linear_paths(
      nnx.eval_shape(lambda: cls(model_cfg, rngs=nnx.Rngs(0)))
  )
  if not lora.select(paths, targets):
    raise _fail(
        "student.lora.targets",
        targets,
        f"select none of the linear layers of the student ({config.student.init})",
        f"choose among {lora.layer_names(paths)}",
    )


def _check_positions(
    model: ModelShape, length: int, gen: int | None, config
) -> None:
  if not model.positions:
    return
  fix = f"pass --config.data.max_length={model.positions} or less"
  if config.student.init.startswith("preset:") and "student" in model.where:
    fix += " (or raise student.model_overrides.n_positions)"
  if length > model.positions:
    raise _fail(
        "data.max_length",
        length,
        f"exceeds the {model.positions} positions of {model.where}",
        fix,
    )
  if (
      gen is not None
      and _get(config, "eval.num_examples", 0)
      and (gen > model.positions)
  ):
    raise _fail(
        "eval.max_new_tokens",
        config.eval.max_new_tokens,
        f"plus data.max_prompt_length={config.data.max_prompt_length} "
        f"exceeds the {model.positions} positions of {model.where}",
        "lower eval.max_new_tokens",
    )


# ----------------------------------------------------------------------------
# Data.


def _check_data(config) -> None:
  name = config.data.name
  if name.endswith(".jsonl"):
    _check_jsonl(name)
  elif name.split("/")[0] == "instruct_jsonl":
    if name.partition("/")[2] not in JSONL_SETS:
      raise _fail(
          "data.name",
          name,
          "is not a known instruct_jsonl set",
          f"use instruct_jsonl/<one of {JSONL_SETS}> or a .jsonl path",
      )
  elif name not in DATASETS:
    raise _fail(
        "data.name",
        name,
        "is not a dataset",
        f"use one of {DATASETS} or a path to a .jsonl file",
    )
  seqkd = _get(config, "data.seqkd_teacher", "")
  if seqkd and _read_config_json(fs.local(seqkd)) is None:
    raise MissingInputError(
        f"data.seqkd_teacher={seqkd!r} is not a Hugging Face model directory "
        "(no config.json); pass the teacher that generates the responses."
    )


def _check_jsonl(name: str) -> None:
  path = fs.path(fs.local(name))
  fs.check_kind(
      path,
      "file",
      "data.name",
      "pass the JSONL file inside it, not the directory",
  )
  if not path.is_file():
    raise MissingInputError(
        f"data.name={name!r}: no such file; pass an existing JSONL file "
        '(one {"instruction", "input", "output"} object per line).'
    )
  with path.open("rb") as f:
    if not any(line.strip() for line in f):
      raise ConfigError(
          f'data.name={name!r} is empty; put one {{"instruction", "input", '
          '"output"} object per line in it.'
      )
