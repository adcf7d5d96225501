"""The objective's feature and attention terms (docs/beyond_logits.md).

``loss.features`` (hidden states through a learned projection) and
``loss.attention`` (MiniLM / MiniLMv2) add ``w_feat · feature + w_attn ·
attention`` to ``(1 − kd_ratio)·CE + kd_ratio·KD``. Each term is a masked
token mean over the response tokens (``loss_mask``), taken as a global sum
like CE's and divided by the same token count; a term covers every pair of
its layer map and averages them.

* :func:`plan`: the layer pairs and the taps each model's forward returns
  (a run's static structure, from the loss config and the two models);
* :func:`init_projection`: the projections ``[D_s, D_t]``, one per feature
  pair, part of the student's training state (trained, checkpointed, not
  exported);
* :func:`local_sums`: one shard's sums of both terms;
* :func:`weights`: the terms' weights as arrays (traced: changing one does
  not recompile).

A term with weight 0 is off, and with both off nothing here runs: the step
is the program it was without them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp

from kdjax.config import spec
from kdjax.divergences import features as F

if TYPE_CHECKING:
  from kdjax.models import layers

Array = jax.Array
TERMS = ("feature", "attention")
_GROUPS = {"feature": "features", "attention": "attention"}


class Plan(NamedTuple):
  """Which layers each term pairs, and what each model's forward returns."""

  feature_pairs: tuple[tuple[int, int], ...]
  attention_pairs: tuple[tuple[int, int], ...]
  student_taps: layers.Taps
  teacher_taps: layers.Taps


def _group(loss_cfg: Mapping[str, Any], term: str) -> Mapping[str, Any]:
  return loss_cfg.get(_GROUPS[term]) or {}


def weight(loss_cfg: Mapping[str, Any], term: str) -> float:
  """``loss.features.weight`` / ``loss.attention.weight`` (0 when absent)."""
  return float(_group(loss_cfg, term).get("weight", 0.0))


def active(loss_cfg: Mapping[str, Any]) -> tuple[str, ...]:
  """The terms whose weight is positive."""
  return tuple(t for t in TERMS if weight(loss_cfg, t) > 0)


def weights(loss_cfg: Mapping[str, Any]) -> dict[str, Array] | None:
  """The active terms' weights as float32 arrays, or None when none is."""
  on = active(loss_cfg)
  if not on:
    return None
  return {t: jnp.asarray(weight(loss_cfg, t), jnp.float32) for t in on}


def _pairs(group: Mapping[str, Any], n_s: int, n_t: int, first: int):
  pairs = group.get("pairs", "")
  if isinstance(pairs, str):
    pairs = spec.layer_pairs(pairs)
  return F.layer_pairs(
      group.get("layer_map", "uniform"),
      n_s,
      n_t,
      last_k=group.get("last_k", 1),
      pairs=pairs,
      first=first,
  )


def heads(model: Any) -> tuple[int, int, int]:
  """``(H, G, K)``: query heads, key/value heads and head width."""
  G, K = model.kv_shape()
  c = model.config
  return getattr(c, "num_attention_heads", None) or c.n_head, G, K


def width(model: Any) -> int:
  """The residual-stream width ``D`` (the LM head's input)."""
  return model.head_weight().shape[-1]


def plan(loss_cfg: Mapping[str, Any], student, teacher) -> Plan:
  """The layer pairs of the active terms, checked against both models.

  Raises one sentence when a pair names a layer a model lacks, when MiniLM
  is asked of models whose head counts differ, or when the relation heads
  do not divide a model's attention widths.
  """
  # Imported here: the config system reads this layer's names (through
  # kdjax.objective) without loading the models.
  from kdjax.models import layers  # pylint: disable=g-import-not-at-top,redefined-outer-name

  n_s, n_t = len(student.blocks), len(teacher.blocks)
  on = active(loss_cfg)
  feat = attn = ()
  if "feature" in on:
    feat = _pairs(_group(loss_cfg, "feature"), n_s, n_t, first=0)
  if "attention" in on:
    group = _group(loss_cfg, "attention")
    attn = _pairs(group, n_s, n_t, first=1)
    _check_heads(group, heads(student), heads(teacher))
  return Plan(
      feat,
      attn,
      layers.Taps(
          tuple(sorted({s for s, _ in feat})),
          tuple(sorted({s for s, _ in attn})),
      ),
      layers.Taps(
          tuple(sorted({t for _, t in feat})),
          tuple(sorted({t for _, t in attn})),
      ),
  )


