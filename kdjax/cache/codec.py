"""The byte layout of one example's sparse teacher distributions (host numpy).

A record holds ``n`` tokens (an example's response positions, in order). Both
encodings are zlib-compressed; ids are ``uint16`` when ``V <= 65536`` and
``uint32`` otherwise, and integer arrays are stored as byte planes (all low
bytes, then all high bytes), which zlib compresses far better than
interleaved bytes.

``topk`` (k slots per token, ``1 <= k <= V``):

* ids sorted ascending per token, stored as gaps (first id, then
  differences);
* log-probs quantised to 8 bits on a per-token grid from ``lo`` (the
  smallest of the k, rounded down to float16) to ``hi`` (the largest,
  rounded up): ``q = round(255 · (ℓ − lo) / (hi − lo))``;
* ``m = log Σ_k p`` (the log of the top-k mass) as float16. Decoding
  dequantises ``ℓ' = lo + q · (hi − lo) / 255`` and shifts each token's
  values by ``m − logsumexp(ℓ')``, so the tail mass ``1 − Σ exp(ℓ)`` is
  ``1 − exp(m)`` to float16 precision.

Error bound of a decoded log-prob (:func:`topk_bound`):
``|Δℓ| ≤ (hi − lo) / 255 + 2⁻¹⁰ · (|m| + 2⁻⁴)``, ``hi``/``lo`` the stored
grid ends: half a grid step from rounding, at most as much again from the
shift (a weighted mean of the rounding errors), plus float16 rounding of
``m``; the tail mass is within ``2⁻¹⁰ · (|m| + 2⁻⁴) · exp(m)`` of the truth.

``sampled`` (RS-KD: ``S`` draws merged into ``u <= S`` distinct ids): per
token ``u`` (uint8), then the ids (sorted, gaps), the draw counts (uint8) and
the teacher log-probs at the ids (float16, relative error ``2⁻¹¹``) of the
``u`` distinct ids. Weights are ``count / S`` exactly.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np

ENCODINGS = ("topk", "sampled")
MAX_SAMPLES = 255  # draw counts are uint8
_LEVELS = 255
_HEADER = struct.Struct("<IHB")  # tokens, slots, id bytes


def id_dtype(vocab_size: int) -> np.dtype:
  """``uint16`` when every id fits, else ``uint32``."""
  return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def _planes(x: np.ndarray) -> bytes:
  """Little-endian integers as byte planes (all byte 0s, then byte 1s, ...)."""
  x = np.ascontiguousarray(x)
  return x.view(np.uint8).reshape(-1, x.dtype.itemsize).T.tobytes()


def _unplanes(buf: bytes, dtype: np.dtype, count: int) -> np.ndarray:
  b = np.frombuffer(buf, np.uint8, count * dtype.itemsize)
  planes = b.reshape(dtype.itemsize, count)
  return np.ascontiguousarray(planes.T).view(dtype).reshape(count)


def _gaps(ids_NxK: np.ndarray) -> np.ndarray:
  return np.diff(ids_NxK, axis=-1, prepend=0)


def _logsumexp(x_NxK: np.ndarray) -> np.ndarray:
  top = np.max(x_NxK, axis=-1, keepdims=True)
  return (top + np.log(np.sum(np.exp(x_NxK - top), -1, keepdims=True)))[..., 0]


def _f16_down(x: np.ndarray) -> np.ndarray:
  h = x.astype(np.float16)
  return np.where(h.astype(np.float64) > x, np.nextafter(h, -np.inf), h)


def _f16_up(x: np.ndarray) -> np.ndarray:
  h = x.astype(np.float16)
  return np.where(h.astype(np.float64) < x, np.nextafter(h, np.inf), h)


def encode_topk(
    ids_NxK: np.ndarray, log_probs_NxK: np.ndarray, vocab_size: int
) -> bytes:
  """One record of ``topk``: finite log-probs of ``softmax(t/T)`` at the ids."""
  ids_NxK = np.asarray(ids_NxK, np.int64)
  lp_NxK = np.asarray(log_probs_NxK, np.float64)
  n, k = ids_NxK.shape
  order = np.argsort(ids_NxK, axis=-1, kind="stable")
  ids_NxK = np.take_along_axis(ids_NxK, order, -1)
  lp_NxK = np.take_along_axis(lp_NxK, order, -1)
  lo_N = _f16_down(np.min(lp_NxK, -1, initial=0.0) if k else np.zeros(n))
  hi_N = _f16_up(np.max(lp_NxK, -1, initial=-np.inf))
  hi_N = np.where(hi_N <= lo_N, np.nextafter(lo_N, np.inf), hi_N)
  lo64, hi64 = lo_N.astype(np.float64), hi_N.astype(np.float64)
  step_N = (hi64 - lo64) / _LEVELS
  q_NxK = np.rint((lp_NxK - lo64[:, None]) / step_N[:, None])
  q_NxK = np.clip(q_NxK, 0, _LEVELS).astype(np.uint8)
  m_N = _logsumexp(lp_NxK).astype(np.float16) if n else np.zeros(0, np.float16)
  dt = id_dtype(vocab_size)
  payload = b"".join(
      (
          _HEADER.pack(n, k, dt.itemsize),
          _planes(np.stack([lo_N, hi_N, m_N]).astype("<f2").view("<u2")),
          _planes(_gaps(ids_NxK).astype(dt)),
          q_NxK.tobytes(),
      )
  )
  return zlib.compress(payload, 9)


def decode_topk(blob: bytes) -> tuple[np.ndarray, np.ndarray]:
  """``(ids_NxK int32, log_probs_NxK float32)`` of a ``topk`` record."""
  buf = zlib.decompress(blob)
  n, k, width = _HEADER.unpack_from(buf)
  at = _HEADER.size
  scales = _unplanes(buf[at:], np.dtype("<u2"), 3 * n).view("<f2")
  lo_N, hi_N, m_N = scales.reshape(3, n).astype(np.float64)
  at += 6 * n
  dt = np.dtype("<u2") if width == 2 else np.dtype("<u4")
  gaps = _unplanes(buf[at:], dt, n * k).reshape(n, k)
  at += n * k * width
  q_NxK = np.frombuffer(buf, np.uint8, n * k, at).reshape(n, k)
  ids_NxK = np.cumsum(gaps.astype(np.int64), axis=-1).astype(np.int32)
  lp_NxK = lo_N[:, None] + q_NxK * ((hi_N - lo_N) / _LEVELS)[:, None]
  if n:
    lp_NxK = lp_NxK + (m_N - _logsumexp(lp_NxK))[:, None]
  return ids_NxK, lp_NxK.astype(np.float32)


def topk_bound(log_probs_NxK: np.ndarray) -> np.ndarray:
  """Per token, the most a decoded log-prob may differ from the encoded one."""
  lp = np.asarray(log_probs_NxK, np.float64)
  span = np.max(lp, -1) - np.min(lp, -1)
  m = np.abs(_logsumexp(lp))
  # float16 rounding of lo/hi widens the grid by at most 2^-10 relative.
  return (span + 2**-9 * np.max(np.abs(lp), -1)) / _LEVELS + 2**-10 * (
      m + 2**-4
  )


def encode_sampled(
    ids_NxS: np.ndarray,
    weights_NxS: np.ndarray,
    log_probs_NxS: np.ndarray,
    num_samples: int,
    vocab_size: int,
) -> bytes:
  """One record of ``sampled``: slots of weight 0 are unused and dropped."""
  ids_NxS = np.asarray(ids_NxS, np.int64)
  counts = np.rint(np.asarray(weights_NxS, np.float64) * num_samples)
  used = counts > 0
  # Used slots first, in ascending id order.
  key = np.where(used, ids_NxS, np.iinfo(np.int64).max)
  order = np.argsort(key, axis=-1, kind="stable")
  ids_NxS = np.take_along_axis(ids_NxS, order, -1)
  counts = np.take_along_axis(counts, order, -1)
  lp_NxS = np.take_along_axis(np.asarray(log_probs_NxS), order, -1)
  used = np.take_along_axis(used, order, -1)
  u_N = used.sum(-1).astype(np.uint8)
  gaps = np.where(used, _gaps(np.where(used, ids_NxS, 0)), 0)
  dt = id_dtype(vocab_size)
  n, s = ids_NxS.shape
  payload = b"".join(
      (
          _HEADER.pack(n, s, dt.itemsize),
          u_N.tobytes(),
          _planes(gaps[used].astype(dt)),
          counts[used].astype(np.uint8).tobytes(),
          _planes(lp_NxS[used].astype("<f2").view("<u2")),
      )
  )
  return zlib.compress(payload, 9)


def decode_sampled(
    blob: bytes, num_samples: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """``(ids, weights, log_probs)`` ``[N, S]``; unused slots: id 0, weight 0."""
  buf = zlib.decompress(blob)
  n, s, width = _HEADER.unpack_from(buf)
  at = _HEADER.size
  u_N = np.frombuffer(buf, np.uint8, n, at).astype(np.int64)
  at += n
  total = int(u_N.sum())
  dt = np.dtype("<u2") if width == 2 else np.dtype("<u4")
  gaps = _unplanes(buf[at:], dt, total).astype(np.int64)
  at += total * width
  counts = np.frombuffer(buf, np.uint8, total, at)
  at += total
  lps = _unplanes(buf[at:], np.dtype("<u2"), total).view("<f2")
  used = np.arange(s)[None, :] < u_N[:, None]
  ids = np.zeros((n, s), np.int64)
  ids[used] = gaps
  ids = np.where(used, np.cumsum(ids, -1), 0).astype(np.int32)
  weights = np.zeros((n, s), np.float32)
  weights[used] = counts / np.float32(num_samples)
  log_probs = np.zeros((n, s), np.float32)
  log_probs[used] = lps
  return ids, weights, log_probs
