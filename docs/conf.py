"""Sphinx configuration of the tekfax documentation.

Build (offline, warnings are errors):

    python -m sphinx -W -b html docs docs/_build/html
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.abspath(".."))

import tekfax  # noqa: E402

project = "tekfax"
author = "The tekfax authors"
copyright = "2026, The tekfax authors"
release = tekfax.__version__
version = release

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
]

# .rst: the per-name API pages that autosummary generates.
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build"]

# Markdown: $...$ and $$...$$ math with labels, and GitHub-style heading anchors so that
# links such as algorithms.md#4-damping work both here and on the repository's web view.
myst_enable_extensions = ["dollarmath"]
myst_dmath_double_inline = True
myst_heading_anchors = 3

# Docstrings are Google style (Args:, Returns:, Example:, References:).
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True
# One generated page per public name (docs/api/, rebuilt on every build, not committed).
autosummary_generate = ["api.md"]
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_preserve_defaults = True

html_theme = "alabaster"
html_title = f"tekfax {release}"
html_static_path: list[str] = []
