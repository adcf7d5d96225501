"""Benchmarks of kdjax components (run as modules)."""

import json
import os
import platform

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
