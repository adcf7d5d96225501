"""The training objective: ``(1 - kd_ratio) · CE + kd_ratio · KD`` as token sums.

The step needs the loss as a *global* masked token mean over a batch that is
split across devices and, with gradient accumulation, across micro-batches.
So everything here returns sums over this shard's masked tokens; the caller
divides by the global token count once. Sums are computed under
``jax.shard_map`` on the batch axes: each device reduces its own rows (the
divergence sees whole local sequences, which SinKD's per-sequence transport
problems need) and one ``psum`` produces the global sum.

Three ways to get the KD term, chosen by ``loss.impl``:

* ``auto`` (default): from ``[B, T, V]`` logits with the public divergence
  ``kd.<name>`` (analytic gradients, chunked over tokens on CPU, one piece
  elsewhere);
* ``fused``: from final hidden states and LM-head weights, never forming the
  logits (:func:`kdjax.divergences.fused.ce_kd_sums`; CE and KD share each
  ``loss.chunk_size``-token logits chunk, soft-capped where the model caps
  its logits). It trades a few percent of speed
  for memory: no ``[B, T, V]`` logits, their gradient or the model's
  ``[B, T, V]`` head output are kept;
* ``reference``: the autodiff definitions ``kd.reference.<name>`` (the oracle
  of the tests; slow, several ``[B, T, V]`` residuals).

``loss.temperature`` (default 1) divides both models' logits in the KD term;
CE always uses the raw logits.

A batch that carries a cached sparse teacher (``teacher_ids`` and
``teacher_log_probs``, plus ``teacher_weights`` for sampled tokens:
:mod:`kdjax.cache`) takes the KD term from
:func:`kdjax.divergences.sparse.divergence` on the student's logits instead;
the cache already holds ``softmax(t / T)``, so the temperature divides the
student's logits only.

``loss.features`` and ``loss.attention`` add hidden-state and attention
transfer terms from the same forward passes (:mod:`kdjax.transfer`).

Several live teachers (``teacher.others``) are mixed per token into one
teacher distribution before the KD term (:func:`teacher_logits`), so every
divergence, ``loss.select`` and TAID see one teacher.

Two options change what the KD term sees: ``loss.select`` distils only each
sequence's highest-student-entropy positions (:func:`kd_mask`), and
``loss.name="taid"`` distils toward TAID's interpolated target
(:mod:`kdjax.taid`).
"""

from __future__ import annotations

import fractions
import functools
import math
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp

from kdjax import divergences as kd
from kdjax import sharding, taid, transfer
from kdjax.divergences import fused

Array = jax.Array
P = jax.sharding.PartitionSpec

IMPLS = ("auto", "fused", "reference")
# The losses that distil from a teacher with its own tokenizer
# (teacher.tokenizer; docs/cross_tokenizer.md): the rest compare the same
# vocabulary entries.
CROSS_TOKENIZER = ("uld", "gold")
# The batch fields of such a teacher: its rows and the alignment
# (kdjax.data.crosstok).
TEACHER_ROW_KEYS = (
    "teacher_input_ids",
    "teacher_positions",
    "teacher_attention_mask",
)
ALIGNMENT_KEYS = ("teacher_row", "aligned_mask")
SELECT_BY = ("student_entropy",)
# Objectives beyond the divergences: TAID runs FKL toward its moving target.
_OBJECTIVES = {"taid": "fkl"}
NAMES = kd.names() + tuple(_OBJECTIVES)


def divergence_of(name: str) -> str:
  """The divergence that ``loss.name`` evaluates (``"taid"`` -> ``"fkl"``)."""
  return _OBJECTIVES.get(name, name)


class Sums(NamedTuple):
  """Masked token sums of one (micro-)batch, already summed over devices.

  ``kd`` sums over the ``kd_tokens`` positions the KD term covers: all
  ``tokens`` unless ``loss.select`` keeps a fraction of them. ``feature``
  and ``attention`` (:mod:`kdjax.transfer`) sum over ``tokens``, None when
  the term is off.
  """

  ce: Array
  kd: Array
  tokens: Array
  kd_tokens: Array
  feature: Array | None = None
  attention: Array | None = None


