"""Pieces shared by every divergence implementation.

Notation (docs/divergences.md, "Conventions"): ``p = softmax(teacher / T)`` is
a constant, ``q = softmax(student / T)`` carries the gradient; every
divergence maps logits ``[..., V]`` to one value per position ``[...]``.

Conventions shared by all of them:

* Student first, teacher second; the teacher is under ``stop_gradient``.
* Arithmetic in float32 whatever the input dtype (bf16/f16 logits are upcast
  before the softmax, never after).
* Values are true divergences: ``fkl`` includes the teacher-entropy term that
  the MiniLLM/DistiLLM code omits; gradients equal that cross-entropy form's.
* Vocabulary slots with logit ``-inf`` in both teacher and student (padded or
  masked vocabulary) contribute exactly 0 to value and gradient:
  log-probabilities are made finite *before* any product, and each term is
  kept only where its weight factor is positive, so no ``0 * inf`` appears.
* A slot ``-inf`` in the teacher alone (``p = 0 < q``: a teacher truncated to
  its top tokens) is exact too (:func:`finite_pair`): terms weighted by ``p``
  vanish, mixtures see ``m = (1 − a) q``, and a divergence with a
  ``q log(q/p)`` term (RKL and what contains it) is ``+inf`` for every
  student, so its value is ``+inf`` and its gradient 0 (docs/divergences.md,
  "Conventions"). A slot ``-inf`` in the student alone is outside the
  contract: values there are finite-ised, not the divergence.
* No ``T**2`` factor: scaling belongs to the trainer's config.
* Hyper-parameters (alpha, beta, mu, weight, temperature) are Python numbers
  or jax arrays (traced under jit/vmap, so schedules work); they are constants
  for differentiation, like the teacher. Only ``rule`` must be static.

This module holds the vocabulary sum, masked_mean, the AKL head/tail weights
and ULD; the token-level divergences live in :mod:`kdjax.divergences.engine`
(the public, analytic-gradient implementation) and
:mod:`kdjax.divergences.reference` (the autodiff definitions, the oracle).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array


# ----------------------------------------------------------------------------
# Shared pieces.


def log_probs(logits: Array, temperature: float = 1.0) -> Array:
  """float32 ``log_softmax(logits / temperature)`` over the last axis."""
  _check_temperature(temperature)
  return jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)


def masked_mean(per_token: Array, mask: Array | None = None) -> Array:
  """Global token mean ``Σ mask·D / max(Σ mask, 1)`` (docs/divergences.md, "Conventions").

  One mean over every position of the batch (not a mean of per-sequence means).
  A batch with no valid token returns 0 instead of the reference's 0/0 = NaN.
  Masked-out positions are selected away, so a non-finite value there does not
  leak into the result.
  """
  per_token = per_token.astype(jnp.float32)
  if mask is None:
    return jnp.mean(per_token)
  if mask.shape != per_token.shape:
    raise ValueError(
        f"mask shape {mask.shape} does not match per-token shape "
        f"{per_token.shape}; pass one mask entry per token position."
    )
  mask = mask.astype(jnp.float32)
  total = jnp.sum(jnp.where(mask > 0, per_token * mask, 0.0))
  return total / jnp.maximum(jnp.sum(mask), 1.0)


def _abs(x: Array) -> Array:
  # x·sign(x) has derivative sign(x), i.e. 0 at x = 0 like torch; jnp.abs gives 1.
  return x * jnp.sign(x)


# Vocabulary sums run over blocks of this many entries, then over the blocks.
_SUM_BLOCK = 256


def _row_sum(x: Array) -> Array:
  """``Σ_v x_v`` over the last axis, in blocks: error ~1e-7 relative at any V.

  The vocabulary is zero-padded to a multiple of ``_SUM_BLOCK`` and summed
  block by block, then over the blocks. A single reduction may accumulate a
  row sequentially (XLA:CPU does for a one-row block; Eigen's matrix-vector
  product with ones always does) and err by ~1e-5 relative at V = 50257, by
  1e-4 at 128256: that moved FKL values of peaked teachers by 1e-5.
  """
  vocab = x.shape[-1]
  if vocab <= 2 * _SUM_BLOCK:
    return jnp.sum(x, axis=-1)
  n_blocks = -(-vocab // _SUM_BLOCK)
  pad = [(0, 0)] * (x.ndim - 1) + [(0, n_blocks * _SUM_BLOCK - vocab)]
  blocks = jnp.pad(x, pad).reshape(x.shape[:-1] + (n_blocks, _SUM_BLOCK))
  return jnp.sum(jnp.sum(blocks, axis=-1), axis=-1)


def _finite(x: Array) -> Array:
  """First half of the double where: -inf log-probabilities become 0."""
  return jnp.where(jnp.isfinite(x), x, 0.0)


def finite_pair(log_q: Array, log_p: Array) -> tuple[Array, Array]:
  """Student and teacher log-probabilities made safe for products.

  Every slot where the student is ``-inf`` (shared with the teacher, or the
  student's alone, outside the contract) becomes 0 in both, so a term
  weighted by ``q`` is 0 there and nothing multiplies ``inf``. A slot
  ``-inf`` in the teacher alone keeps ``log p = -inf``: that is the exact
  value the formulas need (``log m = log((1 − a) q)``, ``p^α = 0``), and the
  divergences that are ``+inf`` there test :func:`off_support` instead of
  multiplying by it.
  """
  student_finite = jnp.isfinite(log_q)
  return _finite(log_q), jnp.where(student_finite, log_p, _finite(log_p))


def off_support(log_p: Array) -> Array:
  """Rows ``[...]`` where the teacher is 0 at a slot where the student is not.

  ``log_p`` comes from :func:`finite_pair` (``-inf`` only there). On such a
  row ``KL(q‖p) = +inf`` for every student (a student with finite logits has
  ``q > 0`` everywhere), so the value is ``+inf`` and, the divergence being
  constant in the student logits, its gradient is 0.
  """
  return jnp.any(jnp.isneginf(log_p), axis=-1)


def static_value(x) -> float | None:
  """``x`` as a Python float when it is known at trace time, else None."""
  if isinstance(x, jax.core.Tracer):
    return None
  try:
    return float(x)
  except TypeError:  # a non-scalar array
    return None


def check_same_shape(student_logits: Array, teacher_logits: Array) -> None:
  """Token-level divergences take logits of the same positions and vocabulary."""
  if student_logits.shape != teacher_logits.shape:
    raise ValueError(
        f"student logits {student_logits.shape} and teacher logits "
        f"{teacher_logits.shape} differ in shape; token-level divergences need "
        "the same positions and vocabulary (use uld for different "
        "vocabularies)."
    )


def _check_temperature(temperature) -> None:
  value = static_value(temperature)
  if value is not None and not value > 0:
    raise ValueError(f"temperature={value:g} must be > 0.")


def _unit(name: str, value):
  """Checks a hyper-parameter in [0, 1] when it is concrete; returns it."""
  static = static_value(value)
  if static is not None and not 0.0 <= static <= 1.0:
    raise ValueError(
        f"{name}={static:g} is outside [0, 1]; choose a value in " "[0, 1]."
    )
  return value


# ----------------------------------------------------------------------------
# AKL head/tail weights (Wu et al. 2024; docs/divergences.md, "AKL").


AKL_RULES = ("akl", "dskd")

# Teacher tokens inspected by the top-k head search; rows whose top-k mass does
# not cross mu fall back to an exact threshold search (_akl_weights_threshold).
AKL_TOP_K = 64
# Rows settled at a time by the exact fallback: its memory is O(rows · V)
# and each round costs ~7 masked passes over those rows on a flat row.
AKL_FALLBACK_ROWS = 32


def top_k(x: Array, k: int) -> tuple[Array, Array]:
  """``lax.top_k`` over the last axis: same values, indices and tie order.

  On CPU it runs in two levels when the vocabulary splits into blocks of
  ``b ≈ sqrt(V / k)`` tokens: the k blocks with the largest maxima hold every
  top-k entry (a block left out has a maximum below, or tied after, k chosen
  ones), so one ``top_k`` over the ``V / b`` block maxima and one over the
  ``k·b`` gathered entries replace a ``top_k`` over ``V``. XLA:CPU's TopK
  scans every element at ~3 ns independent of k, the block maxima are a plain
  vectorised reduction; for GPT-2's V = 50257 = 29·1733 and k = 64 this halves
  AKL's top-k (experiments/benchmarks/divergences.py). Blocks are gathered
  in vocabulary order, so ties still resolve to the lower index.
  """
  block = _top_k_block(x.shape[-1], k)
  exact = lambda x: tuple(jax.lax.top_k(x, k))
  if block is None:
    return exact(x)

  def blocked(x):
    lead, n_blocks = x.shape[:-1], x.shape[-1] // block
    x_blocks = x.reshape(lead + (n_blocks, block))
    _, which = jax.lax.top_k(jnp.max(x_blocks, axis=-1), k)
    which = jnp.sort(which, axis=-1)
    picked = jnp.take_along_axis(x_blocks, which[..., None], axis=-2)
    values, j = jax.lax.top_k(picked.reshape(lead + (k * block,)), k)
    index = jnp.take_along_axis(which, j // block, axis=-1) * block + j % block
    return values, index

  return jax.lax.platform_dependent(x, cpu=blocked, default=exact)


def _top_k_block(vocab: int, k: int) -> int | None:
  """The divisor of ``vocab`` nearest ``sqrt(vocab / k)`` leaving at least
  ``4k`` blocks, or None (use one ``top_k``)."""
  target = math.sqrt(vocab / k)
  sizes = [
      b
      for b in range(4, int(2 * target) + 1)
      if vocab % b == 0 and vocab // b >= 4 * k and b >= target / 2
  ]
  return min(sizes, key=lambda b: abs(b - target)) if sizes else None


def akl_weights(
    p: Array,
    q: Array,
    *,
    mu: float = 0.5,
    rule: str = "akl",
    order: Array | None = None,
) -> tuple[Array, Array]:
  """AKL's head/tail weights ``(w_head, w_tail)`` per position, both constants.

  With ``π`` the teacher probabilities sorted descending (ties: lower vocabulary
  index first), ``S_k = π_1 + … + π_k`` and ``e_k = |π_k − q_{σ_k}|``::

      rule "akl"  (official AKL.py): head = {k : S_k ≤ μ} ∪ {1}
      rule "dskd" (DSKD):            head = {k : S_{k−1} < μ}, S_0 = 0
      g_head = Σ_{k ∈ head} e_k,  g_tail = Σ_v |p_v − q_v| − g_head
      w_head = g_head / (g_head + g_tail),  w_tail = 1 − w_head

  Under "akl" the token whose cumulative mass first exceeds μ belongs to the
  tail; under "dskd" to the head. ``g_head + g_tail = 0`` only when ``p = q``;
  the weights are then ``(½, ½)`` (the reference divides 0/0).

  ``order`` (same shape as ``p``, default ``p``) ranks the tokens instead of
  ``p``. The divergences pass the teacher logits: their order is the exact
  order of ``p``, while float32 rounds nearly equal probabilities to ties
  (logits within 6e-8 of each other become equal ``π``), which would put the
  lower index first where the exact order puts it second.

  No vocabulary sort: the head is found among the ``AKL_TOP_K`` largest
  teacher probabilities (:func:`top_k`, same tie order). A row whose top-k mass
  does not cross μ is settled exactly by a threshold search on ``order``, in a
  loop that runs zero times when no row needs it.
  """
  mu = _check_akl(mu, rule)
  p, q = jax.lax.stop_gradient(p), jax.lax.stop_gradient(q)
  # NumPy input must become a jax array: the fallback indexes it by tracers.
  order = p if order is None else jax.lax.stop_gradient(jnp.asarray(order))
  _, top_idx = top_k(order, min(AKL_TOP_K, p.shape[-1]))
  top_p, top_q = (jnp.take_along_axis(x, top_idx, axis=-1) for x in (p, q))
  err_total = jnp.sum(_abs(p - q), axis=-1)
  w_head, resolved = _akl_head_weight_topk(top_p, top_q, err_total, mu, rule)
  lead, vocab = p.shape[:-1], p.shape[-1]
  rows = lambda i: tuple(x.reshape(-1, vocab)[i] for x in (p, q, order))
  w_head = _akl_fallback(
      w_head.reshape(-1), resolved.reshape(-1), rows, mu, rule
  ).reshape(lead)
  return w_head, 1.0 - w_head


def _check_akl(mu, rule):
  if rule not in AKL_RULES:
    raise ValueError(
        f"rule={rule!r} is not an AKL rule; use one of {AKL_RULES}."
    )
  return _unit("mu", mu)


def _head_weight(g_head: Array, total: Array) -> Array:
  return jnp.where(total > 0, g_head / jnp.where(total > 0, total, 1.0), 0.5)


def _akl_head_mask(sorted_p: Array, mu: float, rule: str) -> Array:
  """Which descending-sorted positions form the head (docs/divergences.md, "AKL")."""
  cum = jnp.cumsum(sorted_p, axis=-1)
  if rule == "akl":
    return (cum <= mu).at[..., 0].set(True)
  return (cum - sorted_p) < mu  # exclusive cumulative mass S_{k-1}


def _akl_head_weight_topk(
    top_p: Array, top_q: Array, err_total: Array, mu: float, rule: str
) -> tuple[Array, Array]:
  """``w_head`` from the k largest teacher probabilities, and whether exact.

  The head is a descending prefix, so it lies inside the top k exactly when the
  k-th cumulative mass already ends it: ``S_k > μ`` (akl) or ``S_k ≥ μ`` (dskd).
  ``g_tail`` needs no order: it is the total error minus the head's.
  """
  head = _akl_head_mask(top_p, mu, rule)
  s_k = jnp.sum(top_p, axis=-1)
  resolved = (s_k > mu) if rule == "akl" else (s_k >= mu)
  g_head = jnp.sum(jnp.where(head, _abs(top_p - top_q), 0.0), axis=-1)
  return _head_weight(g_head, err_total), resolved


# The threshold search stops narrowing a row once its bracket holds at most
# this many tokens; one top-k then orders them.
_AKL_BRACKET = 64


class _Bracket(NamedTuple):
  """Per row, in ordered keys (:func:`_ordered`): the crossing key lies in
  ``[lo, hi]``; ``mass_lo = Σ_{key ≥ lo} p`` crosses μ and
  ``mass_hi = Σ_{key > hi} p`` does not; ``count_*`` count those tokens."""

  lo: Array
  hi: Array
  mass_lo: Array
  mass_hi: Array
  count_lo: Array
  count_hi: Array


def _ordered(key: Array) -> Array:
  """float32 -> uint32 with the same order (-0.0 ties +0.0, as in a sort):
  flip negatives entirely, set the sign bit of positives."""
  bits = jax.lax.bitcast_convert_type(key.astype(jnp.float32) + 0.0, jnp.uint32)
  return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(1 << 31))


def _unordered(ordered: Array) -> Array:
  """The float32 of an ordered key (inverse of :func:`_ordered`)."""
  bits = jnp.where(ordered >> 31 == 1, ordered & ~jnp.uint32(1 << 31), ~ordered)
  return jax.lax.bitcast_convert_type(bits, jnp.float32)


def _probe(b: _Bracket, step, mu) -> Array:
  """A key in ``(lo, hi]``. Every third step is the midpoint of the ordered
  keys (which alone isolates any key in 32 steps); the others step either
  side of the secant estimate of the crossing (the mass ``Σ_{key ≥ x} p``
  linear between the ends), by the width that holds about
  ``_AKL_BRACKET / 2`` tokens at the bracket's mean token density, so that a
  smooth row's bracket closes around the crossing in a few passes."""
  gap = b.hi - b.lo
  bit_mid = b.lo + (gap >> 1) + (gap & 1)
  lo_x, hi_x = _unordered(b.lo), _unordered(b.hi)
  drop = b.mass_lo - b.mass_hi
  frac = (b.mass_lo - mu) / jnp.where(drop > 0, drop, 1.0)
  width = hi_x - lo_x
  secant = lo_x + width * jnp.clip(frac, 0.0, 1.0)
  half = 0.5 * _AKL_BRACKET * width / (b.count_lo - b.count_hi)
  x = secant + jnp.where(step % 3 == 1, half, -half)
  x = jnp.where(jnp.isfinite(x), _ordered(x), bit_mid)
  return jnp.where(step % 3 == 0, bit_mid, jnp.clip(x, b.lo + 1, b.hi))


def _threshold_bracket(ordered: Array, p: Array, mu, crossed) -> _Bracket:
  """Narrows ``[min key, max key]`` by masked row sums until every row's
  bracket holds at most ``_AKL_BRACKET`` tokens or a single key."""

  def active(b):
    return (b.count_lo - b.count_hi > _AKL_BRACKET) & (b.lo < b.hi)

  def narrow(state):
    step, b = state
    mid = _probe(b, step, mu)
    above = ordered >= mid[..., None]
    mass = _row_sum(jnp.where(above, p, 0.0))
    count = _row_sum(above.astype(jnp.float32))
    ok, live = crossed(mass), active(b)
    keep = lambda new, old: jnp.where(live, new, old)
    return step + 1, _Bracket(
        keep(jnp.where(ok, mid, b.lo), b.lo),
        keep(jnp.where(ok, b.hi, mid - 1), b.hi),
        keep(jnp.where(ok, mass, b.mass_lo), b.mass_lo),
        keep(jnp.where(ok, b.mass_hi, mass), b.mass_hi),
        keep(jnp.where(ok, count, b.count_lo), b.count_lo),
        keep(jnp.where(ok, b.count_hi, count), b.count_hi),
    )

  lo = jnp.min(ordered, axis=-1)
  # Filled like ``lo``, so inside a shard_map the carry varies over the same
  # mesh axes as the loop's outputs (while_loop requires equal types).
  zero = jnp.zeros_like(lo, jnp.float32)
  start = _Bracket(
      lo,
      jnp.max(ordered, axis=-1),
      zero + 1.0,  # Σ p over the row
      zero,
      zero + ordered.shape[-1],
      zero,
  )
  _, bracket = jax.lax.while_loop(
      lambda state: jnp.any(active(state[1])), narrow, (0, start)
  )
  return bracket


def _akl_weights_threshold(
    p: Array, q: Array, key: Array, mu, rule: str
) -> Array:
  """Exact ``w_head`` without sorting: the head is a threshold on ``key``.

  With tokens ranked by ``key`` descending, ties by index, the crossing
  token's key is ``v = max{τ : Σ_{key ≥ τ} p > μ}`` (``≥ μ`` for dskd).
  :func:`_threshold_bracket` encloses ``v`` in a bracket ``[lo, hi]`` of at
  most ``_AKL_BRACKET`` tokens by masked row sums (:func:`_probe`; ~7 passes
  on a flat row of 50257). Tokens above the bracket are
  in the head, tokens below it in the tail. The bracket's tokens, ordered by
  one top-k (ties: lower index first), are in the head when their ``S_k``
  (mass above the bracket plus a cumsum) is ``≤ μ`` (akl; ``S_{k−1} < μ``
  for dskd). A bracket of more tokens is one tied key, split by index with a
  cumsum over the row. Only rows whose top-k mass is ``≤ μ`` come here.
  """
  ordered = _ordered(key)
  crossed = (lambda m: m > mu) if rule == "akl" else (lambda m: m >= mu)
  b = _threshold_bracket(ordered, p, mu, crossed)
  err = _abs(p - q)
  above = ordered > b.hi[..., None]
  in_bracket = (ordered >= b.lo[..., None]) & ~above
  base = b.mass_hi[..., None]

  # Rules "akl" and "dskd" on S_k = cum. Rows reach this search only when
  # the top-k mass is <= μ, so π_1 <= μ: the first token needs no exception.
  def in_head(cum, prob):
    return cum <= mu if rule == "akl" else cum - prob < mu

  # One top-k orders the bracket (XLA:CPU's TopK is fast on float32 only).
  # Its -inf keys (p = 0) come after mass_lo, which crosses μ: tail, so they
  # may share the -inf of the tokens outside it.
  key_k, idx = top_k(
      jnp.where(in_bracket, key.astype(jnp.float32), -jnp.inf),
      min(_AKL_BRACKET, key.shape[-1]),
  )
  p_k, err_k = (jnp.take_along_axis(x, idx, axis=-1) for x in (p, err))
  head_k = (key_k > -jnp.inf) & in_head(base + jnp.cumsum(p_k, axis=-1), p_k)
  g_head = _row_sum(jnp.where(above, err, 0.0)) + jnp.sum(
      jnp.where(head_k, err_k, 0.0), axis=-1
  )

  def tied_head(_):
    # A bracket wider than _AKL_BRACKET is one key: split it by index.
    tied_cum = jnp.cumsum(jnp.where(in_bracket, p, 0.0), axis=-1)
    head = in_bracket & in_head(base + tied_cum, p)
    return _row_sum(jnp.where(above | head, err, 0.0))

  wide = b.count_lo - b.count_hi > _AKL_BRACKET
  g_head = jnp.where(
      wide,
      jax.lax.cond(jnp.any(wide), tied_head, lambda _: g_head, None),
      g_head,
  )
  return _head_weight(g_head, _row_sum(err))


def _akl_fallback(
    w_head_M: Array,
    resolved_M: Array,
    rows,
    mu: float,
    rule: str,
    budget: int | None = None,
) -> Array:
  """Replaces the weights of unresolved rows by the exact ones.

  ``rows(index_R)`` returns the ``(p, q, order)`` rows ``[R, V]`` at those
  indices (``order`` ranks the tokens, see :func:`akl_weights`).
  Unresolved rows are gathered ``budget`` at a time (default
  :data:`AKL_FALLBACK_ROWS`, whatever the token chunking) and settled by :func:`_akl_weights_threshold` in a ``lax.while_loop`` that runs
  zero times when the top-k settled every row; memory stays
  ``O(budget · V)`` however many rows need it.
  """
  m = w_head_M.shape[0]
  budget = min(m, budget or AKL_FALLBACK_ROWS)

  def settle(state):
    w_M, todo_M = state
    (idx_R,) = jnp.nonzero(todo_M, size=budget, fill_value=0)
    idx_R = jnp.where(jnp.arange(budget) < jnp.sum(todo_M), idx_R, m)
    w_R = _akl_weights_threshold(*rows(jnp.minimum(idx_R, m - 1)), mu, rule)
    return (
        w_M.at[idx_R].set(w_R, mode="drop"),
        todo_M.at[idx_R].set(False, mode="drop"),
    )

  w_head_M, _ = jax.lax.while_loop(
      lambda state: jnp.any(state[1]), settle, (w_head_M, ~resolved_M)
  )
  return w_head_M


def _teacher_temperature(temperature, teacher_temperature):
  return temperature if teacher_temperature is None else teacher_temperature


def _sorted_l1(q: Array, p: Array) -> Array:
  """``Σ_k |q↓_k − p↓_k|``, the narrower vector zero-padded to the wider."""
  width = max(q.shape[-1], p.shape[-1])
  pad = lambda x: jnp.pad(
      x, [(0, 0)] * (x.ndim - 1) + [(0, width - x.shape[-1])]
  )
  # Ascending sorts pair the same ranks as descending ones once both are padded.
  return jnp.sum(
      _abs(jnp.sort(pad(q), axis=-1) - jnp.sort(pad(p), axis=-1)), axis=-1
  )


def _check_positions(student_logits: Array, teacher_logits: Array) -> None:
  if student_logits.shape[:-1] != teacher_logits.shape[:-1]:
    raise ValueError(
        f"student logits {student_logits.shape} and teacher logits "
        f"{teacher_logits.shape} must share their leading (position) axes."
    )


def uld(
    student_logits: Array,
    teacher_logits: Array,
    *,
    temperature: float = 1.0,
    teacher_temperature: float | None = None,
) -> Array:
  """Universal logit distillation (Boizard et al. 2024): ``Σ_k |q↓_k − p↓_k|``.

  ``q = softmax(s / temperature)``, ``p = softmax(t / teacher_temperature)``
  (default: the same temperature). ``↓`` sorts each distribution in
  descending order; the smaller vocabulary is zero-padded to the larger, so
  student and teacher may use different tokenizers (only the leading axes
  must agree; docs/divergences.md "ULD"). This is the Wasserstein-1 distance
  between the sorted distributions under a 0/1 ground cost on ranks, up to a
  factor 2. The gradient flows through the sorted student values (the
  permutation is constant).
  """
  _check_positions(student_logits, teacher_logits)
  t_temp = _teacher_temperature(temperature, teacher_temperature)
  q = jnp.exp(log_probs(student_logits, temperature))
  p = jnp.exp(log_probs(jax.lax.stop_gradient(teacher_logits), t_temp))
  return _sorted_l1(q, p)


def _kl_terms(a: Array, log_a: Array, log_b: Array) -> Array:
  """``Σ a (log a − log b)``; terms with ``a = 0`` are exactly 0."""
  return jnp.sum(jnp.where(a > 0, a * (log_a - log_b), 0.0), axis=-1)


def _raw_gjsd(log_q: Array, log_p: Array, beta) -> Array:
  """GJSD_β of two (sub-)vectors given by their logs, not renormalised.

  ``β = 0`` is ``Σ p log(p / q)``, ``β = 1`` is ``Σ q log(q / p)``, between
  them ``β Σ p log(p / m) + (1 − β) Σ q log(q / m)``, ``m = β p + (1 − β) q``
  (docs/divergences.md "Generalized JSD": the endpoints are defined, not
  limits). ``β`` may be traced.
  """
  log_q, log_p = _finite(log_q), _finite(log_p)
  q, p = jnp.exp(log_q), jnp.exp(log_p)
  beta = jnp.asarray(beta, jnp.float32)
  log_m = jnp.logaddexp(jnp.log(beta) + log_p, jnp.log1p(-beta) + log_q)
  inner = beta * _kl_terms(p, log_p, log_m) + (1.0 - beta) * _kl_terms(
      q, log_q, log_m
  )
  return jnp.where(
      beta == 0.0,
      _kl_terms(p, log_p, log_q),
      jnp.where(beta == 1.0, _kl_terms(q, log_q, log_p), inner),
  )


def gold(
    student_logits: Array,
    teacher_logits: Array,
    student_matched: Array,
    teacher_matched: Array,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    teacher_temperature: float | None = None,
) -> Array:
  """GOLD's hybrid (Patiño et al. 2025, TRL ``GOLDTrainer``) per position.

  ``student_matched[m]`` and ``teacher_matched[m]`` (``M`` pairs, int) are
  the vocabulary entries that spell the same string
  (:func:`kdjax.data.crosstok.matched_vocab`). With ``q`` and ``p`` as in
  :func:`uld`, ``q_M = q[student_matched]``, ``p_M = p[teacher_matched]``
  and ``q_U``, ``p_U`` the distributions with the matched entries set to 0::

      w = M / V_T
      gold = w · GJSD_β(q_M, p_M) + (1 − w) · Σ_k |q_U↓_k − p_U↓_k|

  where GJSD_β acts on the raw (not renormalised) sub-vectors: ``β = 0`` is
  ``KL(p_M ‖ q_M) = Σ p_M log(p_M / q_M)``, ``β = 1`` the reverse
  (docs/cross_tokenizer.md "GOLD"). Without matched entries it is
  :func:`uld`. ``V_T`` is the teacher logits' width. ``beta`` and the
  temperatures may be traced.
  """
  _check_positions(student_logits, teacher_logits)
  beta = _unit("beta", beta)
  t_temp = _teacher_temperature(temperature, teacher_temperature)
  log_q = log_probs(student_logits, temperature)
  log_p = log_probs(jax.lax.stop_gradient(teacher_logits), t_temp)
  student_matched = jnp.asarray(student_matched, jnp.int32)
  teacher_matched = jnp.asarray(teacher_matched, jnp.int32)
  if student_matched.shape != teacher_matched.shape:
    raise ValueError(
        f"student_matched {student_matched.shape} and teacher_matched "
        f"{teacher_matched.shape} must pair one teacher entry with each "
        "student entry; pass both arrays of crosstok.matched_vocab."
    )
  matched = _raw_gjsd(
      jnp.take(log_q, student_matched, axis=-1),
      jnp.take(log_p, teacher_matched, axis=-1),
      beta,
  )
  q_U = jnp.exp(log_q).at[..., student_matched].set(0.0)
  p_U = jnp.exp(log_p).at[..., teacher_matched].set(0.0)
  weight = student_matched.shape[0] / teacher_logits.shape[-1]
  return weight * matched + (1.0 - weight) * _sorted_l1(q_U, p_U)
