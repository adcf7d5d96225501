"""Real-world faults: preemption signals, a second trainer, damaged checkpoints,
non-finite steps and damaged input files.

One CLI subprocess gets ``SIGTERM`` mid-run and two bare processes agree on a
stop; every other fault is injected in-process (a signal sent to this process
from inside the loop, a lock file left by a dead trainer, a checkpoint file
damaged on disk, a batch whose loss is not finite) on a tiny ``akl_gpt2``
run (``test_resume_kill``'s sizes, two CPU devices), whose uninterrupted run
is the reference every resumed run must equal bit for bit. The readers of
safetensors, JSONL and teacher-cache shards are fuzzed with hypothesis
(derandomized, 20 damages each).
"""

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

from etils import epath
from flax import nnx
import hypothesis
from hypothesis import strategies as st
import jax
import numpy as np
import pytest
import test_resume_kill as kill_lib

import commands
from commands import ROOT, assert_one_error
from fake_gcs import fake_gcs_fixture  # noqa: F401
from kdjax import checksums, fs, metrics, training
from kdjax.config import files as config_files
from kdjax.config import recipe
from kdjax.training import lock as lock_lib
from kdjax.training import preemption
from kdjax.training import step as step_lib
import tiny_run

STEPS = 6
DEVICES = 2
CONFIG = f"configs/akl_gpt2.py:tiny,steps={STEPS}"


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  return str(tmp_path_factory.mktemp("faults"))


def _overrides(root: str, **extra) -> dict:
  """test_resume_kill's tiny run; only a stop (or the end) saves."""
  return {**kill_lib.tiny_overrides(root), "ckpt.every_steps": 1000, **extra}


def _config(root: str, **extra):
  c = config_files.load(CONFIG)
  recipe.override(c, _overrides(root, **extra))
  return c


def _train(c, workdir: str):
  return training.train_and_evaluate(
      c, workdir, devices=jax.devices()[:DEVICES]
  )


def _train_to(c, workdir: str, step: int):
  return training.train_and_evaluate(
      c, workdir, stop_at=step, devices=jax.devices()[:DEVICES]
  )


def _params(workdir: str) -> dict:
  """The params of the latest checkpoint (the last step's)."""
  return kill_lib._params(_config(os.path.dirname(workdir)), workdir, STEPS)


def _flat(tree) -> dict:
  return {
      jax.tree_util.keystr(k): np.asarray(v)
      for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]
  }


def _assert_same_run(workdir: str, reference: tuple[str, dict]) -> None:
  a, b = metrics.read(reference[0]), metrics.read(workdir)
  assert [r["step"] for r in b] == list(range(1, STEPS + 1))
  assert [r["loss"] for r in a] == [r["loss"] for r in b]
  pa, pb = reference[1], _params(workdir)
  assert pa.keys() == pb.keys()
  for k in pa:
    np.testing.assert_array_equal(pa[k], pb[k], err_msg=k)


@pytest.fixture(scope="module")
def straight(root):
  """The uninterrupted run's workdir and final params (it also prepares the
  data and the teacher)."""
  workdir = os.path.join(root, "straight")
  _train(_config(root), workdir)
  return workdir, _params(workdir)


def _signal_at(monkeypatch, call: int, *signals) -> None:
  """Sends ``signals`` to this process when the loop takes batch ``call``."""
  put, calls = step_lib.put_batch, []

  def put_and_signal(batch, mesh):
    calls.append(1)
    if len(calls) == call:
      for s in signals:
        os.kill(os.getpid(), s)
    return put(batch, mesh)

  monkeypatch.setattr(step_lib, "put_batch", put_and_signal)


# ----------------------------------------------------------------------------
# Preemption.


