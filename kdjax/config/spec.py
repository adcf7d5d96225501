"""Every config field, declared once, and the config resolved into parts.

The frozen dataclasses below are the config schema (:mod:`kdjax.config.schema`
derives the defaults, the rules, the identity and docs/config.md from them)
and, filled from a config, its typed parts. The ``ml_collections.ConfigDict``
of ``configs/*.py`` is read here and nowhere else: :func:`from_config` turns
it into a :class:`TrainSpec` whose parts go each to the one module that needs
it (:class:`DataSpec` to the data pipeline, :class:`TeacherSpec` /
:class:`StudentSpec` to model building, ``loss`` to :mod:`kdjax.objective`,
:class:`OptimSpec` to the optimizer, :class:`CkptSpec` to checkpointing,
:class:`EvalSpec` and its :class:`~kdjax.evaluation.protocol.Protocol` to
validation, :class:`OnPolicySpec` to the sequence source). The evaluation
command line reads the smaller :class:`SuiteSpec` (:func:`suite_from_config`).

```python
from kdjax.config import files, spec
s = spec.from_config(files.load("configs/akl_gpt2.py:tiny"))
s.data.max_length, s.optim.lr, s.loss["name"], s.eval.protocol.seeds
```

A new field is one :func:`~kdjax.config.schema.field` line in its group
(CONTRIBUTING.md, "Configs").
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Mapping

import ml_collections

from kdjax.config import schema
from kdjax.config.schema import field, group
from kdjax.evaluation.protocol import Protocol

# Choices owned by modules above the config system, which it must not import;
# tests/test_schema.py checks that they agree.
ONPOLICY_KINDS = ("dataset", "gkd", "distillm", "skd", "minillm")
REPLAY_RATIOS = ("decreasing", "constant", "increasing")  # onpolicy.distillm
SKD_RESAMPLE = ("top_k", "full")  # onpolicy.skd
CACHE_ENCODINGS = ("topk", "sampled")  # cache.codec
CACHE_MAX_SAMPLES = 255  # cache.codec: draw counts are uint8
DTYPES = ("float32", "bfloat16", "float16")
FEATURE_KINDS = ("mse", "cosine")  # kdjax.transfer
ATTENTION_KINDS = ("minilm", "minilmv2")  # kdjax.transfer
LAYER_MAPS = ("uniform", "last", "pairs")  # divergences.features
REMATS = ("none", "full", "dots")
# LoRA's default targets: the attention and MLP projections of both families
# (LLaMA's q/k/v/o and gate/up/down, GPT-2's c_attn, c_proj and c_fc).
LORA_TARGETS = (
    "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj,c_attn,c_proj,c_fc"
)
# Metrics the best checkpoint may be chosen by (``val_`` + a logged name).
BEST_METRICS = (
    "val_ce",
    "val_loss",
    "val_kd",
    "val_rougeL",
    "val_validity",
    "val_exact_match",
)


def _path(p: str) -> str:
  return os.path.expanduser(p)


def integers(text: str) -> tuple[int, ...]:
  """``"10,20"`` -> ``(10, 20)``; at least one integer."""
  try:
    out = tuple(int(s) for s in text.split(",") if s.strip())
  except ValueError:
    out = ()
  if not out:
    raise ValueError("is not a comma-separated list of integers")
  return out


def int_list(text: str, what: str) -> tuple[int, ...]:
  """``"10,20"`` -> ``(10, 20)``, or one sentence naming the bad ``what``."""
  try:
    return integers(text)
  except ValueError as e:
    raise ValueError(f"{what}={text!r} {e}, e.g. 10,20,30.") from None


def lora_regex(targets: str) -> str:
  """The regex of LoRA ``targets``, full-matched against ``/``-joined module
  paths: module names (``"q_proj, v_proj"``, each the last part of a path,
  as peft's ``target_modules``) or already a regex (``"h/\\d+/attn/c_attn"``).
  """
  if re.fullmatch(r"[\w\s,]+", targets):
    return r"(.*/)?(" + "|".join(names(targets)) + ")"
  try:
    re.compile(targets)
  except re.error as e:
    raise ValueError(
        f"is neither module names nor a regular expression ({e})"
    ) from None
  return targets


def positive_numbers(text: str) -> tuple[float, ...]:
  """``"1, 0.5"`` -> ``(1.0, 0.5)``; ``""`` -> ``()``; each number > 0."""
  try:
    out = tuple(float(n) for n in names(text))
  except ValueError:
    out = None
  if out is None or not all(0 < x < float("inf") for x in out):
    raise ValueError("is not a comma-separated list of positive numbers")
  return out


def _positive_numbers_text(text: str) -> str:
  """``text`` itself, once :func:`positive_numbers` reads it."""
  positive_numbers(text)
  return text


def layer_pairs(text: str) -> tuple[tuple[int, int], ...]:
  """``"1:2, 2:4"`` -> ``((1, 2), (2, 4))``; ``""`` -> ``()``."""
  out = []
  for item in names(text):
    s, sep, t = item.partition(":")
    if not sep or not (s.strip().isdigit() and t.strip().isdigit()):
      raise ValueError(
          "is not a list of student:teacher layer pairs such as 1:2,2:4"
      )
    out.append((int(s), int(t)))
  return tuple(out)


def names(text: str) -> tuple[str, ...]:
  """``"dolly, sinst"`` -> ``("dolly", "sinst")`` (empty items dropped)."""
  return tuple(n.strip() for n in text.split(",") if n.strip())


# Names known only to registries above the config system, imported when a
# value is checked (the registries import no model, training or cache code).
def _loss_names() -> tuple[str, ...]:
  from kdjax import objective  # pylint: disable=g-import-not-at-top

  return objective.NAMES


def _loss_impls() -> tuple[str, ...]:
  from kdjax import objective  # pylint: disable=g-import-not-at-top

  return objective.IMPLS


def _select_by() -> tuple[str, ...]:
  from kdjax import objective  # pylint: disable=g-import-not-at-top

  return objective.SELECT_BY


def _combine_rules() -> tuple[str, ...]:
  from kdjax.divergences import mixture  # pylint: disable=g-import-not-at-top

  return mixture.COMBINE


def _templates() -> tuple[str, ...]:
  from kdjax.data import template  # pylint: disable=g-import-not-at-top

  return template.CHOICES


# ----------------------------------------------------------------------------
# The groups.


@dataclasses.dataclass(frozen=True)
class DataSpec:
  """What to read and how to turn it into rows (``config.data``)."""

  name: str = field(
      "dolly",
      "a registered dataset, instruct_jsonl/SET, or a .jsonl path",
      identity=True,
  )
  data_dir: str = field(
      "~/tensorflow_datasets", "where prepared datasets live", resolve=_path
  )
  manual_dir: str | None = field(
      "",
      "downloaded source files of a dataset ('': none)",
      resolve=lambda p: _path(p) or None,
  )
  train_split: str = field("train", "split trained on", identity=True)
  val_split: str = field("validation", "split validated on")
  tokenizer: str = field(
      "gpt2", "'byte', an HF directory or a hub id", identity=True
  )
  tokenizer_revision: str = field(
      "",
      "the tokenizer hub id's commit hash, tag or branch ('': default)",
      identity=True,
  )
  template: str = field(
      "minillm",
      "prompt template (chat: the tokenizer's chat template)",
      identity=True,
      choices=_templates,
  )
  system_prompt: str = field(
      "",
      "chat template: the system message ('': none)",
      identity=True,
  )
  max_length: int = field(
      512,
      "tokens per sequence, prompt and response",
      identity=True,
      above=1,
  )
  max_prompt_length: int = field(
      256, "prompt tokens kept", identity=True, above=0
  )
  prompt_policy: str = field(
      "drop",
      "what a longer prompt gets",
      identity=True,
      choices=("drop", "truncate"),
  )
  train_limit: int = field(
      0,
      "training examples used",
      identity=True,
      at_least=0,
      special={0: "every example"},
  )
  seqkd_teacher: str = field(
      "",
      "SeqKD: train on this teacher's responses ('': on the references)",
      identity=True,
  )

  def row_settings(self, eos_id: int) -> dict[str, Any]:
    """Keyword arguments shared by ``pipeline.train_batches`` / ``eval_batches``."""
    return dict(
        eos_id=eos_id,
        max_length=self.max_length,
        max_prompt_length=self.max_prompt_length,
        prompt_policy=self.prompt_policy,
        template_style=self.template,
        system_prompt=self.system_prompt,
    )


@dataclasses.dataclass(frozen=True)
class CacheSpec:
  """How a cached teacher is encoded (docs/cached_teacher.md)."""

  encoding: str = field(
      "topk",
      "top-k with a tail bin, or sampled tokens (RS-KD)",
      choices=CACHE_ENCODINGS,
  )
  k: int = field(64, "top-k width of the topk encoding", at_least=1)
  num_samples: int = field(
      12,
      "draws per position of the sampled encoding",
      at_least=1,
      at_most=CACHE_MAX_SAMPLES,
  )


@dataclasses.dataclass(frozen=True)
class TeacherSpec:
  """The frozen teacher (``config.teacher``)."""

  path: str = field(
      "workdirs/gpt2_xl_sft/hf",
      "the teacher's HF directory ('': no teacher), or preset:NAME (random "
      "weights: smoke runs and sizing only)",
      identity=True,
  )
  hub_id: str = field(
      "gpt2-xl", "the hub id it was fine-tuned from (download hints)"
  )
  dtype: str = field(
      "bfloat16", "compute and storage dtype", identity=True, choices=DTYPES
  )
  source: str = field(
      "live",
      "live: run it each step; cache: read its distributions from cache_dir",
      identity=True,
      choices=("live", "cache"),
  )
  cache_dir: str = field(
      "",
      "a cache built by python -m kdjax.cache_teacher",
      resolve=_path,
  )
  cache: CacheSpec = group(CacheSpec, "the cached teacher's encoding")
  model_overrides: Mapping[str, Any] = field(
      {},
      "model config fields replaced (both path kinds, every teacher)",
      identity=True,
  )
  tokenizer: str = field(
      "",
      "the teacher's own tokenizer (an HF directory or 'byte') for a "
      "cross-tokenizer loss (uld, gold); '': the student's",
      identity=True,
  )
  max_length: int = field(
      0,
      "tokens per teacher row with its own tokenizer",
      identity=True,
      at_least=0,
      special={0: "data.max_length"},
  )
  others: str = field(
      "",
      "more live teachers beside path, comma-separated HF directories or "
      "preset:NAME over the student's vocabulary, mixed per token "
      "('': path alone)",
      identity=True,
  )
  weights: str = field(
      "",
      "prior weight of each teacher, path first, comma-separated ('': "
      "equal)",
      identity=True,
      resolve=_positive_numbers_text,
  )
  combine: str = field(
      "fixed",
      "per-token teacher weights: fixed (the prior weights) or confidence "
      "(prior x each teacher's probability of the label)",
      identity=True,
      choices=_combine_rules,
  )

  @property
  def paths(self) -> tuple[str, ...]:
    """Every teacher: ``path``, then each of ``others``."""
    return (self.path, *names(self.others))

  @property
  def prior(self) -> tuple[float, ...]:
    """The teachers' prior weights, ``weights`` or equal ones (not normalised)."""
    return positive_numbers(self.weights) or (1.0,) * len(self.paths)

  @property
  def cached(self) -> bool:
    return self.source == "cache"

  @property
  def cross_tokenizer(self) -> bool:
    """Whether the teacher reads its own tokens (``tokenizer`` is set)."""
    return bool(self.tokenizer)

  def row_length(self, data: DataSpec) -> int:
    """Tokens per teacher row: ``max_length``, else ``data.max_length``."""
    return self.max_length or data.max_length


@dataclasses.dataclass(frozen=True)
class LoraSpec:
  """Low-rank adapters on the student (docs/training.md, "LoRA students").

  With ``rank > 0`` only the adapters train: ``h = W x + (alpha / rank) B A x``
  on the layers ``targets`` selects, the base ``W`` frozen.
  """

  rank: int = field(
      0, "adapter rank", identity=True, at_least=0, special={0: "off"}
  )
  alpha: float = field(
      16.0,
      "scale numerator: the update is (alpha / rank) B A",
      identity=True,
      above=0,
  )
  targets: str = field(
      LORA_TARGETS,
      "module names (q_proj,v_proj) or a regex on module paths",
      identity=True,
      resolve=lora_regex,
  )
  dropout: float = field(
      0.0,
      "dropout on the adapters' input",
      identity=True,
      at_least=0,
      below=1,
  )
  export_adapter: bool = field(
      True, "also export the adapters alone in peft's layout"
  )


@dataclasses.dataclass(frozen=True)
class StudentSpec:
  """The student (``config.student``); ``seed`` is the run's.

  ``model_overrides`` replace model config fields, ``remat`` included.
  """

  init: str = field(
      "gpt2",
      "an HF directory or hub id to fine-tune, or preset:NAME",
      identity=True,
  )
  revision: str = field(
      "",
      "a hub id init's commit hash, tag or branch ('': the default branch)",
      identity=True,
  )
  dtype: str = field("float32", "compute dtype", identity=True, choices=DTYPES)
  remat: str = field(
      "none", "rematerialisation (memory for compute)", choices=REMATS
  )
  model_overrides: Mapping[str, Any] = field(
      {}, "model config fields replaced (both init kinds)", identity=True
  )
  lora: LoraSpec = group(
      LoraSpec, "LoRA adapters (rank 0: every weight trains)"
  )
  seed: int = 0


@dataclasses.dataclass(frozen=True)
class SelectSpec:
  """Entropy-based token selection (docs/divergences.md)."""

  fraction: float = field(
      1.0,
      "share of each sequence's positions distilled (1: every token)",
      above=0,
      at_most=1,
  )
  by: str = field(
      "student_entropy", "how positions are ranked", choices=_select_by
  )


@dataclasses.dataclass(frozen=True)
class FeatureSpec:
  """Hidden-state transfer through a learned projection (docs/beyond_logits.md)."""

  weight: float = field(0.0, "weight of the feature term (0: off)", at_least=0)
  kind: str = field(
      "mse",
      "per-position distance of projected student and teacher states",
      choices=FEATURE_KINDS,
  )
  layer_map: str = field(
      "uniform", "which student layer learns which", choices=LAYER_MAPS
  )
  last_k: int = field(1, "layers paired by layer_map=last", at_least=1)
  pairs: str = field(
      "",
      "student:teacher layers of layer_map=pairs (0: embeddings), e.g. 1:2,2:4",
      resolve=layer_pairs,
  )


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
  """Attention transfer, MiniLM or MiniLMv2 (docs/beyond_logits.md)."""

  weight: float = field(
      0.0, "weight of the attention term (0: off)", at_least=0
  )
  kind: str = field(
      "minilmv2",
      "minilm: attention maps and value relations (equal head counts); "
      "minilmv2: q-q, k-k, v-v relations",
      choices=ATTENTION_KINDS,
  )
  relation_heads: int = field(
      8, "minilmv2: relation heads (divides both models' widths)", at_least=1
  )
  layer_map: str = field(
      "last", "which student block learns which", choices=LAYER_MAPS
  )
  last_k: int = field(1, "blocks paired by layer_map=last", at_least=1)
  pairs: str = field(
      "",
      "student:teacher blocks of layer_map=pairs, e.g. 2:4",
      resolve=layer_pairs,
  )


@dataclasses.dataclass(frozen=True)
class LossSpec:
  """``(1 - kd_ratio)·CE + kd_ratio·KD`` plus the weighted feature and
  attention terms (``config.loss``, a plain dict)."""

  name: str = field(
      "akl", "the divergence, or an objective (taid)", choices=_loss_names
  )
  kd_ratio: float = field(
      0.5, "the KD share (0: SFT, no teacher)", at_least=0, at_most=1
  )
  impl: str = field(
      "auto",
      "auto: analytic gradients; fused: from hidden states; reference",
      choices=_loss_impls,
  )
  chunk_size: int = field(1024, "tokens per chunk of the fused path", above=0)
  temperature: float = field(
      1.0, "divides both models' logits in the KD term", above=0
  )
  hp: Mapping[str, Any] = field(
      {}, "the divergence's hyper-parameters (checked against its signature)"
  )
  select: SelectSpec = group(SelectSpec, "entropy-based token selection")
  features: FeatureSpec = group(
      FeatureSpec, "hidden-state transfer (weight 0: off)"
  )
  attention: AttentionSpec = group(
      AttentionSpec, "attention transfer (weight 0: off)"
  )


@dataclasses.dataclass(frozen=True)
class OptimSpec:
  """Clipped AdamW on a warmup + cosine schedule (``config.optim``)."""

  lr: float = field(5e-4, "peak learning rate", above=0)
  lr_min: float = field(1e-7, "the cosine floor", at_least=0)
  warmup_steps: int = field(0, "linear warm-up steps", at_least=0)
  weight_decay: float = field(
      0.01, "AdamW weight decay, matrices only", at_least=0
  )
  clip: float = field(1.0, "global gradient-norm clip", above=0)
  b1: float = field(0.9, "AdamW beta1", at_least=0, below=1)
  b2: float = field(0.999, "AdamW beta2", at_least=0, below=1)
  eps: float = field(1e-8, "AdamW epsilon", above=0)


@dataclasses.dataclass(frozen=True)
class MeshSpec:
  """Mesh axis sizes, ``sharding.make_mesh``'s arguments."""

  data: int = field(
      -1,
      "data-parallel axis",
      above=0,
      special={-1: "every remaining device"},
  )
  fsdp: int = field(1, "FSDP axis (1: none)", above=0)


@dataclasses.dataclass(frozen=True)
class CkptSpec:
  """Checkpoint every ``every_steps`` steps, keeping the ``max_to_keep`` latest."""

  every_steps: int = field(
      1000,
      "checkpoint cadence",
      at_least=0,
      special={0: "only the final checkpoint"},
  )
  max_to_keep: int = field(2, "latest checkpoints kept", at_least=1)


@dataclasses.dataclass(frozen=True)
class EvalSpec:
  """Periodic validation (``config.eval``); ``protocol`` decodes the samples.

  The best checkpoint is the best ``best_metric`` among validations from step
  ``best_after_steps`` on.
  """

  every_steps: int = field(
      -1,
      "validation cadence in steps",
      above=0,
      special={-1: "every epoch", 0: "never"},
  )
  val_batches: int = field(
      0,
      "validation-loss batches",
      at_least=0,
      special={0: "the whole validation split"},
  )
  num_examples: int = field(
      1000,
      "prompts sampled for ROUGE-L and validity",
      at_least=0,
      special={0: "no sampled scores"},
  )
  batch_size: int = field(32, "generation batch", above=0)
  max_new_tokens: int = field(256, "generated tokens per prompt", above=0)
  greedy: bool = field(False, "greedy decoding instead of sampling")
  datasets: tuple[str, ...] = field(
      "dolly,sinst,vicuna,sni,unni",
      "the evaluation command's datasets, comma-separated",
      resolve=names,
  )
  seeds: tuple[int, ...] = field(
      "10,20,30,40,50", "sampling seeds, comma-separated", resolve=integers
  )
  best_metric: str = field(
      "val_ce",
      "what the best checkpoint minimises or maximises",
      choices=BEST_METRICS,
  )
  best_after_steps: int = field(
      -1,
      "first step a best checkpoint may come from",
      at_least=0,
      special={-1: "automatic"},
  )
  protocol: Protocol = Protocol()


@dataclasses.dataclass(frozen=True)
class OnPolicySpec:
  """The sequence source (``config.onpolicy``; docs/on_policy.md).

  Every generating kind reads the sampling fields; the others belong to one
  kind, named by their prefix or comment.
  """

  source: str = field(
      "dataset",
      "where each step's batch comes from",
      choices=ONPOLICY_KINDS,
  )
  lmbda: float = field(
      0.0,
      "gkd, skd: probability of a generated batch",
      at_least=0,
      at_most=1,
  )
  seq_kd: bool = field(False, "gkd: the teacher's responses first")
  temperature: float = field(1.0, "sampling temperature", above=0)
  top_k: int = field(0, "sampling top-k (0: off)", at_least=0)
  top_p: float = field(1.0, "sampling top-p (1: off)", above=0, at_most=1)
  max_new_tokens: int = field(
      0,
      "generated tokens",
      at_least=0,
      special={0: "data.max_length - data.max_prompt_length"},
  )
  buffer_size: int = field(1000, "distillm: replay-buffer rows", above=0)
  init_threshold: float = field(
      0.0, "distillm: the schedule's starting threshold", at_least=0
  )
  loss_eps: float = field(
      0.1, "distillm: validation-loss rise that counts", at_least=0
  )
  replay_ratio: str = field(
      "decreasing",
      "distillm: how the replayed share moves over the run",
      choices=REPLAY_RATIOS,
  )
  skd_top_k: int = field(
      25, "skd: the teacher's top-k that vets a token", at_least=1
  )
  skd_resample: str = field(
      "top_k", "skd: what a rejected token is drawn from", choices=SKD_RESAMPLE
  )
  minillm_alpha: float = field(
      0.2, "minillm: the teacher's share of the mix", at_least=0, at_most=1
  )
  minillm_gamma: float = field(
      0.95, "minillm: reward discount", at_least=0, at_most=1
  )
  minillm_cliprange: float = field(0.2, "minillm: PPO clip range", above=0)
  minillm_reward_scaling: float = field(0.5, "minillm: reward divisor", above=0)
  minillm_reward_clip: float = field(100.0, "minillm: reward clip", above=0)
  minillm_lm_coef: float = field(
      1.0,
      "minillm: weight of the dataset term",
      at_least=0,
      special={0: "no dataset term"},
  )
  minillm_single_step: bool = field(
      True, "minillm: add the exact single-step term"
  )
  minillm_ppo_epochs: int = field(1, "minillm: updates per rollout", at_least=1)

  @property
  def needs_teacher(self) -> bool:
    """Whether the source decodes with the teacher (SKD, MiniLLM, seq_kd)."""
    return self.source in ("skd", "minillm") or (
        self.source == "gkd" and self.seq_kd
    )


@dataclasses.dataclass(frozen=True)
class TrainSpec:
  """One training run, resolved from its config (the schema's root).

  ``loss`` is the plain mapping :mod:`kdjax.objective` reads
  (``loss["name"]``, ``loss["hp"]`` a dict, ...); ``identity`` is the whole
  config as JSON, what a workdir is bound to.
  """

  seed: int = field(10, "the run's seed", identity=True, at_least=0)
  force_new_run: bool = field(
      False, "start over in a workdir that holds another run"
  )
  data: DataSpec = group(DataSpec, "the dataset and its rows")
  teacher: TeacherSpec = group(TeacherSpec, "the frozen teacher")
  student: StudentSpec = group(StudentSpec, "the student")
  loss: Mapping[str, Any] = group(
      LossSpec, "the objective", identity=True, as_dict=True
  )
  optim: OptimSpec = group(OptimSpec, "the optimizer", identity=True)
  batch_size: int = field(
      32, "global batch in sequences", identity=True, above=0
  )
  grad_accum: int = field(1, "micro-batches per step", at_least=1)
  num_epochs: int = field(20, "training epochs", at_least=1)
  num_steps: int = field(
      0, "training steps", at_least=0, special={0: "use num_epochs"}
  )
  mesh: MeshSpec = group(MeshSpec, "the device mesh")
  log_every: int = field(50, "steps per logged line", at_least=1)
  on_nonfinite: str = field(
      "stop",
      "a step whose loss or gradient is not finite: stop the run, or skip "
      "its update",
      choices=("stop", "skip"),
  )
  max_skips: int = field(
      10, "consecutive skipped updates that stop a 'skip' run", at_least=1
  )
  ckpt: CkptSpec = group(CkptSpec, "checkpoints")
  eval: EvalSpec = group(EvalSpec, "validation and the evaluation command")
  export_hf: bool = field(True, "write the student in HF format at the end")
  onpolicy: OnPolicySpec = group(
      OnPolicySpec, "the on-policy sequence source", optional=True
  )
  identity: Mapping[str, Any] = dataclasses.field(default_factory=dict)


FIELDS: dict[str, schema.Field | schema.Group] = schema.table(TrainSpec)


def defaults() -> ml_collections.ConfigDict:
  """Every field's default, optional groups (``onpolicy``) left out."""
  return schema.defaults(TrainSpec)


# ----------------------------------------------------------------------------
# Resolution.


def protocol_from_config(config: ml_collections.ConfigDict) -> Protocol:
  """The paper protocol with the config's lengths, seeds and (when present)
  ``data.template`` / ``system_prompt`` and ``eval.greedy`` /
  ``temperature`` / ``top_k`` / ``top_p`` / ``no_repeat_ngram_size``."""
  fields = dict(
      max_new_tokens=config.eval.max_new_tokens,
      max_prompt_length=config.data.max_prompt_length,
      seeds=schema.build(EvalSpec, config.eval, "eval.").seeds,
  )
  for key in ("template", "system_prompt"):
    if key in config.data:
      fields[key] = config.data[key]
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
  return schema.build(DataSpec, data, "data.")


def onpolicy_from_config(config: ml_collections.ConfigDict) -> OnPolicySpec:
  """``config.onpolicy`` resolved; configs without the block are off-policy."""
  if "onpolicy" not in config:
    return OnPolicySpec()
  return schema.build(OnPolicySpec, config.onpolicy, "onpolicy.")


def from_config(config: ml_collections.ConfigDict) -> TrainSpec:
  """Resolves a training config (``configs/*.py:get_config``)."""
  c = config
  student = schema.build(
      StudentSpec,
      c.student,
      "student.",
      seed=c.seed,
      model_overrides=dict(c.student.model_overrides, remat=c.student.remat),
  )
  evaluation = schema.build(
      EvalSpec, c.eval, "eval.", protocol=protocol_from_config(c)
  )
  return schema.build(
      TrainSpec,
      c,
      student=student,
      eval=evaluation,
      onpolicy=onpolicy_from_config(c),
      identity=json.loads(c.to_json_best_effort()),
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
  tokenizer_revision: str
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
      tokenizer_revision=config.data.get("tokenizer_revision", ""),
      batch_size=config.eval.batch_size,
      dtype=config.student.dtype,
      seed=config.seed,
      mesh=config.mesh.to_dict() if "mesh" in config else {},
  )
