"""Limits as users write them, the value store a table names, ssh layers,
and ``fleche-remote du`` / ``gc --max-bytes``."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from fleche_remote import Call, ConfigError
from fleche_remote.cli import main
from fleche_remote.config import cache_from_config
from fleche_remote.remote.client import SshCache
from fleche_remote.storage.quota import Limits, parse_age, parse_size


def test_sizes_and_ages_read_as_written() -> None:
    assert parse_size("20 GB") == 20 * 10**9
    assert parse_size("500 MiB") == 500 * 2**20
    assert parse_size(1234) == 1234
    assert parse_age("30d") == 30 * 86400 and parse_age("12h") == 43200 and parse_age("2s") == 2
    with pytest.raises(ConfigError, match=r'max_bytes must be a size like "20 GB".*got \'20 parsecs\''):
        parse_size("20 parsecs")
    with pytest.raises(ConfigError, match="max_age must be more than 0 seconds"):
        parse_age("0s")
    assert Limits.of(max_size=10) == Limits(max_calls=10)
    with pytest.raises(ConfigError, match="max_calls or max_size"):
        Limits.of(max_calls=3, max_size=10)


def test_limits_in_a_table_round_trip(tmp_path: Path) -> None:
    cache = cache_from_config(
        {"template": "sql", "root": str(tmp_path), "max_bytes": "1 GiB", "max_age": "30d"}
    )
    try:
        assert cache.limits == Limits(max_bytes=2**30, max_age=30 * 86400)
        again = cache_from_config(cache.to_config())
        assert again.limits == cache.limits
        again.close()
    finally:
        cache.close()
    with pytest.raises(ConfigError, match=r"max_calls must be a whole number.*\[mine\]"):
        cache_from_config({"template": "memory", "max_calls": "many"}, name="mine")


def test_a_named_hdf5_value_store_gets_small_arrays(tmp_path: Path) -> None:
    cfg = {
        "values": {"type": "hdf5", "path": str(tmp_path / "v.h5")},
        "calls": {"type": "sql", "url": f"sqlite:///{tmp_path / 'c.db'}"},
    }
    cache = cache_from_config(cfg)
    try:
        key = cache.save(Call("f", {"x": 1}, np.arange(10)))
        record = cache.load_records([key])[0]
        assert record is not None and cache.values.contains(record.value)
        assert cache.calls.get_blobs([record.value]) == [None]  # not in the SQLite file
    finally:
        cache.close()


def test_a_named_file_value_store_gets_small_values_unless_calls_opt_in(tmp_path: Path) -> None:
    values = {"type": "cloudpickle", "root": str(tmp_path / "store" / "values")}
    calls = {"type": "sql", "url": f"sqlite:///{tmp_path / 'c.db'}"}
    cache = cache_from_config({"values": values, "calls": calls})
    try:
        cache.save(Call("f", {"x": 1}, 42))
        assert [p for p in (tmp_path / "store" / "values").rglob("*") if p.is_file()]
    finally:
        cache.close()
    inline = cache_from_config(
        {"values": values, "calls": {**calls, "url": calls["url"] + "2", "inline_max": 32768}}
    )
    try:
        key = inline.save(Call("f", {"x": 2}, 43))
        record = inline.load_records([key])[0]
        assert record is not None and not inline.values.contains(record.value)
    finally:
        inline.close()


def test_an_ssh_layer_refuses_limits_and_points_at_the_servers_file() -> None:
    with pytest.raises(ConfigError, match="fleche.toml"):
        SshCache("somewhere", max_bytes="1 GB")
    with pytest.raises(ConfigError, match=r"max_age does not apply to an ssh layer.*\[remote\]"):
        cache_from_config({"type": "ssh", "host": "somewhere", "max_age": "30d"}, name="remote")


def test_du_and_gc_with_limits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "fleche.toml").write_text(
        '[default]\ncache = "work"\n[work]\ntemplate = "sql"\nroot = "store"\nmax_bytes = "1 MB"\n'
    )
    monkeypatch.chdir(tmp_path)
    cache = cache_from_config({"template": "sql", "root": str(tmp_path / "store"), "max_bytes": "1 MB"})
    for i in range(30):
        cache.save(Call("big" if i < 20 else "small", {"i": i}, os.urandom(20_000 if i < 20 else 1000)))
    cache.close()
    assert main(["du"]) == 0
    text = capsys.readouterr().out
    assert "work: 30 call(s)" in text and "% of max_bytes 1.0 MB" in text
    assert text.index("big") < text.index("small")  # largest first
    assert main(["gc", "--max-bytes", "100 kB", "--dry-run"]) == 0
    assert "would evict" in capsys.readouterr().out
    assert main(["gc", "--max-bytes", "100 kB"]) == 0
    cache = cache_from_config({"template": "sql", "root": str(tmp_path / "store")})
    try:
        assert cache.usage().bytes <= 100_000
    finally:
        cache.close()