def test_sigterm_saves_the_step_logs_it_and_resumes_exactly(root, straight):
  workdir = os.path.join(root, "sigterm")
  args = [f"--config={CONFIG}", f"--workdir={workdir}"] + [
      f"--config.{k}={v}" for k, v in _overrides(root).items()
  ]
  env = dict(
      os.environ,
      PYTHONPATH=ROOT,
      JAX_PLATFORMS="cpu",
      XLA_FLAGS=commands.xla_flags(DEVICES),
  )
  p = subprocess.Popen(
      [sys.executable, "-m", "kdjax.train", *args],
      cwd=ROOT,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
  )
  deadline = time.time() + 300
  while p.poll() is None and len(metrics.read(workdir)) < 2:
    assert time.time() < deadline
    time.sleep(0.05)
  p.send_signal(signal.SIGTERM)
  _, err = p.communicate(timeout=300)
  assert p.returncode == 143, err
  msg = assert_one_error(
      err,
      "interrupted at step",
      f"{workdir}/ckpt is kept",
      "re-run the same command to resume: python -m kdjax.train "
      f"--config={CONFIG}",
  )
  stopped = int(msg.split("interrupted at step ")[1].split(";")[0])
  kept = int(msg.split("checkpoint of step ")[1].split()[0])
  assert kept == stopped < STEPS
  # Only the stop saved (the cadence is 1000), and its step is logged.
  assert sorted(os.listdir(os.path.join(workdir, "ckpt"))) == [str(kept)]
  assert not os.path.exists(os.path.join(workdir, lock_lib.LOCK))
  assert [r["step"] for r in metrics.read(workdir)] == list(range(1, kept + 1))
  _train(_config(root), workdir)
  _assert_same_run(workdir, straight)


def test_a_run_survives_a_damaged_step_two_signals_and_a_stale_lock(
    root, straight, monkeypatch, capsys
):
  workdir = os.path.join(root, "faults")
  c = _config(root, **{"ckpt.every_steps": 2, "ckpt.max_to_keep": 3})
  _train_to(c, workdir, 4)  # checkpoints 2 and 4
  _flip(_largest_array_file(os.path.join(workdir, "ckpt", "4")))
  # The resume finds step 4 damaged and goes on from step 2. Both signals
  # arrive while step 4 takes its batch: step 4 is abandoned, step 3 (off
  # the cadence) is saved and the data iterator goes back to where step 4
  # reads.
  _signal_at(monkeypatch, 2, signal.SIGTERM, signal.SIGINT)
  capsys.readouterr()
  with pytest.raises(training.TrainingError) as e:
    _train(c, workdir)
  out = capsys.readouterr().out
  assert f"the step-4 checkpoint in {workdir}/ckpt cannot be restored (" in out
  assert f"moved it to {workdir}/ckpt/4.corrupt" in out
  assert "resumed from step 2, the newest good checkpoint" in out
  assert e.value.exit_code == 143
  assert "interrupted at step 3; the checkpoint of step 3" in str(e.value)
  assert sorted(os.listdir(os.path.join(workdir, "ckpt"))) == [
      "2",
      "3",
      "4.corrupt",
  ]
  monkeypatch.undo()
  assert not os.path.exists(os.path.join(workdir, lock_lib.LOCK))
  # As if a trainer had been killed here: its lock is stale, not blocking.
  _lock(workdir, _dead_pid())
  _train(c, workdir)
  _assert_same_run(workdir, straight)
  assert not os.path.exists(os.path.join(workdir, lock_lib.LOCK))


def test_a_signal_during_set_up_exits_143_and_leaves_nothing(
    root, tmp_path, monkeypatch
):
  # The signal arrives while the models are built: the lock is held and the
  # workdir's config.json written, nothing else.
  from kdjax.training import builder

  workdir = str(tmp_path / "w")
  build = builder.build

  def signalled_build(*args, **kwargs):
    assert sorted(os.listdir(workdir)) == ["config.json", lock_lib.LOCK]
    os.kill(os.getpid(), signal.SIGTERM)
    return build(*args, **kwargs)  # not reached: the handler raises first

  monkeypatch.setattr(builder, "build", signalled_build)
  before = signal.getsignal(signal.SIGTERM)
  with pytest.raises(training.TrainingError) as e:
    _train(_config(root), workdir)
  assert e.value.exit_code == 143
  _one_sentence(
      e.value,
      "interrupted before the first step; nothing was saved and "
      f"{workdir} holds no run",
  )
  assert not os.path.exists(workdir)
  assert signal.getsignal(signal.SIGTERM) == before
  # The loop's handlers end set-up: once they are restored, a signal (or a
  # third one) has its usual effect again.
  with preemption.during_setup():
    stop = preemption.Signals(mesh=None, agree=False)
    stop.install()
    stop.restore()
    assert signal.getsignal(signal.SIGTERM) == before


