"""The notebooks execute top to bottom (small settings), so they cannot rot.

Each code cell runs in one shared namespace, in order, as a kernel would, with
TEKFAX_NOTEBOOK_SMALL=1 and matplotlib's non-interactive backend. The committed notebooks keep
the outputs of a full run (so they render on a code host); these tests execute the sources only
and never read those outputs, apart from the checks that they are there.
"""

import importlib.util
import json
import pathlib
import re
import subprocess
import sys

import matplotlib
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
NAMES = ["quickstart.ipynb", "approximation_error.ipynb"]
# Design notes that are not in the repository; citations go to docs/algorithms.md instead.
STALE_REFERENCES = [f"{name.upper()}.md" for name in ("algorithms", "api", "style")]


def code_cells(name: str) -> list[dict]:
    notebook = json.loads((ROOT / "notebooks" / name).read_text())
    return [c for c in notebook["cells"] if c["cell_type"] == "code"]


def source(cell: dict) -> str:
    return "".join(cell["source"])


@pytest.mark.parametrize("name", NAMES)
def test_notebook_executes(name, monkeypatch):
    matplotlib.use("Agg")
    monkeypatch.setenv("TEKFAX_NOTEBOOK_SMALL", "1")
    cells = code_cells(name)
    assert cells, name
    namespace: dict = {"__name__": "__main__"}
    for i, cell in enumerate(cells):
        exec(compile(source(cell), f"{name}[cell {i}]", "exec"), namespace)
    if name == "quickstart.ipynb":
        curves = {k: v[0] for k, v in namespace["results"].items()}
        assert set(curves) == {"tekfac", "adam"}
        assert all(len(c) == namespace["EPOCHS"] for c in curves.values())
    else:
        sums = namespace["sums"]  # Theorem 3.1, summed over the Dense layers.
        for better, worse in (("TEKFAC", "TKFAC"), ("EKFAC", "KFAC")):
            pairs = zip(sums[better], sums[worse], strict=True)
            assert all(a <= b * (1 + 1e-5) for a, b in pairs)


@pytest.mark.parametrize("name", NAMES)
def test_committed_notebook_keeps_its_outputs(name):
    """A full run's outputs are committed: every figure as a PNG, every print as text."""
    cells = code_cells(name)
    counts = [c["execution_count"] for c in cells]
    assert all(isinstance(n, int) for n in counts) and counts == sorted(counts), counts
    for i, cell in enumerate(cells):
        outputs = cell["outputs"]
        assert not [o for o in outputs if o["output_type"] == "error"], (name, i)
        if "plt.show()" in source(cell):
            images = [o for o in outputs if "image/png" in o.get("data", {})]
            assert images and all(len(o["data"]["image/png"]) > 1000 for o in images), (name, i)
        if "print(" in source(cell):
            texts = [o for o in outputs if o["output_type"] == "stream" and "".join(o["text"])]
            assert texts, (name, i)


@pytest.mark.parametrize("name", NAMES)
def test_notebook_names_no_placeholder_or_index_install(name):
    text = (ROOT / "notebooks" / name).read_text()
    cells = json.loads(text)["cells"]
    for cell in cells:
        body = source(cell)
        assert "pip install tekfax[" not in body
        assert not re.search(r"https?://[\w.-]+/?(?=[\s)\"'\]]|$)", body), body  # host only
        for stale in STALE_REFERENCES:
            assert stale not in body
        assert not re.search(r"\bissue \d", body, re.IGNORECASE)


def test_notebooks_share_one_install_cell():
    cells = [source(code_cells(name)[0]) for name in NAMES]
    assert "TEKFAX_SOURCE" in cells[0] and cells[0] == cells[1]


def run_install_cell(monkeypatch, *, importable=False) -> list[str]:
    """Runs the first code cell with tekfax hidden (unless importable); returns pip's argv."""
    calls = []
    find_spec = importlib.util.find_spec
    if not importable:
        monkeypatch.setattr(
            importlib.util,
            "find_spec",
            lambda name, *a: None if name == "tekfax" else find_spec(name, *a),
        )
    monkeypatch.setattr(subprocess, "run", lambda argv, check: calls.append(argv))
    monkeypatch.setattr(sys, "path", list(sys.path))
    exec(compile(source(code_cells(NAMES[0])[0]), "install cell", "exec"), {})
    assert len(calls) == (0 if importable else 1)
    return calls[0][calls[0].index("-q") + 1 :] if calls else []


def test_install_cell_is_a_no_op_when_tekfax_imports(monkeypatch):
    monkeypatch.setenv("TEKFAX_SOURCE", "/nonexistent")
    assert run_install_cell(monkeypatch, importable=True) == []


def test_install_cell_defaults_to_the_checkout_around_it(monkeypatch):
    monkeypatch.delenv("TEKFAX_SOURCE", raising=False)
    monkeypatch.chdir(ROOT / "notebooks")
    assert run_install_cell(monkeypatch) == ["-e", f"{ROOT}[examples]"]
    assert sys.path[0] == str(ROOT)


def test_install_cell_takes_a_checkout_or_a_git_url(monkeypatch, tmp_path):
    monkeypatch.setenv("TEKFAX_SOURCE", str(tmp_path))
    assert run_install_cell(monkeypatch) == ["-e", f"{tmp_path}[examples]"]
    url = f"git+file://localhost{tmp_path}/tekfax.git@main"
    monkeypatch.setenv("TEKFAX_SOURCE", url)
    assert run_install_cell(monkeypatch) == [f"tekfax[examples] @ {url}"]
    monkeypatch.setenv("TEKFAX_SOURCE", url.removeprefix("git+"))  # "git+" is added
    assert run_install_cell(monkeypatch) == [f"tekfax[examples] @ {url}"]


def test_install_cell_outside_a_checkout_says_to_set_tekfax_source(monkeypatch, tmp_path):
    monkeypatch.delenv("TEKFAX_SOURCE", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RuntimeError, match="TEKFAX_SOURCE"):
        run_install_cell(monkeypatch)
