"""A teacher cache directory: metadata, array_record shards, checks, reader.

Layout of ``DIR``::

    metadata.json                          what the cache was built from
    shard-00000-of-00004.array_record      records of examples 0 .. E-1
    ...

Record ``i`` belongs to the ``i``-th kept training example, in
:func:`kdjax.data.pipeline.tokenize_split` order: 32 bytes of
:func:`example_digest` followed by a :mod:`kdjax.cache.codec` record of the
example's response positions. ``metadata.json`` holds the
:func:`identity` (encoding, k or draws, temperature, vocabulary, teacher,
tokenizer, data settings), the layout (examples per shard), the
:func:`fingerprint` of all examples, the sha256 of each shard as it is
committed (``sha256``), and once every shard is committed ``complete`` with
the measured size.

Training from a cache checks it twice: :func:`check_config` compares the
identity with the config before anything is written (one sentence naming the
first field that differs and the command that rebuilds the cache), and
opening a :class:`Cache` compares each shard with its recorded sha256 (a
damaged or changed file), :meth:`Cache.bind` the fingerprint with the
tokenised examples (a changed dataset file or tokenizer), then each record's
digest as it is read.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import sys
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from kdjax import checksums, fs
from kdjax.cache import codec
from kdjax.config import identity as identity_lib

METADATA = "metadata.json"
FORMAT = 1
DIGEST_BYTES = 32
# Fields of the row a cache adds, per encoding (kdjax.training.step reads them).
FIELDS = {
    "topk": ("teacher_ids", "teacher_log_probs"),
    "sampled": ("teacher_ids", "teacher_weights", "teacher_log_probs"),
}
_DATA_KEYS = (
    "name",
    "train_split",
    "train_limit",
    "template",
    "max_length",
    "max_prompt_length",
    "prompt_policy",
)


class CacheError(ValueError):
  """A cache that does not match the config; the message says how to rebuild."""

  exit_code = 2


def shard_name(index: int, count: int) -> str:
  return f"shard-{index:05d}-of-{count:05d}.array_record"


def example_digest(prompt_len: int, ids: np.ndarray) -> bytes:
  """sha256 over the prompt length and the token ids (int32, little-endian)."""
  h = hashlib.sha256(np.int32(prompt_len).tobytes())
  h.update(np.asarray(ids, "<i4").tobytes())
  return h.digest()


def fingerprint(examples: Sequence[Any]) -> str:
  """sha256 over every example's digest, in order (hex)."""
  h = hashlib.sha256()
  for e in examples:
    h.update(example_digest(e.prompt_len, e.ids))
  return h.hexdigest()


def teacher_identity(path: str) -> dict[str, Any]:
  """The teacher directory: its path, config.json's sha256 and file sizes."""
  local = os.path.expanduser(path)
  out: dict[str, Any] = {"path": path}
  if os.path.isdir(local):
    names = sorted(os.listdir(local))
    out["files"] = {
        n: os.path.getsize(os.path.join(local, n))
        for n in names
        if n.endswith((".safetensors", ".json"))
    }
    cfg = os.path.join(local, "config.json")
    if os.path.exists(cfg):
      with open(cfg, "rb") as f:
        out["config_sha256"] = hashlib.sha256(f.read()).hexdigest()
  return out


def cache_settings(teacher_cfg: Mapping[str, Any]) -> dict[str, Any]:
  """``encoding`` and its size (``k`` or ``num_samples``) of ``teacher``."""
  c = teacher_cfg["cache"]
  size = "k" if c["encoding"] == "topk" else "num_samples"
  return {"encoding": c["encoding"], size: int(c[size])}


def identity(config, vocab_size: int | None = None) -> dict[str, Any]:
  """What a cache built with ``config`` depends on (a plain mapping).

  ``vocab_size`` (the teacher's) is filled in by the builder; the checks at
  training start compare every other field.
  """
  out = cache_settings(config["teacher"])
  out["temperature"] = float(config["loss"]["temperature"])
  if out["encoding"] == "sampled":
    out["seed"] = int(config["seed"])
  out["teacher"] = teacher_identity(config["teacher"]["path"])
  out["tokenizer"] = config["data"]["tokenizer"]
  out["data"] = {k: config["data"][k] for k in _DATA_KEYS}
  if config["data"].get("system_prompt"):  # absent from caches without one
    out["data"]["system_prompt"] = config["data"]["system_prompt"]
  if vocab_size is not None:
    out["vocab_size"] = int(vocab_size)
  return out


