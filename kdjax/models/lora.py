"""LoRA: low-rank adapters on a model's linear layers (docs/training.md, "LoRA students").

A targeted layer computes ``h = W x + b + (alpha / r) B A x`` (peft's
convention; in kdjax's ``(in, out)`` kernels ``y = x W + b + s (x A) B``
with ``A [in, r]``, ``B [r, out]``, ``s = alpha / r``). ``A`` starts from
flax's He-uniform initialiser and ``B`` from zeros, so the adapted model
starts equal to its base.

```python
from kdjax.models import lora
student = lora.apply(student, rank=8, alpha=16, rngs=nnx.Rngs(0))
adapters = nnx.state(student, lora.TRAINABLE)   # what an optimizer updates
plain = lora.merged(student)                    # W + s A B, no adapters left
lora.save_adapter(student, "out/adapter")       # peft's layout
```

:func:`apply` turns each targeted ``nnx.Linear`` into a :class:`LoRALinear`
in place: its ``kernel`` and ``bias`` stay the same ``nnx.Param`` variables
at the same paths (so the base's state, shardings and Hugging Face key map
are the plain model's) and the adapters are flax's ``nnx.LoRA`` under
``<layer>/lora``, ``nnx.LoRAParam`` variables: a distinct type an optimizer,
a gradient or a checkpoint selects with :data:`TRAINABLE`.
"""

from __future__ import annotations

import json
import re

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy

from kdjax import fs
from kdjax.config import spec
from kdjax.models import hf

# The adapters' variable type: what a LoRA student trains.
TRAINABLE = nnx.LoRAParam

# Attention and MLP projections of both families (``student.lora.targets``).
DEFAULT_TARGETS = spec.LORA_TARGETS


class LoRALinear(nnx.Linear):
  """An ``nnx.Linear`` plus a scaled low-rank update (made by :func:`apply`).

  ``y = x W + b + scale * dropout(x) A B`` with ``scale = alpha / rank``;
  ``lora`` is the ``nnx.LoRA`` holding ``lora_a [in, r]`` and
  ``lora_b [r, out]``, ``lora_dropout`` an ``nnx.Dropout`` or None.
  """

  def __call__(self, x, out_sharding=None):
    y = super().__call__(x, out_sharding=out_sharding)
    if self.lora_dropout is not None:
      x = self.lora_dropout(x)
    return y + self.scale * self.lora(x)

  def delta(self) -> jax.Array:
    """``scale * A B``, the update to the kernel ``[in, out]``, in float32."""
    a = self.lora.lora_a[...].astype(jnp.float32)
    b = self.lora.lora_b[...].astype(jnp.float32)
    return self.scale * (a @ b)


def pattern(targets: str) -> re.Pattern:
  """The compiled :func:`kdjax.config.spec.lora_regex` of ``targets``:
  module names (``"q_proj,v_proj"``) or a regex on ``/``-joined paths."""
  try:
    return re.compile(spec.lora_regex(targets))
  except ValueError as e:
    raise ValueError(
        f"LoRA targets {targets!r} {e}; pass names such as q_proj,v_proj."
    ) from None


def linear_paths(model: nnx.Module) -> list[str]:
  """The ``/``-joined paths of every ``nnx.Linear`` in ``model``."""
  return [
      "/".join(map(str, path))
      for path, m in nnx.iter_modules(model)
      if isinstance(m, nnx.Linear)
  ]


def select(paths: list[str], targets: str) -> list[str]:
  """The ``paths`` that ``targets`` (:func:`pattern`) selects."""
  rx = pattern(targets)
  return [p for p in paths if rx.fullmatch(p)]


def matching(model: nnx.Module, targets: str) -> list[str]:
  """Paths of the linear layers ``targets`` selects; refuses an empty match."""
  paths = linear_paths(model)
  found = select(paths, targets)
  if not found:
    raise ValueError(
        f"LoRA targets {targets!r} match none of the model's linear layers; "
        f"choose among {layer_names(paths)}."
    )
  return found


def layer_names(paths: list[str]) -> str:
  """The distinct last parts of ``paths``, comma-separated (a ``targets``)."""
  return ",".join(sorted({p.rsplit("/", 1)[-1] for p in paths}))


