"""float64 NumPy/SciPy references for the KD divergences of docs/divergences.md.

Written from the math in docs/divergences.md, not from the JAX code,
so that the tests compare two independent implementations. Conventions: inputs
are logits ``[..., V]`` (student first, teacher second), outputs one value per
position ``[...]`` in float64. Slots whose logit is ``-inf`` have probability 0
and every term weighted by a zero probability is dropped (docs/divergences.md
"Conventions").
"""

from __future__ import annotations

import numpy as np
from scipy import special


def log_softmax(logits, temperature: float = 1.0) -> np.ndarray:
  """float64 ``log softmax(logits / T)`` over the last axis (-inf stays -inf)."""
  return special.log_softmax(
      np.asarray(logits, np.float64) / temperature, axis=-1
  )


def _dists(student, teacher, temperature):
  log_q = log_softmax(student, temperature)
  log_p = log_softmax(teacher, temperature)
  return log_q, log_p, np.exp(log_q), np.exp(log_p)


def _kl(w, log_w, log_v):
  """``Σ_v w_v (log w_v − log v_v)`` with the terms where ``w_v = 0`` dropped."""
  with np.errstate(invalid="ignore"):
    terms = np.where(w > 0, w * (log_w - log_v), 0.0)
  return terms.sum(-1)


def _log_mix(a, p, q):
  """``log(a·p + (1 − a)·q)``, a mixture of probabilities (docs/divergences.md
  "Conventions")."""
  with np.errstate(divide="ignore"):
    return np.log(a * p + (1.0 - a) * q)


def fkl(student, teacher, temperature=1.0):
  """KL(p‖q)."""
  log_q, log_p, _, p = _dists(student, teacher, temperature)
  return _kl(p, log_p, log_q)


def rkl(student, teacher, temperature=1.0):
  """KL(q‖p)."""
  log_q, log_p, q, _ = _dists(student, teacher, temperature)
  return _kl(q, log_q, log_p)


def fkl_rkl(student, teacher, weight=0.5, temperature=1.0):
  return weight * fkl(student, teacher, temperature) + (1 - weight) * rkl(
      student, teacher, temperature
  )


def skl(student, teacher, alpha=0.1, temperature=1.0):
  """KL(p ‖ α p + (1 − α) q)."""
  _, log_p, q, p = _dists(student, teacher, temperature)
  return _kl(p, log_p, _log_mix(alpha, p, q))


def srkl(student, teacher, alpha=0.1, temperature=1.0):
  """KL(q ‖ (1 − α) p + α q)."""
  log_q, _, q, p = _dists(student, teacher, temperature)
  return _kl(q, log_q, _log_mix(1 - alpha, p, q))


def jsd(student, teacher, beta=0.5, temperature=1.0):
  """β KL(p‖m) + (1 − β) KL(q‖m), m = β p + (1 − β) q; β=0 → FKL, β=1 → RKL."""
  if beta == 0:
    return fkl(student, teacher, temperature)
  if beta == 1:
    return rkl(student, teacher, temperature)
  log_q, log_p, q, p = _dists(student, teacher, temperature)
  log_m = _log_mix(beta, p, q)
  return beta * _kl(p, log_p, log_m) + (1 - beta) * _kl(q, log_q, log_m)


def tvd(student, teacher, temperature=1.0):
  """½ Σ_v |p_v − q_v|."""
  _, _, q, p = _dists(student, teacher, temperature)
  return 0.5 * np.abs(p - q).sum(-1)


def akl_weights(p, q, mu=0.5, rule="akl"):
  """(w_head, w_tail) of docs/divergences.md "AKL", one position at a time.

  ``σ`` sorts ``p`` descending with ties broken by the lower vocabulary index
  (a stable sort of ``−p``).
  """
  p = np.asarray(p, np.float64)
  q = np.asarray(q, np.float64)
  lead = p.shape[:-1]
  p2 = p.reshape(-1, p.shape[-1])
  q2 = q.reshape(-1, q.shape[-1])
  w_head = np.empty(p2.shape[0])
  for row in range(p2.shape[0]):
    order = np.argsort(-p2[row], kind="stable")
    pi = p2[row][order]
    err = np.abs(pi - q2[row][order])
    cum = 0.0
    g_head = g_tail = 0.0
    for k in range(len(pi)):
      prev, cum = cum, cum + pi[k]
      if rule == "akl":
        in_head = k == 0 or cum <= mu
      elif rule == "dskd":
        in_head = prev < mu
      else:
        raise ValueError(rule)
      if in_head:
        g_head += err[k]
      else:
        g_tail += err[k]
    total = g_head + g_tail
    w_head[row] = 0.5 if total == 0 else g_head / total
  w_head = w_head.reshape(lead)
  return w_head, 1.0 - w_head


def akl(student, teacher, mu=0.5, rule="akl", temperature=1.0, weights=None):
  """w_head·KL(p‖q) + w_tail·KL(q‖p); ``weights`` pins (w_head, w_tail)."""
  if weights is None:
    _, _, q, p = _dists(student, teacher, temperature)
    weights = akl_weights(p, q, mu, rule)
  w_head, w_tail = weights
  return w_head * fkl(student, teacher, temperature) + w_tail * rkl(
      student, teacher, temperature
  )


