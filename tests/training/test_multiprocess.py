"""Two processes x two CPU devices train like one process with four devices.

Launches ``tests/mp_worker.py`` twice with ``JAX_COORDINATOR_ADDRESS`` /
``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID`` (``training.maybe_initialize_distributed``
reads them; CPU collectives across processes go through gloo, jax's default) on
a ``fsdp=4`` mesh, so every parameter is split over both processes: the
checkpoint, the metrics and the Hugging Face export all cross process
boundaries.
"""

import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

import commands
from kdjax import checkpoint, metrics, sharding, training
from kdjax.training import step as train_step
import mp_worker
import tiny_run

STEPS = 4


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _launch(root: str, workdir: str, out: str) -> None:
  port = _free_port()
  procs, logs = [], []
  for i in range(2):
    env = dict(
        os.environ,
        JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
        JAX_NUM_PROCESSES="2",
        JAX_PROCESS_ID=str(i),
        XLA_FLAGS=commands.xla_flags(2),
        JAX_PLATFORMS="cpu",
        PYTHONPATH=os.getcwd(),
    )
    logs.append(open(os.path.join(root, f"worker{i}.log"), "w+"))
    procs.append(
        subprocess.Popen(
            [
                sys.executable,
                os.path.join("tests", "mp_worker.py"),
                root,
                workdir,
                str(STEPS),
                out,
            ],
            env=env,
            stdout=logs[-1],
            stderr=subprocess.STDOUT,
        )
    )
  try:
    codes = [p.wait(timeout=400) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for i, (code, log) in enumerate(zip(codes, logs)):
    log.seek(0)
    assert code == 0, f"worker {i} failed:\n{log.read()[-3000:]}"


def _final_params(c, workdir: str) -> dict:
  """The last checkpoint's student params, restored onto this one process.

  Only the ``state`` item: grain keeps one iterator state per process, so the
  data position of a 2-process run does not restore into a 1-process run.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  devices = jax.devices()[:4]
  mesh = sharding.make_mesh(c.mesh.data, c.mesh.fsdp, devices=devices)
  with jax.set_mesh(mesh):
    run = training.build(c, workdir, mesh)
    manager = ocp.CheckpointManager(os.path.join(workdir, "ckpt"))
    assert manager.latest_step() == STEPS
    state = manager.restore(
        STEPS,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(checkpoint.abstract(run.state))
        ),
    ).state
    manager.close()
  return {
      jax.tree_util.keystr(k): np.asarray(v)
      for k, v in jax.tree_util.tree_flatten_with_path(state.params)[0]
  }


@pytest.mark.slow
def test_two_processes_train_like_one(tmp_path, monkeypatch):
  root = str(tmp_path)
  tiny_run.make_teacher(os.path.join(root, "teacher"))
  c = mp_worker.config(root, STEPS)

  # The single-process reference on four devices (also prepares the data the
  # workers then only read). Record the batches it feeds.
  fed, put = [], train_step.put_batch
  monkeypatch.setattr(
      train_step,
      "put_batch",
      lambda b, m: (fed.append(np.asarray(b["input_ids"])), put(b, m))[1],
  )
  single = os.path.join(root, "single")
  training.train_and_evaluate(c, single, devices=jax.devices()[:4])
  monkeypatch.undo()

  multi, out = os.path.join(root, "multi"), os.path.join(root, "out")
  _launch(root, multi, out)
  w = [np.load(os.path.join(out, f"{i}.npz")) for i in range(2)]
  for i in range(2):
    assert (
        int(w[i]["process_count"]),
        int(w[i]["devices"]),
        int(w[i]["local_devices"]),
    ) == (2, 4, 2)

  # Each process fed its own half of every global batch (the validation batch
  # of the last step comes after the STEPS training batches).
  ref = np.stack(fed[:STEPS])
  half = ref.shape[1] // 2
  for i in range(2):
    np.testing.assert_array_equal(
        w[i]["fed"][:STEPS], ref[:, i * half : (i + 1) * half]
    )
  assert not np.array_equal(w[0]["fed"][:STEPS], w[1]["fed"][:STEPS])

  # Only process 0 wrote the run's files; process 1 wrote only its own parts
  # of the checkpoints (its data-iterator state and array metadata).
  written = [set(x["written"].tolist()) for x in w]
  run_files = {"metrics.jsonl", "config.json.tmp", "hf/config.json.tmp"}
  assert run_files <= written[0]
  assert all(
      p.startswith(("ckpt/", "best/")) and "process_1" in p for p in written[1]
  ), written[1]

  # Same losses per step, each step logged once.
  a, b = metrics.read(single), metrics.read(multi)
  assert [r["step"] for r in b] == list(range(1, STEPS + 1))
  for x, y in zip(a, b):
    for k in ("loss", "ce", "kd", "grad_norm", "val_loss"):
      if k in x:
        assert y[k] == pytest.approx(x[k], rel=1e-6), (x["step"], k)

  # Same final students: the multi-process checkpoint restores onto one
  # process and equals the reference, and so do the gathered HF exports.
  pa, pb = _final_params(c, single), _final_params(c, multi)
  assert pa.keys() == pb.keys()
  for k in pa:
    _assert_close(k, pb[k], pa[k], c)
  for name in ("hf", "best_hf"):
    ha = load_file(os.path.join(single, name, "model.safetensors"))
    hb = load_file(os.path.join(multi, name, "model.safetensors"))
    assert ha.keys() == hb.keys()
    for k in ha:
      _assert_close(f"{name}/{k}", hb[k], ha[k], c)


def _assert_close(name: str, got, want, c) -> None:
  """Equal to float32 reduction-order noise.

  Except the attention key bias: softmax ignores it, so its exact gradient is
  0 and what both runs apply is Adam's normalised rounding noise (at most the
  learning rate per step), different for a different reduction order.
  """
  got, want = np.array(got), np.array(want)
  if "c_attn" in name and "bias" in name:
    d = c.student.model_overrides.n_embd
    key_bias = slice(d, 2 * d)
    np.testing.assert_allclose(
        got[key_bias],
        want[key_bias],
        rtol=0,
        atol=STEPS * c.optim.lr,
        err_msg=name,
    )
    got[key_bias] = want[key_bias]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=name)
