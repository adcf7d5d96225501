"""Benchmarks of kdjax components (run as modules)."""

import json
import os
import platform
import statistics
import time

import jax

RESULTS = os.path.join(os.path.dirname(__file__), "results")


def write_result(name: str, device, **fields) -> str:
  """Writes ``results/<name>``: the device and host measured on, then
  ``fields``; returns its path."""
  out = os.path.join(RESULTS, name)
  os.makedirs(RESULTS, exist_ok=True)
  with open(out, "w") as f:
    json.dump(
        dict(device=str(device), host=platform.node(), **fields), f, indent=2
    )
  return out


def compiled_case(fn, args, repeats: int) -> dict:
  """``jit(fn)`` compiled for ``args``: XLA's temporary bytes and the median
  wall time of ``repeats`` runs after a warm-up run."""
  compiled = jax.jit(fn).lower(*args).compile()
  temp = compiled.memory_analysis().temp_size_in_bytes
  jax.block_until_ready(compiled(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - start)
  return {"time_s": statistics.median(times), "temp_bytes": temp}
