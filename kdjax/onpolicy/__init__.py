"""On-policy distillation: students trained on their own generations.

* :mod:`kdjax.onpolicy.batches`: prompts out of training batches, generated
  responses back into training rows (loss on the generated tokens only);
* :mod:`kdjax.onpolicy.source`: the per-step sequence source (dataset, GKD,
  DistiLLM adaptive SGO, SKD, MiniLLM), a pure jittable function of the run's state;
* :mod:`kdjax.onpolicy.distillm`: DistiLLM's schedule and replay buffer;
* :mod:`kdjax.onpolicy.skd`: speculative-KD decoding (student proposes,
  teacher's top-K vets) with both models' KV caches in one loop;
* :mod:`kdjax.onpolicy.minillm`: MiniLLM's teacher-mixed sampler (the same
  loop) and its policy-gradient objective.

The math and the papers' settings: docs/on_policy.md; the ``config.onpolicy``
fields: :class:`kdjax.config.spec.OnPolicySpec`.
"""

from kdjax.onpolicy import batches, distillm, minillm, skd, source
from kdjax.onpolicy.runner import Runner
from kdjax.onpolicy.source import KINDS, Source, State

__all__ = [
    "batches",
    "distillm",
    "minillm",
    "skd",
    "source",
    "KINDS",
    "Runner",
    "Source",
    "State",
]
