"""What kdjax reads from outside runs no code (docs/reliability.md, "Trust
boundary").

Weights load only from safetensors, so no kdjax module unpickles (``pickle``,
``torch.load``, NumPy's ``allow_pickle``) or lets transformers run a model
repository's code (``trust_remote_code``): an AST scan of the package, checked
first against snippets that do. A hub download honours the pinned revision
of the student and the tokenizer: ``huggingface_hub.snapshot_download`` is
replaced by a fake that records its arguments (no network).
"""

import ast
import pathlib

from flax import nnx
import jax
import ml_collections
import numpy as np
import pytest

import commands
from kdjax import hub, models, sharding
from kdjax.config import spec as spec_lib
from kdjax.data import tokenizer as tokenizer_lib
import tiny_run

PACKAGE = pathlib.Path(commands.ROOT) / "kdjax"
UNPICKLERS = {"pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve"}


def _unsafe(tree: ast.AST) -> list[str]:
  """What in ``tree`` can run code from a file: an unpickler imported,
  ``torch.load``, or ``trust_remote_code``/``allow_pickle`` set true or
  ``weights_only`` set false."""
  found = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names = [a.name.split(".")[0] for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      names = [(node.module or "").split(".")[0]]
    else:
      names = []
    found += [f"import {n}" for n in names if n in UNPICKLERS]
    if not isinstance(node, ast.Call):
      continue
    f = node.func
    if (
        isinstance(f, ast.Attribute)
        and f.attr in ("load", "loads")
        and isinstance(f.value, ast.Name)
        and f.value.id == "torch"
    ):
      found.append(f"torch.{f.attr}")
    for k in node.keywords:
      value = getattr(k.value, "value", None)
      if k.arg in ("trust_remote_code", "allow_pickle") and value is not False:
        found.append(f"{k.arg}={ast.unparse(k.value)}")
      if k.arg == "weights_only" and value is not True:
        found.append(f"weights_only={ast.unparse(k.value)}")
  return found


@pytest.mark.parametrize(
    "snippet",
    [
        "import pickle",
        "from joblib import load",
        "import torch\ntorch.load('w.bin')",
        "AutoModel.from_pretrained('x', trust_remote_code=True)",
        "np.load('a.npy', allow_pickle=True)",
        "torch.serialization.load_x(f, weights_only=False)",
    ],
)
def test_the_scan_finds_code_that_unpickles(snippet):
  assert _unsafe(ast.parse(snippet)), snippet


def test_no_kdjax_module_unpickles_or_runs_remote_code():
  files = sorted(PACKAGE.rglob("*.py"))
  assert len(files) > 50
  found = {
      str(f.relative_to(PACKAGE)): bad
      for f in files
      if (bad := _unsafe(ast.parse(f.read_text())))
  }
  assert not found, found


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
  """A reachable hub whose every repository is one tiny byte-vocabulary
  GPT-2; returns the model and the keyword arguments of each download."""
  model = tiny_run.gpt2(3)
  models.save_hf(model, str(tmp_path / "snapshot"))
  calls = []

  def snapshot_download(repo_id, **kwargs):
    calls.append(dict(kwargs, repo_id=repo_id))
    return str(tmp_path / "snapshot")

  import huggingface_hub

  monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
  monkeypatch.setattr(hub, "hub_reachable", lambda: True)
  return model, calls


def _params(model) -> dict:
  return {
      jax.tree_util.keystr(k): np.asarray(v)
      for k, v in jax.tree_util.tree_flatten_with_path(
          nnx.state(model, nnx.Param)
      )[0]
  }


def test_the_students_pinned_revision_reaches_the_download(fake_hub):
  from kdjax.training import builder

  model, calls = fake_hub
  config = spec_lib.defaults().student
  config.update(init="org/tiny", revision="0123abcd", model_overrides={})
  student = spec_lib.from_config(
      ml_collections.ConfigDict(
          dict(spec_lib.defaults().to_dict(), student=config.to_dict())
      )
  ).student
  assert student.revision == "0123abcd"
  mesh = sharding.make_mesh(1, 1, devices=jax.devices()[:1])
  loaded = builder.make_student(student, mesh)
  assert [(c["repo_id"], c["revision"]) for c in calls] == [
      ("org/tiny", "0123abcd")
  ]
  want, got = _params(model), _params(loaded)
  assert want.keys() == got.keys()
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_the_tokenizers_revision_reaches_the_download(fake_hub):
  _, calls = fake_hub
  tok, eos_id = tokenizer_lib.load("org/tiny", "v1.0")
  assert calls[-1]["repo_id"] == "org/tiny" and calls[-1]["revision"] == "v1.0"
  assert eos_id == tokenizer_lib.EOS_ID
  assert tok.encode("add").ids == list(b"add")
  tokenizer_lib.load("org/tiny")
  assert calls[-1]["revision"] is None  # the default branch


def test_an_offline_pinned_download_names_the_revision(monkeypatch):
  import huggingface_hub

  def offline(repo_id, **kwargs):
    raise huggingface_hub.errors.LocalEntryNotFoundError("not cached")

  monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
  monkeypatch.setattr(hub, "hub_reachable", lambda: False)
  with pytest.raises(FileNotFoundError) as e:
    models.load("org/tiny", revision="0123abcd")
  assert "hf download org/tiny --revision 0123abcd --include" in str(e.value)
