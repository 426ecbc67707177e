"""The approximation-error study: Theorem 3.1 holds at every checkpoint; outputs are written."""

import json

import numpy as np

from tekfax.experiments import approx_error


def test_study_orders_errors_and_writes_outputs(tmp_path):
    assert (
        approx_error.main(["--iterations", "20", "--every", "10", "--output", str(tmp_path)]) == 0
    )
    history = json.loads((tmp_path / "errors.json").read_text())
    assert history["iterations"] == [0, 10, 20]
    errors = history["errors"]
    assert set(errors) == {"KFAC", "EKFAC", "TKFAC", "TEKFAC"}
    for layer in errors["KFAC"]:  # Dense layers, T = 1: S = diag(Q^T F Q) is optimal.
        kfac, ekfac = np.array(errors["KFAC"][layer]), np.array(errors["EKFAC"][layer])
        tkfac, tekfac = np.array(errors["TKFAC"][layer]), np.array(errors["TEKFAC"][layer])
        assert np.all(ekfac <= kfac * (1 + 1e-5))
        assert np.all(tekfac <= tkfac * (1 + 1e-5))
        assert np.all(kfac > 0)
    table = (tmp_path / "table.md").read_text().splitlines()
    assert table[0] == "| iteration | KFAC | EKFAC | TKFAC | TEKFAC |"
    assert len(table) == 2 + 3
    for name in ("approx_error.png", "approx_error_heatmaps.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
