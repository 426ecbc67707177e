"""Builds the documentation site (Sphinx, warnings are errors) and checks its API pages.

The site is the one ``python -m sphinx -W -b html docs docs/_build/html`` builds; here it is
built into a temporary directory, offline.
"""

from __future__ import annotations

import inspect
import pathlib
import re
import subprocess
import sys
import types

import myst_parser  # noqa: F401  (the docs extra; a missing one fails here, not silently)
import pytest
import sphinx  # noqa: F401

import tekfax

ROOT = pathlib.Path(__file__).resolve().parents[1]

# The fixed section anchors of docs/algorithms.md that docstrings and the README cite.
ALGORITHM_SECTIONS = (
    "1-notation",
    "2-curvature-estimates-one-batch",
    "3-moving-averages-and-schedules",
    "4-damping",
    "5-preconditioning-and-the-update",
    "6-eadam",
    "7-experimental-protocol",
    "8-cost-notes",
    "9-robustness-trust-region-and-adaptive-damping",
    "10-supported-layers-dense-convolutions-densegeneral-einsum-attention-nnx",
    "11-layers-applied-over-positions-expand-and-reduce",
)


def _module_public_names(module: types.ModuleType) -> list[str]:
    """Public functions and classes defined in ``module`` (its ``__all__`` when it has one)."""
    if hasattr(module, "__all__"):
        return list(module.__all__)
    return [
        name
        for name, obj in vars(module).items()
        if not name.startswith("_")
        and (inspect.isfunction(obj) or inspect.isclass(obj))
        and obj.__module__ == module.__name__
    ]


def _expected_anchors() -> list[str]:
    anchors = []
    for name in tekfax.__all__:
        obj = getattr(tekfax, name)
        if isinstance(obj, types.ModuleType):
            anchors.append(f"module-{obj.__name__}")
            anchors += [f"{obj.__name__}.{n}" for n in _module_public_names(obj)]
        else:
            anchors.append(f"tekfax.{name}")
    return anchors


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("docs_html")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "sphinx",
            "-W",
            "--keep-going",
            "-q",
            "-b",
            "html",
            "docs",
            str(out),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 0, f"sphinx build failed:\n{proc.stdout}\n{proc.stderr}"
    return out


def test_every_public_name_has_its_own_api_page(site):
    """One generated page per public name, holding that name's entry."""
    missing = []
    for anchor in _expected_anchors():
        if anchor.startswith("module-"):
            found = f'id="{anchor}"' in (site / "api.html").read_text()
        else:
            page = site / "api" / f"{anchor}.html"
            found = page.is_file() and f'id="{anchor}"' in page.read_text()
        if not found:
            missing.append(anchor)
    assert not missing, f"public names without their API page: {missing}"


def test_algorithm_sections_are_citable(site):
    html = (site / "algorithms.html").read_text()
    missing = [a for a in ALGORITHM_SECTIONS if f'id="{a}"' not in html]
    assert not missing, f"docs/algorithms.md lost the section anchors {missing}"


def test_pages_are_built(site):
    for page in ("index", "quickstart", "algorithms", "examples", "api"):
        assert (site / f"{page}.html").is_file(), page


def test_readme_links_into_the_algorithms_page_resolve(site):
    html = (site / "algorithms.html").read_text()
    readme = (ROOT / "README.md").read_text()
    anchors = set(re.findall(r"docs/algorithms\.md#([\w-]+)", readme))
    missing = sorted(a for a in anchors if f'id="{a}"' not in html)
    assert not missing, f"README links to missing sections of docs/algorithms.md: {missing}"
