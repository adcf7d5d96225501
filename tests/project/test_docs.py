"""Every document the project cites is in the repository.

Code, tests, notebooks and docs cite the documentation as ``docs/<page>.md``,
optionally followed by a quoted section title (``docs/divergences.md "AKL"``)
or an anchor (``docs/divergences.md#akl``). These tests fail when a cited page
or section does not exist, when a Markdown link inside ``docs/`` or README.md
points at a missing file or anchor, or when a file cites a document that lives
outside the repository; and they keep docs/api.md and the module table of
docs/design.md in step with the package.
"""

from __future__ import annotations

import functools
import os
import pathlib
import re

import pytest

import commands

ROOT = pathlib.Path(commands.ROOT)
DOCS = ROOT / "docs"
SUFFIXES = {
    ".py",
    ".md",
    ".ipynb",
    ".toml",
    ".cfg",
    ".txt",
    ".yaml",
    ".yml",
    ".rst",
}
NAMES = {"Makefile", "run"}
SKIP_DIRS = {
    ".git",
    "_build",
    "__pycache__",
    ".pytest_cache",
    ".hypothesis",
    ".ruff_cache",
    "workdirs",
    "workdir",
    "runs",
    "node_modules",
    "build",
    "dist",
}
# Documents that exist only outside the repository. Written split so that this
# file does not match itself.
OUTSIDE = (
    "kd_" + "losses.md",
    "kd_" + "methods_2026.md",
    "jax_" + "stack.md",
    "../" + "shared",
    "/work/" + "shared",
)
# A citation: docs/<page>.md, then an optional anchor or a quoted title, maybe
# after a comma; the title may wrap onto the next comment or docstring line.
CITATION = re.compile(
    r"docs/(?P<page>[\w-]+)\.md"
    r'(?:#(?P<anchor>[\w-]+)|(?P<sep>,?[ \t]*\n?[ \t]*#?[ \t]*)"(?P<title>[^"]{1,80})")?'
)
MD_LINK = re.compile(r"\]\((?P<target>[^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t]*$", re.M)


def _project_files() -> list[pathlib.Path]:
  out = []
  for dirpath, dirnames, filenames in os.walk(ROOT):
    here = pathlib.Path(dirpath)
    dirnames[:] = [
        d
        for d in dirnames
        if d not in SKIP_DIRS
        and not d.endswith(".egg-info")
        and not (here / d / "pyvenv.cfg").exists()  # any virtualenv
        and not (here / d).is_symlink()
    ]  # docs/notebooks
    for name in filenames:
      path = here / name
      if path.suffix in SUFFIXES or name in NAMES:
        out.append(path)
  return sorted(out)


def _slug(title: str) -> str:
  """The anchor MyST gives a heading (``myst_heading_anchors``)."""
  title = re.sub(r"[`*]", "", title).strip().lower()
  title = re.sub(r"[^\w\- ]", "", title)
  return title.replace(" ", "-")


@functools.cache
def _headings(page: pathlib.Path) -> tuple[set[str], set[str]]:
  """(titles, anchors) of the headings of a Markdown page, code blocks excluded."""
  text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.M | re.S)
  titles = {
      re.sub(r"\s+", " ", t.replace("`", "")) for t in HEADING.findall(text)
  }
  return titles, {_slug(t) for t in titles}


def _rel(path: pathlib.Path) -> str:
  return str(path.relative_to(ROOT))


def _line(text: str, pos: int) -> int:
  return text.count("\n", 0, pos) + 1


def test_no_file_cites_a_document_outside_the_repository():
  bad = []
  this = pathlib.Path(__file__).resolve()
  for path in _project_files():
    if path == this:
      continue
    text = path.read_text(errors="replace")
    for needle in OUTSIDE:
      for m in re.finditer(re.escape(needle), text):
        bad.append(f"{_rel(path)}:{_line(text, m.start())}: {needle}")
    # performance.md is only a document as docs/performance.md (a bare name
    # is a link from inside docs/, checked by the link test below).
    if path.parent != DOCS:
      for m in re.finditer(r"(?<![\w/])performance\.md", text):
        bad.append(
            f"{_rel(path)}:{_line(text, m.start())}: performance.md "
            "(cite docs/performance.md and a section)"
        )
  assert not bad, (
      "files cite documents that are not in the repository; "
      "cite a page and section of docs/ instead:\n" + "\n".join(bad)
  )


