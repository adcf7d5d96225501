"""kdjax's train step against the same steps written in PyTorch transformers.

The student and teacher go to PyTorch through the Hugging Face export; the
PyTorch side recomputes the objective (``(1 - r) CE + r FKL``, token means),
clips the gradient's global norm, and updates with ``torch.optim.AdamW``
(weight decay on matrices only) at the learning rate of a linear warm-up
then cosine decay written out below. After the same batches both students
must hold the same weights.
"""

import math
import os

from flax import nnx
import jax
import numpy as np
import pytest

import extras
from kdjax import models, sharding, training
import tiny_run

torch = extras.require("torch")
transformers = extras.require("transformers")

STEPS = 4


def _lr(step, optim, total):
  """Linear warm-up from 0, then cosine from lr to lr_min at ``total``."""
  if step < optim.warmup_steps:
    return optim.lr * step / optim.warmup_steps
  frac = (step - optim.warmup_steps) / (total - optim.warmup_steps)
  return optim.lr_min + (optim.lr - optim.lr_min) * 0.5 * (
      1 + math.cos(math.pi * frac)
  )


def _torch_loss(student, teacher, batch, kd_ratio):
  as_long = lambda k: torch.as_tensor(np.asarray(batch[k]), dtype=torch.long)
  kw = dict(
      input_ids=as_long("input_ids"),
      attention_mask=as_long("attention_mask"),
      position_ids=as_long("positions"),
  )
  log_q = torch.log_softmax(student(**kw).logits, -1)
  with torch.no_grad():
    log_p = torch.log_softmax(teacher(**kw).logits, -1)
  mask = torch.as_tensor(np.asarray(batch["loss_mask"]), dtype=torch.float32)
  ce = -log_q.gather(-1, as_long("labels")[..., None])[..., 0]
  fkl = (log_p.exp() * (log_p - log_q)).sum(-1)
  n = mask.sum()
  return (1 - kd_ratio) * (ce * mask).sum() / n + kd_ratio * (
      fkl * mask
  ).sum() / n


def test_fkl_steps_equal_pytorch(tmp_path):
  c = tiny_run.config(
      "fkl_gpt2",
      str(tmp_path),
      steps=STEPS,
      # A clip the gradients exceed and a visible decay, so both are checked.
      **{"optim.clip": 0.05, "optim.weight_decay": 0.1, "mesh.data": 1},
  )
  mesh = sharding.make_mesh(1, 1, devices=jax.devices()[:1])
  with jax.set_mesh(mesh):
    run = training.build(c, str(tmp_path / "w"), mesh)
    start = str(tmp_path / "start")
    models.save_hf(
        nnx.merge(run.step.graphdef, run.state.params, run.state.rest), start
    )
    it = run.train_data.iterator()
    data = [next(it) for _ in range(STEPS)]
    step = jax.jit(run.step.train)
    state, bad = run.state, training.Health.init()
    teacher_state = nnx.state(run.teacher)
    norms = []
    for b in data:
      state, m, bad = step(
          state, training.put_batch(b, mesh), teacher_state, bad
      )
      norms.append(float(m["grad_norm"]))
    end = str(tmp_path / "end")
    models.save_hf(nnx.merge(run.step.graphdef, state.params, state.rest), end)
  assert min(norms) > c.optim.clip  # every step was clipped

  load = lambda d: transformers.GPT2LMHeadModel.from_pretrained(
      d, torch_dtype=torch.float32
  ).eval()
  student, teacher = load(start), load(c.teacher.path)
  decay = [p for p in student.parameters() if p.dim() >= 2]
  no_decay = [p for p in student.parameters() if p.dim() < 2]
  opt = torch.optim.AdamW(
      [
          {"params": decay, "weight_decay": c.optim.weight_decay},
          {"params": no_decay, "weight_decay": 0.0},
      ],
      lr=c.optim.lr,
      betas=(c.optim.b1, c.optim.b2),
      eps=c.optim.eps,
  )
  for i, b in enumerate(data):
    for group in opt.param_groups:
      group["lr"] = _lr(i, c.optim, STEPS)
    opt.zero_grad()
    _torch_loss(student, teacher, b, c.loss.kd_ratio).backward()
    norm = torch.nn.utils.clip_grad_norm_(student.parameters(), c.optim.clip)
    assert float(norm) == pytest.approx(norms[i], rel=1e-4)
    opt.step()

  want = {k: v.detach().numpy() for k, v in student.state_dict().items()}
  got = {k: v.detach().numpy() for k, v in load(end).state_dict().items()}
  moved = 0.0
  first = load(start).state_dict()
  for k, w in want.items():
    g = got[k]
    if k.endswith("attn.c_attn.bias"):
      # The key bias adds the same score to every key of a query, which the
      # softmax cancels: its gradient is rounding noise, and Adam's
      # normalisation turns noise into steps of size lr either way.
      n = w.shape[0] // 3
      g, w = np.delete(g, np.s_[n : 2 * n]), np.delete(w, np.s_[n : 2 * n])
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=2e-6, err_msg=k)
    moved = max(moved, float(np.abs(want[k] - first[k].numpy()).max()))
  assert moved > 1e-3  # the steps moved the weights well past the tolerance
  assert os.path.exists(os.path.join(end, "model.safetensors"))
