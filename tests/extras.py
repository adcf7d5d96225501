"""Optional extras in tests: skipped on a laptop without them, fatal in CI.

The PyTorch parity tests need the ``torch`` extra and the notebook tests the
``test`` extra's Jupyter packages. A developer without them still runs the
rest; CI (``CI`` set, as ``.ci/run`` has it) installs every extra, so a missing
one there is an install defect and the test fails instead of skipping.
"""

import importlib
import os
import types

import pytest


def require(name: str) -> types.ModuleType:
  """``import name``, or skip the test where the extra is absent (not in CI)."""
  if os.environ.get("CI"):
    return importlib.import_module(name)
  return pytest.importorskip(name)
