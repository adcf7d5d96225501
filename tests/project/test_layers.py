"""Imports inside kdjax only point down: each module imports its own layer or
a lower one (docs/design.md, "Layers")."""

import ast
import pathlib

import pytest

import commands

PACKAGE = pathlib.Path(commands.ROOT) / "kdjax"

# Bottom to top. A module belongs to the layer of its longest listed prefix.
LAYERS = (
    (
        "ground",
        (
            "kdjax.divergences",
            "kdjax.sharding",
            "kdjax.checkpoint",
            "kdjax.checksums",
            "kdjax.fs",
            "kdjax.hub",
            "kdjax.metrics",
            "kdjax.config",  # the schema, recipe, spec, identity
        ),
    ),
    ("models and data", ("kdjax.models", "kdjax.data", "kdjax.sampling")),
    (
        "losses, sources, cache, evaluation",
        (
            "kdjax.objective",
            "kdjax.transfer",
            "kdjax.taid",
            "kdjax.onpolicy",
            "kdjax.cache",
            "kdjax.evaluation",
            # A whole config checked against the parts it configures.
            "kdjax.config.checks",
        ),
    ),
    ("training", ("kdjax.training",)),
    (
        "entry points",
        (
            "kdjax",  # the package root: submodules on first use
            "kdjax.train",
            "kdjax.evaluate",
            "kdjax.cache_teacher",
            "kdjax.cli",
            "kdjax.data.prepare",
        ),
    ),
)

# Upward imports of the config system's spec: the evaluation protocol it
# builds, and the choice lists of loss names, implementations, token-selection
# rules and templates, read (inside functions) from the modules that own them.
# Each entry is (importer, imported module).
_PENDING = {
    ("kdjax.config.spec", "kdjax.evaluation.protocol"),
    ("kdjax.config.spec", "kdjax.objective"),
    ("kdjax.config.spec", "kdjax.data.template"),
}


def _modules() -> dict[str, pathlib.Path]:
  out = {}
  for path in sorted(PACKAGE.rglob("*.py")):
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    out[name] = path
  return out


MODULES = _modules()


def layer_of(module: str) -> int:
  """The index in :data:`LAYERS` of ``module``'s longest listed prefix."""
  best, found = -1, None
  for index, (_, prefixes) in enumerate(LAYERS):
    for prefix in prefixes:
      if (module == prefix or module.startswith(prefix + ".")) and len(
          prefix
      ) > best:
        best, found = len(prefix), index
  if found is None:
    raise AssertionError(f"{module} is in no layer; add it to LAYERS.")
  return found


def imports(module: str) -> set[str]:
  """The kdjax modules ``module`` imports, at any depth of its code
  (``TYPE_CHECKING`` and function-level imports included)."""
  tree = ast.parse(MODULES[module].read_text())
  out = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      out.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      for a in node.names:
        sub = f"{node.module}.{a.name}"
        out.add(sub if sub in MODULES else node.module)
  return {m for m in out if m == "kdjax" or m.startswith("kdjax.")}


def upward_imports(imports_of=imports) -> set[tuple[str, str]]:
  """``(module, imported)`` pairs where ``imported`` is in a higher layer."""
  return {
      (module, imported)
      for module in MODULES
      for imported in imports_of(module)
      if layer_of(imported) > layer_of(module)
  }


def test_every_module_has_a_layer():
  for module in MODULES:
    layer_of(module)


def test_imports_point_down():
  bad = sorted(upward_imports() - _PENDING)
  assert not bad, "upward imports: " + "; ".join(
      f"{m} ({LAYERS[layer_of(m)][0]}) imports {i} ({LAYERS[layer_of(i)][0]})"
      for m, i in bad
  )


def test_pending_pairs_still_exist():
  # A fixed pair leaves the list, so it cannot come back unnoticed.
  assert not _PENDING - upward_imports()


@pytest.mark.parametrize(
    "module, imported",
    [("kdjax.cache.build", "kdjax.training.step"), ("kdjax.fs", "kdjax.cli")],
)
def test_an_upward_import_is_caught(module, imported):
  added = lambda m: imports(m) | ({imported} if m == module else set())
  assert (module, imported) in upward_imports(added)