def abkd(student, teacher, alpha=0.2, beta=0.7, temperature=1.0):
  """α-β divergence, term by term in powers of the probabilities:

  −1/(αβ) Σ [p^α q^β − α/(α+β) p^(α+β) − β/(α+β) q^(α+β)], and its limits
  α = 0: (1/β²) Σ [q^β log(q^β/p^β) − q^β + p^β]; β = 0: the same with p, q
  and α, β swapped; α = β = 0: ½ Σ (log q − log p)². Terms of -inf slots
  are dropped (not those of probabilities that merely underflow).
  """
  log_q, log_p, q, p = _dists(student, teacher, temperature)
  both = np.isfinite(log_p) & np.isfinite(log_q)
  with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
    if alpha == 0 and beta == 0:
      terms = np.where(both, 0.5 * (log_q - log_p) ** 2, 0.0)
    elif alpha == 0:  # log(q^β / p^β) = β (log q − log p), kept finite
      qb, pb = q**beta, p**beta
      terms = np.where(q > 0, qb * beta * (log_q - log_p), 0.0) - qb + pb
      terms = terms / beta**2
    elif beta == 0:
      pa, qa = p**alpha, q**alpha
      terms = np.where(p > 0, pa * alpha * (log_p - log_q), 0.0) - pa + qa
      terms = terms / alpha**2
    else:
      lam = alpha + beta
      terms = -(
          p**alpha * q**beta - alpha / lam * p**lam - beta / lam * q**lam
      ) / (alpha * beta)
  return terms.sum(-1)


def uld(student, teacher, temperature=1.0, teacher_temperature=None):
  """Σ_k |q↓_k − p↓_k|, the smaller vocabulary zero-padded at the end;
  ``p`` at ``teacher_temperature`` (default: ``temperature``)."""
  t_temp = temperature if teacher_temperature is None else teacher_temperature
  q = np.exp(log_softmax(student, temperature))
  p = np.exp(log_softmax(teacher, t_temp))
  return _sorted_l1(q, p)


def _sorted_l1(q, p):
  width = max(q.shape[-1], p.shape[-1])

  def sorted_padded(x):
    x_desc = -np.sort(-x, axis=-1)
    pad = np.zeros(x.shape[:-1] + (width - x.shape[-1],))
    return np.concatenate([x_desc, pad], axis=-1)

  return np.abs(sorted_padded(q) - sorted_padded(p)).sum(-1)


def gold(
    student,
    teacher,
    student_matched,
    teacher_matched,
    beta=0.5,
    temperature=1.0,
    teacher_temperature=None,
):
  """GOLD's hybrid (docs/cross_tokenizer.md "GOLD"): w·GJSD_β on the raw
  matched sub-vectors + (1 − w)·sorted L1 on the rest, w = M / V_T."""
  t_temp = temperature if teacher_temperature is None else teacher_temperature
  q = np.exp(log_softmax(student, temperature))
  p = np.exp(log_softmax(teacher, t_temp))
  q_m, p_m = q[..., student_matched], p[..., teacher_matched]
  if beta == 0:
    matched = _kl(p_m, np.log(p_m), np.log(q_m))
  elif beta == 1:
    matched = _kl(q_m, np.log(q_m), np.log(p_m))
  else:
    m = beta * p_m + (1 - beta) * q_m
    matched = beta * _kl(p_m, np.log(p_m), np.log(m)) + (1 - beta) * _kl(
        q_m, np.log(q_m), np.log(m)
    )
  q_u, p_u = q.copy(), p.copy()
  q_u[..., student_matched] = 0.0
  p_u[..., teacher_matched] = 0.0
  w = len(teacher_matched) / p.shape[-1]
  return w * matched + (1 - w) * _sorted_l1(q_u, p_u)


# name -> reference function; kwargs are passed through unchanged.
DIVERGENCES = {
    "fkl": fkl,
    "rkl": rkl,
    "fkl_rkl": fkl_rkl,
    "skl": skl,
    "srkl": srkl,
    "jsd": jsd,
    "tvd": tvd,
    "akl": akl,
    "abkd": abkd,
    "uld": uld,
}


# ----------------------------------------------------------------------------
# SinKD (docs/divergences.md "SinKD"), transcribed as plain loops.


def sinkd_cost(ps, pt):
  """C_ij = Σ_v |ps[i, v] − pt[j, v]|, float64."""
  return np.abs(ps[:, None, :] - pt[None, :, :]).sum(-1)


def _probs(student, teacher, temperature):
  """``softmax(student / T)``, ``softmax(teacher / T)`` row by row, float64."""
  return (
      np.exp(log_softmax(student, temperature)),
      np.exp(log_softmax(teacher, temperature)),
  )


