r"""The teacher cache: bytes per token on disk, and a train step from it.

    python -m experiments.benchmarks.teacher_cache

(a) Bytes per response token of each encoding (:mod:`kdjax.cache.codec`):
``topk`` at k in {16, 64, 128} and ``sampled`` with 12 draws, for V = 50257
and V = 128256. The teacher distributions are synthetic but peaked like a
fine-tuned LM's: ``p ∝ rank^-1.5`` with Gaussian noise (σ 0.5) on the logits
(top-1 ≈ 0.4, top-64 mass ≈ 0.9). Which ids hold the top ranks matters to the
id gaps: "zipf ids" draws each position's ranking around a shared frequency
order (Plackett–Luce rankings with weights ∝ 1/id: low ids frequent, as in a
BPE vocabulary, so the top-k concentrates on the same few thousand ids),
"uniform ids" scatters the top-k over the whole vocabulary (the worst case
for the id gaps). "record" is the codec's bytes per token over 16 examples of
256 tokens; "on disk" is the size of an array_record shard of 1024 such
records (the builder's default shard; the 16 records repeated, each with its
32-byte digest) over its tokens.

(b) One train step (fkl, kd_ratio 0.5, batch 8 x 128, V = 50257, the tiny
pair of ``train_step.py``) with the live teacher against the same step
reading a top-64 cache: median wall time and XLA's temporary and argument
bytes (``memory_analysis()``; the live step's arguments include the
teacher's weights), plus the host time to decode one batch of records.

Results go to stdout and ``results/teacher_cache_<device>.json``.
"""

from __future__ import annotations

import os
import tempfile
import time

from absl import app, flags
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from experiments import benchmarks
from experiments.benchmarks import train_step as train_step_bench
from kdjax import divergences as kd
from kdjax import sharding, training
from kdjax.cache import codec, store

_TOKENS = flags.DEFINE_integer("tokens", 256, "Response tokens per example.")
_EXAMPLES = flags.DEFINE_integer("examples", 16, "Examples per measurement.")

VOCABS = (50257, 128256)
KS = (16, 64, 128)
DRAWS = 12
ZIPF = 1.5


def peaked_log_probs(rng, n: int, vocab: int, ids: str) -> np.ndarray:
  """``[n, V]`` float64 log-probs, ``p ∝ rank^-1.5`` with noisy logits."""
  if ids == "zipf":
    # Ranks sorted by a shared log-frequency (id order) plus per-position
    # noise: frequent ids lead most positions, the order varies.
    score = -np.log(np.arange(1, vocab + 1)) + rng.gumbel(0, 1.0, (n, vocab))
    order = np.argsort(-score, -1)
  else:
    order = np.argsort(rng.random((n, vocab)), -1)
  logits = np.empty((n, vocab))
  base = -ZIPF * np.log(np.arange(1, vocab + 1))
  np.put_along_axis(logits, order, base, -1)
  logits += rng.normal(0, 0.5, (n, vocab))
  logits -= logits.max(-1, keepdims=True)
  return logits - np.log(np.exp(logits).sum(-1, keepdims=True))


def _sample(rng, lp_NxV: np.ndarray, draws: int):
  """RS-KD draws from the teacher, merged: ids, weights, log-probs."""
  p = np.exp(lp_NxV)
  n = len(p)
  cdf = np.cumsum(p, -1)
  u = rng.random((n, draws)) * cdf[:, -1:]
  drawn = np.stack([np.searchsorted(cdf[i], u[i]) for i in range(n)])
  drawn = np.minimum(drawn, p.shape[-1] - 1)
  ids = np.zeros((n, draws), np.int64)
  w = np.zeros((n, draws))
  for i in range(n):
    uniq, counts = np.unique(drawn[i], return_counts=True)
    ids[i, : len(uniq)] = uniq
    w[i, : len(uniq)] = counts / draws
  return ids, w, np.take_along_axis(lp_NxV, ids, -1)


def _write(records, count: int = 1024) -> int:
  """Bytes of one shard of ``count`` records (``records`` repeated)."""
  # pylint: disable-next=g-import-not-at-top
  from array_record.python import array_record_module

  with tempfile.TemporaryDirectory() as d:
    path = os.path.join(d, store.shard_name(0, 1))
    w = array_record_module.ArrayRecordWriter(path, "group_size:1,uncompressed")
    for i in range(count):
      w.write(records[i % len(records)])
    w.close()
    return os.path.getsize(path)


