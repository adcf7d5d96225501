"""Every KD divergence of the AKL literature as a pure JAX function.

    from kdjax import divergences as kd
    per_token_BxT = kd.akl(student_logits_BxTxV, teacher_logits_BxTxV)
    loss = kd.masked_mean(per_token_BxT, loss_mask_BxT)

Student logits first, teacher second; per-position values in float32 shaped like
the leading axes; the teacher is constant. ``get(name)`` and ``names()`` give the
registry the trainer and the experiments use. Importing this package imports
jax and ott-jax only (no models, data or trainer).

Implementations: the public names are the autodiff definitions (also reachable
as ``kd.autodiff.<name>``). ``get(name, impl="fast")`` returns the analytic-VJP
version of :mod:`kdjax.divergences.fast` (same values and gradients, no
``[N, V]`` residuals), ``get(name, impl="chunked")`` the same over token chunks
(``fused.chunked``, memory O(chunk · V)); :mod:`kdjax.divergences.fused` also
has the fused LM-head path (``fused.fused_linear``).
"""

import functools
from typing import Callable

from kdjax.divergences import core as autodiff
from kdjax.divergences import fast, fused

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


IMPLS = ("autodiff", "fast", "chunked")


def get(name: str, impl: str = "autodiff") -> Callable:
  """The divergence called ``name`` (see :func:`names`).

  ``impl="fast"`` gives the analytic-VJP version and ``impl="chunked"`` the
  same over token chunks (``fused.chunked``; takes ``chunk_size=``, the
  fastest path on CPU); sinkhorn and uld have neither, so asking raises.
  """
  if impl not in IMPLS:
    raise ValueError(f"impl={impl!r} is not an implementation; use one of "
                     f"{IMPLS}.")
  try:
    divergence = _REGISTRY[name]
  except KeyError:
    raise ValueError(f"unknown divergence {name!r}; choose one of "
                     f"{', '.join(names())}.") from None
  if impl != "autodiff":
    if name not in fast.NAMES:
      raise ValueError(f"{name!r} has no {impl} implementation; use "
                       f"impl='autodiff' or one of {', '.join(fast.NAMES)}.")
    if impl == "chunked":
      return functools.partial(fused.chunked, name)
    return getattr(fast, name)
  return divergence


__all__ = ["AKL_RULES", "IMPLS", "akl", "akl_weights", "autodiff", "fast",
           "fkl", "fkl_rkl", "fused", "get", "jsd",
           "log_probs", "masked_mean", "names", "rkl", "sinkhorn", "skl", "srkl",
           "tvd", "uld"]
