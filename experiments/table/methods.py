"""The rows of the method table: each method's config, seeds and family.

A method is one config module, ``configs/<module>.py``, trained from a
live teacher, from a teacher cache, or without a teacher (SFT). New methods
register one line in :data:`METHODS`; a method whose config module does not
exist (yet) is left out of the default table.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
from typing import Any

from kdjax.config import files as config_files
from kdjax.config import recipe


@dataclasses.dataclass(frozen=True)
class Method:
  """A table row: its config module, whether it distils from a teacher, and
  the teacher cache it trains from instead of the live teacher (if any)."""

  module: str  # configs/<module>.py
  kd: bool = True  # False for the SFT baseline
  cache: tuple[tuple[str, Any], ...] = ()  # teacher.cache.* settings


# The registry: method name -> config. Add a line to add a row.
METHODS: dict[str, Method] = {
    "sft": Method("sft_gpt2", kd=False),
    "seqkd": Method("seqkd_gpt2"),
    "fkl": Method("fkl_gpt2"),
    "rkl": Method("rkl_gpt2"),
    "fkl_rkl": Method("fkl_rkl_gpt2"),
    "skl": Method("skl_gpt2"),
    "srkl": Method("srkl_gpt2"),
    "jsd": Method("jsd_gpt2"),
    "tvd": Method("tvd_gpt2"),
    "akl": Method("akl_gpt2"),
    "abkd": Method("abkd_gpt2"),
    "taid": Method("taid_gpt2"),
    "sinkhorn": Method("sinkhorn_gpt2"),
    # On-policy sequence sources (docs/on_policy.md).
    "gkd": Method("gkd_gpt2"),
    "distillm": Method("distillm_gpt2"),
    "skd": Method("skd_gpt2"),
    "minillm": Method("minillm_gpt2"),
    # FKL from a teacher cache (docs/cached_teacher.md) instead of the live
    # teacher: its top-16 / top-64 with the tail bucket, RS-KD's 12 draws.
    "fkl_top16": Method("fkl_gpt2", cache=(("encoding", "topk"), ("k", 16))),
    "fkl_top64": Method("fkl_gpt2", cache=(("encoding", "topk"), ("k", 64))),
    "fkl_sampled": Method(
        "fkl_gpt2", cache=(("encoding", "sampled"), ("num_samples", 12))
    ),
}
# The default rows, in table order (sinkhorn is autodiff-only and slow).
TABLE = (
    "sft",
    "seqkd",
    "fkl",
    "rkl",
    "fkl_rkl",
    "skl",
    "srkl",
    "jsd",
    "tvd",
    "akl",
    "abkd",
    "taid",
    "gkd",
    "distillm",
    "skd",
    "minillm",
    "fkl_top16",
    "fkl_top64",
    "fkl_sampled",
)
SEEDS = (10, 20, 30)

# AKL paper (arXiv 2404.02657), GPT-2 1.5B -> 120M, ROUGE-L on Dolly / S-NI / UnNI.
PAPER_GPT2 = {
    "teacher": (26.98, 27.25, 31.61),
    "sft": (23.01, 16.48, 18.43),
    "seqkd": (23.30, 16.35, 18.51),
    "fkl": (23.46, 16.63, 19.27),
    "rkl": (22.62, 17.88, 19.35),
    "skl": (23.47, 16.51, 18.46),
    "srkl": (23.25, 17.54, 19.31),
    "fkl_rkl": (23.36, 17.83, 20.37),
    "akl": (23.88, 19.15, 21.97),
}
PAPER_DATASETS = ("dolly", "sni", "unni")


def available(methods: Sequence[str]) -> list[str]:
  """``methods`` whose config module exists (rows of divergences not yet in
  the package drop out)."""
  return [
      m for m in methods if config_files.find(METHODS[m].module) is not None
  ]


def config_for(
    method: str, scale: str, seed: int, overrides: Sequence[str] = ()
):
  """``configs/<method>_gpt2.py`` at ``scale`` with the seed and overrides."""
  if method not in METHODS:
    raise ValueError(
        f"method {method!r} is unknown; use some of " f"{', '.join(METHODS)}."
    )
  module = config_files.experiment(METHODS[method].module)
  c = module.get_config("tiny" if scale == "tiny" else None)
  c.seed = seed
  if METHODS[method].cache:
    c.teacher.source = "cache"
    recipe.override(
        c, {f"teacher.cache.{k}": v for k, v in METHODS[method].cache}
    )
  recipe.override(c, dict(item.partition("=")[::2] for item in overrides))
  return c


def is_kd(method: str) -> bool:
  """Whether ``method`` distils from a teacher (unregistered names do)."""
  return METHODS.get(method, Method("")).kd


def family(method: str) -> str:
  """``"SFT"``, ``"off-policy"``, ``"on-policy"`` or ``"cached teacher"``."""
  m = METHODS.get(method, Method(""))
  if not m.kd:
    return "SFT"
  if m.cache:
    return "cached teacher"
  if method not in METHODS:
    return "off-policy"
  c = config_for(method, "tiny", SEEDS[0])
  on = "onpolicy" in c and c.onpolicy.source != "dataset"
  return "on-policy" if on else "off-policy"
