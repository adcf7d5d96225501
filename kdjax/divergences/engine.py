"""The token-level divergences: one implementation each, and it is the public one.

``kd.fkl(student_logits, teacher_logits)`` and the others are memory-lean and
pick their own execution; the math of each lives once, in a :class:`Spec`:

* ``forward(ctx, hp) -> (value, const)``: the per-row value and the per-row
  constants the gradient needs;
* ``grad(ctx, hp, const) -> ∂D/∂(s/T)``: the gradient in closed form
  (docs/divergences.md, "Gradients in closed form"). With ``G_v = ∂D/∂q_v``,

      ∂D/∂s_v = q_v (G_v − c) / T,   c = Σ_u q_u G_u   (a per-row constant),

  so nothing of size ``[N, V]`` is kept between the passes, only the two
  log-partition functions and ``c`` of each row.

:func:`rows_forward` and :func:`rows_grad` apply a spec to a block of rows;
every execution path calls them and nothing else computes a divergence:
the whole ``[N, V]`` at once, token chunks of it (``lax.map``, memory
O(chunk · V)), or :mod:`kdjax.divergences.fused`, which forms each chunk's
logits from hidden states and LM heads. The public functions choose the
chunking (docs/divergences.md, "Chunked and fused execution"): on CPU, chunks
of about ``_CPU_CHUNK_BYTES`` per logits array, which stay in cache between
the passes; elsewhere the whole array, which XLA fuses into a few streaming
reductions. ``chunk_size=`` overrides the choice (0: one piece).

Hyper-parameters and the temperature may be jax arrays (traced under jit or
vmap); they are constants for differentiation, like the teacher. Where a
family has separate formulas at its endpoints (JSD's β ∈ {0, 1}, the skew
divergences' α ∈ {0, 1}, ABKD's α = 0 or β = 0), a concrete value picks its
formula when the function is traced, and a traced value evaluates each
formula and selects per row with ``jnp.where``, so the endpoints stay exact.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from kdjax.divergences import core

Array = jax.Array
_F32 = jnp.float32
_POSITIONAL = inspect.Parameter.POSITIONAL_OR_KEYWORD

# CPU chunks hold about this many bytes per [chunk, V] float32 array (41
# tokens at V = 50257, 16 at V = 128256): a chunk's passes then run in cache.
_CPU_CHUNK_BYTES = 8 << 20


# ----------------------------------------------------------------------------
# Per-row statistics and the elementwise view of a block of rows.


class Lse(NamedTuple):
  """``logsumexp(x / T)`` per row, kept as ``max + log Σ exp(x / T − max)``.

  Log-probabilities are ``(x / T − max) − log_sum``, the order of
  ``jax.nn.log_softmax``: ``x / T − max`` is exact for the largest logits. A
  single float32 partition rounds to ``eps·|max|`` (2e-3 at ``|x / T| = 2e4``),
  which would scale every probability by up to ``exp(±4e-3)``.
  """

  max: Array  # [...]
  log_sum: Array  # [...]

  def log_prob(self, x: Array, temperature) -> Array:
    return (x.astype(_F32) / temperature - self.max[..., None]) - self.log_sum[
        ..., None
    ]


def _lse(x: Array, temperature) -> Lse:
  # max(x) / T equals max(x / T) bit for bit (rounding is monotone, T > 0).
  row_max = jnp.max(x, axis=-1).astype(_F32) / temperature
  shifted = x.astype(_F32) / temperature - row_max[..., None]
  return Lse(row_max, jnp.log(core._row_sum(jnp.exp(shifted))))


class Ctx(NamedTuple):
  """Everything a formula may use, elementwise ``[R, V]`` or per row ``[R]``.

  XLA fuses what a formula uses and drops the rest.
  """

  s: Array  # student logits, input dtype
  t: Array  # teacher logits, input dtype
  lse_s: Lse  # log-partition of s / T
  lse_t: Lse  # log-partition of t / T
  temperature: Array
  log_q: Array  # finite student log-probs (0 in -inf slots)
  log_p: Array  # teacher log-probs: 0 where the student is -inf, -inf where
  # the teacher alone is (core.finite_pair)
  q: Array  # student probabilities
  p: Array  # teacher probabilities


def _context(s, t, lse_s: Lse, lse_t: Lse, temperature) -> Ctx:
  ls, lt = lse_s.log_prob(s, temperature), lse_t.log_prob(t, temperature)
  log_q, log_p = core.finite_pair(ls, lt)
  return Ctx(
      s, t, lse_s, lse_t, temperature, log_q, log_p, jnp.exp(ls), jnp.exp(lt)
  )


def _sum(x: Array) -> Array:
  return core._row_sum(x)


def _kl(w: Array, log_w: Array, log_v: Array) -> Array:
  """``Σ_v w_v (log w_v − log v_v)``, each term exactly 0 where ``w_v = 0``."""
  return _sum(jnp.where(w > 0, w * (log_w - log_v), 0.0))


# ----------------------------------------------------------------------------
# The math: one Spec per divergence (and per endpoint formula).


class Spec(NamedTuple):
  """A divergence's closed forms. ``hp`` maps names to float32 scalars.

  ``finish(parts, const, rows, hp, budget) -> (value, const)`` settles what
  needs all rows at once (AKL's exact fallback); ``rows(index_R)`` returns
  full probability rows. None for every other divergence.
  """

  forward: Callable[[Ctx, dict], tuple[Any, Any]]
  grad: Callable[[Ctx, dict, Any], Array]
  finish: Callable | None = None


def _fkl_value(c: Ctx) -> Array:
  return _kl(c.p, c.log_p, c.log_q)


def _rkl_value(c: Ctx) -> Array:
  # +inf where the teacher is 0 at a slot the student covers (also where q
  # underflows there: q > 0 in exact arithmetic).
  return jnp.where(
      core.off_support(c.log_p), jnp.inf, _kl(c.q, c.log_q, c.log_p)
  )


def _rkl_grad(c: Ctx, rkl: Array) -> Array:
  # G = log q − log p + 1; the +1 cancels against c = RKL + 1. 0 on rows
  # where RKL is +inf for every student (core.off_support).
  grad = c.q * (c.log_q - c.log_p - rkl[..., None])
  return jnp.where(jnp.isinf(rkl)[..., None], 0.0, grad)


def _blend(w, a: Array, b: Array) -> Array:
  """``w·a + (1 − w)·b``; a zero weight drops its term, even an infinite one."""
  return jnp.where(w > 0, w * a, 0.0) + jnp.where(w < 1, (1.0 - w) * b, 0.0)


def _rkl_forward(c, _):
  value = _rkl_value(c)
  return value, value


FKL = Spec(lambda c, _: (_fkl_value(c), ()), lambda c, _, __: c.q - c.p)
RKL = Spec(_rkl_forward, lambda c, _, rkl: _rkl_grad(c, rkl))
ZERO = Spec(
    lambda c, _: (jnp.zeros(c.lse_s.max.shape, _F32), ()),
    lambda c, _, __: jnp.zeros_like(c.q),
)


def _fkl_rkl_forward(c, hp):
  w, rkl = hp["weight"], _rkl_value(c)
  return _blend(w, _fkl_value(c), rkl), rkl


def _fkl_rkl_grad(c, hp, rkl):
  w = hp["weight"]
  return w * (c.q - c.p) + (1.0 - w) * _rkl_grad(c, rkl)


FKL_RKL = Spec(_fkl_rkl_forward, _fkl_rkl_grad)


def _centered(value_fn, g_fn) -> Spec:
  """Spec from ``value_fn(c, hp) -> (value, Σ q G or None)`` and ``G``."""

  def forward(c, hp):
    const = _sum(c.q * g_fn(c, hp))
    return value_fn(c, hp, const), const

  def grad(c, hp, const):
    return c.q * (g_fn(c, hp) - const[..., None])

  return Spec(forward, grad)


class _Mix(NamedTuple):
  """The mixture ``m = a·p + (1−a)·q`` of one position, elementwise."""

  log_m: Array
  p_m: Array  # p / m ≤ 1 / a
  q_m: Array  # q / m ≤ 1 / (1 − a)


def _mix(c: Ctx, a) -> _Mix:
  """``log m``, ``p/m`` and ``q/m`` with one ``exp`` and one ``log`` per entry.

  With ``d = log p − log q`` and ``u = exp(−|d|) ∈ (0, 1]`` the smaller of
  ``p, q`` is ``u`` times the larger, so ``m = max(p, q)·A`` with
  ``A = a + (1−a)·u`` (if ``p ≥ q``) or ``a·u + (1−a)`` (otherwise), and
  ``A ≥ min(a, 1−a) > 0`` for ``0 < a < 1``. A logaddexp and two ratio exps
  would cost four transcendentals per entry, which is what bounds these
  divergences on CPU.
  """
  d = c.log_p - c.log_q
  u = jnp.exp(-jnp.abs(d))
  p_larger = d >= 0
  big = jnp.where(p_larger, a + (1.0 - a) * u, a * u + (1.0 - a))
  inv = 1.0 / big
  return _Mix(
      jnp.maximum(c.log_p, c.log_q) + jnp.log(big),
      jnp.where(p_larger, inv, u * inv),
      jnp.where(p_larger, u * inv, inv),
  )


# skl: m = α p + (1−α) q, D = KL(p‖m), G = −(1−α) p/m.
SKL = _centered(
    lambda c, hp, _: _kl(c.p, c.log_p, _mix(c, hp["alpha"]).log_m),
    lambda c, hp: -(1.0 - hp["alpha"]) * _mix(c, hp["alpha"]).p_m,
)


def _srkl_g(c, hp):
  # m' = (1−α) p + α q, D = KL(q‖m'), G = log(q/m') + 1 − α q/m' (the +1
  # cancels in q (G − c)).
  a = hp["alpha"]
  mix = _mix(c, 1.0 - a)
  return (c.log_q - mix.log_m) - a * mix.q_m


SRKL = _centered(
    lambda c, hp, _: _kl(c.q, c.log_q, _mix(c, 1.0 - hp["alpha"]).log_m),
    _srkl_g,
)

# jsd: m = β p + (1−β) q, G = (1−β) log(q/m); the q-half of the value,
# (1−β) KL(q‖m), is the row constant Σ q G itself.
JSD = _centered(
    lambda c, hp, q_half: (
        hp["beta"] * _kl(c.p, c.log_p, _mix(c, hp["beta"]).log_m) + q_half
    ),
    lambda c, hp: (1.0 - hp["beta"]) * (c.log_q - _mix(c, hp["beta"]).log_m),
)


def _tvd_g(c, _):
  # sign(q − p) from the log-probabilities: exact where both slots are -inf
  # (neither comparison holds).
  log_q = c.lse_s.log_prob(c.s, c.temperature)
  log_p = c.lse_t.log_prob(c.t, c.temperature)
  return 0.5 * ((log_q > log_p).astype(_F32) - (log_q < log_p).astype(_F32))


TVD = _centered(lambda c, _, __: 0.5 * _sum(core._abs(c.p - c.q)), _tvd_g)


def _endpoint_select(key: str, at0: Spec, at1: Spec, inside: Spec) -> Spec:
  """``at0`` where ``hp[key] == 0``, ``at1`` where 1, else ``inside``,
  chosen per row at run time (``hp[key]`` is traced). ``inside`` sees 0.5 at
  the endpoints, so no branch produces a non-finite value to select away."""

  def split(hp):
    x = hp[key]
    return x, {**hp, key: jnp.where((x > 0) & (x < 1), x, 0.5)}

  def pick(x, v0, v1, vi):
    return jnp.where(x == 0, v0, jnp.where(x == 1, v1, vi))

  def forward(c, hp):
    x, hp_in = split(hp)
    (v0, k0), (v1, k1), (vi, ki) = (
        at0.forward(c, hp),
        at1.forward(c, hp),
        inside.forward(c, hp_in),
    )
    return pick(x, v0, v1, vi), (k0, k1, ki)

  def grad(c, hp, const):
    x, hp_in = split(hp)
    k0, k1, ki = const
    return pick(
        x, at0.grad(c, hp, k0), at1.grad(c, hp, k1), inside.grad(c, hp_in, ki)
    )

  return Spec(forward, grad)


# ---- ABKD: D_AB(p‖q) = −1/(αβ) Σ [p^α q^β − α/(α+β) p^(α+β) − β/(α+β) q^(α+β)]


def _pow(prob: Array, log_prob: Array, a) -> Array:
  return jnp.where(prob > 0, jnp.exp(a * log_prob), 0.0)


def _log_ratio(c: Ctx) -> Array:
  """``log q − log p``; 0 in shared -inf slots (both finite-ised to 0), +inf
  where the teacher alone is -inf (those rows are settled by
  :func:`core.off_support`)."""
  return c.log_q - c.log_p


def _if_supported(c: Ctx, value: Array, grad: Array | None = None):
  """``+inf`` values and 0 gradients on rows where the teacher is 0 at a slot
  the student covers: the α = 0 limits contain ``q^β log(q/p)``."""
  off = core.off_support(c.log_p)
  if grad is None:
    return jnp.where(off, jnp.inf, value)
  return jnp.where(off[..., None], 0.0, grad)


def _ab_gap(c, hp):
  """``αβ·D_AB`` per entry as a Jensen gap, without cancellation at p ≈ q.

  With ``a = log p``, ``b = log q``, ``λ = α + β``, ``w = α/λ``:
  ``w p^λ + (1−w) q^λ − p^α q^β = e^(λ·max(a, b)) [u·expm1(δ) − expm1(u·δ)]``
  where ``δ = −λ|a − b| ≤ 0`` and ``u`` is the weight (``1−w`` or ``w``) of
  the smaller of p, q. Exactly 0 where ``p = q`` (also in shared -inf slots,
  whose finite log-probabilities are both 0), never overflowing.
  """
  a, b = hp["alpha"], hp["beta"]
  lam = a + b
  p_larger = c.log_p >= c.log_q
  u = jnp.where(p_larger, b / lam, a / lam)
  delta = -lam * jnp.abs(c.log_p - c.log_q)
  scale = jnp.exp(lam * jnp.maximum(c.log_p, c.log_q))
  return scale * (u * jnp.expm1(delta) - jnp.expm1(u * delta))


def _ab_mixed_minus_q(c, hp):
  """``p^α q^β − q^(α+β)`` without overflow or cancellation at p ≈ q."""
  a, b = hp["alpha"], hp["beta"]
  x = a * (c.log_p - c.log_q)  # log(p^α q^β / q^(α+β))
  value = jnp.where(
      x <= 0,
      jnp.exp((a + b) * c.log_q) * jnp.expm1(x),
      -jnp.exp(a * c.log_p + b * c.log_q) * jnp.expm1(-x),
  )
  return jnp.where((c.p > 0) | (c.q > 0), value, 0.0)


def _ab_forward(c, hp):
  value = _sum(_ab_gap(c, hp)) / (hp["alpha"] * hp["beta"])
  return value, _sum(_ab_mixed_minus_q(c, hp))


def _ab_grad(c, hp, const):
  # q G = −(p^α q^β − q^(α+β)) / α.
  return (c.q * const[..., None] - _ab_mixed_minus_q(c, hp)) / hp["alpha"]


def _ab_alpha0_forward(c, hp):
  # α → 0: Σ [q^β log(q/p) / β − (q^β − p^β) / β²];  q G = q^β log(q/p).
  b = hp["beta"]
  q_b, r = _pow(c.q, c.log_q, b), _log_ratio(c)
  value = _sum(q_b * r / b - (q_b - _pow(c.p, c.log_p, b)) / b**2)
  return _if_supported(c, value), _sum(q_b * r)


def _ab_alpha0_grad(c, hp, const):
  grad = _pow(c.q, c.log_q, hp["beta"]) * _log_ratio(c) - c.q * const[..., None]
  return _if_supported(c, None, grad)


def _ab_beta0_forward(c, hp):
  # β → 0: Σ [p^α log(p/q) / α − (p^α − q^α) / α²];  q G = −(p^α − q^α) / α.
  a = hp["alpha"]
  p_a, q_a = _pow(c.p, c.log_p, a), _pow(c.q, c.log_q, a)
  # p^α log(p/q) → 0 as p → 0 (α > 0); p_a = 0 where log(p/q) may be -inf.
  p_log = jnp.where(p_a > 0, p_a * _log_ratio(c), 0.0)
  value = _sum(-p_log / a - (p_a - q_a) / a**2)
  return value, _sum(p_a - q_a)


def _ab_beta0_grad(c, hp, const):
  a = hp["alpha"]
  p_a, q_a = _pow(c.p, c.log_p, a), _pow(c.q, c.log_q, a)
  return (c.q * const[..., None] - (p_a - q_a)) / a


def _ab_zero_forward(c, _):
  # α = β = 0: ½ Σ (log q − log p)²;  q G = log(q/p).
  r = _log_ratio(c)
  return _if_supported(c, 0.5 * _sum(r * r)), _sum(r)


def _ab_zero_grad(c, _, const):
  return _if_supported(c, None, _log_ratio(c) - c.q * const[..., None])


ABKD = Spec(_ab_forward, _ab_grad)
ABKD_ALPHA0 = Spec(_ab_alpha0_forward, _ab_alpha0_grad)
ABKD_BETA0 = Spec(_ab_beta0_forward, _ab_beta0_grad)
ABKD_ZERO = Spec(_ab_zero_forward, _ab_zero_grad)


def _abkd_select() -> Spec:
  """All four ABKD formulas, chosen per row by traced ``alpha`` and ``beta``;
  each formula sees a safe 0.5 where it does not apply."""

  def cases(hp):
    a, b = hp["alpha"], hp["beta"]
    safe = lambda x, ok: jnp.where(ok, x, 0.5)
    general = {
        "alpha": safe(a, (a > 0) & (b > 0)),
        "beta": safe(b, (a > 0) & (b > 0)),
    }
    return (
        a,
        b,
        (
            (ABKD_ZERO, hp),
            (ABKD_ALPHA0, {"beta": safe(b, b > 0)}),
            (ABKD_BETA0, {"alpha": safe(a, a > 0)}),
            (ABKD, general),
        ),
    )

  def pick(a, b, zero, alpha0, beta0, general):
    return jnp.where(
        a == 0,
        jnp.where(b == 0, zero, alpha0),
        jnp.where(b == 0, beta0, general),
    )

  def forward(c, hp):
    a, b, specs = cases(hp)
    outs = [spec.forward(c, h) for spec, h in specs]
    return pick(a, b, *(v for v, _ in outs)), tuple(k for _, k in outs)

  def grad(c, hp, const):
    a, b, specs = cases(hp)
    return pick(
        a, b, *(spec.grad(c, h, k) for (spec, h), k in zip(specs, const))
    )

  return Spec(forward, grad)


# ---- AKL: w_head·KL(p‖q) + w_tail·KL(q‖p), weights constant.


def _akl(rule: str) -> Spec:
  def forward(c, hp):
    # w_head from the teacher's top-k (taken over the logits, the exact order
    # of p); rows it does not settle are finished over the whole batch.
    k = min(core.AKL_TOP_K, c.t.shape[-1])
    top_t, idx = core.top_k(c.t, k)
    to_prob = lambda x, lse: jnp.exp(lse.log_prob(x, c.temperature))
    top_p = to_prob(top_t, c.lse_t)
    top_q = to_prob(jnp.take_along_axis(c.s, idx, axis=-1), c.lse_s)
    err_total = _sum(core._abs(c.p - c.q))
    weights = core._akl_head_weight_topk(
        top_p, top_q, err_total, hp["mu"], rule
    )
    return (_fkl_value(c), _rkl_value(c)), weights

  def finish(parts, const, rows, hp, budget):
    (fkl, rkl), (w_head, resolved) = parts, const
    w_head = core._akl_fallback(
        w_head.reshape(-1), resolved.reshape(-1), rows, hp["mu"], rule, budget
    ).reshape(w_head.shape)
    w_head = jax.lax.stop_gradient(w_head)
    return _blend(w_head, fkl, rkl), (w_head, rkl)

  def grad(c, _, const):
    w_head, rkl = const
    return w_head[..., None] * (c.q - c.p) + (
        1.0 - w_head[..., None]
    ) * _rkl_grad(c, rkl)

  return Spec(forward, grad, finish)


# name -> {hyper-parameter: default}: float32 scalars, possibly traced. The
# public functions take them as keyword-only parameters with these defaults.
HYPER_PARAMETERS = {
    "fkl": {},
    "rkl": {},
    "fkl_rkl": {"weight": 0.5},
    "skl": {"alpha": 0.1},
    "srkl": {"alpha": 0.1},
    "jsd": {"beta": 0.5},
    "tvd": {},
    "akl": {"mu": 0.5},
    "abkd": {"alpha": 0.2, "beta": 0.7},
}
NAMES = tuple(HYPER_PARAMETERS)
# name -> {option: default}: settings that pick a formula, static under jit.
STATIC_OPTIONS = {"akl": {"rule": "akl"}}


def _branch(x) -> str:
  """Which formula a [0, 1] hyper-parameter selects at trace time."""
  static = core.static_value(x)
  if static is None:
    return "traced"
  return {0.0: "at0", 1.0: "at1"}.get(static, "inside")


def _ab_branch(alpha, beta) -> str:
  a, b = core.static_value(alpha), core.static_value(beta)
  if a is None or b is None:
    return "traced"
  return {
      (True, True): "zero",
      (True, False): "alpha0",
      (False, True): "beta0",
  }.get((a == 0.0, b == 0.0), "general")


@functools.lru_cache(maxsize=None)
def spec(name: str, branch: str = "", rule: str = "akl") -> Spec:
  """The :class:`Spec` of ``name`` for an endpoint ``branch`` (see
  :func:`_branch`) and AKL ``rule``."""
  endpoints = {
      "skl": (FKL, ZERO, SKL, "alpha"),
      "srkl": (RKL, ZERO, SRKL, "alpha"),
      "jsd": (FKL, RKL, JSD, "beta"),
  }
  if name in endpoints:
    at0, at1, inside, key = endpoints[name]
    return {"at0": at0, "at1": at1, "inside": inside}.get(
        branch
    ) or _endpoint_select(key, at0, at1, inside)
  if name == "abkd":
    return {
        "zero": ABKD_ZERO,
        "alpha0": ABKD_ALPHA0,
        "beta0": ABKD_BETA0,
        "general": ABKD,
    }.get(branch) or _abkd_select()
  if name == "akl":
    return _akl(rule)
  return {"fkl": FKL, "rkl": RKL, "fkl_rkl": FKL_RKL, "tvd": TVD}[name]


def resolve(name: str, temperature, hp: dict[str, Any]) -> tuple[Spec, dict]:
  """Validated ``(spec, params)``; ``params`` holds the temperature and every
  hyper-parameter as float32 scalars (constants for differentiation)."""
  if name not in HYPER_PARAMETERS:
    raise ValueError(
        f"{name!r} is not a token-level divergence; choose one "
        f"of {', '.join(NAMES)}."
    )
  hp = dict(hp)
  rule = hp.pop("rule", "akl") if name == "akl" else "akl"
  unknown = sorted(set(hp) - set(HYPER_PARAMETERS[name]))
  if unknown:
    raise TypeError(
        f"{name} takes no hyper-parameter(s) {unknown}; it takes "
        f"{sorted(HYPER_PARAMETERS[name]) or 'none'}."
    )
  values = {**HYPER_PARAMETERS[name], **hp}
  core._check_temperature(temperature)
  if name == "abkd":
    for key, value in values.items():
      static = core.static_value(value)
      if static is not None and static < 0:
        raise ValueError(f"abkd {key}={static:g} must be >= 0.")
    branch = _ab_branch(values["alpha"], values["beta"])
  else:
    for key, value in values.items():
      core._unit(key, value)
    branch = _branch(next(iter(values.values()))) if values else ""
  if name == "akl":
    core._check_akl(values["mu"], rule)
    branch = ""
  params = {
      key: jax.lax.stop_gradient(jnp.asarray(value, _F32))
      for key, value in {**values, "temperature": temperature}.items()
  }
  return spec(name, branch, rule), params


# ----------------------------------------------------------------------------
# The canonical per-block functions: every path computes a divergence here.


def rows_forward(sp: Spec, s: Array, t: Array, params: dict):
  """``(value [R], stats)`` of the rows ``s, t [R, V]``; ``stats`` holds only
  per-row arrays (the two log-partitions and the spec's constants)."""
  temperature = params["temperature"]
  lse_s, lse_t = _lse(s, temperature), _lse(t, temperature)
  value, const = sp.forward(_context(s, t, lse_s, lse_t, temperature), params)
  return value, (lse_s, lse_t, const)


def rows_grad(sp: Spec, s: Array, t: Array, params: dict, stats) -> Array:
  """``∂D/∂s [R, V]`` float32 (unit cotangent per row) from the forward's
  ``stats``."""
  lse_s, lse_t, const = stats
  temperature = params["temperature"]
  c = _context(s, t, lse_s, lse_t, temperature)
  return sp.grad(c, params, const) / temperature


def finish(
    sp: Spec,
    value,
    stats,
    s: Array,
    t: Array,
    params: dict,
    budget: int | None = None,
):
  """Settles what needs every row at once (AKL's exact fallback, at most
  ``budget`` rows at a time); identity for the other divergences."""
  if sp.finish is None:
    return value, stats
  lse_s, lse_t, const = stats
  rows = _prob_rows(s, t, lse_s, lse_t, params["temperature"])
  value, const = sp.finish(value, const, rows, params, budget)
  return value, (lse_s, lse_t, const)


def value_and_grad(sp: Spec, s: Array, t: Array, params: dict):
  """``(D [R], ∂D/∂s [R, V] float32)`` of one block of rows, in one forward
  computation (the fused LM-head path)."""
  value, stats = rows_forward(sp, s, t, params)
  value, stats = finish(sp, value, stats, s, t, params)
  return value, rows_grad(sp, s, t, params, stats)


def _prob_rows(s: Array, t: Array, lse_s: Lse, lse_t: Lse, temperature):
  """``index_R -> (p_R, q_R, t_R)``: full probability rows and the teacher
  logits that order them (AKL's tie rule)."""
  vocab = s.shape[-1]

  def rows(index_R):
    def prob(x, lse):
      row = Lse(*(a.reshape(-1)[index_R] for a in lse))
      return jnp.exp(row.log_prob(x.reshape(-1, vocab)[index_R], temperature))

    return prob(t, lse_t), prob(s, lse_s), t.reshape(-1, vocab)[index_R]

  return rows


# ----------------------------------------------------------------------------
# Execution over token chunks.


def chunk_rows(n_tokens: int, vocab: int, chunk_size: int | None) -> int:
  """Tokens per chunk: ``chunk_size`` if given (0: all), else automatic."""
  if chunk_size is None:
    if jax.default_backend() != "cpu":
      return max(n_tokens, 1)
    target = max(8, _CPU_CHUNK_BYTES // (4 * vocab))
    # Prefer a size dividing N: a remainder chunk makes the gradient a
    # concatenation, one more [N, V] buffer.
    divisors = [d for d in range(target, target // 2, -1) if n_tokens % d == 0]
    chunk_size = divisors[0] if divisors else target
  if (
      not isinstance(chunk_size, int)
      or isinstance(chunk_size, bool)
      or chunk_size < 0
  ):
    raise ValueError(
        f"chunk_size={chunk_size!r} must be None (automatic), 0 "
        "(no chunking) or a positive number of tokens."
    )
  return max(1, n_tokens if chunk_size == 0 else min(chunk_size, n_tokens))


def over_chunks(fn: Callable, size: int, n_tokens: int, *arrays):
  """``fn`` on consecutive ``size``-row slices of ``arrays`` (pytrees of
  ``[N, ...]``), outputs concatenated along rows; the remainder is one call."""
  n_chunks = n_tokens // size
  if n_chunks <= 1 and n_chunks * size == n_tokens:
    return fn(*arrays)
  take = lambda i: jax.tree.map(
      lambda x: jax.lax.dynamic_slice_in_dim(x, i * size, size), arrays
  )
  out = jax.lax.map(lambda i: fn(*take(i)), jnp.arange(n_chunks))
  out = jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), out)
  rest = n_chunks * size
  if rest == n_tokens:
    return out
  tail = fn(*jax.tree.map(lambda x: x[rest:], arrays))
  return jax.tree.map(lambda a, b: jnp.concatenate([a, b]), out, tail)


def _fallback_budget(n_tokens: int) -> int:
  return min(n_tokens, max(core.AKL_FALLBACK_ROWS, n_tokens // 64))


def _run_forward(sp, size, s_NxV, t_NxV, params):
  n = s_NxV.shape[0]
  value, stats = over_chunks(
      lambda s, t: rows_forward(sp, s, t, params), size, n, s_NxV, t_NxV
  )
  value, stats = finish(
      sp, value, stats, s_NxV, t_NxV, params, _fallback_budget(n)
  )
  return value, (s_NxV, t_NxV, params, stats)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _run(sp, size, s_NxV, t_NxV, params):
  return _run_forward(sp, size, s_NxV, t_NxV, params)[0]


def _run_bwd(sp, size, residuals, g_N):
  s_NxV, t_NxV, params, stats = residuals

  def block(s, t, stats, g):
    grad = rows_grad(sp, s, t, params, stats) * g.astype(_F32)[:, None]
    return grad.astype(s.dtype)

  grad = over_chunks(block, size, s_NxV.shape[0], s_NxV, t_NxV, stats, g_N)
  return grad, None, jax.tree.map(jnp.zeros_like, params)


_run.defvjp(_run_forward, _run_bwd)


def divergence(
    name: str,
    student_logits: Array,
    teacher_logits: Array,
    *,
    temperature=1.0,
    chunk_size: int | None = None,
    **hp,
) -> Array:
  """Per-position divergence ``name`` of ``[..., V]`` logits, shape ``[...]``."""
  sp, params = resolve(name, temperature, hp)
  s, t = jnp.asarray(student_logits), jnp.asarray(teacher_logits)
  core.check_same_shape(s, t)
  lead, vocab = s.shape[:-1], s.shape[-1]
  s_NxV = s.reshape(-1, vocab)
  t_NxV = jax.lax.stop_gradient(t).reshape(-1, vocab)
  size = chunk_rows(s_NxV.shape[0], vocab, chunk_size)
  return _run(sp, size, s_NxV, t_NxV, params).reshape(lead)


# ----------------------------------------------------------------------------
# The public divergences: one function per name of HYPER_PARAMETERS.


def _signature(name: str, teacher: tuple[str, str]) -> inspect.Signature:
  """``(student_logits, <teacher>, *, <hyper-parameters>, <static options>,
  temperature=1.0, chunk_size=None)`` with the defaults of the tables;
  ``teacher`` is the second parameter's name and annotation."""
  keyword = inspect.Parameter.KEYWORD_ONLY
  hp = HYPER_PARAMETERS[name].items()
  options = STATIC_OPTIONS.get(name, {}).items()
  return inspect.Signature(
      [
          inspect.Parameter("student_logits", _POSITIONAL, annotation="Array"),
          inspect.Parameter(teacher[0], _POSITIONAL, annotation=teacher[1]),
          *(inspect.Parameter(k, keyword, default=v) for k, v in hp),
          *(
              inspect.Parameter(k, keyword, default=v, annotation="str")
              for k, v in options
          ),
          inspect.Parameter("temperature", keyword, default=1.0),
          inspect.Parameter(
              "chunk_size", keyword, default=None, annotation="int | None"
          ),
      ],
      return_annotation="Array",
  )


def public(
    name: str,
    call: Callable,
    *,
    teacher: tuple[str, str],
    module: str,
    doc: str,
) -> Callable:
  """The public function ``name`` of ``module``: ``call(name, student_logits,
  teacher, **keywords)`` behind the signature the tables give it.

  ``inspect.signature`` reports that signature (config validation and
  autodoc read it) and calls bind to it, defaults included. A keyword
  outside it is passed on, so that :func:`resolve` refuses it with the
  hyper-parameters ``name`` does take.
  """
  signature = _signature(name, teacher)

  def fn(*args, **kwargs):
    known = {k: v for k, v in kwargs.items() if k in signature.parameters}
    bound = signature.bind(*args, **known)
    bound.apply_defaults()
    unknown = {k: v for k, v in kwargs.items() if k not in known}
    return call(name, *bound.args, **bound.kwargs, **unknown)

  fn.__signature__ = signature
  fn.__name__ = fn.__qualname__ = name
  fn.__module__ = module
  fn.__doc__ = doc
  return fn


_EXECUTION = """
Analytic gradient, no ``[N, V]`` residuals; chunked over tokens on CPU
(``chunk_size=None``: automatic; 0: one piece; k: k tokens per chunk).
Hyper-parameters and ``temperature`` may be traced jax arrays."""

# Each divergence's math, stated once for its public function.
_DOCS = {
    "fkl": """Forward KL ``KL(p‖q) = Σ_v p_v (log p_v − log q_v)`` (Hinton KD).

docs/divergences.md, "Forward KL". Gradient: ``(q − p) / T``.
""",
    "rkl": """Reverse KL ``KL(q‖p) = Σ_v q_v (log q_v − log p_v)``.

docs/divergences.md, "Reverse KL". Gradient:
``q ⊙ (log q − log p − RKL) / T``.
""",
    "fkl_rkl": """``weight·KL(p‖q) + (1 − weight)·KL(q‖p)``, weight in [0, 1].

docs/divergences.md, "FKL+RKL"; 0.5 is the AKL paper's "FKL+RKL" baseline.
""",
    "skl": """Skew KL (DistiLLM) ``KL(p ‖ α·p + (1 − α)·q)``, α in [0, 1].

docs/divergences.md, "Skew KL and skew reverse KL". α = 0 is FKL, α = 1
is 0; bounded by ``−log α``.
""",
    "srkl": """Skew reverse KL (DistiLLM) ``KL(q ‖ (1 − α)·p + α·q)``, α in [0, 1].

docs/divergences.md, "Skew KL and skew reverse KL". α = 0 is RKL, α = 1
is 0.
""",
    "jsd": """Generalized JSD (GKD): with ``m = β·p + (1 − β)·q``,

    GJSD_β = β·KL(p‖m) + (1 − β)·KL(q‖m),   0 ≤ GJSD_β ≤ H(β) ≤ log 2.

docs/divergences.md, "Generalized JSD". ``β = 0`` is FKL and ``β = 1`` RKL,
exactly (the interior formula vanishes there, as GKD and TRL define it).
""",
    "tvd": """Total variation ``½ Σ_v |p_v − q_v|`` ∈ [0, 1] (DistiLLM).

docs/divergences.md, "Total variation"; the subgradient of ``|x|`` at 0 is
0, as in torch.
""",
    "akl": """Adaptive KL (Wu et al. 2024): ``w_head·KL(p‖q) + w_tail·KL(q‖p)``.

docs/divergences.md, "AKL". The per-position weights are those of
:func:`kdjax.divergences.core.akl_weights` (constants), from the teacher's
top-``AKL_TOP_K`` with an exact fallback for rows it does not settle.
``rule`` ("akl" or "dskd") must be static.
""",
    "abkd": """α-β divergence (ABKD, Wang et al. ICML 2025), α, β ≥ 0:

    D_AB(p‖q) = −1/(αβ) Σ_v [p^α q^β − α/(α+β)·p^(α+β) − β/(α+β)·q^(α+β)]

docs/divergences.md, "Alpha-beta divergence (ABKD)". The limits have their
own formulas: α = 0 gives ``Σ [q^β log(q/p)/β − (q^β − p^β)/β²]`` (RKL at
β = 1), β = 0 gives ``Σ [p^α log(p/q)/α − (p^α − q^α)/α²]`` (FKL at
α = 1), α = β = 0 gives ``½ Σ (log q − log p)²``. The paper's GPT-2 setting
is α = 0.2, β = 0.7. Gradient: ``q G = −(p^α q^β − q^(α+β))/α``.
""",
}


def _dense(name: str) -> Callable:
  return public(
      name,
      divergence,
      teacher=("teacher_logits", "Array"),
      module=__name__,
      doc=_DOCS[name] + _EXECUTION,
  )


fkl = _dense("fkl")
rkl = _dense("rkl")
fkl_rkl = _dense("fkl_rkl")
skl = _dense("skl")
srkl = _dense("srkl")
jsd = _dense("jsd")
tvd = _dense("tvd")
akl = _dense("akl")
abkd = _dense("abkd")


def akl_unresolved_fraction(
    teacher_logits: Array, *, mu=0.5, rule: str = "akl", temperature=1.0
) -> Array:
  """Fraction of rows whose top-``AKL_TOP_K`` teacher mass does not settle the
  AKL head, i.e. rows that take the exact fallback. Log it to check that the
  fallback stays rare on real teacher distributions."""
  core._check_akl(mu, rule)
  lse_t = _lse(teacher_logits, temperature)
  top_t, _ = core.top_k(
      teacher_logits, min(core.AKL_TOP_K, teacher_logits.shape[-1])
  )
  mass = core._row_sum(jnp.exp(lse_t.log_prob(top_t, temperature)))
  resolved = (mass > mu) if rule == "akl" else (mass >= mu)
  return jnp.mean(1.0 - resolved.astype(_F32))