def test_every_cited_docs_page_and_section_exists():
  bad = []
  for path in _project_files():
    text = path.read_text(errors="replace")
    for m in CITATION.finditer(text):
      where = f"{_rel(path)}:{_line(text, m.start())}"
      page = DOCS / f"{m['page']}.md"
      if not page.exists():
        bad.append(f"{where}: docs/{m['page']}.md does not exist")
        continue
      titles, anchors = _headings(page)
      if m["anchor"] and m["anchor"] not in anchors:
        bad.append(
            f"{where}: docs/{m['page']}.md has no anchor " f"#{m['anchor']}"
        )
      if m["title"]:
        # Join a title wrapped over comment or docstring lines.
        title = re.sub(r"\s*\n\s*#?\s*", " ", m["title"]).strip()
        if title not in titles:
          bad.append(
              f"{where}: docs/{m['page']}.md has no section " f"{title!r}"
          )
  assert not bad, "\n".join(bad)


@pytest.mark.parametrize(
    "page",
    sorted(DOCS.glob("*.md")) + [ROOT / "README.md", ROOT / "CONTRIBUTING.md"],
    ids=lambda p: _rel(p),
)
def test_markdown_links_resolve(page):
  text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.M | re.S)
  bad = []
  for m in MD_LINK.finditer(text):
    target = m["target"]
    if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("<"):
      continue  # a URL, or a MyST role target
    file_part, _, anchor = target.partition("#")
    dest = (page.parent / file_part).resolve() if file_part else page
    if not dest.exists():
      bad.append(f"{target}: no such file")
    elif anchor and dest.suffix == ".md" and anchor not in _headings(dest)[1]:
      bad.append(f"{target}: no such section")
  assert not bad, f"{_rel(page)}: broken links:\n" + "\n".join(bad)


@pytest.mark.parametrize(
    "title",
    [
        "Conventions",
        "Forward KL",
        "Reverse KL",
        "FKL+RKL",
        "Skew KL and skew reverse KL",
        "Generalized JSD",
        "Total variation",
        "AKL",
        "ULD",
        "SinKD",
        "Alpha-beta divergence (ABKD)",
        "TAID",
        "Entropy-based token selection",
        "Gradients in closed form",
        "Chunked and fused execution",
        "Sparse teachers",
    ],
)
def test_divergences_page_has_the_sections_the_code_cites(title):
  assert title in _headings(DOCS / "divergences.md")[0]


def test_the_api_page_lists_every_module():
  api = (DOCS / "api.md").read_text()
  missing = []
  for path in sorted((ROOT / "kdjax").rglob("*.py")):
    parts = path.relative_to(ROOT).with_suffix("").parts
    if parts[-1] == "__init__":
      parts = parts[:-1]
    module = ".".join(parts)
    if not re.search(rf"^\s*{re.escape(module)}\s*$", api, re.M):
      missing.append(module)
  assert not missing, (
      "docs/api.md does not list these modules (add them to "
      "its autosummary and an automodule): " + ", ".join(missing)
  )


def _design_table() -> str:
  text = (DOCS / "design.md").read_text()
  return text.split("## Modules", 1)[1].split("\n## ", 1)[0]


def test_the_design_table_names_only_paths_that_exist():
  table = _design_table()
  paths = re.findall(
      r"`((?:kdjax|experiments|notebooks|tests|docs)/[^`\s]*)`", table
  )
  missing = [p for p in paths if not (ROOT / p).exists()]
  assert paths and not missing, f"docs/design.md names missing paths: {missing}"


def test_the_design_table_covers_every_module():
  table = _design_table()
  missing = []
  for path in sorted((ROOT / "kdjax").rglob("*.py")):
    rel = path.relative_to(ROOT)
    if rel.parts[1] == "configs" and rel.name not in (
        "common.py",
        "__init__.py",
    ):
      continue  # one file per experiment: the table describes them together
    if rel.name == "__init__.py":
      named = f"`{rel.parent}/`" in table or f"`{rel}`" in table
    elif len(rel.parts) == 2:
      named = f"`{rel}`" in table
    else:  # inside a package: its own row, or named in the package's row
      named = f"`{rel}`" in table or f"`{rel.name}`" in table
    if not named:
      missing.append(str(rel))
  assert (
      not missing
  ), "docs/design.md's module table does not mention: " + ", ".join(missing)
