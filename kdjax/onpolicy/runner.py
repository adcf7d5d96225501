"""The sequence source inside a training loop: state, timing, metrics.

Example::

  runner = Runner(source, source.init(config.seed))   # or restored state
  for step in ...:
    batch = runner(train_state, teacher_state, put(next(data_iter)))
    train_state, m, bad = train_fn(train_state, batch, teacher_state, bad)
    ...
    metrics.update(runner.log())          # at a logging boundary
    runner.after_validation(val_loss)     # DistiLLM's schedule
    save((train_state, runner.state))     # exact resume

:class:`Runner` jits :meth:`Source.__call__` once (the source state is
donated, so the replay buffer is updated in place) and, on the kinds that
generate, times each call: it first waits for the previous train step (the
generation needs its parameters), then for the generated batch, so
``gen_time_s`` is generation alone. :meth:`log` returns the window's means
and starts a new window:

* ``onpolicy_fraction``: batches not taken from the dataset;
* ``gen_fraction``: batches sampled this step (the rest of the on-policy
  ones are DistiLLM replays);
* ``gen_time_s``: seconds of generation per step (all steps of the window);
* ``gen_len``: mean generated response length over the steps that sampled;
* ``skd_replaced``: fraction of SKD tokens the teacher replaced.
"""

from __future__ import annotations

import time

import jax
import numpy as np

from kdjax.onpolicy import source as source_lib


class Runner:
  """One run's source, its state and the metrics of the current window."""

  def __init__(
      self,
      source: source_lib.Source,
      state: source_lib.State,
      mesh: jax.sharding.Mesh | None = None,
  ):
    """``mesh``: where the step runs; the state is replicated over it."""
    self.source = source
    if mesh is not None:
      state = jax.device_put(
          state, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
      )
    self.state = state
    self._fn = jax.jit(source.__call__, donate_argnums=(4,))
    self._infos: list[dict] = []
    self._gen_s = 0.0

  @property
  def generates(self) -> bool:
    return self.source.kind != "dataset"

  def __call__(self, train_state, teacher_state, batch: dict) -> dict:
    """The batch to train on at ``train_state.step``."""
    if not self.generates:
      self._infos.append(None)
      return batch
    jax.block_until_ready(train_state.step)  # the previous update is done
    t0 = time.perf_counter()
    batch, self.state, info = self._fn(
        train_state.params,
        train_state.rest,
        teacher_state,
        batch,
        self.state,
        train_state.step,
    )
    jax.block_until_ready(batch)
    self._gen_s += time.perf_counter() - t0
    self._infos.append(info)
    return batch

  def after_validation(self, val_loss: float) -> None:
    """DistiLLM: raises ``tau`` when the validation loss rose (else nothing)."""
    if self.source.kind == "distillm":
      self.state = source_lib.after_validation(
          self.state, val_loss, self.source.loss_eps
      )

  def log(self) -> dict[str, float]:
    """Means over the steps since the last call; empty for ``dataset``."""
    infos, gen_s = self._infos, self._gen_s
    self._infos, self._gen_s = [], 0.0
    if not self.generates or not infos:
      return {}
    got = {k: np.asarray([float(i[k]) for i in infos]) for k in infos[0]}
    sampled = got["generated"] > 0
    return {
        "onpolicy_fraction": float(got["onpolicy"].mean()),
        "gen_fraction": float(sampled.mean()),
        "gen_time_s": gen_s / len(infos),
        "gen_len": float(got["gen_len"][sampled].mean())
        if sampled.any()
        else 0.0,
        "skd_replaced": float(got["skd_replaced"][sampled].mean())
        if sampled.any()
        else 0.0,
    }
