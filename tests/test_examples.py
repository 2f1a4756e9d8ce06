"""Every runnable scenario under examples/ runs to the end and tells its story."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.py"))

#: Lines a reader of each example's output relies on.
STORY = {
    "laptop_and_cluster.py": [
        "computations so far: 1)",  # the laptop never recomputed
        "local copy kept: True",
        "same result: True; computations so far: 1",
        "read-only: True; reads work: True",
        "evict refused",
    ],
}


@pytest.mark.parametrize("script", EXAMPLES, ids=lambda p: p.name)
def test_example_runs(script, tmp_path):
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.rstrip().endswith("done")
    for line in STORY.get(script.name, []):
        assert line in done.stdout
