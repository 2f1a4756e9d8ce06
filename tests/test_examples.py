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
    "sweep_with_map.py": [
        "200 points in",
        # one lookup for the whole sweep, and one batch of claims (so that another
        # laptop sharing the cluster waits for these points instead of computing them)
        "computed 200, requests to the cluster so far: 2",
        "computed 100,",  # widened: only the new points
        "pushed to the cluster in the background: True",
        # another process: all hits, in two parts sent back to back (one round trip)
        "computed 0, requests to the cluster so far: 2",
        "kept locally: 300",
    ],
    "read_only_colleague.py": [
        "the server says read-only: True",
        "computed 0 time(s) here",
        "stored on the cluster: False",
        "alpha=0.1",
        "save refused",
        "evict refused (exit 1)",
        "gc refused (exit 1)",
    ],
    "pull_and_push.py": [
        "copied 1 entry (192.0 KiB) from cluster to laptop",
        "would copy 4 of 5 entries (768.0 KiB) from cluster to laptop; 1 already there",
        "copied 4 entries (768.0 KiB) from cluster to laptop",
        "copied 1 entry (5 B) from laptop to cluster",
        "the cluster holds now: ['__main__.summarize', 'work.prepare', 'work.simulate']",
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