_AGREE = """
import os, signal, sys
import jax
jax.distributed.initialize(sys.argv[1], 2, int(sys.argv[2]))
from kdjax.training import preemption
stop = preemption.Signals(jax.make_mesh((4,), ("data",)))
stop.install()
for step in range(8):
  if step == 2 and jax.process_index() == 1:
    os.kill(os.getpid(), signal.SIGTERM)
  if stop.poll():
    break
print(step, stop.signum)
"""


def test_processes_agree_on_the_step_to_stop_at(tmp_path):
  # A signal that reaches one process only stops both after the same step.
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  env = dict(
      os.environ,
      PYTHONPATH=ROOT,
      JAX_PLATFORMS="cpu",
      XLA_FLAGS=commands.xla_flags(2),
  )
  procs = [
      subprocess.Popen(
          [sys.executable, "-c", _AGREE, f"localhost:{port}", str(i)],
          env=env,
          stdout=subprocess.PIPE,
          stderr=subprocess.PIPE,
          text=True,
      )
      for i in range(2)
  ]
  out = [p.communicate(timeout=120) for p in procs]
  assert [p.returncode for p in procs] == [0, 0], out
  lines = [o.strip().splitlines()[-1] for o, _ in out]
  assert lines == ["3 None", f"3 {int(signal.SIGTERM)}"], out


# ----------------------------------------------------------------------------
# One trainer per workdir.


def _lock(workdir: str, pid: int, host: str = socket.gethostname()) -> str:
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, lock_lib.LOCK)
  holder = lock_lib.Holder(pid, host, "2025-01-01T00:00:00+00:00", "x")
  with open(path, "w") as f:
    f.write(holder.text())
  return path


def _dead_pid() -> int:
  p = subprocess.Popen(["true"])
  p.wait()
  return p.pid


def test_a_second_trainer_is_refused_naming_the_holder(root, tmp_path):
  workdir = str(tmp_path / "w")
  other = subprocess.Popen(["sleep", "60"])  # a live trainer on this host
  try:
    path = _lock(workdir, other.pid)
    before = open(path).read()
    with pytest.raises(lock_lib.LockedError) as e:
      _train(_config(root), workdir)
    msg = str(e.value)
    assert f"pid {other.pid} on host {socket.gethostname()}" in msg, msg
    assert f"kill {other.pid}" in msg and "\n" not in msg
    assert os.listdir(workdir) == [lock_lib.LOCK]  # nothing else written
    assert open(path).read() == before
  finally:
    other.kill()
    other.wait()
  # A lock from another host cannot be checked: the message says how to
  # remove it.
  _lock(workdir, other.pid, host="elsewhere")
  with pytest.raises(lock_lib.LockedError) as e:
    _train(_config(root), workdir)
  assert f"pid {other.pid} on host elsewhere" in str(e.value)
  assert f"delete {path} and re-run the same command" in str(e.value)


def test_a_stale_lock_is_taken_over_and_released(tmp_path, caplog):
  workdir, dead = str(tmp_path / "w"), _dead_pid()
  path = _lock(workdir, dead)
  holder = lock_lib.acquire(workdir)
  assert f"pid {dead}" in caplog.text and "no longer runs" in caplog.text
  assert json.loads(open(path).read())["pid"] == os.getpid()
  with pytest.raises(lock_lib.LockedError, match="in use by a trainer"):
    lock_lib.acquire(workdir)  # held: by this very process
  lock_lib.release(workdir, holder)
  assert not os.path.exists(path)


def test_the_lock_works_on_a_bucket(fake_gcs):
  holder = lock_lib.acquire("gs://b/run")
  assert any(k.endswith("b/run/trainer.lock") for k in fake_gcs), fake_gcs
  with pytest.raises(lock_lib.LockedError, match=f"pid {os.getpid()}"):
    lock_lib.acquire("gs://b/run")
  lock_lib.release("gs://b/run", holder)
  assert not any("trainer.lock" in k for k in fake_gcs)


