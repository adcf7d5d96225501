r"""Trains a student: ``python -m kdjax.train --config=kdjax/configs/X.py[:arg] --workdir=DIR``.

    python -m kdjax.train --config=kdjax/configs/akl_gpt2.py:tiny --workdir=/tmp/akl
    python -m kdjax.train --config=kdjax/configs/akl_gpt2.py --workdir=gs://b/akl \
        --config.teacher.path=/ckpt/gpt2_xl_sft --config.mesh.fsdp=4

Re-running the same command in the same workdir resumes from its latest
checkpoint. ``--config.key=value`` overrides any config field; unknown keys are
an error. The library is :mod:`kdjax.training`.
"""

from __future__ import annotations

import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from kdjax import training

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, e.g. kdjax/configs/akl_gpt2.py:tiny.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (resumed if it "
                               "holds a checkpoint).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}; overrides are "
                         "--config.key=value.")
  if not flags.FLAGS["verbosity"].present:  # orbax logs every file it writes
    logging.set_verbosity(logging.WARNING)
  try:
    training.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except (training.TrainingError, ValueError, FileNotFoundError) as e:
    logging.error("%s", e)
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
