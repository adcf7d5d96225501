"""Test set-up shared by every test module.

Eight fake CPU devices let sharding tests build real meshes; the flag must be
set before jax initialises its backend, hence here, before any test imports jax.
Only tests marked ``multi_device`` build their default meshes over all eight;
every other ``sharding.make_mesh()`` without ``devices=`` takes the first
device alone, since a program partitioned eight ways on two cores compiles and
runs about a third slower and tests nothing more there. Explicit ``devices=``
are honoured everywhere; the CLI subprocesses see one device.

Every test process (the xdist workers and the CLI subprocesses, which inherit
the environment) shares one persistent compilation cache, so a program that a
test compiled is loaded, not compiled again, by every later test and process
that builds the same one. Its key covers jax's version, the program and the
devices, so a stale entry is never reused; ``make clean`` removes it.

Tests compile thousands of tiny programs, and LLVM's optimisation passes are
most of each compile while buying nothing at these sizes: the backend runs
unoptimised (``JAX_DISABLE_MOST_OPTIMIZATIONS``), which cuts a training
step's compile about threefold. XLA's HLO passes, which decide the arithmetic,
still run, so results are those of an optimised build. Where jaxlib has the
switch, XLA:CPU also emits its fused kernels the classic way, another
threefold (:func:`commands.xla_flags`, which every test subprocess uses too).

The synthetic dataset is prepared once per run in a directory every worker
shares (:func:`tiny_run.data_dir`).
"""

import os

import pytest

import commands  # sets no jax state: safe before jax initialises

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

os.environ.setdefault("XLA_FLAGS", commands.xla_flags(devices=8))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", os.path.join(_ROOT, ".pytest_cache", "jax")
)
# Cache every program: the tiny test programs each compile in well under the
# default one-second threshold, and there are thousands of them.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
# Tests never reach the network: hub look-ups fail fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session", autouse=True)
def _shared_dir(request, tmp_path_factory):
  """One directory per pytest run, the same for every xdist worker and the
  subprocesses tests start (``$KDJAX_TEST_SHARED_DIR``)."""
  worker = getattr(request.config, "workerinput", None)
  if worker is None:
    shared = tmp_path_factory.mktemp("shared")
  else:  # the workers' base directories are siblings under the run's one
    run = tmp_path_factory.getbasetemp().parent
    shared = run / f"shared-{worker['testrunuid']}"
  os.environ["KDJAX_TEST_SHARED_DIR"] = str(shared)
  return str(shared)


# The slowest files, slowest first (cold-cache --durations on the 2-core
# machine). Under ``--dist loadfile --no-loadscope-reorder`` xdist hands files
# out in this order, so the long ones start at once and the short ones fill
# in around them, instead of a long file arriving last and running alone.
SLOWEST_FIRST = (
    "tests/training/test_trainer.py",
    "tests/divergences/test_divergences_engine.py",
    "tests/cli/test_cli_train.py",
    "tests/training/test_resume_kill.py",
    "tests/project/test_notebooks.py",
    "tests/onpolicy/test_minillm.py",
    "tests/training/test_faults.py",
    "tests/models/test_families.py",
    "tests/onpolicy/test_onpolicy_training.py",
    "tests/onpolicy/test_onpolicy.py",
    "tests/cache/test_teacher_cache.py",
    "tests/experiments/test_run_table.py",
    "tests/training/test_multiprocess.py",
    "tests/training/test_lora.py",
    "tests/training/test_cross_tokenizer.py",
    "tests/training/test_lowering.py",
    "tests/divergences/test_fuzz_divergences.py",
    "tests/divergences/test_sparse_divergences.py",
    "tests/objective/test_taid.py",
)


# Whether the running test is marked ``multi_device``.
_ALL_DEVICES = [False]


@pytest.fixture(scope="session", autouse=True)
def _default_mesh_one_device():
  """``sharding.make_mesh()`` without ``devices=`` takes one device, or all
  eight in a test marked ``multi_device`` (module fixtures: one)."""
  import jax  # pylint: disable=g-import-not-at-top

  from kdjax import sharding  # pylint: disable=g-import-not-at-top

  real = sharding.make_mesh

  def make_mesh(data=-1, fsdp=1, tensor=1, devices=None):
    if devices is None and not _ALL_DEVICES[0]:
      devices = jax.devices()[:1]
    return real(data, fsdp, tensor, devices=devices)

  sharding.make_mesh = make_mesh
  yield
  sharding.make_mesh = real


@pytest.fixture(autouse=True)
def _all_devices_if_marked(request):
  _ALL_DEVICES[0] = request.node.get_closest_marker("multi_device") is not None
  yield
  _ALL_DEVICES[0] = False


def pytest_collection_modifyitems(items):
  rank = {path: i for i, path in enumerate(SLOWEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))
