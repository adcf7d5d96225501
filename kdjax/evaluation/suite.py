"""Evaluating a checkpoint on a suite of datasets: what ``python -m kdjax.evaluate`` does."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import ml_collections

from kdjax import fs, models, sharding
from kdjax.config import checks as config_checks
from kdjax.config import spec as spec_lib
from kdjax.data import tokenizer as tokenizer_lib
from kdjax.evaluation import datasets as datasets_lib
from kdjax.evaluation import files, harness


def run(
    config: ml_collections.ConfigDict,
    checkpoint: str,
    *,
    datasets: str | None = None,
    seeds: str | None = None,
    limit: int | None = None,
    outdir: str | None = None,
    manual_dir: str | None = None,
    progress: bool = True,
) -> dict[str, dict[str, Any]]:
  """Scores ``checkpoint`` (a HF model dir or a training workdir).

  ``datasets`` / ``seeds`` (comma-separated) override the config's; writes
  the files of :mod:`kdjax.evaluation.files`, prints the markdown table and
  returns ``{dataset: metrics}``.
  """
  config_checks.validate(config, training=False)
  suite = spec_lib.suite_from_config(config)
  hf_dir, default_outdir = files.resolve_checkpoint(checkpoint)
  outdir = fs.local(outdir or default_outdir)
  print(f"scoring {files.describe_checkpoint(hf_dir)}", flush=True)
  protocol = suite.protocol
  if seeds:
    protocol = protocol._replace(seeds=spec_lib.int_list(seeds, "--seeds"))
  names = spec_lib.names(datasets) if datasets else suite.datasets
  manual_dir = manual_dir or suite.manual_dir
  # Cheapest first: the tokenizer (a hub id fails in seconds offline), then
  # every dataset, then the weights.
  tok, eos_id = tokenizer_lib.load(suite.tokenizer, suite.tokenizer_revision)
  loaded = [
      datasets_lib.load_dataset(n, suite.data_dir, manual_dir) for n in names
  ]
  mesh = sharding.make_mesh(**suite.mesh)
  model = models.load(
      hf_dir, dtype=jnp.dtype(suite.dtype), mesh=mesh, seed=suite.seed
  )
  summaries = {}
  for source, name in loaded:
    result = harness.evaluate(
        model,
        tok,
        eos_id,
        source,
        protocol=protocol,
        limit=limit,
        batch_size=suite.batch_size,
        mesh=mesh,
        progress=progress,
        name=name,
    )
    files.write(result, outdir, name)
    summaries[name] = result.metrics
  print(f"{hf_dir} -> {outdir}")
  print(files.markdown_table(summaries))
  return summaries
