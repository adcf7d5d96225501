"""An on-policy strategy inside a training loop: state, timing, metrics.

Example::

  runner = Runner(strategy, strategy.init(config.seed))   # or restored state
  runner.before_training(measure_val_loss)   # a fresh run
  for step in ...:
    batch = runner(train_state, teacher_state, put(next(data_iter)))
    train_state, m, bad = train_fn(train_state, batch, teacher_state, bad)
    ...
    metrics.update(runner.log())          # at a logging boundary
    runner.after_validation(val_loss)     # the strategy's reaction
    save((train_state, runner.state))     # exact resume

:class:`Runner` jits :meth:`Strategy.__call__
<kdjax.onpolicy.strategy.Strategy.__call__>` once (the strategy state is
donated, so a replay buffer is updated in place) and, on strategies that
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
from typing import Callable

import jax
import numpy as np

from kdjax.onpolicy import strategy as strategy_lib


class Runner:
  """One run's strategy, its state and the metrics of the current window."""

  def __init__(
      self,
      strategy: strategy_lib.Strategy,
      state: strategy_lib.State,
      mesh: jax.sharding.Mesh | None = None,
  ):
    """``mesh``: where the step runs; the state is replicated over it."""
    self.strategy = strategy
    if mesh is not None:
      state = jax.device_put(
          state, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
      )
    self.state = state
    self._fn = jax.jit(strategy.__call__, donate_argnums=(4,))
    self._infos: list[dict] = []
    self._gen_s = 0.0

  @property
  def generates(self) -> bool:
    return self.strategy.generates

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

  def before_training(self, val_loss: Callable[[], float]) -> None:
    """Before step 0 of a fresh run; ``val_loss()`` validates the initial
    student, if the strategy asks (DistiLLM's schedule)."""
    self.state = self.strategy.before_training(self.state, val_loss)

  def after_validation(self, val_loss: float) -> None:
    """After a validation (DistiLLM raises ``tau`` when the loss rose)."""
    self.state = self.strategy.after_validation(self.state, val_loss)

  def log(self) -> dict[str, float]:
    """Means over the steps since the last call; empty when the strategy
    does not generate."""
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
