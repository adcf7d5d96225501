"""The optimizer: global-norm clipping, then AdamW on a warmup + cosine schedule.

Weight decay applies to matrices only: biases and norm scales (1-D) are not
decayed, the rule of the reference trainers (no decay on bias/LayerNorm).
Under FSDP the optimizer state is sharded like the parameters
(:func:`abstract_opt_state`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from flax import nnx
import jax
import optax

if TYPE_CHECKING:
  from kdjax.config.spec import OptimSpec

P = jax.sharding.PartitionSpec


def make_schedule(optim: OptimSpec, total_steps: int) -> optax.Schedule:
  """Linear warmup (if any), then cosine decay from lr to lr_min at the last step."""
  if optim.warmup_steps:
    return optax.warmup_cosine_decay_schedule(
        0.0,
        optim.lr,
        optim.warmup_steps,
        max(total_steps, optim.warmup_steps + 1),
        end_value=optim.lr_min,
    )
  return optax.cosine_decay_schedule(
      optim.lr, max(total_steps, 1), alpha=optim.lr_min / optim.lr
  )


def make_optimizer(
    optim: OptimSpec, total_steps: int
) -> optax.GradientTransformation:
  """Global-norm clipping, then AdamW on :func:`make_schedule` (decay on
  matrices only)."""
  schedule = make_schedule(optim, total_steps)
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
  return optax.chain(
      optax.clip_by_global_norm(optim.clip),
      optax.adamw(
          schedule,
          b1=optim.b1,
          b2=optim.b2,
          eps=optim.eps,
          weight_decay=optim.weight_decay,
          mask=decay_mask,
      ),
  )


def abstract_opt_state(
    tx: optax.GradientTransformation, params: nnx.State, mesh: jax.sharding.Mesh
) -> optax.OptState:
  """``tx.init(params)`` as ``ShapeDtypeStruct`` leaves with their shardings.

  A per-parameter buffer (Adam's ``mu``, ``nu``) is sharded like its parameter,
  found by path suffix and shape; the rest (step counts) is replicated. Left
  to sharding propagation, ``jax.jit(tx.init)`` replicates every buffer (zeros
  do not depend on the sharded input), so FSDP would not shard the optimizer.
  """
  keystr = jax.tree_util.keystr
  by_path = {
      keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(params)[0]
  }
  replicated = jax.sharding.NamedSharding(mesh, P())

  def place(path, leaf):
    for i in range(len(path)):
      param = by_path.get(keystr(path[i:]))
      if param is not None and param.shape == leaf.shape:
        return jax.ShapeDtypeStruct(
            leaf.shape, leaf.dtype, sharding=param.sharding
        )
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=replicated)

  return jax.tree_util.tree_map_with_path(
      place, jax.eval_shape(tx.init, params)
  )


def init_opt_state(
    tx: optax.GradientTransformation, params: nnx.State, mesh: jax.sharding.Mesh
) -> optax.OptState:
  """``tx.init(params)`` placed on the shardings of :func:`abstract_opt_state`."""
  shardings = jax.tree.map(
      lambda x: x.sharding, abstract_opt_state(tx, params, mesh)
  )
  return jax.jit(tx.init, out_shardings=shardings)(params)