# ----------------------------------------------------------------------------
# Checkpoints that fall back.


def _largest_array_file(step_dir: str, item: str = "state") -> str:
  files = [
      os.path.join(d, n)
      for d, _, names in os.walk(os.path.join(step_dir, item))
      for n in names
      if os.sep + "d" + os.sep in os.path.join(d, n) + os.sep
  ]
  return max(files, key=os.path.getsize)


def _flip(path: str, at: float = 2 / 3) -> None:
  data = bytearray(open(path, "rb").read())
  data[int(len(data) * at)] ^= 0x10
  with open(path, "wb") as f:
    f.write(bytes(data))


CORRUPTIONS = {
    # A flipped byte inside an array's data restores silently as a wrong
    # value: only the recorded checksum catches it.
    "flipped array byte": lambda d: _flip(_largest_array_file(d)),
    "truncated array file": lambda d: _truncate(_largest_array_file(d)),
    "deleted array file": lambda d: os.remove(_largest_array_file(d)),
    "truncated record": lambda d: _truncate(
        os.path.join(d, "record", "metadata")
    ),
    "truncated data position": lambda d: _truncate(
        os.path.join(d, "data", "process_0-of-1.json")
    ),
}


def _truncate(path: str) -> None:
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


def _tiny_checkpoints(workdir: str, steps=(1, 2)):
  import grain
  import jax.numpy as jnp

  from kdjax import checkpoint

  ck = checkpoint.Checkpoints(workdir, every_steps=1, max_to_keep=3)
  it = grain.MapDataset.range(10).to_iter_dataset().__iter__()
  state = {"w": jnp.arange(2000, dtype=jnp.float32), "n": jnp.int32(0)}
  for s in steps:
    next(it)
    ck.save(s, jax.tree.map(lambda x: x + s, state), it, {"step": s})
  ck.close()
  return state


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_a_corrupt_latest_step_falls_back_to_the_previous(tmp_path, corruption):
  import grain

  from kdjax import checkpoint

  workdir = str(tmp_path)
  state = _tiny_checkpoints(workdir)
  CORRUPTIONS[corruption](os.path.join(workdir, "ckpt", "2"))
  ck = checkpoint.Checkpoints(workdir, every_steps=1, max_to_keep=3)
  it = grain.MapDataset.range(10).to_iter_dataset().__iter__()
  step, restored, notes = ck.restore_latest(state, it)
  assert step == 1
  np.testing.assert_array_equal(restored["w"], np.arange(2000) + 1)
  assert next(it) == 1  # the data position of step 1
  moved = os.path.join(workdir, "ckpt", "2.corrupt")
  assert notes[0].startswith(
      f"the step-2 checkpoint in {workdir}/ckpt cannot be restored ("
  ), notes
  assert notes[0].endswith(f"; moved it to {moved}")
  assert notes[1] == "resumed from step 1, the newest good checkpoint"
  assert os.path.isdir(moved) and ck.latest.all_steps() == [1]
  ck.close()


def test_a_damaged_best_checkpoint_is_refused_in_one_sentence(tmp_path):
  from kdjax import checkpoint

  workdir = str(tmp_path)
  params = {"w": jax.numpy.arange(2000, dtype=jax.numpy.float32)}
  ck = checkpoint.Checkpoints(workdir, every_steps=1, max_to_keep=3)
  assert ck.save_best(3, params, -1.5, {"metric": "val_ce", "value": 1.5})
  step, restored = ck.restore_best(params)
  assert step == 3
  np.testing.assert_array_equal(restored["w"], np.arange(2000))
  ck.close()
  best = os.path.join(workdir, "best", "3")
  _flip(_largest_array_file(best, "default"))
  ck = checkpoint.Checkpoints(workdir, every_steps=1, max_to_keep=3)
  with pytest.raises(checkpoint.CorruptCheckpoint) as e:
    ck.restore_best(params)
  _one_sentence(
      e.value,
      f"the best checkpoint (step 3) in {workdir}/best has 1 array(s) that "
      "differ from their checksums, first ['w']",
      f"move {workdir}/best and {workdir}/best.json aside",
  )
  ck.close()


