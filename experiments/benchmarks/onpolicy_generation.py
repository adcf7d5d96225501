r"""On-policy sequence sources timed against the bare sampler on the same batch.

    python -m experiments.benchmarks.onpolicy_generation            # tiny pair, CPU
    python -m experiments.benchmarks.onpolicy_generation --pair=gpt2 --batch=8

For one teacher/student pair (random weights, ``kdjax.models`` presets) and a
batch of training rows whose prompts are ``--prompt`` tokens long, it times,
each compiled once and then run ``--repeats`` times (median wall time):

* ``sampler``: :func:`kdjax.sampling.generate` on the left-padded prompts,
  called from Python as a user would (``sampler``) and inside one
  ``jax.jit`` with the model's state as argument (``sampler_jit``: device
  time only, the fair floor for the sources, which run the same way);
* ``gkd``: the GKD source with ``lmbda=1`` (prompts out of the batch, the
  same sampler, rows back in the batch layout);
* ``skd``: the SKD source (student and teacher decoding together);
* ``minillm``: the MiniLLM source (the teacher-mixed sampler, both models
  decoding together, with the per-token log-probs it records);
* ``step``: one trainer step (teacher forward, student forward/backward,
  AdamW) on the generated batch, for the generation share of a step.

Every row generates exactly ``--new`` tokens (no EOS id is set), so all
settings decode the same number of tokens. Prints tokens/s and ratios;
writes ``results/onpolicy_generation_<device>_<pair>.json``.
"""

from __future__ import annotations

import json
import os
import platform
import time

from absl import app, flags
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from kdjax import models, sampling
from kdjax.data import pipeline
from kdjax.onpolicy import strategies
from kdjax.training.step import Health

PAIRS = {
    "tiny": (
        dict(n_embd=96, n_layer=4, n_head=4),
        dict(n_embd=48, n_layer=2, n_head=4),
        257,
    ),
    "gpt2": (
        dict(n_embd=1024, n_layer=24, n_head=16),
        dict(n_embd=768, n_layer=12, n_head=12),
        50257,
    ),
}
_PAIR = flags.DEFINE_enum("pair", "tiny", list(PAIRS), "Teacher/student pair.")
_BATCH = flags.DEFINE_integer("batch", 16, "Rows per batch.")
_PROMPT = flags.DEFINE_integer("prompt", 64, "Prompt tokens per row.")
_NEW = flags.DEFINE_integer("new", 32, "Generated tokens per row.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed runs per setting.")


def _median_s(fn, repeats):
  jax.block_until_ready(fn())  # compile
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def main(_):
  teacher_kw, student_kw, vocab = PAIRS[_PAIR.value]
  B, P, N = _BATCH.value, _PROMPT.value, _NEW.value
  L = P + N
  eos = vocab - 1
  common = dict(
      vocab_size=vocab,
      embd_pdrop=0.0,
      attn_pdrop=0.0,
      resid_pdrop=0.0,
      n_positions=max(1024, L + 1),
  )
  student = models.create("tiny-gpt2", rngs=nnx.Rngs(0), **common, **student_kw)
  teacher = models.create("tiny-gpt2", rngs=nnx.Rngs(1), **common, **teacher_kw)
  student.eval()
  teacher.eval()
  rng = np.random.RandomState(0)
  rows = [
      pipeline.train_row(
          pipeline.Tokenized(
              rng.randint(0, vocab - 1, P + 4).astype(np.int32), P
          ),
          max_length=L,
          eos_id=eos,
      )
      for _ in range(B)
  ]
  batch = {k: jnp.asarray(v) for k, v in pipeline._stack(rows).items()}
  prompts = jnp.asarray(np.stack([r["input_ids"][:P] for r in rows]))
  mask = jnp.ones((B, P), bool)
  settings = sampling.Settings(
      max_new_tokens=N, greedy=False, temperature=1.0, stop_ids=(), pad_id=eos
  )
  graphdef, params, rest = nnx.split(student, nnx.Param, ...)
  key = jax.random.key(0)
  t_state = nnx.state(teacher)

  def make(kind):
    src = strategies.make(
        kind=kind,
        settings=settings,
        prompt_length=P,
        max_length=L,
        eos_id=eos,
        total_steps=1,
        student_graphdef=graphdef,
        teacher_graphdef=nnx.graphdef(teacher),
        lmbda=1.0,
        skd_top_k=25,
    )
    state = src.init(0)
    fn = jax.jit(src.__call__)
    return lambda: fn(
        params, rest, t_state, batch, state, jnp.asarray(0, jnp.int32)
    )

  out = {
      "device": jax.devices()[0].device_kind,
      "pair": _PAIR.value,
      "batch": B,
      "prompt": P,
      "new": N,
      "host": platform.node(),
  }
  out["sampler_s"] = _median_s(
      lambda: sampling.generate(
          student, prompts, mask, key, **settings._asdict()
      ),
      _REPEATS.value,
  )
  s_def, s_state = nnx.split(student)
  jitted = jax.jit(
      lambda st, ids, m, k: sampling.generate(
          nnx.merge(s_def, st), ids, m, k, **settings._asdict()
      )
  )
  out["sampler_jit_s"] = _median_s(
      lambda: jitted(s_state, prompts, mask, key), _REPEATS.value
  )
  out["gkd_s"] = _median_s(make("gkd"), _REPEATS.value)
  out["skd_s"] = _median_s(make("skd"), _REPEATS.value)
  out["minillm_s"] = _median_s(make("minillm"), _REPEATS.value)
  try:
    from kdjax import training  # pylint: disable=g-import-not-at-top

    student.train()
    graphdef_t, params_t, rest_t = nnx.split(student, nnx.Param, ...)
    step = training.Step(
        dict(name="fkl", kd_ratio=0.5, impl="auto", chunk_size=256, hp={}),
        graphdef_t,
        nnx.graphdef(teacher),
        optax.adamw(1e-4),
        1,
    )
    state = training.TrainState(
        jnp.zeros((), jnp.int32),
        params_t,
        rest_t,
        optax.adamw(1e-4).init(params_t),
    )
    train = jax.jit(step.train)
    gen_batch = make("gkd")()[0]
    out["step_s"] = _median_s(
        lambda: train(state, gen_batch, t_state, Health.init())[1]["loss"],
        _REPEATS.value,
    )
  except (ImportError, AttributeError) as e:
    print(f"no train step timed ({e})")
  tokens = B * N
  for k in ("sampler", "sampler_jit", "gkd", "skd", "minillm"):
    out[f"{k}_tokens_per_s"] = tokens / out[f"{k}_s"]
  for k in ("gkd", "skd", "minillm"):
    out[f"{k}_over_sampler_jit"] = out[f"{k}_s"] / out["sampler_jit_s"]
    if "step_s" in out:  # of one on-policy step: generate, then update
      out[f"{k}_generation_share"] = out[f"{k}_s"] / (
          out[f"{k}_s"] + out["step_s"]
      )
  for k, v in out.items():
    print(f"{k:>24}: {v:.4g}" if isinstance(v, float) else f"{k:>24}: {v}")
  os.makedirs("experiments/benchmarks/results", exist_ok=True)
  name = f"onpolicy_generation_{jax.devices()[0].platform}_{_PAIR.value}.json"
  with open(os.path.join("experiments/benchmarks/results", name), "w") as f:
    json.dump(out, f, indent=2)


if __name__ == "__main__":
  app.run(main)
