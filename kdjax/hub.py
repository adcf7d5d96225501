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


def download_hint(hub_id: str) -> str:
  """The command that fetches ``hub_id`` on a machine with network."""
  return (
      f"hf download {hub_id} --include '*.json' '*.safetensors' '*.txt' "
      "--local-dir DIR"
  )
