"""Joining a multi-process run: ``jax.distributed`` from the launcher's environment."""

from __future__ import annotations

import os

import jax


def maybe_initialize_distributed() -> None:
  """``jax.distributed.initialize()`` when launched as one of several processes.

  Recognised launchers: explicit ``JAX_COORDINATOR_ADDRESS`` (+
  ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``), SLURM with more than one task,
  and multi-host TPU slices (``TPU_WORKER_HOSTNAMES`` lists several hosts).
  """
  env = os.environ
  if jax.distributed.is_initialized():
    return
  if "JAX_COORDINATOR_ADDRESS" in env:
    jax.distributed.initialize(
        env["JAX_COORDINATOR_ADDRESS"],
        int(env["JAX_NUM_PROCESSES"]),
        int(env["JAX_PROCESS_ID"]),
    )
  elif int(env.get("SLURM_NTASKS", "1")) > 1 or "," in env.get(
      "TPU_WORKER_HOSTNAMES", ""
  ):
    jax.distributed.initialize()