def test_no_restorable_step_moves_nothing(tmp_path):
  import grain

  from kdjax import checkpoint

  workdir = str(tmp_path)
  state = _tiny_checkpoints(workdir)
  for s in ("1", "2"):
    _flip(_largest_array_file(os.path.join(workdir, "ckpt", s)))
  ck = checkpoint.Checkpoints(workdir, every_steps=1, max_to_keep=3)
  it = grain.MapDataset.range(10).to_iter_dataset().__iter__()
  with pytest.raises(checkpoint.CorruptCheckpoint, match="no checkpoint in"):
    ck.restore_latest(state, it)
  assert sorted(os.listdir(os.path.join(workdir, "ckpt"))) == ["1", "2"]
  ck.close()


def test_a_failed_save_keeps_the_only_kept_step(tmp_path, monkeypatch):
  # Orbax deletes the steps past max_to_keep only after the new step has
  # committed (CheckpointManager._finalize): a save that fails in the
  # background leaves the previous step, here the only one kept.
  import errno

  import grain
  from orbax.checkpoint._src.handlers import json_checkpoint_handler as jh

  from kdjax import checkpoint

  workdir = str(tmp_path)
  ck = checkpoint.Checkpoints(workdir, every_steps=1, max_to_keep=1)
  it = grain.MapDataset.range(10).to_iter_dataset().__iter__()
  state = {"w": jax.numpy.arange(8.0)}
  ck.save(1, state, it, {"step": 1})
  ck.latest.wait_until_finished()

  async def disk_full(self, x, directory):
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(jh.JsonCheckpointHandler, "_save_fn", disk_full)
  ck.save(2, jax.tree.map(lambda x: x + 1, state), it, {"step": 2})
  with pytest.raises(checkpoint.SaveFailed) as e:
    ck.close()
  _one_sentence(
      e.value,
      f"saving the step-2 checkpoint in {workdir}/ckpt failed (No space left "
      "on device); the last good checkpoint there (step 1) is kept",
  )
  monkeypatch.undo()
  ck = checkpoint.Checkpoints(workdir, every_steps=1, max_to_keep=1)
  step, restored, _ = ck.restore_latest(state, it)
  assert step == 1
  np.testing.assert_array_equal(restored["w"], np.arange(8.0))
  ck.close()


# ----------------------------------------------------------------------------
# A full disk.