def sinkd_plan(cost, epsilon=0.1, num_iters=20):
  """Π = exp(−C/ε); num_iters × (rows normalised, then columns normalised)."""
  plan = np.exp(-cost / epsilon)
  for _ in range(num_iters):
    plan = plan / plan.sum(axis=1, keepdims=True)
    plan = plan / plan.sum(axis=0, keepdims=True)
  return plan


def sinkd_rows(student, teacher, temperature=2.0, epsilon=0.1, num_iters=20):
  """Per-row costs Σ_j Π_ij C_ij of one group of rows ``[g, V]`` (their sum is
  SinKD's loss with λ = 1)."""
  cost = sinkd_cost(*_probs(student, teacher, temperature))
  return (sinkd_plan(cost, epsilon, num_iters) * cost).sum(1)


def sinkd_loss(student, teacher, **kwargs):
  """SinKD's scalar loss ``Σ_ij Π_ij C_ij`` for one group ``[g, V]``."""
  return sinkd_rows(student, teacher, **kwargs).sum()


def ott_scalings(cost, epsilon=0.1, num_iters=None, symmetric=False):
  """Scalings ``u = exp(f/ε)``, ``v = exp(g/ε)`` of ott-jax's Sinkhorn loop.

  Uniform marginals ``a = b = 1/g``, ``K = exp(−C/ε)``, started from
  ``f = g = 0``. Each iteration rescales the columns, then the rows:
  ``v = b / Kᵀu``, then ``u = a / K v``. ``symmetric``: both from the previous
  pair, each averaged with its previous value in log space (momentum ½), the
  update of the self-terms of a Sinkhorn divergence. ``num_iters=None`` runs
  until both marginals of ``diag(u) K diag(v)`` are within 1e-14 of ``1/g``
  (checked every 10 iterations; an error after 10⁵).
  """
  g = cost.shape[0]
  a = np.full(g, 1.0 / g)
  kernel = np.exp(-cost / epsilon)
  u, v = np.ones(g), np.ones(g)
  for i in range(1, 100_001 if num_iters is None else num_iters + 1):
    if symmetric:
      u, v = np.sqrt(u * a / (kernel @ v)), np.sqrt(v * a / (kernel.T @ u))
    else:
      v = a / (kernel.T @ u)
      u = a / (kernel @ v)
    if num_iters is None and i % 10 == 0:
      plan = u[:, None] * kernel * v[None, :]
      err = max(np.abs(plan.sum(0) - a).max(), np.abs(plan.sum(1) - a).max())
      if err < 1e-14:
        return u, v, kernel
  if num_iters is None:
    raise RuntimeError(f"Sinkhorn at epsilon={epsilon} did not converge.")
  return u, v, kernel


def ott_rows(student, teacher, temperature=2.0, epsilon=0.1, num_iters=None):
  """Per-row costs ``g · Σ_j Π_ij C_ij`` of ott-jax's plan (rows of mass 1)."""
  ps, pt = _probs(student, teacher, temperature)
  cost = sinkd_cost(ps, pt)
  u, v, kernel = ott_scalings(cost, epsilon, num_iters)
  return cost.shape[0] * (u[:, None] * kernel * v[None, :] * cost).sum(1)


def _reg_ot_cost(cost, epsilon, num_iters, symmetric):
  """ott-jax's ``reg_ot_cost`` from the dual potentials ``f, g = ε log (u, v)``:
  ``Σ a (f − ε log a) + Σ b (g − ε log b) + ε (1 − Σ_ij Π_ij)``."""
  u, v, kernel = ott_scalings(cost, epsilon, num_iters, symmetric)
  a = np.full(cost.shape[0], 1.0 / cost.shape[0])
  plan = u[:, None] * kernel * v[None, :]
  return epsilon * (
      np.sum(a * (np.log(u) - np.log(a)))
      + np.sum(a * (np.log(v) - np.log(a)))
      + 1.0
      - plan.sum()
  )


def sinkhorn_divergence(
    student, teacher, temperature=2.0, epsilon=0.1, num_iters=None
):
  """``OT_ε(s, t) − ½ OT_ε(s, s) − ½ OT_ε(t, t)`` of one group ``[g, V]``."""
  ps, pt = _probs(student, teacher, temperature)
  return (
      _reg_ot_cost(sinkd_cost(ps, pt), epsilon, num_iters, False)
      - 0.5 * _reg_ot_cost(sinkd_cost(ps, ps), epsilon, num_iters, True)
      - 0.5 * _reg_ot_cost(sinkd_cost(pt, pt), epsilon, num_iters, True)
  )


# ----------------------------------------------------------------------------
# Finite differences.


def central_grad(f, x, h=1e-6):
  """∂ f(x) / ∂x by central differences, ``f`` scalar, ``x`` float64."""
  x = np.asarray(x, np.float64)
  grad = np.zeros_like(x)
  flat, gflat = x.reshape(-1), grad.reshape(-1)
  for i in range(flat.size):
    orig = flat[i]
    flat[i] = orig + h
    up = f(x)
    flat[i] = orig - h
    down = f(x)
    flat[i] = orig
    gflat[i] = (up - down) / (2 * h)
  return grad
