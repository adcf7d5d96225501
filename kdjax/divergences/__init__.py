"""Every KD divergence of the AKL literature as a pure JAX function.

    from kdjax import divergences as kd
    per_token_BxT = kd.akl(student_logits_BxTxV, teacher_logits_BxTxV)
    loss = kd.masked_mean(per_token_BxT, loss_mask_BxT)

Student logits first, teacher second; per-position values in float32 shaped like
the leading axes; the teacher is constant. ``get(name)`` and ``names()`` give the
registry the trainer and the experiments use. Importing this package imports
jax and ott-jax only (no models, data or trainer).
"""

from typing import Callable

from kdjax.divergences.core import (AKL_RULES, akl, akl_weights, fkl, fkl_rkl,
                                    jsd, log_probs, masked_mean, rkl, skl, srkl,
                                    tvd, uld)
from kdjax.divergences.ot import sinkhorn

_REGISTRY: dict[str, Callable] = {
    "fkl": fkl,
    "rkl": rkl,
    "fkl_rkl": fkl_rkl,
    "skl": skl,
    "srkl": srkl,
    "jsd": jsd,
    "tvd": tvd,
    "akl": akl,
    "uld": uld,
    "sinkhorn": sinkhorn,
}


def names() -> tuple[str, ...]:
  """Names accepted by :func:`get`, in registry order."""
  return tuple(_REGISTRY)


def get(name: str) -> Callable:
  """The divergence called ``name`` (see :func:`names`)."""
  try:
    return _REGISTRY[name]
  except KeyError:
    raise ValueError(f"unknown divergence {name!r}; choose one of "
                     f"{', '.join(names())}.") from None


__all__ = ["AKL_RULES", "akl", "akl_weights", "fkl", "fkl_rkl", "get", "jsd",
           "log_probs", "masked_mean", "names", "rkl", "sinkhorn", "skl", "srkl",
           "tvd", "uld"]
