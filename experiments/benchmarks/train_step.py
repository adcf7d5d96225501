r"""One full KD train step, timed for every ``loss.impl``.

    python -m experiments.benchmarks.train_step                       # tiny + gpt2-sized, CPU-friendly shapes
    python -m experiments.benchmarks.train_step --pairs=gpt2 --batch=8 --seq=512 --loss=akl

For each teacher/student pair (random weights from the ``kdjax.models`` presets,
GPT-2's 50257-word vocabulary unless the pair says otherwise) and each
implementation of the KD loss it builds the trainer's real step
(:class:`kdjax.training.Step`: teacher forward, student forward/backward,
``0.5 CE + 0.5 KD``, clipped AdamW), compiles it once, then reports the median
wall time of ``--repeats`` steps, tokens/s and the step's XLA temporary bytes
(``memory_analysis()``). Results go to stdout and
``results/train_step_<device>_<loss>_<pairs>.json``.

Random-weight teachers are near-uniform, so with ``--loss=akl`` every row takes
AKL's exact fallback (a trained teacher's top-64 mass settles most rows);
``--loss=fkl`` times the step without it.
"""

from __future__ import annotations

import time

from absl import app, flags
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from experiments import benchmarks
from kdjax import models, objective, sharding, training
from kdjax.config import recipe

# The papers' AdamW recipe (kdjax/config/recipe.py), warm-up off.
OPTIM = recipe.get_config().optim
OPTIM.warmup_steps = 0

# name -> (teacher preset + overrides, student preset + overrides)
PAIRS = {
    "tiny": (
        ("tiny-gpt2", dict(n_embd=96, n_layer=4, n_head=4)),
        ("tiny-gpt2", dict(n_embd=48, n_layer=2, n_head=4)),
    ),
    "gpt2": (("gpt2-medium", {}), ("gpt2", {})),
}

_PAIRS = flags.DEFINE_string(
    "pairs", "tiny,gpt2", "Comma-separated PAIRS keys."
)
_IMPLS = flags.DEFINE_string(
    "impls", ",".join(objective.IMPLS), "loss.impl values."
)
_LOSS = flags.DEFINE_string("loss", "akl", "Divergence.")
_BATCH = flags.DEFINE_integer("batch", 4, "Sequences per step.")
_SEQ = flags.DEFINE_integer("seq", 256, "Tokens per sequence.")
_VOCAB = flags.DEFINE_integer("vocab", 50257, "Vocabulary size.")
_CHUNK = flags.DEFINE_integer("chunk", 256, "Token chunk of chunked/fused.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed steps per setting.")
_TEACHER_DTYPE = flags.DEFINE_string(
    "teacher_dtype",
    "auto",
    "Teacher compute dtype; auto = bfloat16 on "
    "accelerators, float32 on CPU (XLA:CPU has no fast bf16 GEMM).",
)


def _model(preset, overrides, vocab, seed, dtype):
  return models.create(
      preset,
      rngs=nnx.Rngs(seed),
      vocab_size=vocab,
      embd_pdrop=0.0,
      attn_pdrop=0.0,
      resid_pdrop=0.0,
      n_positions=max(1024, _SEQ.value),
      dtype=dtype,
      **overrides,
  )


def _batch(batch: int, seq: int, vocab: int) -> dict:
  rng = np.random.default_rng(0)
  ids = rng.integers(0, vocab, (batch, seq), dtype=np.int32)
  mask = np.zeros((batch, seq), np.float32)
  mask[:, seq // 2 :] = 1.0  # the response half, as an SFT-style loss mask
  return {
      "input_ids": ids,
      "labels": np.roll(ids, -1, axis=1),
      "loss_mask": mask,
      "attention_mask": np.ones((batch, seq), np.int32),
      "positions": np.broadcast_to(
          np.arange(seq, dtype=np.int32), (batch, seq)
      ).copy(),
  }


def bench(pair: str, impl: str, mesh) -> dict:
  (tp, to), (sp, so) = PAIRS[pair]
  vocab = _VOCAB.value
  t_dtype = _TEACHER_DTYPE.value
  if t_dtype == "auto":
    t_dtype = "float32" if jax.devices()[0].platform == "cpu" else "bfloat16"
  teacher = _model(tp, to, vocab, 1, jnp.dtype(t_dtype))
  teacher.eval()
  student = _model(sp, so, vocab, 0, jnp.float32)
  loss_cfg = dict(
      name=_LOSS.value, kd_ratio=0.5, impl=impl, chunk_size=_CHUNK.value, hp={}
  )
  tx = training.make_optimizer(OPTIM, 1000)
  graphdef, params, rest = nnx.split(student, nnx.Param, ...)
  state = training.TrainState(
      jnp.zeros((), jnp.int32), params, rest, tx.init(params)
  )
  step = training.Step(loss_cfg, graphdef, nnx.graphdef(teacher), tx, 1)
  batch = training.put_batch(_batch(_BATCH.value, _SEQ.value, vocab), mesh)
  t_state = nnx.state(teacher)
  bad = training.Health.init()
  fn = jax.jit(step.train)
  compiled = fn.lower(state, batch, t_state, bad).compile()
  mem = compiled.memory_analysis()
  temp = getattr(mem, "temp_size_in_bytes", None) if mem is not None else None
  state, m, bad = fn(state, batch, t_state, bad)
  jax.block_until_ready(m)
  times = []
  for _ in range(_REPEATS.value):
    t0 = time.perf_counter()
    state, m, bad = fn(state, batch, t_state, bad)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t0)
  sec = float(np.median(times))
  tokens = _BATCH.value * _SEQ.value
  return dict(
      pair=pair,
      impl=impl,
      loss=_LOSS.value,
      teacher_dtype=t_dtype,
      batch=_BATCH.value,
      seq=_SEQ.value,
      vocab=vocab,
      step_s=sec,
      tokens_per_s=tokens / sec,
      temp_bytes=temp,
      loss_value=float(m["loss"]),
  )


def main(argv):
  del argv
  device = jax.devices()[0]
  mesh = sharding.make_mesh(devices=[device])
  rows = []
  with jax.set_mesh(mesh):
    for pair in _PAIRS.value.split(","):
      for impl in _IMPLS.value.split(","):
        r = bench(pair, impl, mesh)
        rows.append(r)
        temp = (
            "–" if r["temp_bytes"] is None else f"{r['temp_bytes'] / 2**20:.0f}"
        )
        print(
            f"{pair:5s} {impl:9s} step {r['step_s'] * 1e3:8.1f} ms  "
            f"{r['tokens_per_s']:9.0f} tok/s  temp {temp} MiB  "
            f"loss {r['loss_value']:.4f}",
            flush=True,
        )
  kind = (
      device.platform
      + "_"
      + getattr(device, "device_kind", "").replace(" ", "_")
  )
  out = benchmarks.write_result(
      f"train_step_{kind}_{_LOSS.value}_{_PAIRS.value.replace(',', '+')}.json",
      device,
      rows=rows,
  )
  print(f"wrote {out}")


if __name__ == "__main__":
  app.run(main)