def _full_disk(monkeypatch, cls, name: str, prefix: str, skip: int = 0):
  """``cls.name`` (a write taking ``(path, data)``) fails with ``ENOSPC``
  under ``prefix`` after ``skip`` whole writes there, half of the data
  written first, as when a disk fills mid-file. Returns the paths refused."""
  write, passed, refused = getattr(cls, name), [], []

  def full(*args):
    at, data = os.fspath(args[-2]), args[-1]
    if not at.startswith(prefix):
      return write(*args)
    if len(passed) < skip:
      passed.append(at)
      return write(*args)
    write(*args[:-1], data[: len(data) // 2])
    refused.append(at)
    raise OSError(errno.ENOSPC, "No space left on device", at)

  monkeypatch.setattr(cls, name, full)
  return refused


def test_a_full_disk_during_a_save_is_one_sentence_and_resumes_exactly(
    root, straight, monkeypatch
):
  # Orbax writes arrays with TensorStore (C++) and its JSON files (the
  # record, the step's metadata) and grain's data position through
  # etils.epath: the fault enters there, under step 4's temporary directory,
  # after TensorStore started on the arrays. It surfaces when step 6's save
  # waits for step 4's.
  workdir = os.path.join(root, "full_ckpt")
  c = _config(root, **{"ckpt.every_steps": 2})
  ckpt = os.path.join(workdir, "ckpt")
  refused = _full_disk(
      monkeypatch, epath.Path, "write_text", os.path.join(ckpt, "4.")
  )
  with pytest.raises(training.TrainingError) as e:
    _train(c, workdir)
  assert refused
  _one_sentence(
      e.value,
      f"saving the step-4 checkpoint in {ckpt} failed (No space left on "
      "device); the last good checkpoint there (step 2) is kept; free space "
      "there (or lower ckpt.max_to_keep) and re-run the same command",
  )
  monkeypatch.undo()
  # Step 4 never committed: what it left is not a step to a new start.
  assert [n for n in os.listdir(ckpt) if n.isdigit()] == ["2"]
  _train(c, workdir)  # space freed
  _assert_same_run(workdir, straight)


def test_a_full_disk_during_the_export_is_one_sentence_and_rerun_writes_it(
    root, straight, monkeypatch
):
  from kdjax import models

  # The finished uninterrupted run, now exporting (export_hf is outside the
  # resume identity): each start below only exports.
  workdir = os.path.join(root, "full_export")
  shutil.copytree(straight[0], workdir)
  hf_dir = os.path.join(workdir, "hf")
  c = _config(root, export_hf=True)
  # The weights and two more files are written whole, the next one half.
  refused = _full_disk(monkeypatch, fs, "write_bytes", hf_dir, skip=3)
  with pytest.raises(training.TrainingError) as e:
    _train(c, workdir)
  assert len(refused) == 1 and os.path.exists(refused[0])
  _one_sentence(
      e.value,
      f"exporting the final student to {hf_dir} failed (No space left on "
      f"device); the step-{STEPS} checkpoint in {workdir}/ckpt is kept; free "
      "space there and re-run the same command to write the export.",
  )
  monkeypatch.undo()
  # Without its config.json the directory is not taken for a model.
  assert os.path.exists(os.path.join(hf_dir, "model.safetensors"))
  with pytest.raises(FileNotFoundError, match=f"no config.json in {hf_dir}"):
    models.load(hf_dir)
  _train(c, workdir)  # space freed
  assert metrics.read(workdir) == metrics.read(straight[0])
  exported = _flat(nnx.state(models.load(hf_dir), nnx.Param))
  want = straight[1]
  assert exported.keys() == want.keys()
  for k in want:
    np.testing.assert_array_equal(exported[k], want[k], err_msg=k)


def test_tensorstores_disk_full_is_an_enospc():
  from kdjax import checkpoint

  # TensorStore's ValueError on a full tmpfs, verbatim.
  e = ValueError(
      'RESOURCE_EXHAUSTED: Error writing "w/0" in OCDBT database at local '
      'file "/t/ckpt/1.orbax-checkpoint-tmp/state.orbax-checkpoint-tmp/'
      'ocdbt.process_0/": Failed to write 500213 bytes to file 4: No space '
      "left on device [os_error_code='28']"
  )
  assert checkpoint.storage_error(e).errno == errno.ENOSPC
  assert checkpoint.storage_error(ValueError("shape mismatch")) is None
  try:
    raise RuntimeError("wrapped") from OSError(errno.EDQUOT, "quota")
  except RuntimeError as wrapped:
    assert checkpoint.storage_error(wrapped).errno == errno.EDQUOT


# ----------------------------------------------------------------------------
# Non-finite steps.


def _poison(monkeypatch, steps) -> None:
  """An infinite loss mask (so a NaN loss and gradient) at these 1-based steps."""
  put, calls = step_lib.put_batch, []

  def put_poisoned(batch, mesh):
    calls.append(1)
    if len(calls) in steps:
      batch = dict(batch, loss_mask=np.full_like(batch["loss_mask"], np.inf))
    return put(batch, mesh)

  monkeypatch.setattr(step_lib, "put_batch", put_poisoned)


def _ckpt_params(workdir: str, step: int) -> dict:
  import orbax.checkpoint as ocp

  with ocp.CheckpointManager(os.path.join(workdir, "ckpt")) as m:
    state = m.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore())
    ).state
  return {
      jax.tree_util.keystr(k): np.asarray(v)
      for k, v in jax.tree_util.tree_flatten_with_path(
          {"params": state["params"], "opt": state["opt_state"]}
      )[0]
  }


