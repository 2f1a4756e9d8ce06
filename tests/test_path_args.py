"""``pathlib.Path`` arguments keyed by the content they name, the digest
memory that spares re-hashing, directory trees, and Path results kept off
remote layers (through the real sshd)."""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path, PurePosixPath
from typing import Any, List

from remote.helpers import remote_dir, ssh_cache

from fleche_remote import CacheStack, cached, digest_of
from fleche_remote.caches import Cache
from fleche_remote.codec.paths import clear_path_cache, path_cache_info
from fleche_remote.storage.memory import MemoryCallStore, MemoryValueStore

HOUR_AGO = time.time() - 3600


def memory() -> Cache:
    return Cache(MemoryValueStore(), MemoryCallStore())


def test_a_changed_input_file_gives_a_fresh_result(tmp_path: Path) -> None:
    data = tmp_path / "data.csv"
    data.write_text("a,b\n1,2\n")
    runs: List[str] = []

    @cached(cache=memory())
    def total(path: Path) -> int:
        text = path.read_text()
        runs.append(text)
        return sum(int(v) for line in text.splitlines()[1:] for v in line.split(","))

    assert total(data) == 3
    assert total(data) == 3 and len(runs) == 1
    data.write_text("a,b\n5,7\n")  # same size, new content
    assert total(data) == 12 and len(runs) == 2  # not last version's 3
    data.write_text("a,b\n1,2\n")
    assert total(data) == 3 and len(runs) == 2  # the first content's result, stored


def test_a_file_is_keyed_by_name_and_content_not_by_directory(tmp_path: Path) -> None:
    (tmp_path / "laptop").mkdir()
    (tmp_path / "cluster").mkdir()
    for where in ("laptop", "cluster"):
        (tmp_path / where / "data.csv").write_bytes(b"same bytes")
    (tmp_path / "laptop" / "data.json").write_bytes(b"same bytes")
    assert digest_of(tmp_path / "laptop" / "data.csv") == digest_of(tmp_path / "cluster" / "data.csv")
    assert digest_of(tmp_path / "laptop" / "data.csv") != digest_of(tmp_path / "laptop" / "data.json")
    assert digest_of(tmp_path / "laptop" / "data.csv") != digest_of(PurePosixPath("data.csv"))


def test_a_missing_path_is_keyed_by_its_spelling(tmp_path: Path) -> None:
    out = tmp_path / "out.h5"
    assert digest_of(out) == digest_of(PurePosixPath(out.as_posix()))
    out.write_bytes(b"written")
    assert digest_of(out) != digest_of(PurePosixPath(out.as_posix()))


def test_a_remembered_digest_spares_reading_the_file_again(tmp_path: Path) -> None:
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(3 << 20))  # past the bulk threshold
    os.utime(big, (HOUR_AGO, HOUR_AGO))
    clear_path_cache()
    first = digest_of(big)
    assert path_cache_info()[:2] == (0, 1)
    assert digest_of(big) == first
    assert path_cache_info()[:2] == (1, 1)  # answered from memory: not read again
    # same size and the old mtime put back: the ctime still tells the change
    st = big.stat()
    with open(big, "r+b") as f:
        f.write(b"changed!")
    os.utime(big, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert big.stat().st_size == st.st_size and big.stat().st_mtime_ns == st.st_mtime_ns
    assert digest_of(big) != first
    assert path_cache_info()[:2] == (1, 2)


def test_a_file_written_just_now_is_not_remembered(tmp_path: Path) -> None:
    # a second write within the same timestamp tick could leave size and
    # times equal, so a fresh file is hashed again on every lookup
    fresh = tmp_path / "fresh.txt"
    fresh.write_text("now")
    clear_path_cache()
    digest_of(fresh)
    digest_of(fresh)
    assert path_cache_info() == (0, 2, 0)


def test_directory_trees_are_keyed_by_every_entry(tmp_path: Path) -> None:
    tree = tmp_path / "run" / "inputs"
    (tree / "sub").mkdir(parents=True)
    (tree / "a.txt").write_text("a")
    (tree / "sub" / "b.txt").write_text("b")
    base = digest_of(tree)
    copy = tmp_path / "elsewhere" / "inputs"
    shutil.copytree(tree, copy)
    assert digest_of(copy) == base  # the same tree somewhere else
    (tree / "sub" / "b.txt").write_text("B")
    changed = digest_of(tree)
    assert changed != base
    (tree / "sub" / "c.txt").write_text("")
    added = digest_of(tree)
    assert added not in (base, changed)
    (tree / "sub" / "c.txt").rename(tree / "sub" / "d.txt")
    assert digest_of(tree) not in (base, changed, added)
    (tree / "sub" / "empty").mkdir()
    renamed = digest_of(tree)
    (tree / "sub" / "empty").rmdir()
    assert digest_of(tree) != renamed  # an empty directory is an entry too
    os.symlink(tree, tree / "sub" / "loop")  # a cycle: recorded, not followed
    assert digest_of(tree) != renamed
    assert digest_of(tree) != digest_of(tree / "sub")


def test_path_results_stay_off_remote_layers(sshd: Any, tmp_path: Path, caplog: Any) -> None:
    remote = ssh_cache(sshd, remote_dir(tmp_path))
    local = memory()
    stack = CacheStack([local, remote])
    data = tmp_path / "client-only.csv"  # the server has no such file
    data.write_text("1\n2\n")
    runs: List[Path] = []
    try:

        def output_for(path: Path) -> Path:
            runs.append(path)
            return path.with_suffix(".out")

        def lines(path: Path) -> int:
            return len(path.read_text().splitlines())

        direct = cached(cache=remote)(output_for)
        with caplog.at_level(logging.WARNING, logger="fleche_remote.cached"):
            assert direct(data) == data.with_suffix(".out")
        assert "returned a local Path" in caplog.text  # logged, not raised
        assert not remote.contains(direct.key(data))
        assert direct(data) == data.with_suffix(".out") and len(runs) == 2  # nothing stored

        through = cached(cache=stack)(output_for)
        assert through(data) == data.with_suffix(".out")
        assert local.contains(through.key(data)) and not remote.contains(through.key(data))

        # a Path argument is a local question: keyed here by content, saved remotely
        counted = cached(cache=remote)(lines)
        assert counted(data) == 2 and remote.contains(counted.key(data))
        data.write_text("1\n2\n3\n")
        assert not remote.contains(counted.key(data))
        assert counted(data) == 3
    finally:
        stack.close()
