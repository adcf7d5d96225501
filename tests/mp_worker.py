"""One process of a multi-process training run (driven by test_multiprocess.py).

    python tests/mp_worker.py ROOT WORKDIR STEPS OUT

with ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``
set, as a launcher would. Trains ``tiny_run.config("akl_gpt2", ROOT)`` through
``training.train_and_evaluate`` (which initialises ``jax.distributed``) and
writes ``OUT/<process id>.npz``: the host-local ``input_ids`` this process fed
each step, and the files under WORKDIR that this process opened for writing.
"""

import builtins
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # pylint: disable=g-import-not-at-top

from kdjax import training  # pylint: disable=g-import-not-at-top
from kdjax.training import step as train_step  # pylint: disable=g-import-not-at-top
import tiny_run  # pylint: disable=g-import-not-at-top

CONFIG = {
    "mesh.data": 1,
    "mesh.fsdp": 4,
    "ckpt.every_steps": 2,
    "eval.every_steps": 4,
    "export_hf": True,
}


def config(root: str, steps: int):
  return tiny_run.config("akl_gpt2", root, steps=steps, **CONFIG)


def main(root: str, workdir: str, steps: int, out: str) -> None:
  fed, written = [], set()
  put = train_step.put_batch

  def recording_put(batch, mesh):
    fed.append(np.asarray(batch["input_ids"]))
    return put(batch, mesh)

  train_step.put_batch = recording_put

  real_open = builtins.open
  workdir = os.path.abspath(workdir)

  def recording_open(file, mode="r", *args, **kwargs):
    if isinstance(file, (str, os.PathLike)) and any(m in mode for m in "wax"):
      path = os.path.abspath(file)
      if path.startswith(workdir + os.sep):
        written.add(os.path.relpath(path, workdir))
    return real_open(file, mode, *args, **kwargs)

  builtins.open = recording_open

  training.train_and_evaluate(config(root, steps), workdir)
  builtins.open = real_open
  os.makedirs(out, exist_ok=True)
  np.savez(
      os.path.join(out, f"{jax.process_index()}.npz"),
      fed=np.stack(fed),
      written=np.array(sorted(written), dtype=str),
      process_count=jax.process_count(),
      devices=len(jax.devices()),
      local_devices=len(jax.local_devices()),
  )


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4])
