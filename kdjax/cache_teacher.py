r"""Caches the teacher once: ``python -m kdjax.cache_teacher --config=C --out=DIR``.

For example::

    python -m kdjax.cache_teacher --config=configs/fkl_gpt2.py:tiny \
        --out=workdirs/tiny/fkl_cache
    python -m kdjax.train --config=configs/fkl_gpt2.py:tiny \
        --workdir=/tmp/fkl --config.teacher.source=cache \
        --config.teacher.cache_dir=workdirs/tiny/fkl_cache

The teacher runs once over the training split's kept examples and each
response token's sparse distribution (``teacher.cache.encoding``: ``topk``
with ``teacher.cache.k`` slots, or ``sampled`` with
``teacher.cache.num_samples`` draws; at ``loss.temperature``) is written to
``DIR`` (:mod:`kdjax.cache`). Re-running the same command after an
interruption (a kill included) finishes the cache, skipping the shards
already written. ``--config.key=value`` overrides any config field; user
errors are one ``error: ...`` line (:mod:`kdjax.cli`).
"""

from __future__ import annotations

from absl import flags
from ml_collections import config_flags

from kdjax import cli
from kdjax.cache import build


def _define_flags() -> None:
  """Defined only when run as a script: importing this module defines none."""
  config_flags.DEFINE_config_file(
      "config",
      None,
      "Experiment config file, e.g. configs/fkl_gpt2.py:tiny.",
      lock_config=True,
  )
  flags.DEFINE_string("out", None, "Cache directory (resumed if partial).")
  flags.DEFINE_integer(
      "examples_per_shard",
      build.EXAMPLES_PER_SHARD,
      "Examples per array_record shard (the unit a resume skips).",
  )
  flags.mark_flags_as_required(["config", "out"])


def main(argv: list[str]) -> None:
  f = flags.FLAGS
  if len(argv) > 1:
    raise cli.UsageError(
        f"unexpected arguments {argv[1:]}; overrides are --config.key=value."
    )
  meta = build.build(f.config, f.out, examples_per_shard=f.examples_per_shard)
  print(
      f"teacher cache {f.out}: {meta['num_examples']} examples, "
      f"{meta['tokens']} tokens, {meta['bytes_per_token']:.1f} bytes/token"
  )


if __name__ == "__main__":
  _define_flags()
  cli.run(main)
