"""Token-level KD divergences as pure JAX functions.

Every function maps student and teacher logits of shape ``[..., V]`` to one
divergence per position, shape ``[...]``, summed over the vocabulary. Notation
(kd_losses.md 1.1): ``p = softmax(teacher / T)`` is a constant, ``q =
softmax(student / T)`` carries the gradient.

Conventions shared by all of them:

* Student first, teacher second; the teacher is under ``stop_gradient``.
* Arithmetic in float32 whatever the input dtype (bf16/f16 logits are upcast
  before the softmax, never after).
* Values are true divergences: ``fkl`` includes the teacher-entropy term that the
  MiniLLM/DistiLLM code omits. Gradients are identical to that cross-entropy form.
* Vocabulary slots with logit ``-inf`` (padded or masked vocabulary; teacher and
  student must agree on them) contribute exactly 0 to value and gradient. This
  needs the "double where": log-probabilities are made finite *before* any
  product, and each term is kept only where its weight factor is positive, so no
  ``0 * inf`` appears in the forward or the backward pass.
* No ``T**2`` factor: scaling belongs to the trainer's config.
* Hyper-parameters (alpha, beta, mu, weight, rule) are static Python numbers.

Reduce with :func:`masked_mean`, the global token mean over the response mask.
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
  """Global token mean ``Σ mask·D / max(Σ mask, 1)`` (kd_losses.md 1.5).

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
        f"{per_token.shape}; pass one mask entry per token position.")
  mask = mask.astype(jnp.float32)
  total = jnp.sum(jnp.where(mask > 0, per_token * mask, 0.0))
  return total / jnp.maximum(jnp.sum(mask), 1.0)


def _abs(x: Array) -> Array:
  # x·sign(x) has derivative sign(x), i.e. 0 at x = 0 like torch; jnp.abs gives 1.
  return x * jnp.sign(x)


def _row_sum(x: Array) -> Array:
  """``Σ_v x_v`` over the last axis.

  On CPU this is a matrix-vector product with ones: XLA:CPU emits a reduction
  fused with its elementwise producer (``Σ exp(..)``, ``Σ q·G``) as a scalar
  loop, about 10x slower per element than Eigen's vectorised matvec on the
  same values (experiments/benchmarks/divergences.py). Other backends fuse
  the reduction well and keep ``jnp.sum``. The matvec needs its input
  materialised: cheap for a token chunk or a few rows, an extra ``[N, V]``
  buffer for a whole batch.
  """
  return jax.lax.platform_dependent(x, cpu=_matvec_sum, default=_reduce_sum)


def _matvec_sum(x: Array) -> Array:
  ones = jnp.ones(x.shape[-1], x.dtype)
  return jnp.matmul(x, ones, precision=jax.lax.Precision.HIGHEST)


def _reduce_sum(x: Array) -> Array:
  return jnp.sum(x, axis=-1)


def _finite(x: Array) -> Array:
  """First half of the double where: -inf log-probabilities become 0."""
  return jnp.where(jnp.isfinite(x), x, 0.0)


class _Dists(NamedTuple):
  """Both distributions of a position, prepared once and shared by every term."""
  log_q: Array  # student log-probs, finite everywhere (masked slots hold 0)
  log_p: Array  # teacher log-probs, finite everywhere, constant
  q: Array      # student probabilities (exactly 0 in masked slots)
  p: Array      # teacher probabilities, constant


def _dists(student_logits: Array, teacher_logits: Array,
           temperature: float) -> _Dists:
  if student_logits.shape != teacher_logits.shape:
    raise ValueError(
        f"student logits {student_logits.shape} and teacher logits "
        f"{teacher_logits.shape} differ in shape; token-level divergences need "
        "the same positions and vocabulary (use uld for different vocabularies).")
  log_q = log_probs(student_logits, temperature)
  log_p = log_probs(jax.lax.stop_gradient(teacher_logits), temperature)
  return _Dists(_finite(log_q), _finite(log_p), jnp.exp(log_q), jnp.exp(log_p))


def _kl(w: Array, log_w: Array, log_v: Array) -> Array:
  """``Σ_v w_v (log w_v − log v_v)``, each term exactly 0 where ``w_v = 0``."""
  terms = jnp.where(w > 0, w * (log_w - log_v), 0.0)
  return jnp.sum(terms, axis=-1)


