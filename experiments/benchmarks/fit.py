r"""Does a run fit? Per-device memory and FLOPs of the train step, compiled ahead of time.

    python -m experiments.benchmarks.fit --config=configs/akl_gpt2.py
    python -m experiments.benchmarks.fit --config=configs/akl_llama.py --devices=8
    python -m experiments.benchmarks.fit --config=configs/akl_gpt2.py --fsdp=8 \
        --config.student.remat=full

The step of :mod:`kdjax.training` (teacher forward, student forward + backward,
AdamW; a LoRA student's optimizer state over its adapters only) is lowered
on abstract inputs only (:func:`aot.abstract_run`: no weights,
no data) over a mesh of ``--devices`` fake CPU devices and compiled; XLA's
``memory_analysis`` gives the per-device temporaries of the partitioned program
and ``cost_analysis`` its FLOPs. Parameter, optimizer and teacher bytes are
summed from the arrays' per-device shard shapes. The verdict is the smallest
accelerator (16/24/40/80 GB) whose memory holds arguments + temporaries +
outputs not aliased to (donated) arguments. CPU compilation of the real sizes
takes minutes.
"""

from __future__ import annotations

import os
import time
from typing import Any, Mapping

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    "configs/akl_gpt2.py",
    "Experiment config file[:arg].",
    lock_config=True,
)
_DEVICES = flags.DEFINE_integer("devices", 8, "Fake CPU devices in the mesh.")
_DATA = flags.DEFINE_integer(
    "data",
    None,
    "Mesh data axis (default: the "
    "config's mesh.data; -1 = the devices left).",
)
_FSDP = flags.DEFINE_integer(
    "fsdp", None, "Mesh fsdp axis (default: the " "config's mesh.fsdp)."
)
_STUDENT = flags.DEFINE_string(
    "student",
    None,
    "Student model preset " "(default: the one matching student.init).",
)
_TEACHER = flags.DEFINE_string(
    "teacher",
    None,
    "Teacher model preset " "(default: the one matching teacher.hub_id).",
)

GB = 1e9
ACCELERATORS_GB = (16, 24, 40, 80)
# Checkpoints named by the paper configs -> the kdjax.models preset of the
# same architecture.
PRESET_OF = {
    "gpt2": "gpt2",
    "gpt2-xl": "gpt2-xl",
    "huggyllama/llama-7b": "llama-7b",
    "TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T": "tinyllama-1.1b",
    "Qwen/Qwen3-0.6B": "qwen3-0.6b",
    "Qwen/Qwen3-1.7B": "qwen3-1.7b",
    "Qwen/Qwen3-8B": "qwen3-8b",
    "meta-llama/Llama-3.2-1B-Instruct": "llama-3.2-1b",
    "meta-llama/Llama-3.1-8B-Instruct": "llama-3.1-8b",
    "google/gemma-3-1b-it": "gemma-3-1b",
    "google/gemma-3-12b-it": "gemma-3-12b",
}


def presets(config: Any) -> tuple[str, str | None]:
  """``(student, teacher)`` presets standing in for ``config``'s checkpoints."""
  init = config.student.init
  student = (
      init.removeprefix("preset:")
      if init.startswith("preset:")
      else (PRESET_OF.get(init))
  )
  teacher = (
      PRESET_OF.get(config.teacher.hub_id) if config.teacher.hub_id else None
  )
  if student is None:
    raise ValueError(
        f"no model preset is known for student.init {init!r}; "
        "pass --student=PRESET."
    )
  if teacher is None and config.loss.kd_ratio > 0:
    raise ValueError(
        f"no model preset is known for teacher "
        f"{config.teacher.hub_id or config.teacher.path!r}; pass "
        "--teacher=PRESET."
    )
  return student, teacher