def differences(
    built: Mapping[str, Any], wanted: Mapping[str, Any]
) -> list[str]:
  """Dotted keys of ``wanted`` whose value the cache has otherwise.

  A teacher directory that is absent now (training never loads it) is compared
  by path only.
  """
  a, b = identity_lib.flatten(built), identity_lib.flatten(wanted)
  if "teacher.config_sha256" not in b:
    a = {k: v for k, v in a.items() if not k.startswith("teacher.")}
    a["teacher.path"] = identity_lib.flatten(built).get("teacher.path")
  return sorted(k for k in b if k != "vocab_size" and a.get(k) != b[k])


def _config_key(key: str) -> str:
  """A dotted identity key as the config field a user changes."""
  if key in ("k", "num_samples", "encoding"):
    return f"teacher.cache.{key}"
  if key == "temperature":
    return "loss.temperature"
  if key == "tokenizer":
    return "data.tokenizer"
  if key.startswith("teacher.") and key != "teacher.path":
    return "the teacher's files"
  return key


def rebuild_command(cache_dir: str) -> str:
  """The command that (re)builds the cache for this process's config."""
  main = sys.modules.get("__main__")
  module = getattr(getattr(main, "__spec__", None), "name", None)
  if module in ("kdjax.train", "kdjax.cache_teacher"):
    args = [
        a
        for a in sys.argv[1:]
        if not a.startswith(("--workdir", "--out", "--config.teacher.source"))
    ]
    return shlex.join(
        ["python", "-m", "kdjax.cache_teacher", *args, f"--out={cache_dir}"]
    )
  return (
      "python -m kdjax.cache_teacher --config=<this experiment config> "
      f"--out={cache_dir}"
  )


def read_metadata(directory: str) -> dict[str, Any] | None:
  """``metadata.json`` of a cache directory, None if absent.

  Raises:
    kdjax.fs.BadFileError: it is not JSON (one sentence with the fix).
  """
  path = os.path.join(os.path.expanduser(directory), METADATA)
  if not os.path.exists(path):
    return None
  return fs.read_json(
      path, f"delete {directory} and rebuild it: {rebuild_command(directory)}"
  )


def write_metadata(directory: str, meta: Mapping[str, Any]) -> None:
  """Atomically (a temporary file renamed over the old one)."""
  path = os.path.join(directory, METADATA)
  with open(path + ".tmp", "w") as f:
    json.dump(meta, f, indent=1, sort_keys=True)
  os.replace(path + ".tmp", path)


def check_config(config) -> dict[str, Any]:
  """The metadata of ``teacher.cache_dir`` if it fits ``config``.

  Raises :class:`CacheError` (one sentence, with the rebuild command) if not.
  """
  cache_dir = config["teacher"]["cache_dir"]
  fix = f"build it: {rebuild_command(cache_dir)}"
  fs.check_kind(
      os.path.expanduser(cache_dir), "directory", "teacher.cache_dir", fix
  )
  meta = read_metadata(cache_dir)
  if meta is None:
    raise CacheError(
        f"teacher.cache_dir={cache_dir!r} holds no teacher cache ({METADATA}); "
        f"{fix}."
    )
  if not meta.get("complete"):
    raise CacheError(
        f"teacher cache {cache_dir} is incomplete (its build stopped); "
        f"finish it with the same command: {rebuild_command(cache_dir)}."
    )
  changed = differences(meta["identity"], identity(config))
  if changed:
    key = changed[0]
    old, new = (
        identity_lib.flatten(meta["identity"]).get(key),
        identity_lib.flatten(identity(config))[key],
    )
    what = _config_key(key)
    detail = (
        f"{what} changed"
        if what == "the teacher's files"
        else f"it was built with {what}={old!r}, the config has {new!r}"
    )
    raise CacheError(
        f"teacher cache {cache_dir} does not match the config ({detail}); "
        f"rebuild it: {rebuild_command(cache_dir)}."
    )
  return meta