def _check_heads(group, student: tuple, teacher: tuple) -> None:
  if group.get("kind", "minilmv2") == "minilm":
    if student[:2] != teacher[:2]:
      raise ValueError(
          "loss.attention.kind='minilm' pairs heads one to one, but the "
          f"student has {student[0]} query / {student[1]} key-value heads "
          f"and the teacher {teacher[0]} / {teacher[1]}; use "
          "--config.loss.attention.kind=minilmv2."
      )
    return
  r = group.get("relation_heads", 8)
  for who, (H, G, K) in (("student", student), ("teacher", teacher)):
    if (H * K) % r or (G * K) % r:
      raise ValueError(
          f"loss.attention.relation_heads={r} must divide the {who}'s query "
          f"width {H * K} and key/value width {G * K}; pick a common divisor."
      )


def init_projection(
    loss_cfg: Mapping[str, Any], plan_: Plan, student, teacher, key: Array
) -> dict[str, Array] | None:
  """One projection ``W [D_s, D_t]`` per feature pair (LeCun normal), keyed
  ``"<student layer>_<teacher layer>"``; None without the feature term."""
  if not plan_.feature_pairs:
    return None
  shape = (width(student), width(teacher))
  init = jax.nn.initializers.lecun_normal()
  keys = jax.random.split(key, len(plan_.feature_pairs))
  return {
      f"{s}_{t}": init(k, shape, jnp.float32)
      for (s, t), k in zip(plan_.feature_pairs, keys)
  }


def _feature(loss_cfg, pairs, projection, hidden_s, hidden_t) -> Array:
  """``mean over pairs`` of the per-position feature loss, ``[B, T]``."""
  fn = {"mse": F.hidden_mse, "cosine": F.hidden_cosine}[
      _group(loss_cfg, "feature").get("kind", "mse")
  ]
  per = [fn(hidden_s[s], hidden_t[t], projection[f"{s}_{t}"]) for s, t in pairs]
  return sum(per) / len(per)


def _attention(loss_cfg, pairs, qkv_s, qkv_t, valid_BxT) -> Array:
  """``mean over pairs`` of the per-position attention loss, ``[B, T]``.

  MiniLM: attention-map KL plus the value relation per key/value head;
  MiniLMv2: the q-q, k-k and v-v relations on ``relation_heads`` heads,
  summed (the papers' sums).
  """
  group = _group(loss_cfg, "attention")
  per = []
  for s, t in pairs:
    (q_s, k_s, v_s), (q_t, k_t, v_t) = qkv_s[s], qkv_t[t]
    if group.get("kind", "minilmv2") == "minilm":
      G = v_s.shape[2]
      per.append(
          F.attention_kl(q_s, k_s, q_t, k_t, valid_BxT)
          + F.relation_kl(v_s, v_t, valid_BxT, G)
      )
    else:
      r = group.get("relation_heads", 8)
      per.append(
          sum(
              F.relation_kl(a, b, valid_BxT, r)
              for a, b in ((q_s, q_t), (k_s, k_t), (v_s, v_t))
          )
      )
  return sum(per) / len(per)


def local_sums(
    loss_cfg: Mapping[str, Any],
    plan_: Plan,
    projection: dict[str, Array] | None,
    inter_s: layers.Intermediates,
    inter_t: layers.Intermediates,
    valid_BxT: Array,
    mask_BxT: Array,
) -> dict[str, Array]:
  """This shard's masked token sums of the active terms, by term name.

  ``valid_BxT`` (the attention mask) fences the keys of every relation row;
  ``mask_BxT`` (the loss mask) picks the rows (tokens) that count.
  """
  out = {}
  if plan_.feature_pairs:
    f = _feature(
        loss_cfg,
        plan_.feature_pairs,
        projection,
        inter_s.hidden,
        inter_t.hidden,
    )
    out["feature"] = jnp.sum(jnp.where(mask_BxT > 0, f, 0.0))
  if plan_.attention_pairs:
    a = _attention(
        loss_cfg, plan_.attention_pairs, inter_s.qkv, inter_t.qkv, valid_BxT
    )
    out["attention"] = jnp.sum(jnp.where(mask_BxT > 0, a, 0.0))
  return out
