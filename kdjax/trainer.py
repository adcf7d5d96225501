"""The training library's public names (:mod:`kdjax.training`), in one place.

```python
from kdjax import trainer
from kdjax.configs import akl_gpt2
summary = trainer.train_and_evaluate(akl_gpt2.get_config("tiny"), "/tmp/akl")
```

:func:`train_and_evaluate` trains (or resumes) a run in its workdir;
:func:`build` returns what a run builds before its first step (a
:class:`Run`: data, models, the jitted :class:`Step`, the initial
:class:`TrainState`). The command line is ``python -m kdjax.train``.
"""

from kdjax.training import (
    BATCH_KEYS,
    Run,
    Step,
    TrainingError,
    TrainState,
    abstract_opt_state,
    build,
    export,
    make_optimizer,
    make_schedule,
    make_student,
    maybe_initialize_distributed,
    put_batch,
    train_and_evaluate,
)

__all__ = [
    "BATCH_KEYS",
    "Run",
    "Step",
    "TrainingError",
    "TrainState",
    "abstract_opt_state",
    "build",
    "export",
    "make_optimizer",
    "make_schedule",
    "make_student",
    "maybe_initialize_distributed",
    "put_batch",
    "train_and_evaluate",
]
