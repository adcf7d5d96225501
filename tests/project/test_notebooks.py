"""The committed notebooks execute end to end on CPU (as CI runs them).

Each notebook runs with nbclient on the venv's ``python3`` kernel, from a copy in
a temporary folder (so no output lands in the repository), with
``KDJAX_NOTEBOOK_QUICK=1`` and the repository on ``PYTHONPATH``. The notebooks
carry their own self-checks (``assert`` / ``np.testing``), so an execution error
is a failed claim, not just a crash. Add a notebook by appending to NOTEBOOKS.
"""

import json
import os
import shutil

import pytest

import commands
from commands import ROOT
import extras
import tiny_run

nbformat = extras.require("nbformat")
nbclient = extras.require("nbclient")


# notebook -> strings its quick run must print (its own checks are asserts).
EXPECTED = {
    "divergences.ipynb": ("AKL weights: head", "long_tailed"),
    "quickstart.ipynb": ("saved student:", "model.safetensors", "ROUGE-L"),
}
NOTEBOOKS = sorted(EXPECTED)
# notebook -> where its quick run keeps the embedded dataset: copied there,
# prepared already, from the test run's shared copy (preparing it is what
# every tiny run in the suite does).
SEEDED_DATA = {"quickstart.ipynb": "workdirs/notebook_quick/data"}
TIMEOUT_S = 180  # per notebook, the CI budget


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_notebook_has_no_outputs(name):
  with open(os.path.join(ROOT, "notebooks", name)) as f:
    nb = json.load(f)
  for cell in nb["cells"]:
    if cell["cell_type"] == "code":
      assert not cell["outputs"] and cell["execution_count"] is None, name


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_first_code_cell_installs_with_the_projects_versions(name):
  """One marked repository variable; the jax range is setup.cfg's."""
  import configparser
  import re

  with open(os.path.join(ROOT, "notebooks", name)) as f:
    nb = json.load(f)
  first = "".join(
      next(c for c in nb["cells"] if c["cell_type"] == "code")["source"]
  )
  assert len(re.findall(r"^KDJAX_REPO = ", first, re.M)) == 1
  assert "<-- EDIT" in first and "restart" in first
  setup = configparser.ConfigParser()
  setup.read(os.path.join(ROOT, "setup.cfg"))
  deps = setup["options"]["install_requires"].split("\n")
  jax_req = next(
      d
      for d in deps
      if re.match(r"jax\b(?!-)", d) and not d.startswith("jaxlib")
  )
  jax_range = jax_req.removeprefix("jax")
  assert f'JAX_RANGE = "{jax_range}"' in first
  assert 'f"jax[tpu]{JAX_RANGE}"' in first
  assert 'f"jax[cuda12]{JAX_RANGE}"' in first


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_executes(name, tmp_path, monkeypatch):
  path = tmp_path / name
  shutil.copy(os.path.join(ROOT, "notebooks", name), path)
  if (
      name in SEEDED_DATA
  ):  # the run's prepared dataset, where the notebook keeps it
    shutil.copytree(tiny_run.data_dir(), tmp_path / SEEDED_DATA[name])
  nb = nbformat.read(path, as_version=4)
  # The kernel inherits this environment: quick mode, this checkout's packages,
  # one CPU device (the 8 fake devices of conftest are not needed here).
  monkeypatch.setenv("KDJAX_NOTEBOOK_QUICK", "1")
  monkeypatch.setenv(
      "PYTHONPATH",
      os.pathsep.join([ROOT, *filter(None, [os.environ.get("PYTHONPATH")])]),
  )
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("MPLBACKEND", "Agg")
  monkeypatch.setenv("XLA_FLAGS", commands.xla_flags())
  client = nbclient.NotebookClient(
      nb,
      timeout=TIMEOUT_S,
      kernel_name="python3",
      resources={"metadata": {"path": str(tmp_path)}},
  )
  client.execute()
  outputs = "".join(
      o.get("text", "")
      for c in nb.cells
      if c.cell_type == "code"
      for o in c.outputs
  )
  for expected in EXPECTED[name]:
    assert expected in outputs, (name, expected)
