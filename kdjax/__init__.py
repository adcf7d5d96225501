"""kdjax: knowledge distillation of large language models in JAX/Flax.

Submodules are imported on demand, so ``from kdjax import divergences`` pulls in
neither the models, the data pipeline nor the trainer.
"""

import importlib

__version__ = "0.1.0"

_SUBMODULES = (
    "checkpoint",
    "config",
    "data",
    "divergences",
    "evaluate",
    "evaluation",
    "metrics",
    "models",
    "objective",
    "sampling",
    "sharding",
    "training",
)


def __getattr__(name):
  if name in _SUBMODULES:
    return importlib.import_module(f"kdjax.{name}")
  raise AttributeError(f"module 'kdjax' has no attribute {name!r}")
