"""Every runnable scenario under examples/ runs to the end and says so."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.py"))


@pytest.mark.parametrize("script", EXAMPLES, ids=lambda p: p.name)
def test_example_runs(script, tmp_path):
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.rstrip().endswith("done")


def test_laptop_and_cluster_story():
    script = Path(__file__).parent.parent / "examples" / "laptop_and_cluster.py"
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300).stdout
    assert "computations so far: 1)" in out  # the laptop never recomputed
    assert "local copy kept: True" in out
    assert "same result: True; computations so far: 1" in out
    assert "read-only: True; reads work: True" in out
    assert "evict refused" in out
