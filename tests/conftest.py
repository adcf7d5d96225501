"""Test set-up shared by every test module.

Eight fake CPU devices let sharding tests build real meshes; the flag must be
set before jax initialises its backend, hence here, before any test imports jax.

Every test process (the xdist workers and the CLI subprocesses, which inherit
the environment) shares one persistent compilation cache, so a program that a
test compiled is loaded, not compiled again, by every later test and process
that builds the same one. Its key covers jax's version, the program and the
devices, so a stale entry is never reused; ``make clean`` removes it.
"""

import os

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", os.path.join(_ROOT, ".pytest_cache", "jax")
)
# Cache every program: the tiny test programs each compile in well under the
# default one-second threshold, and there are thousands of them.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")
# Tests never reach the network: hub look-ups fail fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
