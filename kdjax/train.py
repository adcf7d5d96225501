r"""Trains a student: ``python -m kdjax.train --config=configs/X.py[:arg] --workdir=DIR``.

For example::

    python -m kdjax.train --config=configs/akl_gpt2.py:tiny --workdir=/tmp/akl
    python -m kdjax.train --config=configs/akl_gpt2.py --workdir=gs://b/akl \
        --config.teacher.path=/ckpt/gpt2_xl_sft --config.mesh.fsdp=4

Re-running the same command in the same workdir resumes from its latest
checkpoint; so does extending it (``:tiny,steps=60`` on a finished 30-step
run: see :mod:`kdjax.config.identity` for what may change). ``--config.key=value``
overrides any config field. Every user error is one ``error: ...`` line
(:mod:`kdjax.cli`): exit 2 for a wrong command line or config value, 1 for a
missing file or a run that stopped, 130 for Ctrl-C and 143 for ``SIGTERM``
(the step in progress is saved; the message names the checkpoint kept and
the command that resumes). One trainer at a time runs in a workdir
(:mod:`kdjax.training.lock`). The library is :mod:`kdjax.training`.
"""

from __future__ import annotations

from absl import flags
from ml_collections import config_flags

from kdjax import cli

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    None,
    "Experiment config file, e.g. configs/akl_gpt2.py:tiny.",
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run directory (resumed if it " "holds a checkpoint)."
)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise cli.UsageError(
        f"unexpected arguments {argv[1:]}; overrides are " "--config.key=value."
    )
  # Imported here, not at the top: a command-line mistake is reported before
  # jax loads, and the config's own mistakes before the training stack (the
  # models, the data pipeline: seconds of imports) does.
  # pylint: disable=g-import-not-at-top
  from kdjax.config import checks

  checks.validate(_CONFIG.value)
  from kdjax import training

  training.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  cli.run(main)
