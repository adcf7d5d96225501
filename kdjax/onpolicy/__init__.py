"""On-policy distillation: students trained on their own generations.

Each method is a strategy behind one interface
(:class:`kdjax.onpolicy.strategy.Strategy`): per step, the batch to train on
from the dataset's, the state it carries, and hooks on validation.

* :mod:`kdjax.onpolicy.strategy`: the interface, its checkpointed state and
  the ``dataset`` strategy (off-policy KD);
* :mod:`kdjax.onpolicy.strategies`: ``onpolicy.source`` to its strategy;
* :mod:`kdjax.onpolicy.sampler`: what the generating strategies share:
  models, prompts out, generated rows back in;
* :mod:`kdjax.onpolicy.batches`: prompts out of training batches, generated
  responses back into training rows (loss on the generated tokens only);
* :mod:`kdjax.onpolicy.gkd`: GKD's mixture of dataset and student batches;
* :mod:`kdjax.onpolicy.distillm`: DistiLLM's schedule, replay buffer and
  strategy;
* :mod:`kdjax.onpolicy.skd`: speculative-KD decoding (student proposes,
  teacher's top-K vets) with both models' KV caches in one loop, and its
  strategy;
* :mod:`kdjax.onpolicy.minillm`: MiniLLM's teacher-mixed sampler (the same
  loop), its policy-gradient objective and strategy;
* :mod:`kdjax.onpolicy.runner`: a strategy inside the training loop.

The math and the papers' settings: docs/on_policy.md; the ``config.onpolicy``
fields: :class:`kdjax.config.spec.OnPolicySpec`.
"""

from kdjax.onpolicy import (
    batches,
    distillm,
    gkd,
    minillm,
    sampler,
    skd,
    strategies,
    strategy,
)
from kdjax.onpolicy.runner import Runner
from kdjax.onpolicy.strategies import KINDS
from kdjax.onpolicy.strategy import State, Strategy

__all__ = [
    "batches",
    "distillm",
    "gkd",
    "minillm",
    "sampler",
    "skd",
    "strategies",
    "strategy",
    "KINDS",
    "Runner",
    "State",
    "Strategy",
]