def zero_sums(loss_cfg, zero: Any = 0.0) -> Sums:
  """:class:`Sums` of ``zero``, with the fields of the active transfer terms."""
  extra = {t: zero for t in transfer.active(loss_cfg)}
  return Sums(zero, zero, zero, zero, **extra)


def check(loss_cfg: Mapping[str, Any]) -> None:
  """Fails early, with the fix, on a loss config that cannot run."""
  name, impl = loss_cfg["name"], loss_cfg["impl"]
  if impl not in IMPLS:
    raise ValueError(f"loss.impl={impl!r} is unknown; use one of {IMPLS}.")
  if name not in NAMES:
    raise ValueError(
        f"loss.name={name!r} is unknown; use one of " f"{', '.join(NAMES)}."
    )
  _check_select(loss_cfg)
  if impl == "fused" and transfer.active(loss_cfg):
    raise ValueError(
        "loss.features / loss.attention read the models' intermediates, "
        "which the fused path does not combine with its chunked head; use "
        "--config.loss.impl=auto."
    )
  if transfer.active(loss_cfg) and loss_cfg["kd_ratio"] == 0:
    raise ValueError(
        "loss.features / loss.attention compare the student with the "
        "teacher, which loss.kd_ratio=0 never loads; set loss.kd_ratio > 0."
    )
  if name == "taid":
    if "taid" not in loss_cfg:
      raise ValueError(
          "loss.name='taid' needs the loss.taid schedule; start "
          "from configs/taid_gpt2.py."
      )
    taid.check(loss_cfg["taid"])
    if impl == "fused":
      raise ValueError(
          "loss.name='taid' interpolates logits, which "
          "loss.impl='fused' never forms; use "
          "--config.loss.impl=auto."
      )
  name = divergence_of(name)
  if not 0.0 <= loss_cfg["kd_ratio"] <= 1.0:
    raise ValueError(f"loss.kd_ratio={loss_cfg['kd_ratio']} must be in [0, 1].")
  if (
      impl == "fused"
      and loss_cfg["kd_ratio"] > 0
      and (name not in kd.TOKEN_LEVEL)
  ):
    raise ValueError(
        f"loss.impl='fused' has no {name!r} version; set "
        "--config.loss.impl=auto."
    )
  if "temperature" in loss_cfg["hp"]:
    raise ValueError(
        "set the KD temperature as --config.loss.temperature, "
        "not loss.hp.temperature."
    )
  temperature = loss_cfg.get("temperature", 1.0)
  if not temperature > 0:
    raise ValueError(f"loss.temperature={temperature} must be > 0.")


def _check_select(loss_cfg) -> None:
  fraction, by = _select(loss_cfg)
  if not 0.0 < fraction <= 1.0:
    raise ValueError(
        f"loss.select.fraction={fraction} must be in (0, 1] "
        "(1 distils every token)."
    )
  if by not in SELECT_BY:
    raise ValueError(
        f"loss.select.by={by!r} is unknown; use one of " f"{SELECT_BY}."
    )
  if fraction < 1.0 and loss_cfg["impl"] == "fused":
    raise ValueError(
        "loss.select ranks positions by the student's logits, "
        "which loss.impl='fused' never forms; use "
        "--config.loss.impl=auto."
    )


def _select(loss_cfg) -> tuple[float, str]:
  """``(fraction, by)`` of ``loss.select`` (1.0: every token is distilled)."""
  sel = dict(loss_cfg.get("select") or {})
  return float(sel.get("fraction", 1.0)), sel.get("by", "student_entropy")


def _temperature(loss_cfg):
  """The KD temperature, ``loss.temperature`` (1 when absent)."""
  return loss_cfg.get("temperature", 1.0)


def _ceil(fraction: float, n: int) -> int:
  """``ceil(fraction · n)`` exactly, for the fraction as written (decimal)."""
  return math.ceil(fractions.Fraction(repr(float(fraction))) * n)


