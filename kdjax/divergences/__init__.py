"""Every KD divergence of the AKL literature as a pure JAX function.

    from kdjax import divergences as kd
    per_token_BxT = kd.akl(student_logits_BxTxV, teacher_logits_BxTxV)
    loss = kd.masked_mean(per_token_BxT, loss_mask_BxT)

Student logits first, teacher second; per-position values in float32 shaped like
the leading axes; the teacher is constant. ``get(name)`` and ``names()`` give the
registry the trainer and the experiments use. Importing this package imports
jax and ott-jax only (no models, data or trainer).

The token-level divergences (fkl, rkl, fkl_rkl, skl, srkl, jsd, tvd, akl,
abkd) have one implementation each, :mod:`kdjax.divergences.engine`: analytic
gradients, no ``[N, V]`` residuals, chunked over tokens on CPU and in one
piece elsewhere (``chunk_size=`` overrides), hyper-parameters and temperature
traceable. :mod:`kdjax.divergences.fused` runs the same math from hidden
states and LM heads without forming the logits. ``kd.reference.<name>`` holds
the plain autodiff definitions, the oracle of the tests, not a training path.
ULD (:func:`uld`), GOLD's hybrid (:func:`gold`, which also takes the matched
vocabulary entries of two tokenizers) and SinKD (:func:`sinkhorn`) are
autodiff implementations.
``kd.sparse.<name>`` evaluates the same divergences against a cached teacher
kept on its top-k tokens plus a tail bucket (:mod:`kdjax.divergences.sparse`),
and RS-KD's sampled FKL. :func:`kdjax.divergences.mixture.mix` mixes several
teachers of one vocabulary into the one teacher every divergence takes.
"""

from typing import Callable

from kdjax.divergences import core, engine, fused, mixture, reference, sparse
from kdjax.divergences.core import (
    AKL_RULES,
    akl_weights,
    gold,
    log_probs,
    masked_mean,
    uld,
)
from kdjax.divergences.engine import (
    abkd,
    akl,
    akl_unresolved_fraction,
    fkl,
    fkl_rkl,
    jsd,
    rkl,
    skl,
    srkl,
    tvd,
)
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
    "abkd": abkd,
    "uld": uld,
    "gold": gold,
    "sinkhorn": sinkhorn,
}

# Divergences computed per position from logits of one shared vocabulary,
# with the engine's analytic gradients (and the fused path).
TOKEN_LEVEL = engine.NAMES

IMPLS = ("auto", "reference")


def names() -> tuple[str, ...]:
  """Names accepted by :func:`get`, in registry order."""
  return tuple(_REGISTRY)


def get(name: str, impl: str = "auto") -> Callable:
  """The divergence called ``name`` (see :func:`names`).

  ``impl="auto"`` (default) is the public function ``kd.<name>``;
  ``impl="reference"`` the autodiff oracle ``kd.reference.<name>`` of a
  token-level divergence (uld, gold and sinkhorn are their own reference,
  so both impls return the same function for them).
  """
  if impl not in IMPLS:
    raise ValueError(
        f"impl={impl!r} is not an implementation; use one of " f"{IMPLS}."
    )
  try:
    divergence = _REGISTRY[name]
  except KeyError:
    raise ValueError(
        f"unknown divergence {name!r}; choose one of " f"{', '.join(names())}."
    ) from None
  if impl == "reference" and name in TOKEN_LEVEL:
    return getattr(reference, name)
  return divergence


__all__ = [
    "AKL_RULES",
    "IMPLS",
    "TOKEN_LEVEL",
    "abkd",
    "akl",
    "akl_unresolved_fraction",
    "akl_weights",
    "core",
    "engine",
    "fkl",
    "fkl_rkl",
    "fused",
    "get",
    "gold",
    "jsd",
    "log_probs",
    "masked_mean",
    "mixture",
    "names",
    "reference",
    "rkl",
    "sinkhorn",
    "skl",
    "sparse",
    "srkl",
    "tvd",
    "uld",
]
