"""Checksums of what kdjax writes, verified when it is read back.

* :func:`tree` hashes a pytree of (possibly sharded) arrays on their devices:
  one ``uint32`` per leaf, recorded with a checkpoint and compared after a
  restore. Orbax and TensorStore catch a missing or truncated file, but a
  flipped byte inside an array's data restores silently as a wrong value.
* :func:`file_sha256` hashes a file through :mod:`kdjax.fs` (teacher-cache
  shards).

The leaf hash, over the leaf's bits ``b_i`` (its dtype's unsigned integer of
the same width; PRNG keys by their key data) at flat position ``i``::

    h_i = xorshift(b_i * 0x9E3779B1 + i * 0x85EBCA77),  H = sum_i h_i mod 2^32

Every step is a bijection of ``b_i`` for fixed ``i``, so changing one
element always changes ``H``; the sum of integers mod ``2^32`` does not
depend on the reduction order, so ``H`` is the same for any sharding, device
count or number of processes.
"""

from __future__ import annotations

import hashlib

import jax
import jax.numpy as jnp

from kdjax import fs

_UNSIGNED = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}


def _bits(x: jax.Array) -> jax.Array:
  """``x``'s elements as ``uint32`` holding their bit patterns, flattened."""
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    x = x.astype(jnp.uint8)
  # 8-byte types become pairs of uint32 (a trailing axis of 2).
  unsigned = _UNSIGNED.get(x.dtype.itemsize, jnp.uint32)
  return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32).ravel()


def _leaf(x: jax.Array) -> jax.Array:
  b = _bits(x)
  i = jnp.arange(b.shape[0], dtype=jnp.uint32)
  h = b * jnp.uint32(0x9E3779B1) + i * jnp.uint32(0x85EBCA77)
  h = h ^ (h >> 15)
  return jnp.sum(h, dtype=jnp.uint32)


@jax.jit
def _hashes(leaves: list[jax.Array]) -> list[jax.Array]:
  return [_leaf(x) for x in leaves]


def tree(state) -> dict[str, int]:
  """``{leaf path: uint32 hash}`` of every array leaf of ``state``."""
  flat = jax.tree_util.tree_flatten_with_path(state)[0]
  hashes = jax.device_get(_hashes([x for _, x in flat]))
  return {jax.tree_util.keystr(k): int(h) for (k, _), h in zip(flat, hashes)}


def mismatches(state, recorded: dict[str, int]) -> list[str]:
  """Leaf paths of ``state`` whose hash differs from ``recorded``."""
  now = tree(state)
  return sorted(
      k for k in recorded.keys() | now.keys() if now.get(k) != recorded.get(k)
  )


def file_sha256(path: fs.PathLike) -> str:
  """The sha256 of a file's bytes (hex), read in 1 MiB blocks."""
  h = hashlib.sha256()
  with fs.path(path).open("rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()