def _kept_per_row(fraction: float, mask_BxT: Array) -> Array:
  """``ceil(fraction · n_b)`` for each row's ``n_b`` masked positions, int32.

  Looked up in a table computed exactly on the host from the fraction as
  written: ``0.07`` of 100 is 7, where the float product ``0.07 * 100``
  (7.000000000000001) would round up to 8.
  """
  t = mask_BxT.shape[-1]
  table = jnp.asarray([_ceil(fraction, n) for n in range(t + 1)], jnp.int32)
  n_B = jnp.sum(mask_BxT > 0, axis=-1)
  return table[n_B]


def _ranked(loss_cfg, student_logits_BxTxV: Array, mask_BxT: Array):
  """Each row's positions by decreasing student entropy, and how many to keep.

  ``(order_BxT, k_B)``: masked positions come first (highest entropy first,
  ties in position order, by a stable sort), then the unmasked ones.
  """
  fraction, _ = _select(loss_cfg)
  log_q = kd.log_probs(
      jax.lax.stop_gradient(student_logits_BxTxV), _temperature(loss_cfg)
  )
  h_BxT = -jnp.sum(jnp.exp(log_q) * log_q, axis=-1)
  score_BxT = jnp.where(mask_BxT > 0, h_BxT, -jnp.inf)
  order_BxT = jnp.argsort(-score_BxT, axis=-1, stable=True)
  return order_BxT, _kept_per_row(fraction, mask_BxT)


def kd_mask(loss_cfg, student_logits_BxTxV: Array, mask_BxT: Array) -> Array:
  """The positions the KD term covers, ``mask_BxT`` or its top-entropy part.

  Entropy-based token selection (SE-KD; docs/divergences.md, "Entropy-based
  token selection"): in each sequence ``b`` with ``n_b`` masked positions,
  keep the ``k_b = ceil(fraction · n_b)`` positions of highest student
  entropy ``H(q) = −Σ_v q_v log q_v``, ``q = softmax(s / T)`` at the KD
  temperature, under ``stop_gradient`` (a ranking, never a loss term). Ties
  keep the earlier position. Per sequence, not per batch: it is the paper's
  rule, needs no collective across devices, and makes ``Σ_b k_b`` a function
  of the mask alone (:func:`kd_tokens`), so the KD normaliser is known before
  the forward pass. Returns float32 0/1 ``[B, T]``; with ``fraction = 1`` it is
  ``mask_BxT`` itself.
  """
  if _select(loss_cfg)[0] >= 1.0:
    return mask_BxT
  order_BxT, k_B = _ranked(loss_cfg, student_logits_BxTxV, mask_BxT)
  rank_BxT = jnp.argsort(order_BxT, axis=-1)  # the inverse permutation
  keep_BxT = (rank_BxT < k_B[:, None]) & (mask_BxT > 0)
  return keep_BxT.astype(jnp.float32)


def kd_rows(
    loss_cfg, student_logits_BxTxV: Array, mask_BxT: Array
) -> tuple[Array, Array]:
  """:func:`kd_mask`'s positions as indices, so the KD runs on those rows only.

  ``(index_BxK, keep_BxK)`` with ``K = ceil(fraction · T)``, the most any row
  keeps: row ``b``'s first ``k_b`` slots hold its kept positions (``keep``
  1), the rest are padding (``keep`` 0).
  """
  fraction, _ = _select(loss_cfg)
  order_BxT, k_B = _ranked(loss_cfg, student_logits_BxTxV, mask_BxT)
  width = _ceil(fraction, mask_BxT.shape[-1])
  keep_BxK = jnp.arange(width)[None, :] < k_B[:, None]
  return order_BxT[:, :width], keep_BxK.astype(jnp.float32)


def kd_base_mask(batch: Mapping[str, Array]) -> Array:
  """The positions the KD term may cover: the response mask, and of a batch
  with a cross-tokenizer teacher only the rows paired with a teacher row."""
  mask = batch["loss_mask"]
  if "aligned_mask" in batch:
    mask = mask * batch["aligned_mask"]
  return mask


