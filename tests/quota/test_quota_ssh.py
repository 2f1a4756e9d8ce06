"""Through the real sshd: the server keeps the limits of its own
fleche.toml, whatever a client saves, and reports them."""

from __future__ import annotations

import os
from pathlib import Path

from fleche_remote import Call
from fleche_remote.config import cache_from_config
from tests.remote.helpers import SQL_TOML, remote_dir, ssh_cache

REMOTE = SQL_TOML + 'max_bytes = "200 kB"\n'


def test_a_remote_cache_keeps_its_own_limit_against_a_client_that_saves_more(sshd, tmp_path: Path) -> None:
    workdir = remote_dir(tmp_path, REMOTE)
    cache = ssh_cache(sshd, workdir)
    try:
        for i in range(60):  # three times the limit
            cache.save(Call("f", {"i": i}, os.urandom(10_000)))
        report = cache.usage_report()
        assert report is not None and report["limits"] == {"max_bytes": 200_000}
        assert report["bytes"] <= 200_000 + 2 * 10_400, report
        assert cache.contains(Call("f", {"i": 59}).key()) and not cache.contains(Call("f", {"i": 0}).key())
        assert cache.info()["cache"]["max_bytes"] == 200_000
        done = cache.trim_remote(max_bytes=50_000)  # gc --max-bytes, done by the server
        assert done["remaining"]["bytes"] <= 50_000 and done["evicted"] > 0
    finally:
        cache.close()
    local = cache_from_config({"template": "sql", "root": str(workdir / "store")})
    try:
        assert local.usage().bytes <= 50_000
    finally:
        local.close()
