"""Is the Hugging Face hub reachable? Asked once, answered in seconds.

``huggingface_hub`` and TFDS retry HTTP requests for minutes on a machine
without network. kdjax asks first: :func:`hub_reachable` is False at once
under ``HF_HUB_OFFLINE=1`` and otherwise opens one TCP connection to the
endpoint with a short timeout; callers then use only local files and say in
one sentence what to download where.
"""

from __future__ import annotations

import functools
import os
import socket
from typing import Sequence
import urllib.parse

HUB_TIMEOUT_S = 3.0


def hub_reachable(timeout_s: float = HUB_TIMEOUT_S) -> bool:
  """Whether the Hugging Face hub can be reached (checked once per endpoint).

  False at once under ``HF_HUB_OFFLINE=1``; otherwise one TCP connection to
  the endpoint (``HF_ENDPOINT``) with a short timeout, so an offline machine
  learns it in seconds instead of minutes of HTTP retries.
  """
  if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
    return False
  return _reachable(
      os.environ.get("HF_ENDPOINT", "https://huggingface.co"), timeout_s
  )


@functools.cache
def _reachable(endpoint: str, timeout_s: float) -> bool:
  url = urllib.parse.urlparse(endpoint)
  port = url.port or (443 if url.scheme == "https" else 80)
  try:
    socket.create_connection((url.hostname, port), timeout=timeout_s).close()
    return True
  except OSError:
    return False


# What a model snapshot needs: configs, weights, tokenizer and vocabulary files.
MODEL_FILES = ("*.json", "*.safetensors", "*.txt")


def download_hint(
    hub_id: str, files: Sequence[str] = MODEL_FILES, revision: str = ""
) -> str:
  """The command that fetches ``files`` of ``hub_id`` (at ``revision``, if
  given) on a machine with network."""
  patterns = " ".join(f"'{f}'" for f in files)
  pin = f" --revision {revision}" if revision else ""
  return f"hf download {hub_id}{pin} --include {patterns} --local-dir DIR"


def snapshot(
    hub_id: str,
    files: Sequence[str],
    missing: str,
    hint_files: Sequence[str] = MODEL_FILES,
    revision: str = "",
) -> str:
  """The local snapshot of ``hub_id``'s ``files`` (glob patterns): from the
  cache, or from the hub when :func:`hub_reachable`.

  ``revision`` (a commit hash, tag or branch; empty: the default branch)
  pins what is fetched: a commit hash always means the same files, so a
  repository changed after the run was configured is not picked up. Only
  files are fetched; no code from the repository runs.

  Otherwise one sentence, ``missing`` (what is not there), why it could not
  be fetched and the :func:`download_hint` of ``hint_files``.
  """
  import huggingface_hub  # pylint: disable=g-import-not-at-top

  online = hub_reachable()
  try:
    return huggingface_hub.snapshot_download(
        hub_id,
        revision=revision or None,
        allow_patterns=list(files),
        local_files_only=not online,
    )
  except Exception as e:  # offline, unknown repo, no credentials, ...
    why = type(e).__name__ if online else "the hub is unreachable"
    raise FileNotFoundError(
        f"{missing} and could not be fetched from the Hugging Face hub "
        f"({why}); on a machine with network run "
        f"`{download_hint(hub_id, hint_files, revision)}` and pass DIR."
    ) from None