def kd_tokens(loss_cfg, mask_BxT: Array) -> Array:
  """How many positions :func:`kd_mask` keeps in ``mask_BxT`` (float32)."""
  fraction, _ = _select(loss_cfg)
  if fraction >= 1.0:
    return jnp.sum(mask_BxT)
  return jnp.sum(_kept_per_row(fraction, mask_BxT)).astype(jnp.float32)


def _token_ce(logits_BxTxV: Array, labels_BxT: Array) -> Array:
  """Next-token negative log-likelihood per position, float32."""
  log_q = jax.nn.log_softmax(logits_BxTxV.astype(jnp.float32), axis=-1)
  return -jnp.take_along_axis(log_q, labels_BxT[..., None], axis=-1)[..., 0]


def _kd_hp(loss_cfg) -> dict[str, Any]:
  """The divergence's keyword arguments: ``loss.hp`` and the temperature."""
  return dict(loss_cfg["hp"], temperature=_temperature(loss_cfg))


def _per_token_kd(
    loss_cfg, s_BxTxV: Array, t_BxTxV: Array, mask_BxT: Array
) -> Array:
  """The KD divergence per position ``[B, T]`` from both models' logits."""
  name, hp = loss_cfg["name"], _kd_hp(loss_cfg)
  if name == "sinkhorn":  # needs the mask to wall off padding rows
    return kd.sinkhorn(s_BxTxV, t_BxTxV, mask_BxT, **hp)
  return kd.get(name, loss_cfg["impl"])(s_BxTxV, t_BxTxV, **hp)


def _local_sums(loss_cfg, use_kd, s, t, labels, mask) -> Sums:
  """This device's sums from logits (``t`` is None when ``use_kd`` is False)."""
  ce = jnp.sum(_token_ce(s, labels) * mask)
  if not use_kd:
    return Sums(ce, jnp.zeros((), jnp.float32), jnp.sum(mask), jnp.sum(mask))
  if _select(loss_cfg)[0] < 1.0 and loss_cfg["name"] != "sinkhorn":
    # The divergence runs on the kept rows alone (SinKD's transport problems
    # need whole sequences, so it takes the masked path below).
    index_BxK, keep = kd_rows(loss_cfg, s, mask)
    rows = lambda x: jnp.take_along_axis(x, index_BxK[..., None], axis=1)
    per_token = _per_token_kd(loss_cfg, rows(s), rows(t), keep)
  else:
    keep = kd_mask(loss_cfg, s, mask)
    per_token = _per_token_kd(loss_cfg, s, t, mask)
  kd_sum = jnp.sum(jnp.where(keep > 0, per_token, 0.0))
  return Sums(ce, kd_sum, jnp.sum(mask), jnp.sum(keep))


def sparse_teacher(batch: Mapping[str, Array]):
  """The cached teacher of ``batch`` (``TopK`` / ``Sampled``), or None."""
  if "teacher_ids" not in batch:
    return None
  if "teacher_weights" in batch:
    return kd.sparse.Sampled(
        batch["teacher_ids"],
        batch["teacher_weights"],
        batch["teacher_log_probs"],
    )
  return kd.sparse.TopK(batch["teacher_ids"], batch["teacher_log_probs"])


def _local_sums_sparse(loss_cfg, s, labels, mask, *teacher) -> Sums:
  """This device's sums with the KD term on a cached sparse teacher."""
  ce = jnp.sum(_token_ce(s, labels) * mask)
  t = (kd.sparse.TopK if len(teacher) == 2 else kd.sparse.Sampled)(*teacher)
  keep = kd_mask(loss_cfg, s, mask)
  per_token = kd.sparse.divergence(
      divergence_of(loss_cfg["name"]), s, t, **_kd_hp(loss_cfg)
  )
  kd_sum = jnp.sum(jnp.where(keep > 0, per_token, 0.0))
  return Sums(ce, kd_sum, jnp.sum(mask), jnp.sum(keep))


