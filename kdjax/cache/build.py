"""One pass of the teacher over the training split, written as a cache.

:func:`build` tokenises the training split exactly as training does
(:func:`kdjax.data.pipeline.tokenize_split` with the config's row settings),
runs the frozen teacher (jitted, its batch sharded over the mesh's batch axes)
on the kept examples in order, turns each response position's logits into a
sparse distribution of ``softmax(t / T)`` (``T = loss.temperature``) with
:func:`kdjax.divergences.sparse.top_k` or
:func:`~kdjax.divergences.sparse.sample`, and writes one record per example
(:mod:`kdjax.cache.store`).

It is resumable: ``metadata.json`` is written before the first shard, each
shard is written to a temporary file and renamed when complete, and a re-run
with the same config skips the committed shards (a different config is
refused). Draws of ``sampled`` use the key ``fold_in(key(seed), example)``, so
a resumed or re-batched build writes the same records. Run it on one host: it
shards over that host's devices.
"""

from __future__ import annotations

import os
from typing import Any, Callable

from absl import logging
from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm

from kdjax import checksums, sharding
from kdjax.cache import codec, store
from kdjax.config import checks as config_checks
from kdjax.config import spec as spec_lib
from kdjax.data import inputs, pipeline
from kdjax.data import tokenizer as tokenizer_lib
from kdjax.divergences import sparse
from kdjax.models import teacher as teacher_lib

EXAMPLES_PER_SHARD = 1024


def _refuse_unbuildable(config: ml_collections.ConfigDict) -> None:
  if config.data.seqkd_teacher:
    raise config_checks.ConfigError(
        "data.seqkd_teacher is set: a SeqKD run trains on responses generated "
        "in its workdir, which a teacher cache cannot follow; cache a config "
        "that trains on the dataset's references."
    )
  if config.teacher.get("others"):
    raise config_checks.ConfigError(
        f"teacher.others={config.teacher.others!r} is set but a teacher cache "
        "holds one teacher's distributions; cache a config with one teacher "
        "(--config.teacher.others='')."
    )
  if config.loss.kd_ratio == 0:
    raise config_checks.ConfigError(
        "loss.kd_ratio=0 trains without a teacher; there is nothing to cache "
        "(use a KD config such as configs/fkl_gpt2.py)."
    )


def live_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """``config`` with ``teacher.source="live"``: what the build itself runs."""
  c = config.copy_and_resolve_references()
  c.teacher.source = "live"
  return c


def _teacher_fn(meta_identity, graphdef) -> Callable:
  """The jitted ``(state, batch, index_B) -> sparse arrays [B, L, width]``."""
  enc = meta_identity["encoding"]
  temperature = meta_identity["temperature"]
  width = meta_identity.get("k") or meta_identity["num_samples"]
  base = jax.random.key(meta_identity.get("seed", 0))

  def forward(state, batch, index_B):
    teacher = nnx.merge(graphdef, state)
    logits = teacher(
        batch["input_ids"], batch["positions"], batch["attention_mask"]
    )
    logits = logits.astype(jnp.float32)
    if enc == "topk":
      t = sparse.top_k(logits, width, temperature=temperature)
      return t.ids, t.log_probs
    keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(index_B)
    t = jax.vmap(
        lambda k, x: sparse.sample(k, x, width, temperature=temperature)
    )(keys, logits)
    return t.ids, t.weights, t.log_probs

  return jax.jit(forward)


def _encode(identity, arrays, vocab_size: int) -> bytes:
  if identity["encoding"] == "topk":
    return codec.encode_topk(*arrays, vocab_size)
  return codec.encode_sampled(*arrays, identity["num_samples"], vocab_size)


def commit(tmp_path: str, path: str) -> None:
  """Makes a written shard visible (atomic rename)."""
  os.replace(tmp_path, path)


def _write_shard(path: str, records) -> int:
  # pylint: disable-next=g-import-not-at-top
  from array_record.python import array_record_module

  tmp = path + ".tmp"
  # One record per chunk (random access reads only its own record); the
  # records are compressed already.
  writer = array_record_module.ArrayRecordWriter(
      tmp, "group_size:1,uncompressed"
  )
  total = 0
  for r in records:
    writer.write(r)
    total += len(r)
  writer.close()
  commit(tmp, path)
  return total


