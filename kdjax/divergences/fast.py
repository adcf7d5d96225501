"""The token-level divergences with analytic gradients (``jax.custom_vjp``).

Same values and gradients as :mod:`kdjax.divergences.core` (the autodiff
reference), but with the gradient w.r.t. the student logits written in closed
form (kd_losses.md 3): with ``G_v = ∂D/∂q_v``,

    ∂D/∂s_v = q_v (G_v − c) / T,   c = Σ_u q_u G_u   (a per-row constant)

so nothing of size ``[..., V]`` is kept for the backward pass. The forward pass
reads both logit arrays and keeps only per-row statistics (the two
log-partition functions and ``c``); the backward pass re-reads the logits and
writes the gradient in one elementwise sweep. Autodiff instead keeps float32
softmax/log-softmax/mixture residuals of the full vocabulary (performance.md 0).

Gradients flow to the student logits only (the teacher is constant). All
arithmetic is float32; the gradient is returned in the student's dtype. Slots
with logit ``-inf`` in both arrays contribute exactly 0 to value and gradient.

:func:`value_and_grad` gives the per-row value and the (unscaled) float32
gradient in one forward computation, for callers that want the gradient in the
forward pass (the fused-linear path in :mod:`kdjax.divergences.fused`).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from kdjax.divergences import core

Array = jax.Array
_F32 = jnp.float32


class _Lse(NamedTuple):
  """``logsumexp(x / T)`` per row, kept as ``max + log Σ exp(x / T − max)``.

  Log-probabilities are ``(x / T − max) − log_sum``, the order of
  ``jax.nn.log_softmax``: ``x / T − max`` is exact for the largest logits. A
  single float32 partition rounds to ``eps·|max|`` (2e-3 at ``|x / T| = 2e4``),
  which scaled every probability by up to ``exp(±4e-3)`` and made FKL values
  of 2e4 wrong by about 10.
  """
  max: Array      # [...]
  log_sum: Array  # [...]

  def log_prob(self, x: Array, temperature: float) -> Array:
    return ((x.astype(_F32) / temperature - self.max[..., None])
            - self.log_sum[..., None])


class _Ctx(NamedTuple):
  """Everything a divergence formula may use, all elementwise or per row."""
  s: Array          # student logits, input dtype
  t: Array          # teacher logits, input dtype
  lse_s: _Lse      # log-partition of s / T, per row
  lse_t: _Lse      # log-partition of t / T, per row
  temperature: float
  log_q: Array      # finite student log-probs (0 in -inf slots)
  log_p: Array      # finite teacher log-probs (0 in -inf slots)
  q: Array          # student probabilities
  p: Array          # teacher probabilities
  sum: Callable[[Array], Array]  # Σ over the vocabulary (see _operator)


def _context(s: Array, t: Array, lse_s: _Lse, lse_t: _Lse,
             temperature: float, row_sum: Callable) -> _Ctx:
  s, t = jnp.asarray(s), jnp.asarray(t)  # NumPy logits in, jax arrays out
  ls, lt = lse_s.log_prob(s, temperature), lse_t.log_prob(t, temperature)
  return _Ctx(s, t, lse_s, lse_t, temperature, core._finite(ls),
              core._finite(lt), jnp.exp(ls), jnp.exp(lt), row_sum)


def _lse(x: Array, temperature: float, row_sum: Callable) -> _Lse:
  # max(x) / T equals max(x / T) bit for bit (rounding is monotone), and a max
  # straight over the input is a plain reduction (see core._row_sum).
  row_max = jnp.max(x, axis=-1).astype(_F32) / temperature
  shifted = x.astype(_F32) / temperature - row_max[..., None]
  return _Lse(row_max, jnp.log(row_sum(jnp.exp(shifted))))


def _kl(c: _Ctx, w: Array, log_w: Array, log_v: Array) -> Array:
  """:func:`core._kl` (each term 0 where ``w_v = 0``) summed with ``c.sum``."""
  return c.sum(jnp.where(w > 0, w * (log_w - log_v), 0.0))


# ----------------------------------------------------------------------------
# Closed forms. Each divergence is a pair
#   forward(ctx) -> (value [...], const)   per-row results of the forward pass
#   grad(ctx, const) -> [..., V]           ∂D/∂(s/T), float32
# Constants are per-row arrays (or tuples of them), never [..., V].


def _fkl_value(c: _Ctx) -> Array:
  return _kl(c, c.p, c.log_p, c.log_q)


def _rkl_value(c: _Ctx) -> Array:
  return _kl(c, c.q, c.log_q, c.log_p)


def _fkl():
  return (lambda c: (_fkl_value(c), ())), (lambda c, _: c.q - c.p)


def _rkl():
  def forward(c):
    value = _rkl_value(c)
    return value, value  # c = Σ q (log q − log p) is the value itself

  def grad(c, rkl):
    return c.q * (c.log_q - c.log_p - rkl[..., None])

  return forward, grad


def _fkl_rkl(weight: float):
  def forward(c):
    rkl = _rkl_value(c)
    return weight * _fkl_value(c) + (1.0 - weight) * rkl, rkl

  def grad(c, rkl):
    return (weight * (c.q - c.p)
            + (1.0 - weight) * c.q * (c.log_q - c.log_p - rkl[..., None]))

  return forward, grad


def _centered(g_fn: Callable[[_Ctx], Array]):
  """Forward/grad pair for ``∂D/∂s = q (G − Σ q G)`` given ``G``."""
  def forward_const(c):
    return c.sum(c.q * g_fn(c))

  def grad(c, const):
    return c.q * (g_fn(c) - const[..., None])

  return forward_const, grad


def _zero():
  """``α = 1`` skew divergences: the mixture is the first argument, D ≡ 0."""
  return (lambda c: (jnp.zeros(c.lse_s.max.shape, _F32), ())), (
      lambda c, _: jnp.zeros_like(c.q))


class _Mix(NamedTuple):
  """The mixture ``m = a·p + (1−a)·q`` of one position, elementwise."""
  log_m: Array
  p_m: Array  # p / m ≤ 1 / a
  q_m: Array  # q / m ≤ 1 / (1 − a)


def _mix(c: _Ctx, a: float) -> _Mix:
  """``log m``, ``p/m`` and ``q/m`` with one ``exp`` and one ``log`` per entry.

  With ``d = log p − log q`` and ``u = exp(−|d|) ∈ (0, 1]`` the smaller of
  ``p, q`` is ``u`` times the larger, so ``m = max(p, q)·A`` with
  ``A = a + (1−a)·u`` (if ``p ≥ q``) or ``a·u + (1−a)`` (otherwise), and
  ``A ≥ min(a, 1−a) > 0``. A logaddexp and two ratio exps would cost four
  transcendentals per entry, which is what bounds these divergences on CPU.
  """
  d = c.log_p - c.log_q
  u = jnp.exp(-jnp.abs(d))
  p_larger = d >= 0
  big = jnp.where(p_larger, a + (1.0 - a) * u, a * u + (1.0 - a))
  inv = 1.0 / big
  return _Mix(jnp.maximum(c.log_p, c.log_q) + jnp.log(big),
              jnp.where(p_larger, inv, u * inv),
              jnp.where(p_larger, u * inv, inv))


def _skl(alpha: float):
  if alpha == 0.0:
    return _fkl()
  if alpha == 1.0:
    return _zero()
  # m = α p + (1−α) q;  G = −(1−α) p/m.
  g_fn = lambda c: -(1.0 - alpha) * _mix(c, alpha).p_m
  const, grad = _centered(g_fn)

  def forward(c):
    return _kl(c, c.p, c.log_p, _mix(c, alpha).log_m), const(c)

  return forward, grad


def _srkl(alpha: float):
  if alpha == 0.0:
    return _rkl()
  if alpha == 1.0:
    return _zero()

  def g_fn(c):  # m' = (1−α) p + α q;  G = log(q/m') − α q/m'
    mix = _mix(c, 1.0 - alpha)
    return (c.log_q - mix.log_m) - alpha * mix.q_m

  const, grad = _centered(g_fn)

  def forward(c):
    return _kl(c, c.q, c.log_q, _mix(c, 1.0 - alpha).log_m), const(c)

  return forward, grad


def _jsd(beta: float):
  if beta == 0.0:
    return _fkl()
  if beta == 1.0:
    return _rkl()
  # m = β p + (1−β) q;  G = (1−β) log(q/m).
  g_fn = lambda c: (1.0 - beta) * (c.log_q - _mix(c, beta).log_m)
  const, grad = _centered(g_fn)

  def forward(c):
    # The q-half of the value, (1−β) KL(q‖m), is the row constant Σ q G.
    const_q = const(c)
    return beta * _kl(c, c.p, c.log_p, _mix(c, beta).log_m) + const_q, const_q

  return forward, grad


def _tvd():
  def g_fn(c):
    # sign(q − p) from the log-probabilities: no exp for p, and exact where
    # both slots are -inf (neither comparison holds).
    log_q = c.lse_s.log_prob(c.s, c.temperature)
    log_p = c.lse_t.log_prob(c.t, c.temperature)
    return 0.5 * ((log_q > log_p).astype(_F32) - (log_q < log_p).astype(_F32))

  const, grad = _centered(g_fn)
  return (lambda c: (0.5 * c.sum(core._abs(c.p - c.q)), const(c))), grad


def _akl_topk(c: _Ctx, mu: float, rule: str) -> tuple[Array, Array]:
  """AKL ``w_head`` from the teacher's top-k, and which rows it settles.

  Same weights as :func:`kdjax.divergences.core.akl_weights` with
  ``order=teacher_logits``: the top-k is taken over the logits, the exact order
  of ``p``. Unsettled rows are finished by ``finish`` in :func:`_akl`, over
  the whole batch.
  """
  k = min(core.AKL_TOP_K, c.t.shape[-1])
  top_t, idx = core.top_k(c.t, k)
  to_prob = lambda x, lse: jnp.exp(lse.log_prob(x, c.temperature))
  top_p = to_prob(top_t, c.lse_t)
  top_q = to_prob(jnp.take_along_axis(c.s, idx, axis=-1), c.lse_s)
  err_total = c.sum(core._abs(c.p - c.q))
  return core._akl_head_weight_topk(top_p, top_q, err_total, mu, rule)


def _akl(mu: float, rule: str):
  def forward(c):  # per row; the weights are settled by finish
    return (_fkl_value(c), _rkl_value(c)), _akl_topk(c, mu, rule)

  def finish(parts, const, rows, budget):
    (fkl, rkl), (w_head, resolved) = parts, const
    w_head = core._akl_fallback(w_head.reshape(-1), resolved.reshape(-1),
                                rows, mu, rule, budget).reshape(w_head.shape)
    w_head = jax.lax.stop_gradient(w_head)
    return w_head * fkl + (1.0 - w_head) * rkl, (w_head, rkl)

  def grad(c, const):
    w_head, rkl = (x[..., None] for x in const)
    return (w_head * (c.q - c.p)
            + (1.0 - w_head) * c.q * (c.log_q - c.log_p - rkl))

  return forward, grad, finish


def _check_hp(name: str, hp: dict[str, Any]) -> tuple:
  """Validated static hyper-parameters, in the order the spec takes them."""
  if name == "fkl_rkl":
    return (core._unit("weight", hp.pop("weight", 0.5)),)
  if name in ("skl", "srkl"):
    return (core._unit("alpha", hp.pop("alpha", 0.1)),)
  if name == "jsd":
    return (core._unit("beta", hp.pop("beta", 0.5)),)
  if name == "akl":
    rule = hp.pop("rule", "akl")
    return (core._check_akl(hp.pop("mu", 0.5), rule), rule)
  return ()


_SPECS = {"fkl": _fkl, "rkl": _rkl, "fkl_rkl": _fkl_rkl, "skl": _skl,
          "srkl": _srkl, "jsd": _jsd, "tvd": _tvd, "akl": _akl}
NAMES = tuple(_SPECS)


# ----------------------------------------------------------------------------
# The custom_vjp operator per (divergence, hyper-parameters, temperature).


def _row_stats(s: Array, t: Array, temperature: float, row_sum: Callable):
  if s.shape != t.shape:
    raise ValueError(
        f"student logits {s.shape} and teacher logits {t.shape} differ in "
        "shape; token-level divergences need the same positions and "
        "vocabulary (use uld for different vocabularies).")
  return _lse(s, temperature, row_sum), _lse(t, temperature, row_sum)


class _Op(NamedTuple):
  """One divergence with fixed hyper-parameters and temperature.

  ``forward(s, t) -> (value, stats)`` works row by row and keeps only per-row
  ``stats``; ``finish(value, stats, s, t)`` then settles what needs all rows
  at once (AKL's exact fallback, with one budget for the whole batch);
  ``backward(s, t, stats, g) -> ∂`` is the VJP for per-row cotangents ``g``.
  :func:`kdjax.divergences.fused.chunked` runs forward and backward over token
  chunks and finish once in between.
  """
  op: Callable[[Array, Array], Array]
  value_and_grad: Callable[[Array, Array], tuple[Array, Array]]
  forward: Callable
  finish: Callable
  backward: Callable


def _prob_rows(s: Array, t: Array, lse_s: _Lse, lse_t: _Lse,
               temperature: float):
  """``index_R -> (p_R, q_R, t_R)``: full probability rows of the flattened
  tokens and the teacher logits that order them (AKL's tie rule)."""
  # NumPy logits must become jax arrays: they are indexed by tracers.
  s, t, vocab = jnp.asarray(s), jnp.asarray(t), s.shape[-1]

  def rows(index_R):
    prob = lambda x, lse: jnp.exp(_Lse(*(a.reshape(-1)[index_R] for a in lse))
                                  .log_prob(x.reshape(-1, vocab)[index_R],
                                            temperature))
    return prob(t, lse_t), prob(s, lse_s), t.reshape(-1, vocab)[index_R]

  return rows


@functools.lru_cache(maxsize=None)
def _operator(name: str, hp: tuple, temperature: float, chunk: bool) -> _Op:
  forward, grad, *finish = _SPECS[name](*hp)
  # On CPU a chunk's sums are a matvec with ones (core._row_sum); the unchunked
  # operator keeps jnp.sum, whose fused reduction needs no [N, V] input buffer.
  row_sum = core._row_sum if chunk else core._reduce_sum
  context = lambda s, t, lse_s, lse_t: _context(s, t, lse_s, lse_t,
                                                temperature, row_sum)

  def forward_rows(s, t):
    lse_s, lse_t = _row_stats(s, t, temperature, row_sum)
    value, const = forward(context(s, t, lse_s, lse_t))
    return value, (lse_s, lse_t, const)

  def finish_rows(value, stats, s, t, budget=None):
    """Settles what needs every row at once (AKL's exact fallback), touching
    at most ``budget`` rows at a time (default ``max(8, N/16)``)."""
    if not finish:
      return value, stats
    lse_s, lse_t, const = stats
    rows = _prob_rows(s, t, lse_s, lse_t, temperature)
    value, const = finish[0](value, const, rows, budget)
    return value, (lse_s, lse_t, const)

  def run_forward(s, t):
    return finish_rows(*forward_rows(s, t), s, t)

  def run_backward(s, t, stats, g):
    lse_s, lse_t, const = stats
    c = context(s, t, lse_s, lse_t)
    scale = (g.astype(_F32) / temperature)[..., None]
    return (grad(c, const) * scale).astype(s.dtype)

  @jax.custom_vjp
  def op(s, t):
    return run_forward(s, t)[0]

  def op_fwd(s, t):
    value, stats = run_forward(s, t)
    return value, (s, t, stats)

  def op_bwd(res, g):
    return run_backward(*res, g), None

  op.defvjp(op_fwd, op_bwd)

  def value_and_grad(s, t):
    value, (lse_s, lse_t, const) = run_forward(s, t)
    return value, grad(context(s, t, lse_s, lse_t), const) / temperature

  return _Op(op, value_and_grad, forward_rows, finish_rows, run_backward)


def _resolve(name: str, temperature, hp: dict[str, Any],
             chunk: bool = False) -> _Op:
  """The operator for ``name``; ``chunk`` marks callers that pass token chunks
  (their vocabulary sums may materialise their input, see core._row_sum)."""
  if name not in _SPECS:
    raise ValueError(f"no fast implementation of {name!r}; choose one of "
                     f"{', '.join(NAMES)}.")
  if isinstance(temperature, jax.core.Tracer):
    raise TypeError("temperature must be a static Python float for the fast "
                    "divergences; bind it with functools.partial outside jit.")
  core._check_temperature(temperature)
  hp = dict(hp)
  args = _check_hp(name, hp)
  if hp:
    raise TypeError(f"{name} takes no hyper-parameter(s) {sorted(hp)}.")
  return _operator(name, args, float(temperature), chunk)


def value_and_grad(name: str, *, temperature: float = 1.0,
                   **hp) -> Callable[[Array, Array], tuple[Array, Array]]:
  """``(s, t) -> (D [...], ∂D/∂s [..., V] float32)`` in one forward pass."""
  return _resolve(name, temperature, hp).value_and_grad


def _public(name: str):
  def divergence(student_logits: Array, teacher_logits: Array, *,
                 temperature: float = 1.0, **hp) -> Array:
    op = _resolve(name, temperature, hp).op
    return op(student_logits, jax.lax.stop_gradient(teacher_logits))

  reference = getattr(core, name)
  divergence.__name__ = divergence.__qualname__ = name
  divergence.__doc__ = (
      f"{reference.__doc__}\n  Fast implementation: analytic VJP "
      "(kdjax.divergences.fast); hyper-parameters are keyword-only and static.")
  return divergence


fkl = _public("fkl")
rkl = _public("rkl")
fkl_rkl = _public("fkl_rkl")
skl = _public("skl")
srkl = _public("srkl")
jsd = _public("jsd")
tvd = _public("tvd")
akl = _public("akl")


def akl_unresolved_fraction(teacher_logits: Array, *, mu: float = 0.5,
                            rule: str = "akl",
                            temperature: float = 1.0) -> Array:
  """Fraction of rows whose top-``AKL_TOP_K`` teacher mass does not settle the
  AKL head, i.e. rows that take the exact threshold-search fallback. Log it to check
  that the fallback stays rare on real teacher distributions."""
  mu = core._check_akl(mu, rule)
  lse_t = _lse(teacher_logits, temperature, core._reduce_sum)
  top_t, _ = core.top_k(teacher_logits,
                        min(core.AKL_TOP_K, teacher_logits.shape[-1]))
  mass = core._reduce_sum(jnp.exp(lse_t.log_prob(top_t, temperature)))
  resolved = (mass > mu) if rule == "akl" else (mass >= mu)
  return jnp.mean(1.0 - resolved.astype(_F32))
