"""kdjax's commands run as a user runs them: subprocesses from a directory.

``ROOT`` is the repository root; :func:`run_cli` runs ``python -m module``
with the test environment (CPU, offline, the shared compilation cache) and
:func:`assert_one_error` checks the CLI's one-line error contract;
:func:`run_python` runs a snippet in a fresh interpreter. :func:`xla_flags`
is the ``XLA_FLAGS`` of every test process.
"""

from importlib import metadata
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _jaxlib_before(major: int, minor: int) -> bool:
  version = metadata.version("jaxlib").split(".")
  return tuple(int(v) for v in version[:2]) < (major, minor)


# XLA:CPU's MLIR fusion emitters take about three times as long to compile a
# tiny training step as the classic LLVM IR emitters and run it no faster at
# test sizes; both give the same numbers. jaxlib 0.12 dropped the switch (an
# unknown flag aborts the process), so it is set only where it exists.
_COMPILE_FLAGS = (
    ("--xla_cpu_use_fusion_emitters=false",) if _jaxlib_before(0, 11) else ()
)


def xla_flags(devices: int = 1) -> str:
  """``XLA_FLAGS`` for a test process with ``devices`` fake CPU devices."""
  flags = list(_COMPILE_FLAGS)
  if devices > 1:
    flags.insert(0, f"--xla_force_host_platform_device_count={devices}")
  return " ".join(flags)


def run_cli(module, *args, cwd, env=None):
  """``python -m module args`` in ``cwd``; returns (rc, stdout, stderr)."""
  full_env = dict(
      os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1"
  )
  full_env["XLA_FLAGS"] = xla_flags()
  full_env.update(env or {})
  p = subprocess.run(
      [sys.executable, "-m", module, *args],
      cwd=cwd,
      env=full_env,
      capture_output=True,
      text=True,
      timeout=300,
  )
  return p.returncode, p.stdout, p.stderr


def run_python(code: str) -> str:
  """``python -c code`` at the repository root, kdjax importable; its stdout
  (a failure raises)."""
  return subprocess.run(
      [sys.executable, "-c", code],
      capture_output=True,
      text=True,
      check=True,
      cwd=ROOT,
      env=dict(os.environ, PYTHONPATH=ROOT),
  ).stdout


def assert_one_error(stderr: str, *words) -> str:
  """Exactly one ``error:`` line, no traceback, the key words in it."""
  errors = [l for l in stderr.splitlines() if l.startswith("error: ")]
  assert len(errors) == 1, stderr
  assert "Traceback" not in stderr, stderr
  for w in words:
    assert w in errors[0], (w, errors[0])
  return errors[0]


def listing(path) -> list[str]:
  """Every path under ``path`` (empty if it does not exist)."""
  out = []
  for dirpath, dirnames, filenames in os.walk(path):
    out += [
        os.path.relpath(os.path.join(dirpath, n), path)
        for n in dirnames + filenames
    ]
  return sorted(out)
