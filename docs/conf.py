"""Sphinx configuration of pykvm's site: ``sphinx-build -W --keep-going -b html docs docs/_build/html``.

docs/about.md says why Sphinx and how the pages are made; docs/_ext/pykvm_docs.py holds the
directives that generate pages from the code at build time (commands' --help, the requests table,
the API pages).
"""

import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS / "_ext"))

project = "pykvm"
author = "the pykvm authors"
copyright = "the pykvm authors"
release = version = __import__("pykvm").__version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.intersphinx",
    "pykvm_docs",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "_ext", "_intersphinx"]
myst_heading_anchors = 3
myst_enable_extensions = ["colon_fence"]

# Python's own objects: the inventory ships in the repository (Debian's python3.11-doc, objects.inv), so the
# build needs no network; docs/about.md says how to refresh it.
intersphinx_mapping = {"python": ("https://docs.python.org/3", str(DOCS / "_intersphinx" / "python3.inv"))}

autodoc_member_order = "bysource"
autodoc_inherit_docstrings = False     # a pytest Item's methods would bring pytest's own cross-references
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": True}

html_theme = "alabaster"
html_title = "pykvm"

# Every cross-reference must resolve (sphinx-build -n), except pytest's: its inventory is not shipped here, and
# the plugin's signatures name pytest's classes (FixtureRequest, nodes.Item and nodes.File).
nitpicky = True
nitpick_ignore_regex = [("py:class", r"_?pytest\..*")]