def shard_bytes(tree: Any) -> int:
  """Bytes one device holds of the ``ShapeDtypeStruct`` leaves of ``tree``
  (the most loaded device: shards of uneven splits are rounded up)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  return sum(
      int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize
      for x in jax.tree.leaves(tree)
      if hasattr(x, "sharding")
  )


def fit(
    config: Any,
    mesh: Any,
    student: str,
    teacher: str | None,
    teacher_overrides: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
  """Compiles the step of ``config`` on ``mesh``; its per-device sizes in bytes."""
  import jax  # pylint: disable=g-import-not-at-top

  from experiments.benchmarks import aot  # pylint: disable=g-import-not-at-top

  with jax.set_mesh(mesh):
    step, args = aot.abstract_run(
        config,
        mesh,
        student_preset=student,
        teacher_preset=teacher,
        teacher_overrides=teacher_overrides,
    )
    state, batch, teacher_state, _ = args
    t0 = time.perf_counter()
    compiled = jax.jit(step.train, donate_argnums=(0, 3)).lower(*args).compile()
    seconds = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  out = dict(
      devices=mesh.devices.size,
      mesh=dict(mesh.shape),
      param_count=sum(x.size for x in jax.tree.leaves(state.params)),
      trained_count=sum(
          x.size for x in jax.tree.leaves(step.trained(state.params))
      ),
      params=shard_bytes(state.params),
      opt_state=shard_bytes(state.opt_state),
      teacher=shard_bytes(teacher_state),
      batch=shard_bytes(batch),
      arguments=mem.argument_size_in_bytes,
      outputs=mem.output_size_in_bytes,
      aliased=mem.alias_size_in_bytes,
      temp=mem.temp_size_in_bytes,
      flops=float(cost.get("flops", 0.0)),
      compile_s=seconds,
  )
  out["peak"] = out["arguments"] + out["temp"] + out["outputs"] - out["aliased"]
  out["fits_on_gb"] = next(
      (g for g in ACCELERATORS_GB if out["peak"] <= g * GB), None
  )
  return out


def report(name: str, r: Mapping[str, Any]) -> str:
  mb = lambda b: f"{b / 2**20:,.0f} MiB"
  fits = f"{r['fits_on_gb']} GB" if r["fits_on_gb"] else "none of 16-80 GB"
  return "\n".join(
      [
          f"{name}: {r['devices']} devices, mesh {r['mesh']}, student "
          f"{r['param_count'] / 1e6:,.1f}M params "
          f"({r['trained_count'] / 1e6:,.2f}M trained)",
          f"  per device: params {mb(r['params'])}, optimizer {mb(r['opt_state'])}, "
          f"teacher {mb(r['teacher'])}, batch {mb(r['batch'])}",
          f"  XLA: arguments {mb(r['arguments'])}, temporaries {mb(r['temp'])}, "
          f"outputs {mb(r['outputs'])} (donated {mb(r['aliased'])}); peak "
          f"{mb(r['peak'])}",
          f"  {r['flops'] / 1e12:,.2f} TFLOP per device per step; fits on: {fits}; "
          f"compiled in {r['compile_s']:.0f} s",
      ]
  )


def main(argv: list[str]) -> None:
  del argv
  os.environ["XLA_FLAGS"] = (
      os.environ.get("XLA_FLAGS", "")
      + f" --xla_force_host_platform_device_count="
      f"{_DEVICES.value}"
  )
  os.environ["JAX_PLATFORMS"] = "cpu"
  import jax  # pylint: disable=g-import-not-at-top

  from kdjax import sharding  # pylint: disable=g-import-not-at-top

  config = _CONFIG.value
  devices = jax.devices()
  if len(devices) != _DEVICES.value:
    raise app.UsageError(
        f"jax already has {len(devices)} devices; run fit.py "
        "in a fresh process."
    )
  data = config.mesh.data if _DATA.value is None else _DATA.value
  fsdp = config.mesh.fsdp if _FSDP.value is None else _FSDP.value
  mesh = sharding.make_mesh(data, fsdp, devices=devices)
  student, teacher = presets(config)
  if _STUDENT.value:
    student = _STUDENT.value
  if _TEACHER.value:
    teacher = _TEACHER.value
  path = config_flags.get_config_filename(flags.FLAGS["config"])
  name = f"{path} ({teacher} -> {student})"
  overrides = dict(config.teacher.get("model_overrides", {}))
  print(report(name, fit(config, mesh, student, teacher, overrides)))


if __name__ == "__main__":
  app.run(main)
