"""Experiment config files: ``configs/<name>.py[:arg]``, loaded by path.

An experiment config is a Python file with ``get_config(arg)`` (big_vision's
form) in the repository's top-level ``configs/`` folder. The folder is not
installed with the package: ``python -m kdjax.train --config=configs/X.py``
runs from a clone, and so does Python code::

    from kdjax import training
    from kdjax.config import files
    config = files.load("configs/akl_gpt2.py:tiny,steps=30")
    training.train_and_evaluate(config, "workdirs/tiny/akl")
    files.experiment("akl_gpt2").get_config("tiny")  # the same file

``load`` reads the file the way ``--config=`` does (ml-collections'
``config_flags``): the text after the first ``:`` is the file's ``arg``.
"""

from __future__ import annotations

import importlib.util
import os
import types

import ml_collections

# Where experiment configs live, relative to the repository root.
CONFIGS_DIR = "configs"
# The clone this package was imported from (a source checkout or an editable
# install); a wheel install has no configs there.
_CLONE_CONFIGS = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(__file__))), CONFIGS_DIR
)


def available(directory: str = CONFIGS_DIR) -> list[str]:
  """The experiment config files in ``directory`` (empty if there is none)."""
  if not os.path.isdir(directory):
    return []
  return sorted(
      n
      for n in os.listdir(directory)
      if n.endswith(".py") and not n.startswith("_")
  )


def missing_file_message(path: str) -> str:
  """One sentence for a ``--config`` path that names no file."""
  here = available()
  if here:
    listing = f"{CONFIGS_DIR}/ holds {', '.join(here)}"
  else:
    listing = (
        f"there is no {CONFIGS_DIR}/ folder in {os.getcwd()}: run from the "
        "root of a kdjax clone (docs/getting_started.md)"
    )
  return (
      f"config file {path} does not exist; pass an experiment config such "
      f"as {CONFIGS_DIR}/akl_gpt2.py:tiny ({listing})."
  )


def module(path: str) -> types.ModuleType:
  """The config file at ``path``, imported as a module (not cached)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(missing_file_message(path))
  name = "kdjax_config_" + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def find(name: str) -> str | None:
  """The path of ``configs/<name>.py``: in the working directory's
  ``configs/``, else in the clone kdjax was imported from; None if neither."""
  for directory in (CONFIGS_DIR, _CLONE_CONFIGS):
    path = os.path.join(directory, f"{name}.py")
    if os.path.isfile(path):
      return path
  return None


def experiment(name: str) -> types.ModuleType:
  """``configs/<name>.py`` as a module (:func:`find`)."""
  path = find(name)
  if path is None:
    raise FileNotFoundError(missing_file_message(f"{CONFIGS_DIR}/{name}.py"))
  return module(path)


def load(path_and_arg: str) -> ml_collections.ConfigDict:
  """``"configs/akl_gpt2.py:tiny"`` -> that file's ``get_config("tiny")``."""
  path, colon, arg = path_and_arg.partition(":")
  mod = module(path)
  return mod.get_config(arg) if colon else mod.get_config()