def _log_mixture(d: _Dists, weight_p: float) -> Array:
  """``log(a·p + (1−a)·q)`` evaluated stably as a logaddexp (kd_losses.md 1.8).

  Mixes probabilities, not logits. Not detached: the gradient also flows through
  q inside the mixture, as in distillm and TRL.
  """
  log_a = math.log(weight_p) if weight_p > 0 else -jnp.inf
  log_1ma = math.log1p(-weight_p) if weight_p < 1 else -jnp.inf
  return jnp.logaddexp(log_a + d.log_p, log_1ma + d.log_q)


def _fkl(d: _Dists) -> Array:
  return _kl(d.p, d.log_p, d.log_q)


def _rkl(d: _Dists) -> Array:
  return _kl(d.q, d.log_q, d.log_p)


def _check_temperature(temperature) -> None:
  if isinstance(temperature, (int, float)) and not temperature > 0:
    raise ValueError(f"temperature={temperature} must be > 0.")


def _unit(name: str, value) -> float:
  """Validates a static hyper-parameter in [0, 1]."""
  if isinstance(value, jax.core.Tracer):
    raise TypeError(f"{name} must be a static Python float, not a traced array; "
                    "bind it with functools.partial outside jit.")
  value = float(value)
  if not 0.0 <= value <= 1.0:
    raise ValueError(f"{name}={value} is outside [0, 1]; choose a value in [0, 1].")
  return value


# ----------------------------------------------------------------------------
# The divergences.


def fkl(student_logits: Array, teacher_logits: Array, *,
        temperature: float = 1.0) -> Array:
  """Forward KL ``KL(p‖q) = Σ_v p_v (log p_v − log q_v)`` (Hinton KD; MiniLLM "KD").

  Mean-seeking in the classic picture; fits the head of ``p`` first (AKL paper).
  Gradient w.r.t. the student logits: ``(q − p) / T``.
  """
  return _fkl(_dists(student_logits, teacher_logits, temperature))


def rkl(student_logits: Array, teacher_logits: Array, *,
        temperature: float = 1.0) -> Array:
  """Reverse KL ``KL(q‖p) = Σ_v q_v (log q_v − log p_v)`` (token-level RKL).

  Mode-seeking in the classic picture; fits the tail of ``p`` first (AKL paper).
  The gradient flows through both ``q`` factors:
  ``∂/∂s = q ⊙ (log q − log p − RKL) / T``.
  """
  return _rkl(_dists(student_logits, teacher_logits, temperature))


def fkl_rkl(student_logits: Array, teacher_logits: Array, *,
            weight: float = 0.5, temperature: float = 1.0) -> Array:
  """Fixed mixture ``weight·KL(p‖q) + (1 − weight)·KL(q‖p)``.

  ``weight = 0.5`` is the "FKL+RKL" baseline of the AKL paper, the non-adaptive
  counterpart of :func:`akl` on the same scale.
  """
  weight = _unit("weight", weight)
  d = _dists(student_logits, teacher_logits, temperature)
  return weight * _fkl(d) + (1.0 - weight) * _rkl(d)


def skl(student_logits: Array, teacher_logits: Array, *,
        alpha: float = 0.1, temperature: float = 1.0) -> Array:
  """Skew KL (DistiLLM): ``KL(p ‖ α·p + (1 − α)·q)``.

  ``α = 0`` is :func:`fkl`; ``α = 1`` is identically 0. DistiLLM uses α = 0.1.
  The value is bounded by ``−log α`` even where ``q_v → 0``.
  """
  alpha = _unit("alpha", alpha)
  d = _dists(student_logits, teacher_logits, temperature)
  return _kl(d.p, d.log_p, _log_mixture(d, alpha))


def srkl(student_logits: Array, teacher_logits: Array, *,
         alpha: float = 0.1, temperature: float = 1.0) -> Array:
  """Skew reverse KL (DistiLLM): ``KL(q ‖ (1 − α)·p + α·q)``.

  ``α = 0`` is :func:`rkl`; ``α = 1`` is identically 0. DistiLLM uses α = 0.1.
  """
  alpha = _unit("alpha", alpha)
  d = _dists(student_logits, teacher_logits, temperature)
  return _kl(d.q, d.log_q, _log_mixture(d, 1.0 - alpha))


