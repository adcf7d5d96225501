"""Several teachers over one vocabulary mixed into one teacher distribution.

Teacher ``k`` of ``K`` gives, at each position, the tempered distribution
``p_k = softmax(z_k / T)`` and a score ``a_k``; the teachers' weights are
``w_k = softmax_k(a_k)`` and the mixture is ``p_mix = Σ_k w_k p_k``
(docs/beyond_logits.md, "Several teachers"). Two rules set the scores from
the prior weights ``π_k`` (normalised here):

* ``fixed``: ``a_k = log π_k``, the same weights at every position;
* ``confidence``: ``a_k = log π_k − CE_k`` with ``CE_k = −log softmax(z_k)_y``
  the teacher's cross-entropy on the label token ``y`` at temperature 1, so
  ``w_k = π_k p_k(y) / Σ_j π_j p_j(y)``: the posterior probability that
  teacher ``k`` produced the label, and for equal priors the softmax over
  teachers of ``−CE_k``. With two teachers and equal priors this is
  CA-MKD's confidence weight ``(1 − softmax_k(CE)) / (K − 1)`` (Zhang et
  al., 2022, arXiv:2201.00007); with more it is sharper than CA-MKD's.
  Positions outside the loss mask (padding, prompt) take the prior weights.

The mixture is returned as logits for the divergences, ``T · log p_mix``:
every divergence divides the teacher's logits by ``T`` before its softmax, and
``softmax(T · log p_mix / T) = p_mix``, so each one evaluates the mixture
unchanged. ``log p_mix = logsumexp_k(log p_k + a_k) − logsumexp_k(a_k)`` is
accumulated one teacher at a time (``logaddexp``) from an iterable of the
teachers' logits, never stacked into one ``[K, B, T, V]`` array; under
``jit`` the compiler may still fuse the whole sum into one pass that reads
every teacher's logits (docs/beyond_logits.md, "Several teachers").
"""

from __future__ import annotations

from typing import Iterable, NamedTuple, Sequence

import jax
import jax.numpy as jnp

Array = jax.Array
_F32 = jnp.float32

COMBINE = ("fixed", "confidence")


class Mixture(NamedTuple):
  """The mixed teacher and the weights it was mixed with.

  Attributes:
    logits_BxTxV: ``T · log p_mix`` (float32): ``softmax(logits / T)`` is
      the mixture.
    weights_KxBxT: ``w_k`` per teacher and position (float32), summing to
      one over ``K``.
  """

  logits_BxTxV: Array
  weights_KxBxT: Array


def mix(
    teacher_logits: Iterable[Array],
    labels_BxT: Array,
    mask_BxT: Array,
    *,
    prior: Sequence[float],
    combine: str = "fixed",
    temperature: float | Array = 1.0,
) -> Mixture:
  """The teachers' per-position mixture (module docstring for the math).

  Args:
    teacher_logits: each teacher's ``[B, T, V]`` logits, in the order of
      ``prior``; read one at a time.
    labels_BxT: the next-token labels (``confidence`` reads them).
    mask_BxT: the positions that count; elsewhere the weights are the
      prior's.
    prior: ``π_k``, positive; normalised here.
    combine: a rule of :data:`COMBINE`.
    temperature: ``T``, dividing each teacher's logits in ``p_k``.
  """
  if combine not in COMBINE:
    raise ValueError(f"combine={combine!r} is unknown; use one of {COMBINE}.")
  log_prior_K = jnp.log(jnp.asarray(prior, _F32))
  keep_BxT = mask_BxT > 0
  # Labels outside the mask may be anything; read a valid id there.
  labels_BxT = jnp.where(keep_BxT, labels_BxT, 0)
  total_BxTxV, scores = None, []
  for k, z_BxTxV in enumerate(teacher_logits):
    z_BxTxV = z_BxTxV.astype(_F32)
    score_BxT = jnp.broadcast_to(log_prior_K[k], labels_BxT.shape)
    if combine == "confidence":
      log_p1_BxTxV = jax.nn.log_softmax(z_BxTxV, axis=-1)
      log_py_BxT = jnp.take_along_axis(
          log_p1_BxTxV, labels_BxT[..., None], axis=-1
      )[..., 0]
      score_BxT = score_BxT + jnp.where(keep_BxT, log_py_BxT, 0.0)
    term_BxTxV = (
        jax.nn.log_softmax(z_BxTxV / temperature, axis=-1)
        + score_BxT[..., None]
    )
    total_BxTxV = (
        term_BxTxV
        if total_BxTxV is None
        else jnp.logaddexp(total_BxTxV, term_BxTxV)
    )
    scores.append(score_BxT)
  if len(scores) != len(prior):
    raise ValueError(
        f"{len(scores)} teachers' logits for {len(prior)} prior weights; "
        "give one weight per teacher."
    )
  scores_KxBxT = jnp.stack(scores)
  log_norm_BxT = jax.nn.logsumexp(scores_KxBxT, axis=0)
  log_mix_BxTxV = total_BxTxV - log_norm_BxT[..., None]
  return Mixture(
      temperature * log_mix_BxTxV, jax.nn.softmax(scores_KxBxT, axis=0)
  )