def test_skip_drops_the_update_counts_it_and_stops_after_max_skips(
    root, tmp_path, monkeypatch
):
  workdir = str(tmp_path / "w")
  c = _config(
      root,
      **{
          "on_nonfinite": "skip",
          "max_skips": 3,
          "ckpt.every_steps": 1,
          "ckpt.max_to_keep": 10,
      },
  )
  # Step 2 is skipped, 3 trains, 4 to 6 are skipped: three in a row.
  _poison(monkeypatch, {2, 4, 5, 6})
  with pytest.raises(training.TrainingError) as e:
    _train(c, workdir)
  assert str(e.value).startswith(
      "3 updates in a row were skipped up to step 6, whose loss was not "
      "finite (4 skipped in all); the last good checkpoint (step 5) is kept"
  ), str(e.value)
  rows = metrics.read(workdir)
  assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
  assert [r["skipped"] for r in rows] == [0, 1, 1, 2, 3]
  # A skipped step leaves parameters and optimizer state as they were.
  p = {s: _ckpt_params(workdir, s) for s in (1, 2, 3, 5)}
  for k in p[1]:
    np.testing.assert_array_equal(p[1][k], p[2][k], err_msg=k)
    np.testing.assert_array_equal(p[3][k], p[5][k], err_msg=k)
  assert any(not np.array_equal(p[2][k], p[3][k]) for k in p[2])


def test_stop_names_the_step_and_the_metric(root, tmp_path, monkeypatch):
  workdir = str(tmp_path / "w")
  c = _config(root, **{"ckpt.every_steps": 2})
  _poison(monkeypatch, {3})
  with pytest.raises(training.TrainingError) as e:
    _train_to(c, workdir, 4)
  assert str(e.value).startswith(
      "the loss became non-finite at step 3; the last good checkpoint (step "
      f"2) is kept in {workdir}/ckpt."
  ), str(e.value)
  assert "--config.on_nonfinite=skip" in str(e.value)
  assert sorted(os.listdir(os.path.join(workdir, "ckpt"))) == ["2"]


# ----------------------------------------------------------------------------
# Damaged files, fuzzed: every damage kdjax can see is one sentence naming
# the file (and the line, for JSONL).

FUZZ = hypothesis.settings(
    max_examples=20, deadline=None, derandomize=True, database=None
)


def _one_sentence(e: BaseException, *words: str) -> str:
  msg = str(e)
  assert "\n" not in msg, msg
  for w in words:
    assert w in msg, (w, msg)
  return msg


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
  return tmp_path_factory.mktemp("damaged")


def _safetensors() -> bytes:
  from safetensors.numpy import save

  return save(
      {
          "wte": np.arange(12, dtype=np.float32).reshape(3, 4),
          "count": np.ones(5, np.int32),
      },
      {"format": "pt"},
  )


# A damage: ("truncate", at), ("flip", at, byte) or ("append", bytes).
def _damages(size: int, flip_below: int | None = None):
  flip_below = flip_below or size
  return st.one_of(
      st.tuples(st.just("truncate"), st.integers(0, size - 1)),
      st.tuples(
          st.just("flip"),
          st.integers(0, flip_below - 1),
          st.integers(0, 255),
      ),
      st.tuples(st.just("append"), st.binary(min_size=1, max_size=9)),
  )


def _damage(data: bytes, damage) -> bytes:
  if damage[0] == "truncate":
    return data[: damage[1]]
  if damage[0] == "flip":
    b = bytearray(data)
    b[damage[1]] = damage[2]
    return bytes(b)
  return data + damage[1]


_GOOD_ST = _safetensors()
_HEADER_END = 8 + int.from_bytes(_GOOD_ST[:8], "little")


@FUZZ
@hypothesis.given(_damages(len(_GOOD_ST), flip_below=_HEADER_END))
def test_damaged_safetensors_are_refused_in_one_sentence(scratch, damage):
  from safetensors.numpy import load_file

  from kdjax.models import safetensors_check

  path = str(scratch / "model.safetensors")
  with open(path, "wb") as f:
    f.write(_damage(_GOOD_ST, damage))
  try:
    safetensors_check.check_file(path)
  except fs.BadFileError as e:
    _one_sentence(e, path, "is not a valid safetensors file", "re-download")
    return
  # What passes the check is a file the reader takes: a byte flipped inside
  # a name or the metadata, or no change at all.
  assert damage[0] == "flip", damage
  load_file(path)