def _local_sums_aligned(loss_cfg, matched, s, t, labels, mask, kd_mask) -> Sums:
  """This device's sums with a cross-tokenizer teacher: ``t`` holds the
  teacher row paired with each student row, ``kd_mask`` the paired response
  rows (:func:`kd_base_mask`); ``matched`` GOLD's vocabulary pairs."""
  ce = jnp.sum(_token_ce(s, labels) * mask)
  hp = _kd_hp(loss_cfg)
  if loss_cfg["name"] == "gold":
    per_token = kd.gold(s, t, *matched, **hp)
  else:
    per_token = kd.get(loss_cfg["name"])(s, t, **hp)
  kd_sum = jnp.sum(jnp.where(kd_mask > 0, per_token, 0.0))
  return Sums(ce, kd_sum, jnp.sum(mask), jnp.sum(kd_mask))


def _aligned_teacher_logits(teacher, batch: Mapping[str, Array]) -> Array:
  """The teacher on its own tokens, its row paired with each student row
  gathered: ``[B, T_student, V_teacher]``, under ``stop_gradient``."""
  t_BxKxV = teacher(*(batch[k] for k in TEACHER_ROW_KEYS))
  index_BxT = batch["teacher_row"]
  t_BxTxV = jnp.take_along_axis(t_BxKxV, index_BxT[..., None], axis=1)
  return jax.lax.stop_gradient(t_BxTxV)


def _local_sums_fused(loss_cfg, use_kd, maps, x_s, w_s, x_t, w_t, labels, mask):
  """This device's sums from hidden states ``[B, T, D]`` and heads ``[V, D]``
  (``maps``: the models' ``logits_map()``)."""
  mask_N, labels_N = mask.reshape(-1), labels.reshape(-1)
  x_t_NxD = x_t.reshape(-1, x_t.shape[-1]) if use_kd else None
  ce, kd_sum = fused.ce_kd_sums(
      loss_cfg["name"] if use_kd else None,
      x_s.reshape(-1, x_s.shape[-1]),
      w_s,
      x_t_NxD,
      w_t if use_kd else None,
      labels_N,
      mask_N,
      kd_ratio=loss_cfg["kd_ratio"] if use_kd else 0.0,
      chunk_size=loss_cfg["chunk_size"],
      logits_map_s=maps[0],
      logits_map_t=maps[1],
      **_kd_hp(loss_cfg),
  )
  tokens = jnp.sum(mask_N)
  return Sums(ce, kd_sum, tokens, tokens)


