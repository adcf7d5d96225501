"""The teacher cache: sparse teacher distributions, written once, read in training.

* :mod:`kdjax.cache.codec`: the byte layout of one example's tokens (numpy);
* :mod:`kdjax.cache.store`: the cache directory (metadata, array_record
  shards, what is checked against a config) and the reader that attaches the
  cached fields to training rows;
* :mod:`kdjax.cache.build`: one pass of the teacher over the training split
  (``python -m kdjax.cache_teacher``).

docs/cached_teacher.md describes the format and its error bounds.
"""