_GOOD_JSONL = b"".join(
    (
        json.dumps({"prompt": f"add {i} and 2", "output": str(i + 2)}) + "\n"
    ).encode()
    for i in range(6)
)


@FUZZ
@hypothesis.given(_damages(len(_GOOD_JSONL)))
@hypothesis.example(("flip", 30, 0xFF))  # not UTF-8
@hypothesis.example(("flip", 0, ord("[")))
def test_damaged_jsonl_names_the_file_and_line(scratch, damage):
  from kdjax.data import instruct_jsonl, jsonl

  path = str(scratch / "train.jsonl")
  data = _damage(_GOOD_JSONL, damage)
  with open(path, "wb") as f:
    f.write(data)
  try:
    jsonl.read_jsonl(path, instruct_jsonl.parse)
  except jsonl.BadLinesError as e:
    msg = _one_sentence(e, "malformed line", "Fix the file")
    at = damage[1] if damage[0] != "append" else len(_GOOD_JSONL)
    line = data[:at].count(b"\n") + 1
    assert f"{path}:{line}:" in msg or f"{path}:{line + 1}:" in msg, msg


def test_a_model_whose_config_is_not_json_is_refused_in_one_sentence(
    tmp_path,
):
  from kdjax import models

  directory = str(tmp_path / "model")
  models.save_hf(tiny_run.gpt2(), directory)
  path = os.path.join(directory, "config.json")
  with open(path, "r+") as f:
    f.truncate(os.path.getsize(path) // 2)
  with pytest.raises(fs.BadFileError) as e:
    models.load(directory)
  _one_sentence(
      e.value,
      f"{path} is not valid JSON (",
      "re-download or re-export that model directory",
  )


def _tiny_cache(directory: str):
  """A one-shard top-k cache of three examples, without a teacher."""
  import collections

  from kdjax.cache import build, codec, store

  example = collections.namedtuple("Example", "prompt_len ids")
  rng = np.random.default_rng(0)
  examples = [example(2, rng.integers(0, 50, 6 + i)) for i in range(3)]
  records = []
  for e in examples:
    n = len(e.ids) - e.prompt_len
    ids = np.sort(rng.choice(50, (n, 4)), axis=-1)
    lp = np.log(np.full((n, 4), 0.2, np.float32))
    blob = codec.encode_topk(ids, lp, 50)
    records.append(store.example_digest(e.prompt_len, e.ids) + blob)
  os.makedirs(directory, exist_ok=True)
  name = store.shard_name(0, 1)
  build._write_shard(os.path.join(directory, name), records)
  meta = {
      "format": store.FORMAT,
      "identity": {"encoding": "topk", "k": 4, "vocab_size": 50},
      "num_examples": 3,
      "examples_per_shard": 3,
      "num_shards": 1,
      "fingerprint": store.fingerprint(examples),
      "complete": True,
      "sha256": {name: checksums.file_sha256(os.path.join(directory, name))},
  }
  return examples, meta, os.path.join(directory, name)


_CACHE = {}  # the intact cache, built once (kept out of hypothesis' reports)


@FUZZ
@hypothesis.given(data=st.data())
def test_a_damaged_cache_shard_is_refused_in_one_sentence(scratch, data):
  from kdjax.cache import store

  directory = str(scratch / "cache")
  if not _CACHE:
    examples, meta, shard = _tiny_cache(directory)
    with open(shard, "rb") as f:
      _CACHE.update(examples=examples, meta=meta, shard=shard, good=f.read())
  examples, meta, shard, good = (
      _CACHE[k] for k in ("examples", "meta", "shard", "good")
  )
  store.Cache(directory, meta).bind(examples, 16)  # the intact shard
  damage = data.draw(
      _damages(len(good)).filter(lambda d: _damage(good, d) != good)
  )
  with open(shard, "wb") as f:
    f.write(_damage(good, damage))
  try:
    with pytest.raises(store.CacheError) as e:
      store.Cache(directory, meta).bind(examples, 16)
    _one_sentence(e.value, shard, "checksum", "rebuild it")
  finally:
    with open(shard, "wb") as f:
      f.write(good)