def _psum(local: Callable, n_batch_args: int, n_replicated: int = 0):
  """``local`` under shard_map over the batch axes, outputs psum-ed."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return local
  axes = tuple(a for a in sharding.BATCH if a in mesh.axis_names)
  batch = P(axes)

  def body(*args):
    # Replicated inputs (LM heads) become device-varying, so a custom VJP
    # may return per-device partial gradients for them; the transpose of
    # this cast is the psum that adds those partials up.
    rep = jax.tree.map(
        lambda x: jax.lax.pcast(x, axes, to="varying"), args[:n_replicated]
    )
    out = local(*rep, *args[n_replicated:])
    return jax.tree.map(lambda x: jax.lax.psum(x, axes), out)

  specs = (P(),) * n_replicated + (batch,) * n_batch_args
  return jax.shard_map(body, in_specs=specs, out_specs=P())


def sums(
    loss_cfg,
    student,
    teacher,
    batch: Mapping[str, Array],
    *,
    taid_t: Array | float | None = None,
    matched: tuple[Array, Array] | None = None,
    projection: dict[str, Array] | None = None,
) -> Sums:
  """CE and KD masked token sums of ``student`` (and ``teacher``) on ``batch``.

  ``teacher`` may be None when ``kd_ratio`` is 0 or when ``batch`` carries
  a cached sparse teacher (:func:`sparse_teacher`), which then takes its
  place. The teacher's outputs are under ``stop_gradient``; the student's
  keep their gradient. ``taid_t`` is
  TAID's interpolation time (a traced scalar: a schedule never recompiles;
  default ``loss.taid.t_start``), used when ``loss.name`` is ``"taid"``.

  A batch with a cross-tokenizer teacher (:data:`TEACHER_ROW_KEYS` and
  :data:`ALIGNMENT_KEYS`, :mod:`kdjax.data.crosstok`) runs the teacher on
  its own tokens and the KD term on the paired rows (:func:`kd_base_mask`);
  ``matched`` is GOLD's pair of matched vocabulary index arrays
  (:func:`kdjax.data.crosstok.matched_vocab`).

  With ``loss.features`` / ``loss.attention`` on, the same forward passes
  also return the layers those terms read (:mod:`kdjax.transfer`), and
  ``projection`` holds the feature projections.
  """
  use_kd = teacher is not None and loss_cfg["kd_ratio"] > 0
  inputs = (batch["input_ids"], batch["positions"], batch["attention_mask"])
  labels, mask = batch["labels"], batch["loss_mask"].astype(jnp.float32)
  cached = sparse_teacher(batch)
  if cached is not None and loss_cfg["kd_ratio"] > 0:
    s = student(*inputs)
    fields = jax.tree.map(jax.lax.stop_gradient, tuple(cached))
    local = functools.partial(_local_sums_sparse, loss_cfg)
    return _psum(local, 3 + len(fields))(s, labels, mask, *fields)
  if "teacher_row" in batch and use_kd:
    s = student(*inputs)
    t = _aligned_teacher_logits(teacher, batch)
    local = functools.partial(_local_sums_aligned, loss_cfg, matched)
    return _psum(local, 5)(s, t, labels, mask, kd_base_mask(batch))
  if loss_cfg["impl"] == "fused":
    x_s, w_s = student.hidden_states(*inputs), student.head_weight()
    x_t = w_t = map_t = None
    if use_kd:
      x_t = jax.lax.stop_gradient(teacher.hidden_states(*inputs))
      w_t = jax.lax.stop_gradient(teacher.head_weight())
      map_t = teacher.logits_map()
    maps = (student.logits_map(), map_t)  # final-logit soft-caps
    local = functools.partial(_local_sums_fused, loss_cfg, use_kd, maps)
    # Heads are replicated inputs (shard_map gathers FSDP shards once).
    fn = _psum(
        lambda w_s, w_t, x_s, x_t, l, m: local(x_s, w_s, x_t, w_t, l, m), 4, 2
    )
    return fn(w_s, w_t, x_s, x_t, labels, mask)
  if use_kd and transfer.active(loss_cfg):
    return _sums_with_transfer(
        loss_cfg, student, teacher, batch, taid_t, projection
    )
  s = student(*inputs)
  t = teacher_logits(loss_cfg, teacher, batch) if use_kd else None
  return _logit_sums(loss_cfg, use_kd, s, t, labels, mask, taid_t)


def teacher_logits(loss_cfg, teacher, batch: Mapping[str, Array]) -> Array:
  """The teacher's logits on ``batch``, under ``stop_gradient``.

  Several teachers (:class:`kdjax.models.teacher.Teachers`) run one after
  another, their logits folded into the per-token mixture in turn
  (:func:`kdjax.divergences.mixture.mix`, at the KD temperature), which is
  returned as the logits ``T · log p_mix`` of one teacher.
  """
  inputs = (batch["input_ids"], batch["positions"], batch["attention_mask"])
  members = getattr(teacher, "members", None)
  if members is None:
    return jax.lax.stop_gradient(teacher(*inputs))
  mixed = kd.mixture.mix(
      (jax.lax.stop_gradient(m(*inputs)) for m in members),
      batch["labels"],
      batch["loss_mask"],
      prior=teacher.prior,
      combine=teacher.combine,
      temperature=_temperature(loss_cfg),
  )
  return mixed.logits_BxTxV


def _logit_sums(loss_cfg, use_kd, s, t, labels, mask, taid_t) -> Sums:
  """CE and KD sums from both models' logits (TAID's target made here)."""
  if use_kd and loss_cfg["name"] == "taid":
    if taid_t is None:
      taid_t = taid.init(loss_cfg["taid"]).t
    t = taid.target_logits(s, t, taid_t)  # KL(p_t ‖ q_θ) is FKL to p_t
    loss_cfg = dict(loss_cfg, name=divergence_of("taid"))
  local = functools.partial(_local_sums, loss_cfg, use_kd)
  return _psum(local, 4)(s, t, labels, mask)


def _sums_with_transfer(loss_cfg, student, teacher, batch, taid_t, projection):
  """:func:`sums` plus the feature and attention terms, one forward each."""
  inputs = (batch["input_ids"], batch["positions"], batch["attention_mask"])
  labels, mask = batch["labels"], batch["loss_mask"].astype(jnp.float32)
  plan = transfer.plan(loss_cfg, student, teacher)
  h_s, inter_s = student.intermediates(*inputs, taps=plan.student_taps)
  h_t, inter_t = teacher.intermediates(*inputs, taps=plan.teacher_taps)
  t = jax.lax.stop_gradient(teacher.lm_head(h_t))
  inter_t = jax.lax.stop_gradient(inter_t)
  out = _logit_sums(
      loss_cfg, True, student.lm_head(h_s), t, labels, mask, taid_t
  )
  local = functools.partial(transfer.local_sums, loss_cfg, plan)
  extra = _psum(local, 4, 1)(
      projection, inter_s, inter_t, batch["attention_mask"], mask
  )
  return out._replace(**extra)


def _transfer_weights(loss_cfg, weights):
  """The transfer terms' weights: ``weights`` (traced) or the config's."""
  return transfer.weights(loss_cfg) if weights is None else weights


def combine(
    loss_cfg, totals: Sums, weights: Mapping[str, Array] | None = None
) -> tuple[Array, dict[str, Array]]:
  """The scalar objective from global sums, plus its parts for logging.

  ``weights``: the transfer terms' (:func:`kdjax.transfer.weights`, traced
  in the step); None reads them from ``loss_cfg``.
  """
  n = jnp.maximum(totals.tokens, 1.0)
  ce = totals.ce / n
  kd_value = totals.kd / jnp.maximum(totals.kd_tokens, 1.0)
  r = loss_cfg["kd_ratio"]
  loss = (1.0 - r) * ce + r * kd_value if r > 0 else ce
  out = {"loss": loss, "ce": ce, "kd": kd_value, "tokens": totals.tokens}
  for term, w in (_transfer_weights(loss_cfg, weights) or {}).items():
    out[term] = getattr(totals, term) / n
    loss = loss + w * out[term]
  out["loss"] = loss
  if _select(loss_cfg)[0] < 1.0:
    out["select_fraction"] = totals.kd_tokens / n
  return loss, out


def micro_loss(
    loss_cfg,
    s: Sums,
    tokens: Array,
    kd_tokens: Array,
    *,
    same_tokens: bool = True,
    weights: Mapping[str, Array] | None = None,
) -> Array:
  """One micro-batch's share of the objective, given the whole batch's counts.

  ``(1 − r)·ce / tokens + r·kd / kd_tokens``: the shares of a batch's
  micro-batches add up to :func:`combine`'s loss, so their gradients do too.
  ``tokens`` and ``kd_tokens`` (:func:`kd_tokens`) count the whole batch;
  ``same_tokens=False`` when the KD term's positions are not the response
  mask's (a cross-tokenizer teacher pairs some of them only). The transfer
  terms add ``w · sum / tokens`` each (``weights`` as in :func:`combine`).
  """
  r = loss_cfg["kd_ratio"]
  if same_tokens and _select(loss_cfg)[0] >= 1.0:  # kd_tokens == tokens
    loss = ((1.0 - r) * s.ce + r * s.kd) / tokens
  else:
    loss = (1.0 - r) * s.ce / tokens + r * s.kd / kd_tokens
  for term, w in (_transfer_weights(loss_cfg, weights) or {}).items():
    loss = loss + w * getattr(s, term) / tokens
  return loss