def jsd(student_logits: Array, teacher_logits: Array, *,
        beta: float = 0.5, temperature: float = 1.0) -> Array:
  """Generalized Jensen-Shannon divergence (GKD): with ``m = β·p + (1 − β)·q``,

      GJSD_β = β·KL(p‖m) + (1 − β)·KL(q‖m),   0 ≤ GJSD_β ≤ H(β) ≤ log 2.

  The endpoints are defined separately: ``β = 0`` returns :func:`fkl` and
  ``β = 1`` returns :func:`rkl`, exactly. The interior formula cannot be used
  there because it vanishes as ``β → 0`` or ``1`` (``m`` collapses onto one of
  the two distributions and its weight goes to 0), while the GKD paper and TRL
  name those limits FKL and RKL; the family is discontinuous at its endpoints.
  ``β = 0.5`` is the symmetric JS; distillm's "jsd" (λ = 0.9) is ``β = 0.1``.
  """
  beta = _unit("beta", beta)
  d = _dists(student_logits, teacher_logits, temperature)
  if beta == 0.0:
    return _fkl(d)
  if beta == 1.0:
    return _rkl(d)
  log_m = _log_mixture(d, beta)
  return beta * _kl(d.p, d.log_p, log_m) + (1.0 - beta) * _kl(d.q, d.log_q, log_m)


def tvd(student_logits: Array, teacher_logits: Array, *,
        temperature: float = 1.0) -> Array:
  """Total variation distance ``½ Σ_v |p_v − q_v|`` ∈ [0, 1] (DistiLLM).

  Subgradient of ``|x|`` at 0 is 0, as in torch.
  """
  d = _dists(student_logits, teacher_logits, temperature)
  return 0.5 * jnp.sum(_abs(d.p - d.q), axis=-1)


AKL_RULES = ("akl", "dskd")

# Teacher tokens inspected by the top-k head search; rows whose top-k mass does
# not cross mu fall back to an exact threshold search (_akl_weights_threshold).
AKL_TOP_K = 64


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
  sizes = [b for b in range(4, int(2 * target) + 1)
           if vocab % b == 0 and vocab // b >= 4 * k and b >= target / 2]
  return min(sizes, key=lambda b: abs(b - target)) if sizes else None


def akl_weights(p: Array, q: Array, *, mu: float = 0.5, rule: str = "akl",
                order: Array | None = None) -> tuple[Array, Array]:
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
  loop that runs zero times when no row needs it (performance.md 5).
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
  w_head = _akl_fallback(w_head.reshape(-1), resolved.reshape(-1), rows, mu,
                         rule).reshape(lead)
  return w_head, 1.0 - w_head


def _check_akl(mu, rule) -> float:
  if rule not in AKL_RULES:
    raise ValueError(f"rule={rule!r} is not an AKL rule; use one of {AKL_RULES}.")
  return _unit("mu", mu)


def _head_weight(g_head: Array, total: Array) -> Array:
  return jnp.where(total > 0, g_head / jnp.where(total > 0, total, 1.0), 0.5)


def _akl_head_mask(sorted_p: Array, mu: float, rule: str) -> Array:
  """Which descending-sorted positions form the head (kd_losses.md 2.4)."""
  cum = jnp.cumsum(sorted_p, axis=-1)
  if rule == "akl":
    return (cum <= mu).at[..., 0].set(True)
  return (cum - sorted_p) < mu  # exclusive cumulative mass S_{k-1}


def _akl_head_weight_topk(top_p: Array, top_q: Array, err_total: Array,
                          mu: float, rule: str) -> tuple[Array, Array]:
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


def _akl_weights_threshold(p: Array, q: Array, key: Array, mu: float,
                           rule: str) -> Array:
  """Exact ``w_head`` without sorting: the head is a threshold on ``key``.

  With ``order`` = ``key`` descending, ties by index, the crossing token's key
  is ``v = max{τ : Σ_{key ≥ τ} p > μ}`` (``≥ μ`` for dskd), found by bisection
  over the 2³² ordered float32 bit patterns (32 masked row sums). Every token
  with ``key > v`` is in the head; a token tied at ``v`` is when its ``S_k``
  (mass above ``v`` plus the tied mass up to it in index order, a cumsum)
  is ``≤ μ`` (akl; ``S_{k−1} < μ`` for dskd); the first token always is
  under akl. XLA:CPU sorts 8 rows of 50257 in ~0.1 s (~250 ns per entry);
  this costs ~9 ms for the same rows (and less than a top-4096, 16 ms).
  """
  key = key.astype(jnp.float32) + 0.0  # -0.0 ties +0.0, as in a sort
  bits = jax.lax.bitcast_convert_type(key, jnp.uint32)
  # Monotone map float32 -> uint32: flip negatives entirely, set the sign bit
  # of positives, so unsigned order is float order.
  ordered = jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(1 << 31))
  crossed = (lambda m: m > mu) if rule == "akl" else (lambda m: m >= mu)

  def bisect(_, bounds):
    lo, hi = bounds  # crossed(mass(ordered >= lo)) holds; the answer is <= hi
    gap = hi - lo
    mid = lo + (gap >> 1) + (gap & 1)
    ok = crossed(_row_sum(jnp.where(ordered >= mid[..., None], p, 0.0)))
    return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid - 1)

  lo = jnp.min(ordered, axis=-1)
  hi = jnp.max(ordered, axis=-1)
  v, _ = jax.lax.fori_loop(0, 32, bisect, (lo, hi))
  above, tied = ordered > v[..., None], ordered == v[..., None]
  base = _row_sum(jnp.where(above, p, 0.0))[..., None]
  tied_cum = jnp.cumsum(jnp.where(tied, p, 0.0), axis=-1)
  if rule == "akl":
    first = jnp.arange(key.shape[-1]) == jnp.argmax(key, axis=-1)[..., None]
    head = above | (tied & (base + tied_cum <= mu)) | first
  else:
    head = above | (tied & (base + tied_cum - p < mu))
  err = _abs(p - q)
  return _head_weight(_row_sum(jnp.where(head, err, 0.0)), _row_sum(err))


