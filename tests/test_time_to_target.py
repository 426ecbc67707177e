"""Smoke test of scripts/time_to_target.py: its --quick run, checked against its own records.

Each task runs once in-process through ``main()`` (one Kronecker optimizer per task, to keep
the file fast: its Kronecker compilations dominate). The checks recompute, with NumPy from
the JSON's raw epoch records, what the script derives: the target (Adam's best over all its
records), each optimizer's time to target and its ratio to Adam's.
"""

import contextlib
import doctest
import importlib.util
import io
import json
import math
import pathlib

import jax
import numpy as np
import pytest

from tekfax.experiments import data, models

ROOT = pathlib.Path(__file__).resolve().parents[1]
_SPEC = importlib.util.spec_from_file_location(
    "time_to_target", ROOT / "scripts" / "time_to_target.py"
)
ttt = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(ttt)

TASKS = ("autoencoder", "classification")
OPTIMIZER = "kfac"  # one Kronecker optimizer: its compilations dominate the run
KAPPAS = (1e-3, 1e-2)  # its trust-region grid (one compilation serves both)
EIGEN_EVERY = 5  # one eigenbasis interval (each is a compilation), not the library's


def _quick_run(out: pathlib.Path) -> dict:
    """Both tasks of one --quick run: task name -> (printed table, JSON result, plot path).

    One run and one test function, so that pytest-xdist's workers do not each repeat it.
    """
    argv = ["--quick", "--tasks", *TASKS, "--optimizers", OPTIMIZER]
    argv += ["--norm-constraints", *map(str, KAPPAS), "--eigen-every", str(EIGEN_EVERY)]
    argv += ["--json", str(out / "ttt.json"), "--plot", str(out / "ttt.png")]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert ttt.main(argv) == 0
    payload = json.loads((out / "ttt.json").read_text())
    return stdout.getvalue(), payload, out / "ttt.png"


def _table_rows(text: str) -> dict[str, list[str]]:
    """Display name -> cells of the printed Markdown table's body rows."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0] not in ("optimizer",):
            rows[cells[0]] = cells
    return rows


def _metric(record: dict, higher: bool) -> float:
    value = record["test_accuracy"] if higher else record["test_loss"]
    return math.nan if value is None else value


def _tables(text: str) -> list[str]:
    """The printed Markdown tables, in order (one per task)."""
    blocks, current = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            current.append(line)
        elif current:
            blocks.append("\n".join(current))
            current = []
    return blocks


def _check_table(name: str, text: str, payload: dict) -> None:
    """Every optimizer has a row with a positive time or "not reached"."""
    rows = _table_rows(text)
    expected = ["Adam", ttt.optimizers.DISPLAY_NAMES[OPTIMIZER]]
    assert sorted(rows) == sorted(expected)
    kfac = payload["tasks"][name]["rows"][1]
    assert kfac["grids"] == {"norm_constraint": list(KAPPAS), "eigen_every": [EIGEN_EVERY]}
    assert kfac["best"]["norm_constraint"] in KAPPAS
    display = ttt.optimizers.DISPLAY_NAMES[OPTIMIZER]
    # a searched axis is named with the best run's value; a single value is not
    assert rows[display][1].endswith(" x kappa " + ", ".join(f"{k:g}" for k in KAPPAS))
    assert rows[display][2].endswith(f"kappa {kfac['best']['norm_constraint']:g}")
    for cells in rows.values():
        time_cell = cells[4]
        assert time_cell == ttt.NOT_REACHED or float(time_cell) > 0
    adam = payload["tasks"][name]["rows"][0]
    assert adam["optimizer"] == "adam" and adam["ratio_to_adam"] == pytest.approx(1.0)
    device = payload["environment"]["device"]
    assert device["platform"] == jax.devices()[0].platform and device["count"] >= 1


def _check_target(name: str, payload: dict) -> None:
    """The target is Adam's best record, recomputed from the raw records."""
    result = payload["tasks"][name]
    higher = result["task"]["higher"]
    adam = [r for r in result["runs"] if r["optimizer"] == "adam"]
    values = np.array([_metric(rec, higher) for run in adam for rec in run["records"]])
    expected = np.nanmax(values) if higher else np.nanmin(values)
    assert result["target"] == pytest.approx(float(expected), rel=0, abs=0)
    # the auto-encoder's metric is the loss on its training split, not the test split
    if not higher:
        assert result["num_eval"] == result["num_train"] == ttt.QUICK_TRAIN


