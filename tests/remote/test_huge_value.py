"""A value past 4 GiB streams through ssh in bounded memory on both sides."""

from __future__ import annotations

import subprocess
import sys

import pytest

from .helpers import remote_dir

SIZE = (4 << 30) + (1 << 20) + 3  # past every 32-bit length, not chunk-aligned

CLIENT = """
import hashlib, resource, sys
import numpy as np
from fleche_remote import Call
from fleche_remote.remote.client import SshCache

size = {size}
arr = np.empty(size, dtype=np.uint8)
step = 4 << 20
pattern = (np.arange(step, dtype=np.uint32) % 251).astype(np.uint8)
for block, start in enumerate(range(0, size, step)):
    n = min(step, size - start)
    np.add(pattern[:n], block % 256, out=arr[start:start + n], casting="unsafe")
expected = hashlib.sha256(memoryview(arr)).hexdigest()
cache = SshCache({host!r}, python={python!r}, ssh_options={options!r}, workdir={workdir!r}, timeout=120)
key = cache.save(Call("huge", {{"size": size}}, arr))
del arr
back = cache.load_value(key)
assert back.shape == (size,) and back.dtype == np.uint8
assert hashlib.sha256(memoryview(back)).hexdigest() == expected, "content differs"
server_peak = cache.info()["peak_rss_bytes"]
cache.close()
client_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(client_peak, server_peak)
"""


@pytest.mark.slow
def test_value_over_4_gib_round_trips_in_bounded_memory(sshd, tmp_path):
    workdir = remote_dir(tmp_path)
    code = CLIENT.format(
        size=SIZE,
        host=sshd.host,
        python=sys.executable,
        options=tuple(sshd.ssh_options),
        workdir=str(workdir),
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    client_peak, server_peak = map(int, done.stdout.split())
    assert client_peak < 1.1 * SIZE, f"client peak RSS {client_peak / SIZE:.2f}x the array"
    assert server_peak < 256 << 20, f"server peak RSS {server_peak >> 20} MiB"
    stored = sum(p.stat().st_size for p in (workdir / "store" / "values").rglob("*") if p.is_file())
    assert stored >= SIZE  # really written on the remote, not kept in memory
