"""Knowledge-distillation training, one concern per module.

================  ==========================================================
module            concern
================  ==========================================================
``step``          :class:`TrainState`, the jitted :class:`Step`, batches
``optimizer``     clipped AdamW on a warmup + cosine schedule
``builder``       :func:`build`: data, models and initial state of a run
``loop``          :func:`train_and_evaluate`: resume, step, log, checkpoint
``validation``    validation loss and sampled scores during training
``workdir``       a workdir's identity (``config.json``, ``force_new_run``)
``distributed``   joining a multi-process run
``errors``        :class:`TrainingError`
================  ==========================================================

```python
from kdjax import training
from kdjax.config import files
config = files.load("configs/akl_gpt2.py:tiny")
summary = training.train_and_evaluate(config, "/tmp/akl")
```
"""

from kdjax.training.builder import (
    Run,
    build,
    make_student,
)
from kdjax.training.distributed import maybe_initialize_distributed
from kdjax.training.errors import TrainingError
from kdjax.training.loop import export, train_and_evaluate
from kdjax.training.optimizer import (
    abstract_opt_state,
    make_optimizer,
    make_schedule,
)
from kdjax.training.step import (
    BATCH_KEYS,
    Health,
    Step,
    TrainState,
    TransferState,
    put_batch,
)

__all__ = [
    "Run",
    "build",
    "make_student",
    "maybe_initialize_distributed",
    "TrainingError",
    "export",
    "train_and_evaluate",
    "abstract_opt_state",
    "make_optimizer",
    "make_schedule",
    "BATCH_KEYS",
    "Health",
    "Step",
    "TrainState",
    "TransferState",
    "put_batch",
]
