"""Preemption: SIGKILL the training CLI at random moments, restart, compare.

An on-policy DistiLLM run, which generates every step and replays from a
full buffer, killed ``KDJAX_KILLS`` times (default 3; ``KDJAX_KILLS=10 pytest
tests/training/test_resume_kill.py`` for the long version) and restarted with
the same command each time must end with the same student and the same
sequence-source state (generation key, schedule, replay buffer), bit for bit,
as a run that was never interrupted, and with one ``metrics.jsonl`` row per
step. Its checkpoints hold everything an off-policy run's do and more, so this
one run covers both kinds; its kills land mid-generation too. Kills land
at seeded random moments of three kinds: while a checkpoint is being written
(an orbax ``*.orbax-checkpoint-tmp*`` directory exists), a random delay after a
checkpoint commits, and a random delay after start (set-up, compilation; cut
short at the first new checkpoint so the run cannot finish before the kill).

Every process shares a persistent compilation cache, so a restart costs the
interpreter start and a cache read rather than a compile.
"""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import commands
from kdjax import checkpoint, metrics, sharding, training
from kdjax.config import files as config_files
import tiny_run

KILLS = int(os.environ.get("KDJAX_KILLS", "3"))
DEVICES = 2  # fake CPU devices per process: a real mesh, fast compile
TMP = ".orbax-checkpoint-tmp"

# (config, kills, overrides). DistiLLM with tau = 1 from the start and a
# one-batch buffer generates, fills the buffer and replays from it.
CASES = {
    "distillm": (
        "distillm_gpt2",
        KILLS,
        {
            "onpolicy.init_threshold": 1.0,
            "onpolicy.buffer_size": 8,
            "onpolicy.max_new_tokens": 8,
        },
    ),
}


def _steps(case: str) -> int:
  return 4 * CASES[case][1] + 4  # enough that the run outlives every kill


def tiny_overrides(root: str) -> dict:
  """``--config.`` overrides shrinking a ``:tiny`` config to tiny_run's sizes
  (checkpoints every step, no evaluation, no export)."""
  out = {
      "data.data_dir": tiny_run.data_dir(),
      "data.train_limit": 64,
      "teacher.path": tiny_run.make_teacher(os.path.join(root, "teacher")),
      "batch_size": 8,
      "optim.warmup_steps": 1,
      "log_every": 1,
      "ckpt.every_steps": 1,
      "ckpt.max_to_keep": 2,
      "eval.every_steps": 0,
      "eval.num_examples": 0,
      "export_hf": False,
  }
  out.update(
      {f"student.model_overrides.{k}": v for k, v in tiny_run.STUDENT.items()}
  )
  return out


def _overrides(root: str, case: str) -> dict:
  """The case's overrides on top of :func:`tiny_overrides`."""
  return {**tiny_overrides(root), **CASES[case][2]}


def _config(root: str, case: str):

  from kdjax.config import recipe

  module = config_files.experiment(CASES[case][0])
  c = module.get_config(f"tiny,steps={_steps(case)}")
  recipe.override(c, _overrides(root, case))
  return c


def _command(root: str, workdir: str, case: str) -> list[str]:
  return [
      sys.executable,
      "-m",
      "kdjax.train",
      f"--config=configs/{CASES[case][0]}.py:tiny,steps={_steps(case)}",
      f"--workdir={workdir}",
  ] + [f"--config.{k}={v}" for k, v in _overrides(root, case).items()]


def _env(root: str) -> dict:
  env = dict(os.environ)
  env.update(
      XLA_FLAGS=commands.xla_flags(DEVICES),
      JAX_PLATFORMS="cpu",
      PYTHONPATH=os.getcwd(),
      JAX_COMPILATION_CACHE_DIR=os.path.join(root, "jax_cache"),
      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1",
  )
  return env


class _Launcher:
  """Starts the same command again and again, logging each attempt."""

  def __init__(self, root, workdir, case):
    self.cmd, self.env = _command(root, workdir, case), _env(root)
    self.workdir, self.logs, self.n = workdir, os.path.join(root, "logs"), 0
    os.makedirs(self.logs, exist_ok=True)

  def start(self) -> subprocess.Popen:
    self.n += 1
    log = open(os.path.join(self.logs, f"{self.n}.log"), "w")
    return subprocess.Popen(
        self.cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT
    )

  def tail(self) -> str:
    with open(os.path.join(self.logs, f"{self.n}.log")) as f:
      return f.read()[-3000:]

  def entries(self) -> list[str]:
    path = os.path.join(self.workdir, "ckpt")
    try:
      return os.listdir(path)
    except FileNotFoundError:
      return []

  def committed(self) -> int:
    return max((int(n) for n in self.entries() if n.isdigit()), default=0)


