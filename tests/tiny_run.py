"""Small trainer set-ups shared by the trainer, resume and reliability tests.

Every config's ``tiny`` arg, shrunk further (1-layer models, 64 training
examples, batch 8) so a step compiles in seconds on CPU. The teacher is a
random tiny GPT-2 written with ``models.save_hf``: the tests check the trainer's
mechanics, not what the teacher knows.
"""

from __future__ import annotations

import fcntl
import os

from flax import nnx
import jax
import ml_collections
import numpy as np

from kdjax import metrics, models, sharding, training
from kdjax.config import files as config_files
from kdjax.config import recipe

TEACHER = dict(n_embd=32, n_layer=1, n_head=2)
# A directory every test process of one pytest run shares (conftest sets it;
# subprocesses inherit it).
SHARED_DIR_VAR = "KDJAX_TEST_SHARED_DIR"
STUDENT = dict(n_embd=16, n_layer=1, n_head=2)


def gpt2(seed: int = 0, vocab_size: int = 257, **overrides) -> nnx.Module:
  """A random tiny GPT-2 of the student's size (:data:`STUDENT`), with
  ``overrides`` on top (``**TEACHER`` for the teacher's)."""
  return models.create(
      "tiny-gpt2",
      rngs=nnx.Rngs(seed),
      vocab_size=vocab_size,
      **{**STUDENT, **overrides},
  )


def data_dir() -> str:
  """The synthetic_instruct dataset, prepared once per pytest run.

  Every xdist worker and CLI subprocess of the run reads the same copy; the
  first caller prepares it under a file lock while the others wait.
  """
  from kdjax.data import sources  # pylint: disable=g-import-not-at-top

  shared = os.environ[SHARED_DIR_VAR]
  directory = os.path.join(shared, "data")
  os.makedirs(shared, exist_ok=True)
  with open(os.path.join(shared, "data.lock"), "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    sources.prepare("synthetic_instruct", directory)
  return directory


def make_teacher(directory: str) -> str:
  """A random tiny teacher in HF format under ``directory`` (created once)."""
  if not os.path.exists(os.path.join(directory, "config.json")):
    models.save_hf(gpt2(1, **TEACHER), directory)
  return directory


def config(
    name: str, root: str, *, steps: int = 4, **overrides
) -> ml_collections.ConfigDict:
  """``configs/<name>.py:tiny`` shrunk for tests, data and teacher under ``root``.

  ``overrides`` are dotted keys: ``config("akl_gpt2", tmp, **{"loss.impl": "fused"})``.
  """
  module = config_files.experiment(name)
  c = module.get_config(f"tiny,steps={steps}")
  c.data.data_dir = data_dir()
  c.data.train_limit = 64
  if c.teacher.path and not c.teacher.path.startswith("preset:"):
    c.teacher.path = make_teacher(os.path.join(root, "teacher"))
  if c.data.seqkd_teacher:
    c.data.seqkd_teacher = make_teacher(os.path.join(root, "teacher"))
  if c.student.init == "preset:tiny-gpt2":  # other families: already tiny
    c.student.model_overrides.update(STUDENT)
  c.batch_size = 8
  c.optim.warmup_steps = 1
  c.log_every = 1
  c.ckpt.every_steps = 2
  c.eval.update(every_steps=0, num_examples=0, val_batches=1, batch_size=8)
  c.export_hf = False
  recipe.override(c, overrides)
  return c


def decode_pair(vocab_size: int) -> tuple[nnx.Module, nnx.Module]:
  """A one-layer student and a two-layer teacher for decode-loop tests (eval mode)."""
  kw = dict(vocab_size=vocab_size, n_head=2)
  student = models.create(
      "tiny-gpt2", n_embd=16, n_layer=1, rngs=nnx.Rngs(0), **kw
  )
  teacher = models.create(
      "tiny-gpt2", n_embd=32, n_layer=2, rngs=nnx.Rngs(1), **kw
  )
  student.eval()
  teacher.eval()
  return student, teacher


def built(config, root: str, devices=None):
  """``(run, mesh)``: ``training.build`` of ``config`` in ``<root>/w`` on a
  mesh of ``devices`` (default: the default mesh, see conftest)."""
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, devices=devices)
  with jax.set_mesh(mesh):
    run = training.build(config, os.path.join(root, "w"), mesh)
  return run, mesh


def first_grads(run, mesh) -> tuple[dict, dict]:
  """Gradient (flat dict of arrays by parameter path) and metrics of the
  first batch."""
  with jax.set_mesh(mesh):
    teacher = None if run.teacher is None else nnx.state(run.teacher)
    g, m, _ = jax.jit(run.step.grads)(
        run.state, training.put_batch(run.train_data.dataset[0], mesh), teacher
    )
  flat = {
      "/".join(map(str, k)): np.asarray(v)
      for k, v in jax.tree_util.tree_flatten_with_path(g)[0]
  }
  return flat, {k: float(v) for k, v in m.items()}


def straight_and_resumed(
    c, directory: str, *, stop_at: int, straight=None
) -> tuple[list[dict], list[dict]]:
  """The metrics rows of a run of ``c`` trained straight through (``straight``:
  its config, default ``c``) and of one stopped after ``stop_at`` steps and
  resumed, in ``<directory>/straight`` and ``<directory>/resumed``; the
  resumed run logged every step once."""
  a, b = (os.path.join(directory, d) for d in ("straight", "resumed"))
  training.train_and_evaluate(c if straight is None else straight, a)
  training.train_and_evaluate(c, b, stop_at=stop_at)
  training.train_and_evaluate(c, b)
  rows = metrics.read(b)
  assert [r["step"] for r in rows] == list(range(1, c.num_steps + 1))
  return metrics.read(a), rows
