"""Meshes and partition rules: the only module that knows mesh axis names.

A mesh has three axes, ``("data", "fsdp", "tensor")``. Models annotate their
parameters with *logical* axis names (``"vocab"``, ``"embed"``, ``"heads"``,
``"mlp"``, ...; see ``LOGICAL_AXES`` in each model family) and this module maps
them onto mesh axes:

* ``embed``  -> ``fsdp``   (ZeRO-3 style: each device holds a slice of every matrix)
* ``vocab``, ``heads``, ``kv_heads``, ``mlp`` -> ``tensor`` (Megatron style)
* batch dimensions -> ``("data", "fsdp")``

A dimension that a mesh axis does not divide evenly stays replicated (GPT-2's
50257-word vocabulary, say), so any model fits any mesh; XLA's GSPMD propagation
(``AxisType.Auto``) inserts the collectives.
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

from flax import nnx, traverse_util
import jax
import numpy as np

P = jax.sharding.PartitionSpec
NamedSharding = jax.sharding.NamedSharding

AXES = ("data", "fsdp", "tensor")
BATCH = ("data", "fsdp")

# logical axis name -> mesh axis (None: replicated).
RULES = {
    "batch": BATCH,
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "pos": None,
    "norm": None,
}


def make_mesh(
    data: int = -1,
    fsdp: int = 1,
    tensor: int = 1,
    devices: Sequence[jax.Device] | None = None,
) -> jax.sharding.Mesh:
  """Builds a ``("data", "fsdp", "tensor")`` mesh with ``AxisType.Auto`` axes.

  Args:
    data: size of the data-parallel axis; -1 takes every device left over.
    fsdp: size of the parameter-sharding axis.
    tensor: size of the tensor-parallel axis.
    devices: devices to use (default: all of ``jax.devices()``).
  """
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  if data == -1:
    if n % (fsdp * tensor):
      raise ValueError(
          f"fsdp*tensor={fsdp * tensor} does not divide the {n} "
          "devices; choose sizes whose product divides the count."
      )
    data = n // (fsdp * tensor)
  if data * fsdp * tensor != n:
    raise ValueError(
        f"mesh data*fsdp*tensor={data}*{fsdp}*{tensor} != {n} "
        "devices; pass data=-1 to take the rest."
    )
  auto = jax.sharding.AxisType.Auto
  # Shape positionally: the keyword is axis_shapes in jax 0.10, axis_sizes in 0.12.
  return jax.make_mesh((data, fsdp, tensor), AXES, (auto,) * 3, devices=devices)


def logical_to_spec(
    logical: Sequence[str | None], shape: Sequence[int], mesh: jax.sharding.Mesh
) -> P:
  """Maps logical axis names to a PartitionSpec, replicating uneven dims."""
  spec = []
  for name, size in zip(logical, shape):
    axis = RULES.get(name) if name is not None else None
    axes = (axis,) if isinstance(axis, str) else tuple(axis or ())
    axes = tuple(a for a in axes if mesh.shape[a] > 1)
    n = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
    if not axes or size % n:
      spec.append(None)
    else:
      spec.append(axes[0] if len(axes) == 1 else axes)
  return P(*spec)


def logical_axes(
    table: Sequence[tuple[str, tuple]], path: str, ndim: int
) -> tuple:
  """Looks a ``/``-joined parameter path up in a model's ``LOGICAL_AXES``."""
  for pattern, axes in table:
    if re.fullmatch(pattern, path):
      if len(axes) != ndim:
        raise ValueError(
            f"logical axes {axes} for {path} do not match its "
            f"rank {ndim}; fix the model's LOGICAL_AXES table."
        )
      return axes
  return (None,) * ndim


def state_shardings(
    model: nnx.Module, mesh: jax.sharding.Mesh | None, state: Any = None
) -> dict:
  """Flat ``{path_tuple: NamedSharding}`` for every array in ``model``'s state.

  ``model`` may be abstract (``nnx.eval_shape``). Non-parameter state (RNG
  keys and counters) is replicated. With ``mesh=None`` everything lands on
  the default device.
  """
  if state is None:
    state = nnx.state(model)
  table = getattr(type(model), "LOGICAL_AXES", ())
  flat = traverse_util.flatten_dict(nnx.to_pure_dict(state))
  out = {}
  for path, leaf in flat.items():
    if mesh is None:
      out[path] = jax.sharding.SingleDeviceSharding(jax.devices()[0])
      continue
    shape = getattr(leaf, "shape", ())
    names = logical_axes(table, "/".join(map(str, path)), len(shape))
    out[path] = NamedSharding(mesh, logical_to_spec(names, shape, mesh))
  return out


def shard_model(model: nnx.Module, mesh: jax.sharding.Mesh) -> nnx.Module:
  """Places every array of ``model`` on its sharding over ``mesh`` (in place)."""
  state = nnx.state(model)
  shardings = state_shardings(model, mesh, state)
  flat = traverse_util.flatten_dict(nnx.to_pure_dict(state))
  placed = {p: jax.device_put(v, shardings[p]) for p, v in flat.items()}
  nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(placed))
  nnx.update(model, state)
  return model


def batch_sharding(mesh: jax.sharding.Mesh, ndim: int = 2) -> NamedSharding:
  """Sharding for a batch-major array: first dim over ``("data", "fsdp")``."""
  return NamedSharding(mesh, P(BATCH, *([None] * (ndim - 1))))


def put_batch(
    batch: Mapping[str, np.ndarray], mesh: jax.sharding.Mesh
) -> dict[str, jax.Array]:
  """Host arrays (this process's rows) -> global arrays split over the batch
  axes; every process passes its own rows of the same global batch."""
  return {
      k: jax.make_array_from_process_local_data(
          batch_sharding(mesh, np.ndim(v)), np.asarray(v)
      )
      for k, v in batch.items()
  }


def constrain(x: jax.Array, logical: Sequence[str | None]) -> jax.Array:
  """``with_sharding_constraint`` by logical axes under ``jax.set_mesh``.

  A no-op without an active mesh, so models call it unconditionally; e.g. the
  residual stream is pinned to ``("batch", None, None)`` so activations stay
  split over ``("data", "fsdp")`` while FSDP gathers the weights.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(
      x, logical_to_spec(logical, x.shape, mesh)
  )