def bytes_per_token() -> list[dict]:
  rows = []
  n, examples = _TOKENS.value, _EXAMPLES.value
  for vocab in VOCABS:
    for ids_kind in ("zipf", "uniform"):
      rng = np.random.default_rng(0)
      blobs = {f"topk k={k}": [] for k in KS} | {f"sampled S={DRAWS}": []}
      for _ in range(examples):
        lp = peaked_log_probs(rng, n, vocab, ids_kind)
        top = np.argsort(-lp, -1)[:, : max(KS)]
        for k in KS:
          ids = top[:, :k]
          blobs[f"topk k={k}"].append(
              codec.encode_topk(ids, np.take_along_axis(lp, ids, -1), vocab)
          )
        blobs[f"sampled S={DRAWS}"].append(
            codec.encode_sampled(*_sample(rng, lp, DRAWS), DRAWS, vocab)
        )
      tokens = n * examples
      for name, bs in blobs.items():
        records = [bytes(store.DIGEST_BYTES) + b for b in bs]
        rows.append(
            dict(
                vocab=vocab,
                ids=ids_kind,
                encoding=name,
                record_bytes_per_token=sum(map(len, bs)) / tokens,
                disk_bytes_per_token=_write(records) / (1024 * n),
            )
        )
        r = rows[-1]
        print(
            f"V={vocab:6d} {ids_kind:7s} {name:12s} record "
            f"{r['record_bytes_per_token']:6.1f} B/token  on disk "
            f"{r['disk_bytes_per_token']:6.1f} B/token",
            flush=True,
        )
  return rows


def _step_rows(mesh) -> list[dict]:
  """Live teacher vs a top-64 cache on the tiny pair (V = 50257)."""
  (tp, to), (sp, so) = train_step_bench.PAIRS["tiny"]
  vocab, batch_size, seq, k = 50257, 8, 128, 64
  # pylint: disable=protected-access
  teacher = train_step_bench._model(tp, to, vocab, 1, jnp.float32)
  teacher.eval()
  student = train_step_bench._model(sp, so, vocab, 0, jnp.float32)
  loss_cfg = dict(
      name="fkl",
      kd_ratio=0.5,
      impl="auto",
      chunk_size=256,
      temperature=1.0,
      hp={},
  )
  tx = training.make_optimizer(train_step_bench.OPTIM, 1000)
  graphdef, params, rest = nnx.split(student, nnx.Param, ...)
  host = train_step_bench._batch(batch_size, seq, vocab)
  logits = teacher(
      jnp.asarray(host["input_ids"]),
      jnp.asarray(host["positions"]),
      jnp.asarray(host["attention_mask"]),
  )
  t = kd.sparse.top_k(logits, k)
  # The cached fields exactly as the reader hands them over (decoded).
  records = [
      codec.encode_topk(np.asarray(t.ids[b]), np.asarray(t.log_probs[b]), vocab)
      for b in range(batch_size)
  ]
  t0 = time.perf_counter()
  decoded = [codec.decode_topk(r) for r in records]
  decode_s = time.perf_counter() - t0
  cached = dict(
      host,
      teacher_ids=np.stack([d[0] for d in decoded]),
      teacher_log_probs=np.stack([d[1] for d in decoded]),
  )
  repeats = train_step_bench._REPEATS.value
  # pylint: enable=protected-access
  rows = []
  for source, t_graph, t_state, b in (
      ("live", nnx.graphdef(teacher), nnx.state(teacher), host),
      ("cache top-64", None, None, cached),
  ):
    state = training.TrainState(
        jnp.zeros((), jnp.int32), params, rest, tx.init(params)
    )
    step = training.Step(loss_cfg, graphdef, t_graph, tx, 1)
    batch = training.put_batch(b, mesh)
    bad = training.Health.init()
    fn = jax.jit(step.train)
    compiled = fn.lower(state, batch, t_state, bad).compile()
    mem = compiled.memory_analysis()
    state, m, bad = fn(state, batch, t_state, bad)
    jax.block_until_ready(m)
    times = []
    for _ in range(repeats):
      t0 = time.perf_counter()
      state, m, bad = fn(state, batch, t_state, bad)
      jax.block_until_ready(m)
      times.append(time.perf_counter() - t0)
    rows.append(
        dict(
            source=source,
            batch=batch_size,
            seq=seq,
            vocab=vocab,
            step_s=float(np.median(times)),
            temp_bytes=getattr(mem, "temp_size_in_bytes", None),
            argument_bytes=getattr(mem, "argument_size_in_bytes", None),
            decode_s_per_batch=decode_s if t_graph is None else 0.0,
            kd=float(m["kd"]),
        )
    )
    r = rows[-1]
    print(
        f"{source:13s} step {r['step_s'] * 1e3:8.1f} ms  temp "
        f"{r['temp_bytes'] / 2**20:7.1f} MiB  args "
        f"{r['argument_bytes'] / 2**20:6.1f} MiB  kd {r['kd']:.4f}",
        flush=True,
    )
  live, cache = rows
  print(
      f"cache/live: step time {cache['step_s'] / live['step_s']:.2f}x, temp "
      f"memory {cache['temp_bytes'] / live['temp_bytes']:.2f}x; host decode "
      f"{decode_s * 1e3:.1f} ms per batch of {batch_size}x{seq} tokens",
      flush=True,
  )
  return rows


def main(argv):
  del argv
  device = jax.devices()[0]
  sizes = bytes_per_token()
  mesh = sharding.make_mesh(devices=[device])
  with jax.set_mesh(mesh):
    steps = _step_rows(mesh)
  out = benchmarks.write_result(
      f"teacher_cache_{device.platform}.json",
      device,
      bytes_per_token=sizes,
      train_step=steps,
  )
  print(f"wrote {out}")


if __name__ == "__main__":
  app.run(main)