def _akl_fallback(w_head_M: Array, resolved_M: Array, rows, mu: float,
                  rule: str, budget: int | None = None) -> Array:
  """Replaces the weights of unresolved rows by the exact ones.

  ``rows(index_R)`` returns the ``(p, q, order)`` rows ``[R, V]`` at those
  indices (``order`` ranks the tokens, see :func:`akl_weights`).
  Unresolved rows are gathered ``budget`` at a time (default ``max(8, M/16)``)
  and settled by :func:`_akl_weights_threshold` in a ``lax.while_loop`` that runs
  zero times when the top-k settled every row; memory stays
  ``O(budget · V)`` however many rows need it.
  """
  m = w_head_M.shape[0]
  budget = min(m, budget or max(8, m // 16))

  def settle(state):
    w_M, todo_M = state
    (idx_R,) = jnp.nonzero(todo_M, size=budget, fill_value=0)
    idx_R = jnp.where(jnp.arange(budget) < jnp.sum(todo_M), idx_R, m)
    w_R = _akl_weights_threshold(*rows(jnp.minimum(idx_R, m - 1)), mu, rule)
    return (w_M.at[idx_R].set(w_R, mode="drop"),
            todo_M.at[idx_R].set(False, mode="drop"))

  w_head_M, _ = jax.lax.while_loop(lambda state: jnp.any(state[1]), settle,
                                   (w_head_M, ~resolved_M))
  return w_head_M


def akl(student_logits: Array, teacher_logits: Array, *, mu: float = 0.5,
        rule: str = "akl", temperature: float = 1.0) -> Array:
  """Adaptive KL (Wu et al. 2024, arXiv 2404.02657):

      AKL = w_head · KL(p‖q) + w_tail · KL(q‖p)

  with the per-position head/tail weights of :func:`akl_weights` (stop-gradient),
  computed from the same tempered distributions. FKL fits the head first and RKL
  the tail, so each error region is weighted toward the divergence that fixes it.
  """
  d = _dists(student_logits, teacher_logits, temperature)
  w_head, w_tail = akl_weights(d.p, d.q, mu=mu, rule=rule,
                               order=teacher_logits)
  return w_head * _fkl(d) + w_tail * _rkl(d)


def uld(student_logits: Array, teacher_logits: Array, *,
        temperature: float = 1.0) -> Array:
  """Universal logit distillation (Boizard et al. 2024): ``Σ_k |q↓_k − p↓_k|``.

  ``↓`` sorts each distribution in descending order; the smaller vocabulary is
  zero-padded to the larger, so student and teacher may use different tokenizers
  (only the leading axes must agree). This is the Wasserstein-1 distance between
  the sorted distributions under a 0/1 ground cost on ranks, up to a factor 2. The
  gradient flows through the sorted student values (the permutation is constant).
  """
  if student_logits.shape[:-1] != teacher_logits.shape[:-1]:
    raise ValueError(
        f"student logits {student_logits.shape} and teacher logits "
        f"{teacher_logits.shape} must share their leading (position) axes.")
  q = jnp.exp(log_probs(student_logits, temperature))
  p = jnp.exp(log_probs(jax.lax.stop_gradient(teacher_logits), temperature))
  width = max(q.shape[-1], p.shape[-1])
  pad = lambda x: jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, width - x.shape[-1])])
  # Ascending sorts pair the same ranks as descending ones once both are padded.
  return jnp.sum(_abs(jnp.sort(pad(q), axis=-1) - jnp.sort(pad(p), axis=-1)),
                 axis=-1)
