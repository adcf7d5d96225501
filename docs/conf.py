"""Sphinx configuration of the kdjax documentation (MyST Markdown + myst-nb)."""

import os
import sys

sys.path.insert(0, os.path.abspath(".."))
# Docs builds import kdjax for autodoc only: keep jax on the CPU and quiet.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import kdjax  # noqa: E402  (after sys.path)

project = "kdjax"
author = "The kdjax authors"
copyright = "The kdjax authors"  # noqa: A001  (Sphinx's name)
release = kdjax.__version__
version = release

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
]

source_suffix = {".md": "myst-nb", ".ipynb": "myst-nb"}
exclude_patterns = ["_build", "**.ipynb_checkpoints", "Thumbs.db", ".DS_Store"]

# MyST: $...$ / $$...$$ math, \begin{align} blocks, ::: fences, #section links.
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3
myst_dmath_double_inline = True

# Notebooks render as committed (outputs cleared); CI executes them in
# tests/project/test_notebooks.py, not here.
nb_execution_mode = "off"

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "undoc-members": False}
autosummary_generate = False
napoleon_google_docstring = True
napoleon_numpy_docstring = False
# "Attributes:" as fields of the class, so NamedTuple fields are not documented
# twice (once by napoleon, once by autodoc).
napoleon_use_ivar = True

html_theme = "furo"
html_title = f"kdjax {release}"
html_static_path = []