def _wait(proc, predicate, timeout=240.0, poll=0.002) -> bool:
  """Polls ``predicate`` until it holds (True) or ``proc`` exits (False)."""
  end = time.monotonic() + timeout
  while time.monotonic() < end:
    if predicate():
      return True
    if proc.poll() is not None:
      return False
    time.sleep(poll)
  raise AssertionError(
      "the training process made no progress in " f"{timeout:.0f} s"
  )


def _params(c, workdir: str, steps: int) -> dict:
  """The final student params of ``workdir``, restored into a built state.

  On-policy runs checkpoint the train state paired with the sequence source's
  state (generation key, schedule, replay buffer); that is compared too.
  """
  devices = jax.devices()[:DEVICES]
  mesh = sharding.make_mesh(c.mesh.data, c.mesh.fsdp, devices=devices)
  with jax.set_mesh(mesh):
    run = training.build(c, workdir, mesh)
    target = run.state
    if run.source is not None:
      target = (run.state, run.source.init(0))
    ck = checkpoint.Checkpoints(workdir, every_steps=1, max_to_keep=2)
    restored, record = ck.restore(
        ck.latest_step(), target, run.train_data.iterator()
    )
    ck.close()
  state = restored[0] if run.source is not None else restored
  assert record["step"] == int(state.step) == steps
  tree = (state.params, restored[1]) if run.source is not None else state.params
  return {
      jax.tree_util.keystr(k): np.asarray(v)
      for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]
  }


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_sigkilled_run_resumes_to_the_same_student(tmp_path, case):
  root = str(tmp_path)
  rng = np.random.default_rng(0)
  num_kills, steps = CASES[case][1], _steps(case)

  # The uninterrupted reference (it also prepares the data and fills the
  # compilation cache for the restarts).
  ref = _Launcher(root, os.path.join(root, "straight"), case)
  proc = ref.start()
  assert proc.wait(timeout=400) == 0, ref.tail()

  run = _Launcher(root, os.path.join(root, "killed"), case)
  kinds = ["during_save"] + list(
      rng.choice(
          ["after_commit", "after_commit", "after_start"], size=num_kills - 1
      )
  )
  mid_save_leftovers, kills = 0, []
  for kind in kinds:
    before = run.committed()
    proc = run.start()
    if kind == "during_save":
      # Kill as soon as orbax opens a temporary directory for a new step; a
      # save that commits between the poll and the kill does not count, so
      # keep trying on the following steps.
      def saving():
        return any(
            TMP in n and int(n.split(".")[0]) > before for n in run.entries()
        )

      alive = _wait(proc, saving, poll=0.0005)
    elif kind == "after_commit":
      alive = _wait(proc, lambda: run.committed() > before)
      time.sleep(rng.uniform(0.0, 0.5))
    else:  # start-up (imports, data, compilation) or the first new step
      deadline = time.monotonic() + rng.uniform(2.0, 12.0)
      alive = _wait(
          proc, lambda: time.monotonic() > deadline or run.committed() > before
      )
    if not alive or proc.poll() is not None:
      pytest.fail(
          f"the run finished before kill {len(kills) + 1}; raise "
          f"the case's steps ({steps}):\n{run.tail()}"
      )
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    left = [n for n in run.entries() if TMP in n]
    kills.append((kind, before, run.committed(), left))
    if kind == "during_save" and left:
      mid_save_leftovers += 1
  proc = run.start()
  assert proc.wait(timeout=400) == 0, run.tail()

  assert len(kills) == num_kills
  # At least one kill interrupted a checkpoint write (its temporary directory
  # is still there), so the resume really skipped a half-written step.
  assert mid_save_leftovers >= 1, kills

  c = _config(root, case)
  killed, straight = run.workdir, ref.workdir
  # The workdir config is whole and is the run's config.
  assert json.load(open(os.path.join(killed, "config.json"))) == json.loads(
      c.to_json_best_effort()
  )
  a, b = metrics.read(straight), metrics.read(killed)
  assert [r["step"] for r in a] == list(range(1, steps + 1))
  assert [r["step"] for r in b] == list(range(1, steps + 1)), kills
  keys = ("loss", "grad_norm") + (
      ("onpolicy_fraction", "gen_fraction", "gen_len")
      if case == "distillm"
      else ()
  )
  for x, y in zip(a, b):
    assert [x[k] for k in keys] == [y[k] for k in keys], x["step"]
  if case == "distillm":  # it generated, and replayed from the buffer
    gen = [r["gen_fraction"] for r in a]
    assert 0 < np.mean(gen) < 1, gen
  pa, pb = _params(c, straight, steps), _params(c, killed, steps)
  assert pa.keys() == pb.keys()
  for k in pa:
    np.testing.assert_array_equal(pa[k], pb[k], err_msg=k)
