"""The notebooks execute top to bottom (small settings), so they cannot rot.

Each code cell runs in one shared namespace, in order, as a kernel would, with
TEKFAX_NOTEBOOK_SMALL=1 and matplotlib's non-interactive backend.
"""

import json
import pathlib

import matplotlib
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["quickstart.ipynb", "approximation_error.ipynb"])
def test_notebook_executes(name, monkeypatch):
    matplotlib.use("Agg")
    monkeypatch.setenv("TEKFAX_NOTEBOOK_SMALL", "1")
    notebook = json.loads((ROOT / "notebooks" / name).read_text())
    cells = [c for c in notebook["cells"] if c["cell_type"] == "code"]
    assert cells, name
    namespace: dict = {"__name__": "__main__"}
    for i, cell in enumerate(cells):
        source = "".join(cell["source"])
        exec(compile(source, f"{name}[cell {i}]", "exec"), namespace)
    if name == "quickstart.ipynb":
        curves = {k: v[0] for k, v in namespace["results"].items()}
        assert set(curves) == {"tekfac", "adam"}
        assert all(len(c) == namespace["EPOCHS"] for c in curves.values())
    else:
        sums = namespace["sums"]  # Theorem 3.1, summed over the Dense layers.
        for better, worse in (("TEKFAC", "TKFAC"), ("EKFAC", "KFAC")):
            pairs = zip(sums[better], sums[worse], strict=True)
            assert all(a <= b * (1 + 1e-5) for a, b in pairs)