def _filler(encoding: str, width: int, vocab_size: int) -> dict[str, Any]:
  """Fields of a position outside the response: a valid, finite distribution."""
  ids = np.arange(width, dtype=np.int32) % vocab_size
  uniform = np.float32(-np.log(vocab_size))
  if encoding == "topk":
    return {"teacher_ids": ids, "teacher_log_probs": np.full(width, uniform)}
  w = np.zeros(width, np.float32)
  w[0] = 1.0
  return {
      "teacher_ids": ids,
      "teacher_weights": w,
      "teacher_log_probs": np.full(width, uniform),
  }


class Cache:
  """Random access to a complete cache directory's records."""

  def __init__(self, directory: str, meta: Mapping[str, Any] | None = None):
    import grain  # pylint: disable=g-import-not-at-top

    self.directory = os.path.expanduser(directory)
    self.meta = dict(meta or read_metadata(self.directory) or {})
    if not self.meta.get("complete"):
      raise CacheError(
          f"teacher cache {directory} is incomplete or missing; build it: "
          f"{rebuild_command(directory)}."
      )
    ident = self.meta["identity"]
    self.encoding = ident["encoding"]
    self.width = int(ident.get("k") or ident["num_samples"])
    self.vocab_size = int(ident["vocab_size"])
    n = self.meta["num_shards"]
    self.verify()  # before array_record reads a damaged shard
    self._source = grain.sources.ArrayRecordDataSource(
        [os.path.join(self.directory, shard_name(i, n)) for i in range(n)]
    )

  def __len__(self) -> int:
    return len(self._source)

  def raw(self, index: int) -> bytes:
    """Record ``index`` as stored (digest + codec bytes)."""
    return self._source[index]

  def record(self, index: int) -> tuple[bytes, tuple[np.ndarray, ...]]:
    """``(digest, decoded [N, width] arrays)`` of example ``index``."""
    raw = self.raw(index)
    digest, blob = raw[:DIGEST_BYTES], raw[DIGEST_BYTES:]
    if self.encoding == "topk":
      return digest, codec.decode_topk(blob)
    return digest, codec.decode_sampled(blob, self.width)

  def verify(self) -> None:
    """Compares each shard with the sha256 recorded when it was written.

    Caches written before checksums were recorded are not checked.

    Raises:
      CacheError: a shard is missing or differs (one sentence, the fix).
    """
    where = self.directory
    fix = f"delete {where} and rebuild it: {rebuild_command(where)}."
    for name, digest in sorted(self.meta.get("sha256", {}).items()):
      path = os.path.join(where, name)
      try:
        ok = checksums.file_sha256(path) == digest
      except FileNotFoundError:
        raise CacheError(f"teacher cache {where} lacks {name}; {fix}") from None
      if not ok:
        raise CacheError(
            f"shard {path} differs from the checksum recorded when it was "
            f"written (damaged or changed); {fix}"
        )

  def bind(
      self, examples: Sequence[Any], max_length: int
  ) -> Callable[[int], dict[str, np.ndarray]]:
    """``row_fields(i)``: example ``i``'s cached fields as ``[L, width]`` rows.

    Position ``p`` of a row carries the teacher's distribution over
    ``labels[p]`` (the logits at input ``p``): the record's tokens fill the
    positions where ``loss_mask`` is 1; the others get a finite filler the
    loss ignores.
    """
    where = self.directory
    if (
        len(examples) != len(self)
        or fingerprint(examples) != self.meta["fingerprint"]
    ):
      raise CacheError(
          f"the tokenised training examples ({len(examples)}) differ from "
          f"the {len(self)} that teacher cache {where} was built from (the "
          "dataset or the tokenizer changed); rebuild it: "
          f"{rebuild_command(where)}."
      )
    names = FIELDS[self.encoding]
    fill = _filler(self.encoding, self.width, self.vocab_size)

    def row_fields(index: int) -> dict[str, np.ndarray]:
      e = examples[index]
      digest, arrays = self.record(index)
      if digest != example_digest(e.prompt_len, e.ids):
        raise CacheError(
            f"record {index} of teacher cache {where} belongs to another "
            f"example; rebuild it: {rebuild_command(where)}."
        )
      start, stop = e.prompt_len - 1, len(e.ids) - 1
      out = {}
      for name, values in zip(names, arrays):
        row = np.broadcast_to(fill[name], (max_length, self.width)).copy()
        row[start:stop] = values
        out[name] = row
      return out

    return row_fields