def _first(run: dict, target: float, higher: bool) -> float | None:
    """Cumulative seconds at the run's first record reaching ``target``, or None."""
    for rec in run["records"]:
        value = _metric(rec, higher)
        if value >= target if higher else value <= target:
            return rec["cumulative_seconds"]
    return None


def _check_times(name: str, payload: dict) -> None:
    """Times are the training seconds at the first epoch that reaches the target."""
    result = payload["tasks"][name]
    higher, target = result["task"]["higher"], result["target"]
    for row in result["rows"]:
        mine = [r for r in result["runs"] if r["optimizer"] == row["optimizer"]]
        assert row["compile_seconds"] >= 0  # 0 if this process had compiled the step before
        kappas = {r["hparams"].get("norm_constraint") for r in mine}
        assert kappas == ({None} if row["optimizer"] == "adam" else set(KAPPAS))
        intervals = {r["hparams"].get("eigen_every") for r in mine}
        assert intervals == ({None} if row["optimizer"] == "adam" else {EIGEN_EVERY})
        (run,) = [
            r
            for r in mine
            if r["learning_rate"] == row["best_learning_rate"]
            and all(r["hparams"].get(k) == v for k, v in row["best"].items())
        ]
        reaches = [_first(r, target, higher) for r in mine]
        if any(x is not None for x in reaches):  # the best run reaches the target soonest
            assert _first(run, target, higher) == min(x for x in reaches if x is not None)
        epoch_seconds = np.array([rec["epoch_seconds"] for rec in run["records"]])
        cumulative = np.array([rec["cumulative_seconds"] for rec in run["records"]])
        np.testing.assert_allclose(cumulative, np.cumsum(epoch_seconds), rtol=1e-12)
        values = np.array([_metric(rec, higher) for rec in run["records"]])
        hits = np.flatnonzero(values >= target if higher else values <= target)
        if hits.size == 0:
            assert row["seconds_to_target"] is None and row["ratio_to_adam"] is None
            continue
        assert row["epochs_to_target"] == hits[0] + 1
        assert row["seconds_to_target"] == cumulative[hits[0]]
        ratio = row["seconds_to_target"] / result["adam_seconds"]
        assert row["ratio_to_adam"] == pytest.approx(ratio)


def test_quick_run_tables_targets_times_and_plot(tmp_path):
    text, payload, plot = _quick_run(tmp_path)
    tables = _tables(text)
    assert len(tables) == len(TASKS)
    for name, table in zip(TASKS, tables, strict=True):
        _check_table(name, table, payload)
        _check_target(name, payload)
        _check_times(name, payload)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_every_task_names_a_registered_model_and_dataset():
    """A typo in a task would only surface minutes into a measurement; here it fails fast."""
    assert set(ttt.DEFAULT_TASKS) < set(ttt.TASKS)
    for task in ttt.TASKS.values():
        assert task.model in models.MODELS and task.dataset in data.DATASETS
        assert models.model_loss(task.model) == (
            "softmax_cross_entropy" if task.higher else "sigmoid_binary_cross_entropy"
        )
        assert all(lr > 0 for lr in task.lrs)


def test_docstring_examples():
    result = doctest.testmod(ttt, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--eigen-every", "0", "--eigen-every: intervals must be >= 1"),
        ("--norm-constraints", "-1", "norm_constraint must be positive"),
    ],
)
def test_bad_grid_values_are_usage_errors(flag, value, message, capsys):
    """A bad grid value stops the script before any training, with a message naming it."""
    with pytest.raises(SystemExit) as exit_info:
        ttt.main(["--quick", flag, value])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