def _metadata(config, examples, vocab_size, per_shard) -> dict[str, Any]:
  return {
      "format": store.FORMAT,
      "identity": store.identity(config, vocab_size),
      "num_examples": len(examples),
      "examples_per_shard": per_shard,
      "num_shards": max(-(-len(examples) // per_shard), 1),
      "fingerprint": store.fingerprint(examples),
      "complete": False,
  }


def _claim(out: str, meta: dict[str, Any]) -> dict[str, Any]:
  """The metadata to continue from: ``meta``, or the same one in ``out``."""
  old = store.read_metadata(out)
  if old is None:
    os.makedirs(out, exist_ok=True)
    store.write_metadata(out, meta)
    return meta
  keys = ("format", "identity", "num_examples", "examples_per_shard")
  keys += ("fingerprint",)
  diff = [k for k in keys if old.get(k) != meta[k]]
  if diff:
    changed = (
        store.differences(old["identity"], meta["identity"])
        if diff[0] == "identity"
        else [diff[0]]
    )
    raise store.CacheError(
        f"--out={out} holds a teacher cache of another config ({changed[0]} "
        "differs); choose another --out or delete that directory."
    )
  return old


def build(
    config: ml_collections.ConfigDict,
    out: str,
    *,
    examples_per_shard: int = EXAMPLES_PER_SHARD,
    devices=None,
    progress: bool = True,
) -> dict[str, Any]:
  """Writes (or finishes) the teacher cache of ``config`` in ``out``.

  Returns its metadata (with the measured sizes).
  """
  _refuse_unbuildable(config)
  c = live_config(config)
  config_checks.validate(c)
  if examples_per_shard < 1:
    raise config_checks.ConfigError(
        f"--examples_per_shard={examples_per_shard} must be >= 1."
    )
  vocab = int(config_checks.teacher_config(c)["vocab_size"])
  width = store.cache_settings(c.teacher)
  width = width.get("k") or width["num_samples"]
  if width > vocab:
    raise config_checks.ConfigError(
        f"teacher.cache.k={width} exceeds the teacher's vocabulary of {vocab}; "
        f"pass --config.teacher.cache.k={min(64, vocab)}."
    )
  s = spec_lib.from_config(c)
  out = os.path.expanduser(out)
  tok, eos_id = tokenizer_lib.load(s.data.tokenizer, s.data.tokenizer_revision)
  examples, _ = pipeline.tokenize_split(
      inputs.train_source(s.data),
      tok,
      name="train",
      **s.data.row_settings(eos_id),
  )
  meta = _claim(out, _metadata(c, examples, vocab, examples_per_shard))
  if meta.get("complete"):
    logging.info("teacher cache %s is complete", out)
    return meta
  mesh = sharding.make_mesh(s.mesh.data, s.mesh.fsdp, devices=devices)
  with jax.set_mesh(mesh):
    teacher = teacher_lib.load(s.teacher, mesh)
    graphdef, state = nnx.split(teacher)
    fn = _teacher_fn(meta["identity"], graphdef)
    n_batch = int(np.prod([mesh.shape[a] for a in sharding.BATCH]))
    batch = -(-s.batch_size // n_batch) * n_batch
    _run(meta, examples, out, fn, state, mesh, batch, s, eos_id, progress)
  meta.update(complete=True, **measure(out, meta, examples))
  store.write_metadata(out, meta)
  return meta


def measure(out: str, meta, examples) -> dict[str, Any]:
  """Tokens, bytes on disk (shard files) and record bytes, per token too."""
  from kdjax.cache.store import Cache  # pylint: disable=g-import-not-at-top

  n = meta["num_shards"]
  files = sum(
      os.path.getsize(os.path.join(out, store.shard_name(i, n)))
      for i in range(n)
  )
  reader = Cache(out, dict(meta, complete=True))
  records = sum(len(reader.raw(i)) for i in range(len(reader)))
  tokens = sum(len(e.ids) - e.prompt_len for e in examples)
  return {
      "tokens": tokens,
      "bytes": files,
      "record_bytes": records,
      "bytes_per_token": files / max(tokens, 1),
      "record_bytes_per_token": records / max(tokens, 1),
  }


def _run(meta, examples, out, fn, state, mesh, batch, s, eos_id, progress):
  """Writes every shard not committed yet; returns the record bytes written."""
  n_shards, per = meta["num_shards"], meta["examples_per_shard"]
  todo = [
      i
      for i in range(n_shards)
      if not os.path.exists(os.path.join(out, store.shard_name(i, n_shards)))
  ]
  done = len(examples) - sum(
      len(examples[i * per : (i + 1) * per]) for i in todo
  )
  bar = tqdm.tqdm(
      total=len(examples),
      initial=done,
      desc="cache",
      disable=not progress or jax.process_index() != 0,
      dynamic_ncols=True,
  )
  ident, vocab = meta["identity"], meta["identity"]["vocab_size"]
  # A build killed between a shard's commit and the metadata write: record
  # the committed shard's checksum now.
  for shard in sorted(set(range(n_shards)) - set(todo)):
    name = store.shard_name(shard, n_shards)
    if name not in meta.get("sha256", {}):
      meta.setdefault("sha256", {})[name] = checksums.file_sha256(
          os.path.join(out, name)
      )
  for shard in todo:
    index = list(range(shard * per, min((shard + 1) * per, len(examples))))
    records = []
    for start in range(0, len(index), batch):
      chunk = index[start : start + batch]
      rows = [
          pipeline.train_row(
              examples[i], max_length=s.data.max_length, eos_id=eos_id
          )
          for i in chunk
      ]
      rows += [rows[0]] * (batch - len(rows))
      host = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
      idx = np.asarray(chunk + [chunk[0]] * (batch - len(chunk)), np.int32)
      arrays = jax.device_get(
          fn(
              state,
              sharding.put_batch(host, mesh),
              jax.device_put(idx, sharding.batch_sharding(mesh, 1)),
          )
      )
      for r, i in enumerate(chunk):
        e = examples[i]
        pos = slice(e.prompt_len - 1, len(e.ids) - 1)
        blob = _encode(ident, [a[r, pos] for a in arrays], vocab)
        records.append(store.example_digest(e.prompt_len, e.ids) + blob)
      bar.update(len(chunk))
    name = store.shard_name(shard, n_shards)
    _write_shard(os.path.join(out, name), records)
    # Recorded as each shard commits (a resumed build keeps the earlier
    # ones); training verifies them (store.Cache.verify).
    meta.setdefault("sha256", {})[name] = checksums.file_sha256(
        os.path.join(out, name)
    )
    store.write_metadata(out, meta)
  bar.close()
