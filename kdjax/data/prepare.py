r"""Builds a kdjax dataset to array_record (the ``tfds build`` CLI needs TensorFlow).

Usage::

  python -m kdjax.data.prepare --dataset=synthetic_instruct --data_dir=~/tfds
  python -m kdjax.data.prepare --dataset=dolly --data_dir=~/tfds \
      [--manual_dir=DIR_WITH_databricks-dolly-15k.jsonl]
  python -m kdjax.data.prepare --dataset=instruct_jsonl/sinst --data_dir=~/tfds \
      --manual_dir=DIR_WITH_sinst.jsonl
  python -m kdjax.data.prepare --dataset=instruct_jsonl --path=my.jsonl \
      --data_dir=~/tfds

Logs the build's counts (read / kept / malformed / empty) and the split sizes.
Bad input is one ``error: ...`` line (:mod:`kdjax.cli`): exit 2 for a flag
that is missing or wrong, 1 for a file that is missing, empty or malformed.
"""

from __future__ import annotations

import json
import os

from absl import flags, logging

from kdjax import cli
from kdjax.data import sources

_DATASET = flags.DEFINE_string(
    "dataset",
    None,
    "dolly | synthetic_instruct | instruct_jsonl/<name> | instruct_jsonl "
    "(with --path).",
    required=True,
)
_DATA_DIR = flags.DEFINE_string(
    "data_dir", None, "TFDS data directory.", required=True
)
_MANUAL_DIR = flags.DEFINE_string(
    "manual_dir", None, "Directory with manually downloaded files (offline)."
)
_PATH = flags.DEFINE_string("path", None, "JSONL file for instruct_jsonl.")
_SKIP_BAD = flags.DEFINE_bool(
    "skip_bad",
    False,
    "Skip (and count) malformed JSONL lines instead of " "failing.",
)


def main(argv):
  if len(argv) > 1:
    raise cli.UsageError(
        f"unexpected arguments {argv[1:]}; every input is a " "--flag=value."
    )
  if _DATASET.value.partition("/")[0] not in sources.NAMES:
    raise cli.UsageError(
        f"--dataset={_DATASET.value} is unknown; use one of "
        "dolly, synthetic_instruct, instruct_jsonl/<name> or "
        "instruct_jsonl with --path."
    )
  expand = lambda p: None if p is None else os.path.expanduser(p)
  builder = sources.prepare(
      _DATASET.value,
      expand(_DATA_DIR.value),
      manual_dir=expand(_MANUAL_DIR.value),
      path=expand(_PATH.value),
      skip_bad=_SKIP_BAD.value,
  )
  info = builder.info
  sizes = {name: split.num_examples for name, split in info.splits.items()}
  logging.info(
      "%s ready in %s; split sizes %s", _DATASET.value, builder.data_dir, sizes
  )
  if info.metadata:
    logging.info("build metadata: %s", json.dumps(dict(info.metadata)))
  print(
      json.dumps(
          {
              "dataset": _DATASET.value,
              "dir": os.fspath(builder.data_dir),
              "splits": sizes,
          }
      )
  )
  return 0


if __name__ == "__main__":
  cli.run(main)
