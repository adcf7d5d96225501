"""A ``gs://`` file system held in memory, for tests of remote workdirs.

``etils.epath`` (and through it orbax and kdjax.fs) opens ``gs://`` paths with
fsspec; registering an in-memory fsspec implementation under ``gs``/``gcs``
makes every such path live in a dict, so a test can check what was written
remotely and that no local ``./gs:`` folder appeared.
"""

import fsspec
from fsspec.implementations.memory import MemoryFileSystem
import pytest


class FakeGCS(MemoryFileSystem):
  protocol = ("gs", "gcs")
  store = {}
  pseudo_dirs = [""]
  root_marker = "/"


@pytest.fixture(name="fake_gcs")
def fake_gcs_fixture(tmp_path, monkeypatch):
  """Yields the store (``{"gs://b/path": file}``); cwd is an empty tmp dir."""
  for name in ("gs", "gcs"):
    fsspec.register_implementation(name, FakeGCS, clobber=True)
  FakeGCS.store.clear()
  FakeGCS.pseudo_dirs[:] = [""]
  # Orbax asks the real bucket whether it has a hierarchical namespace.
  from orbax.checkpoint._src.path import gcs_utils

  monkeypatch.setattr(
      gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False
  )
  monkeypatch.chdir(tmp_path)
  yield FakeGCS.store
  assert not (tmp_path / "gs:").exists()  # nothing became a local folder
