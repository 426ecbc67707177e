"""The README's main job runs and learns; the code base is ruff-clean."""

import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_quickstart_prints_table_and_learns():
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "quickstart.py"), "--epochs", "3"],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    rows = re.findall(
        r"^\| (\d+) \| ([\d.]+) \| ([\d.]+)% \| ([\d.]+) \| ([\d.]+)% \|$",
        result.stdout,
        re.MULTILINE,
    )
    assert [int(r[0]) for r in rows] == [1, 2, 3]
    tekfac_losses = [float(r[1]) for r in rows]
    adam_losses = [float(r[3]) for r in rows]
    assert tekfac_losses[-1] < tekfac_losses[0]
    assert adam_losses[-1] < adam_losses[0]


def test_ruff_clean():
    paths = [str(ROOT / p) for p in ("tekfax", "tests", "scripts")]
    subprocess.run([sys.executable, "-m", "ruff", "check", *paths], check=True)
    subprocess.run([sys.executable, "-m", "ruff", "format", "--check", *paths], check=True)
