"""The training objective: ``(1 - kd_ratio) · CE + kd_ratio · KD`` as token sums.

The step needs the loss as a *global* masked token mean over a batch that is
split across devices and, with gradient accumulation, across micro-batches.
So everything here returns sums over this shard's masked tokens; the caller
divides by the global token count once. Sums are computed under
``jax.shard_map`` on the batch axes: each device reduces its own rows (the
divergence sees whole local sequences, which SinKD's per-sequence transport
problems need) and one ``psum`` produces the global sum.

Three ways to get the KD term, chosen by ``loss.impl``:

* ``auto`` (default): from ``[B, T, V]`` logits with the public divergence
  ``kd.<name>`` (analytic gradients, chunked over tokens on CPU, one piece
  elsewhere);
* ``fused``: from final hidden states and LM-head weights, never forming the
  logits (:func:`kdjax.divergences.fused.ce_kd_sums`; CE and KD share each
  ``loss.chunk_size``-token logits chunk). It trades a few percent of speed
  for memory: no ``[B, T, V]`` logits, their gradient or the model's
  ``[B, T, V]`` head output are kept;
* ``reference``: the autodiff definitions ``kd.reference.<name>`` (the oracle
  of the tests; slow, several ``[B, T, V]`` residuals).

``loss.temperature`` (default 1) divides both models' logits in the KD term;
CE always uses the raw logits.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp

from kdjax import divergences as kd
from kdjax import sharding
from kdjax.divergences import fused

Array = jax.Array
P = jax.sharding.PartitionSpec

IMPLS = ("auto", "fused", "reference")
# Former names of the implementations, with what replaced them.
_RENAMED = {"fast": "auto", "chunked": "auto", "autodiff": "reference"}


class Sums(NamedTuple):
  """Masked token sums of one (micro-)batch, already summed over devices."""
  ce: Array
  kd: Array
  tokens: Array


def check(loss_cfg: Mapping[str, Any]) -> None:
  """Fails early, with the fix, on a loss config that cannot run."""
  name, impl = loss_cfg["name"], loss_cfg["impl"]
  if impl in _RENAMED:
    raise ValueError(f"loss.impl={impl!r} no longer exists; use "
                     f"--config.loss.impl={_RENAMED[impl]} (the analytic, "
                     "chunked path is the default 'auto').")
  if impl not in IMPLS:
    raise ValueError(f"loss.impl={impl!r} is unknown; use one of {IMPLS}.")
  if name not in kd.names():
    raise ValueError(f"loss.name={name!r} is unknown; use one of "
                     f"{', '.join(kd.names())}.")
  if not 0.0 <= loss_cfg["kd_ratio"] <= 1.0:
    raise ValueError(f"loss.kd_ratio={loss_cfg['kd_ratio']} must be in [0, 1].")
  if impl == "fused" and loss_cfg["kd_ratio"] > 0 and (
      name not in kd.TOKEN_LEVEL):
    raise ValueError(f"loss.impl='fused' has no {name!r} version; set "
                     "--config.loss.impl=auto.")
  if "temperature" in loss_cfg["hp"]:
    raise ValueError("set the KD temperature as --config.loss.temperature, "
                     "not loss.hp.temperature.")
  temperature = loss_cfg.get("temperature", 1.0)
  if not temperature > 0:
    raise ValueError(f"loss.temperature={temperature} must be > 0.")


def _token_ce(logits_BxTxV: Array, labels_BxT: Array) -> Array:
  """Next-token negative log-likelihood per position, float32."""
  log_q = jax.nn.log_softmax(logits_BxTxV.astype(jnp.float32), axis=-1)
  return -jnp.take_along_axis(log_q, labels_BxT[..., None], axis=-1)[..., 0]


def _kd_hp(loss_cfg) -> dict[str, Any]:
  """The divergence's keyword arguments: ``loss.hp`` and the temperature."""
  return dict(loss_cfg["hp"], temperature=loss_cfg.get("temperature", 1.0))


def _per_token_kd(loss_cfg, s_BxTxV: Array, t_BxTxV: Array,
                  mask_BxT: Array) -> Array:
  """The KD divergence per position ``[B, T]`` from both models' logits."""
  name, hp = loss_cfg["name"], _kd_hp(loss_cfg)
  if name == "sinkhorn":  # needs the mask to wall off padding rows
    return kd.sinkhorn(s_BxTxV, t_BxTxV, mask_BxT, **hp)
  return kd.get(name, loss_cfg["impl"])(s_BxTxV, t_BxTxV, **hp)