def apply(
    model: nnx.Module,
    *,
    rank: int,
    alpha: float,
    rngs: nnx.Rngs,
    targets: str = DEFAULT_TARGETS,
    dropout: float = 0.0,
) -> nnx.Module:
  """Adds rank-``rank`` adapters to the linear layers ``targets`` selects.

  In place (and returned): each selected ``nnx.Linear`` becomes a
  :class:`LoRALinear` keeping its own kernel and bias. ``A`` is drawn from
  ``rngs.params``, ``B`` is zero; ``dropout > 0`` drops the adapters' input
  (``rngs.dropout``), in training mode only. Call ``model.train()`` /
  ``model.eval()`` afterwards to set the mode of the new dropout layers.
  """
  if rank < 1:
    raise ValueError(f"LoRA rank {rank} must be a positive integer.")
  chosen = set(matching(model, targets))
  for path, m in list(nnx.iter_modules(model)):
    if "/".join(map(str, path)) not in chosen or isinstance(m, LoRALinear):
      continue
    n_in, n_out = m.kernel.shape
    lora = nnx.LoRA(
        n_in,
        rank,
        n_out,
        dtype=m.dtype,
        param_dtype=m.kernel.dtype,
        rngs=rngs,
    )
    m.__class__ = LoRALinear
    m.lora = lora
    m.scale = alpha / rank
    m.lora_dropout = nnx.Dropout(dropout, rngs=rngs) if dropout else None
  return model


def adapted(model: nnx.Module) -> list[tuple[tuple, LoRALinear]]:
  """``(path, layer)`` of every :class:`LoRALinear` in ``model``."""
  return [
      (path, m)
      for path, m in nnx.iter_modules(model)
      if isinstance(m, LoRALinear)
  ]


def merged(model: nnx.Module) -> nnx.Module:
  """A plain copy of ``model``: each adapted kernel ``W + (alpha / r) A B``.

  The copy's layers are ``nnx.Linear`` again and its state has the paths of
  the model without adapters; ``model`` is left as it is.
  """
  plain = nnx.clone(model)
  for _, m in adapted(plain):
    m.kernel[...] = (m.kernel[...].astype(jnp.float32) + m.delta()).astype(
        m.kernel.dtype
    )
    del m.lora, m.scale, m.lora_dropout
    m.__class__ = nnx.Linear
  return plain


def rank_and_scale(model: nnx.Module) -> tuple[int, float]:
  """The adapters' common ``(rank, alpha / rank)``; refuses mixed adapters."""
  found = {(m.lora.lora_a.shape[1], m.scale) for _, m in adapted(model)}
  if len(found) != 1:
    raise ValueError(
        f"the model holds {'no' if not found else 'mixed'} LoRA adapters "
        f"({sorted(found)}); apply one rank and alpha to every layer."
    )
  return found.pop()


def peft_tensors(model: nnx.Module) -> tuple[dict[str, np.ndarray], list, bool]:
  """peft's tensors of ``model``'s adapters, the HF names of the adapted
  modules and whether their HF weights are ``(in, out)`` (GPT-2's Conv1D).

  ``base_model.model.<module>.lora_A.weight`` is ``A^T [r, in]`` and
  ``lora_B.weight`` is ``B^T [out, r]`` (torch ``nn.Linear`` layout).
  """
  entries = hf.family(model.config).entries
  prefix = hf.key_prefix(model.config)
  by_path = {e.path[:-1]: e for e in entries if e.path[-1] == "kernel"}
  tensors, modules, conv1d = {}, [], set()
  for path, m in adapted(model):
    entry = by_path[tuple(path)]
    name = prefix + entry.hf_key.removesuffix(".weight")
    modules.append(name)
    conv1d.add(not entry.transpose)
    for key, value in (("lora_A", m.lora.lora_a), ("lora_B", m.lora.lora_b)):
      array = np.asarray(jax.device_get(value[...]), np.float32)
      tensors[f"base_model.model.{name}.{key}.weight"] = np.ascontiguousarray(
          array.T
      )
  return tensors, modules, conv1d == {True}


def save_adapter(
    model: nnx.Module,
    directory: fs.PathLike,
    *,
    base_model: str | None = None,
    dropout: float = 0.0,
) -> None:
  """Writes the adapters alone as peft does: ``adapter_config.json`` and
  ``adapter_model.safetensors`` (:func:`peft_tensors`).

  ``PeftModel.from_pretrained(base, directory)`` on the base checkpoint
  (``base_model``, recorded in the config) rebuilds the adapted model.
  """
  tensors, modules, fan_in_fan_out = peft_tensors(model)
  rank, scale = rank_and_scale(model)
  config = {
      "peft_type": "LORA",
      "task_type": "CAUSAL_LM",
      "base_model_name_or_path": base_model,
      "r": rank,
      "lora_alpha": scale * rank,
      "lora_dropout": dropout,
      "target_modules": modules,
      "fan_in_fan_out": fan_in_fan_out,
      "bias": "none",
      "use_rslora": False,
      "inference_mode": True,
  }
  out = fs.path(directory)
  out.mkdir(parents=True, exist_ok=True)
  # peft recognises the directory by its config: written last, so an
  # interrupted export is not taken for a whole one.
  (out / "adapter_config.json").unlink(missing_ok=True)
  fs.write_bytes(
      out / "adapter_model.safetensors",
      safetensors.numpy.save(tensors, {"format": "pt"}),
  )
  fs.write_text_atomic(
      out / "adapter_config.json", json.dumps(config, indent=2)
  )