def _local_sums(loss_cfg, use_kd, s, t, labels, mask) -> Sums:
  """This device's sums from logits (``t`` is None when ``use_kd`` is False)."""
  ce = jnp.sum(_token_ce(s, labels) * mask)
  kd_sum = (jnp.sum(jnp.where(mask > 0, _per_token_kd(loss_cfg, s, t, mask), 0.))
            if use_kd else jnp.zeros((), jnp.float32))
  return Sums(ce, kd_sum, jnp.sum(mask))


def _local_sums_fused(loss_cfg, use_kd, x_s, w_s, x_t, w_t, labels, mask):
  """This device's sums from hidden states ``[B, T, D]`` and heads ``[V, D]``."""
  mask_N, labels_N = mask.reshape(-1), labels.reshape(-1)
  x_t_NxD = x_t.reshape(-1, x_t.shape[-1]) if use_kd else None
  ce, kd_sum = fused.ce_kd_sums(
      loss_cfg["name"] if use_kd else None, x_s.reshape(-1, x_s.shape[-1]),
      w_s, x_t_NxD, w_t if use_kd else None, labels_N, mask_N,
      kd_ratio=loss_cfg["kd_ratio"] if use_kd else 0.0,
      chunk_size=loss_cfg["chunk_size"], **_kd_hp(loss_cfg))
  return Sums(ce, kd_sum, jnp.sum(mask_N))


def _psum(local: Callable, n_batch_args: int, n_replicated: int = 0):
  """``local`` under shard_map over the batch axes, outputs psum-ed."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return local
  axes = tuple(a for a in sharding.BATCH if a in mesh.axis_names)
  batch = P(axes)

  def body(*args):
    # Replicated inputs (LM heads) become device-varying, so a custom VJP
    # may return per-device partial gradients for them; the transpose of
    # this cast is the psum that adds those partials up.
    rep = jax.tree.map(lambda x: jax.lax.pcast(x, axes, to="varying"),
                       args[:n_replicated])
    out = local(*rep, *args[n_replicated:])
    return jax.tree.map(lambda x: jax.lax.psum(x, axes), out)

  specs = (P(),) * n_replicated + (batch,) * n_batch_args
  return jax.shard_map(body, in_specs=specs, out_specs=P())


def sums(loss_cfg, student, teacher, batch: Mapping[str, Array]) -> Sums:
  """CE and KD masked token sums of ``student`` (and ``teacher``) on ``batch``.

  ``teacher`` may be None when ``kd_ratio`` is 0. The teacher's outputs are
  under ``stop_gradient``; the student's keep their gradient.
  """
  use_kd = teacher is not None and loss_cfg["kd_ratio"] > 0
  inputs = (batch["input_ids"], batch["positions"], batch["attention_mask"])
  labels, mask = batch["labels"], batch["loss_mask"].astype(jnp.float32)
  if loss_cfg["impl"] == "fused":
    x_s, w_s = student.hidden_states(*inputs), student.head_weight()
    x_t = w_t = None
    if use_kd:
      x_t = jax.lax.stop_gradient(teacher.hidden_states(*inputs))
      w_t = jax.lax.stop_gradient(teacher.head_weight())
    local = functools.partial(_local_sums_fused, loss_cfg, use_kd)
    # Heads are replicated inputs (shard_map gathers FSDP shards once).
    fn = _psum(lambda w_s, w_t, x_s, x_t, l, m: local(x_s, w_s, x_t, w_t, l, m),
               4, 2)
    return fn(w_s, w_t, x_s, x_t, labels, mask)
  s = student(*inputs)
  t = jax.lax.stop_gradient(teacher(*inputs)) if use_kd else None
  local = functools.partial(_local_sums, loss_cfg, use_kd)
  return _psum(local, 4)(s, t, labels, mask)


def combine(loss_cfg, totals: Sums) -> tuple[Array, dict[str, Array]]:
  """The scalar objective from global sums, plus its parts for logging."""
  n = jnp.maximum(totals.tokens, 1.0)
  ce, kd_value = totals.ce / n, totals.kd / n
  r = loss_cfg["kd_ratio"]
  loss = (1.0 - r) * ce + r * kd_value if r > 0 else ce
  return loss, {"loss": loss, "ce": ce, "kd": kd_value, "tokens": totals.tokens}
