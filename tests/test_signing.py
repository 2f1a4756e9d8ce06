"""Signed caches: what is refused, what round-trips, and how keys are configured.

Every refusal test plants an entry whose unpickling would create a canary
file (in its arguments, its result, or both) straight into the storage
underneath a signed cache, as someone with write access to the directory
or database could, and checks both that the cache raises
:class:`SignatureError` and that the canary never appears: nothing was
unpickled.
"""

from __future__ import annotations

import dataclasses
import shutil
import sqlite3
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Tuple

import cloudpickle
import numpy as np
import pytest

from fleche_remote import Cache, CacheStack, Call
from fleche_remote.call import SIGNATURE_KEY, CallRecord
from fleche_remote.codec.values import BytesBlob, blob_digest, encode_value
from fleche_remote.config import cache_from_config, cache_to_config, redact
from fleche_remote.errors import ConfigError
from fleche_remote.signing import ENV_VAR, SignatureError, Signer, canonical
from fleche_remote.storage.file import FileCallStore, FileValueStore
from fleche_remote.storage.memory import MemoryCallStore, MemoryValueStore

#: Canaries are arguments too, hashed through cloudpickle on purpose.
pytestmark = pytest.mark.filterwarnings("ignore::fleche_remote.codec.digest.UnstableDigestWarning")

KEY = "3c" * 32
OTHER = "d1" * 32
NAME = "signing.f"


class Canary:
    """Unpickling this creates ``path``: proof that something was unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> Tuple[Any, Tuple[str, str]]:
        return (open, (self.path, "a"))


def canary_pickle(path: Path) -> bytes:
    return cloudpickle.dumps(Canary(path), protocol=4)


# -- the three stores ---------------------------------------------------------------


def _file(root: Path) -> Tuple[Any, Any]:
    return FileValueStore(root / "values"), FileCallStore(root / "calls")


def _sqlite(root: Path) -> Tuple[Any, Any]:
    from fleche_remote.storage.sql.stores import SqlCallStore

    return FileValueStore(root / "values"), SqlCallStore(f"sqlite:///{root / 'calls.db'}")


def _hdf5(root: Path) -> Tuple[Any, Any]:
    from fleche_remote.storage.hdf5 import Hdf5CallStore, Hdf5ValueStore

    root.mkdir(parents=True, exist_ok=True)
    return Hdf5ValueStore(root / "cache.h5"), Hdf5CallStore(root / "cache.h5")


BACKENDS: Dict[str, Callable[[Path], Tuple[Any, Any]]] = {"file": _file, "sqlite": _sqlite, "hdf5": _hdf5}


@pytest.fixture(params=sorted(BACKENDS))
def stores(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Tuple[str, Any, Any]]:
    values, calls = BACKENDS[request.param](tmp_path / "cache")
    yield request.param, values, calls
    values.close()
    calls.close()


def replace_value(kind: str, values: Any, calls: Any, digest: str, blob: BytesBlob) -> None:
    """Put ``blob`` under ``digest`` in place of what is stored there, as an
    attacker with write access to the storage would (SQL: the inline row)."""
    if kind == "sqlite" and not values.contains(digest):
        url = calls.to_config()["url"]
        with sqlite3.connect(url[len("sqlite:///") :]) as db:
            changed = db.execute(
                "UPDATE fr_blobs SET kind = ?, size = ?, body = ? WHERE digest = ?",
                (blob.kind, blob.size, blob.read_all(), bytes.fromhex(digest)),  # keys are stored as bytes
            ).rowcount
        assert changed == 1
        return
    values.delete(digest)
    values.put(digest, blob)


def replace_record(calls: Any, record: CallRecord) -> None:
    calls.delete(record.key)
    calls.put(record)


# -- round trips ------------------------------------------------------------------------


def test_a_signed_cache_round_trips_every_kind_of_value(stores: Tuple[str, Any, Any]) -> None:
    _, values, calls = stores
    cache = Cache(values, calls, secret_key=KEY)
    results = {
        "small": {"a": 1},
        "bytes": b"raw bytes",
        "array": np.arange(200_000, dtype=np.float64).reshape(400, 500),
        "pickle5": {"big": np.arange(100_000), "tag": "x"},
        "none": None,
    }
    keys = {
        name: cache.save(Call(NAME, {"which": name}, r, metadata={"m": name})) for name, r in results.items()
    }
    for name, key in keys.items():
        got = cache.load_value(key)
        lazy = cache.load(key)
        assert dict(lazy.metadata) == {"m": name}  # the signature is the cache's, not the caller's
        assert SIGNATURE_KEY in lazy.record.metadata
        if isinstance(results[name], np.ndarray):
            np.testing.assert_array_equal(got, results[name])
            np.testing.assert_array_equal(lazy.result, results[name])
        elif name == "pickle5":
            np.testing.assert_array_equal(got["big"], results[name]["big"])
        else:
            assert got == results[name] and lazy.result == results[name]
    assert sorted(c.key for c in cache.query(NAME)) == sorted(keys.values())
    assert [c.result for c in cache.load_many([keys["small"]], results=True)] == [{"a": 1}]
    # an equal result saved again is stored once, under the same signed digest
    again = cache.save(Call(NAME, {"which": "again"}, {"a": 1}))
    assert cache.load(again).value_digest == cache.load(keys["small"]).value_digest


def test_a_signed_value_lives_under_its_own_digest(tmp_path: Path) -> None:
    cache = Cache(*_file(tmp_path), secret_key=KEY)
    key = cache.save(Call(NAME, {"x": 1}, [1, 2, 3]))
    digest = cache.load(key).value_digest
    assert digest != blob_digest(encode_value([1, 2, 3]))  # the unsigned copy's digest
    assert SIGNATURE_KEY in cache.values.get(digest).meta


# -- refusals: unsigned, forged, wrong key --------------------------------------------------


def _all_loads(cache: Any, key: str) -> Iterator[Callable[[], Any]]:
    """Every way a user reaches an entry's arguments or result."""
    yield lambda: cache.load(key).result
    yield lambda: cache.load_value(key)
    yield lambda: cache.load_value(key[:12])
    yield lambda: [c.arguments for c in cache.query(NAME)]
    yield lambda: cache.load_many([key], results=True)[0].result
    yield lambda: cache.load_many([key])[0].arguments


def test_an_unsigned_entry_is_refused_and_nothing_is_unpickled(
    stores: Tuple[str, Any, Any], tmp_path: Path
) -> None:
    kind, values, calls = stores
    canary = tmp_path / "canary"
    unsigned = Cache(values, calls)
    key = unsigned.save(Call(NAME, {"x": Canary(canary)}, Canary(canary)))
    assert not canary.exists()  # saving pickles, never unpickles
    cache = Cache(values, calls, secret_key=KEY)
    for load in _all_loads(cache, key):
        with pytest.raises(SignatureError, match="is not signed") as info:
            load()
        assert Signer.of(KEY).key_id in str(info.value)  # names the key it wanted
    assert not canary.exists()
    # and the message says where the entry is
    with pytest.raises(SignatureError) as info:
        cache.load(key)
    place = str(calls._path(key)) if kind == "file" else "store"
    assert place in str(info.value)


def test_a_forged_value_is_refused_before_it_is_unpickled(
    stores: Tuple[str, Any, Any], tmp_path: Path
) -> None:
    kind, values, calls = stores
    canary = tmp_path / "canary"
    cache = Cache(values, calls, secret_key=KEY)
    small = cache.save(Call(NAME, {"x": 1}, "honest"))  # inline in SQLite
    big = cache.save(Call(NAME, {"x": 2}, np.arange(50_000)))  # a file / an HDF5 dataset
    for key in (small, big):
        digest = cache.load(key).value_digest
        meta = dict(cache.load_blob(digest).meta)  # keeps the honest signature
        replace_value(kind, values, calls, digest, BytesBlob("pickle", meta, canary_pickle(canary)))
        for load in (lambda k=key: cache.load_value(k), lambda k=key: cache.load(k).result):
            with pytest.raises(SignatureError, match="does not match its signature"):
                load()
        with pytest.raises(SignatureError):
            cache.load_many([key], results=True)
    assert not canary.exists()
    # the storage really holds the canary: an unsigned view runs it
    Cache(values, calls).load_value(small)
    assert canary.exists()


def test_forged_arguments_are_refused_before_they_are_unpickled(
    stores: Tuple[str, Any, Any], tmp_path: Path
) -> None:
    _, values, calls = stores
    canary = tmp_path / "canary"
    cache = Cache(values, calls, secret_key=KEY)
    key = cache.save(Call(NAME, {"x": 1}, 42))
    record = calls.get(key)
    replace_record(calls, dataclasses.replace(record, arguments=canary_pickle(canary)))
    for load in _all_loads(cache, key):
        with pytest.raises(SignatureError, match="altered after it was signed"):
            load()
    assert not canary.exists()


def test_forged_metadata_is_refused(tmp_path: Path) -> None:
    cache = Cache(*_file(tmp_path), secret_key=KEY)
    key = cache.save(Call(NAME, {"x": 1}, 42, metadata={"host": "node1"}))
    record = cache.calls.get(key)
    replace_record(cache.calls, dataclasses.replace(record, metadata={**record.metadata, "host": "evil"}))
    with pytest.raises(SignatureError):
        cache.load(key)


def test_a_record_moved_under_another_key_is_refused(tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    cache = Cache(*_file(tmp_path), secret_key=KEY)
    honest = cache.save(Call(NAME, {"x": 1}, 1))
    evil = cache.save(Call(NAME, {"x": 2}, Canary(canary)))
    shutil.copyfile(cache.calls._path(evil), cache.calls._path(honest))
    with pytest.raises(SignatureError, match="holds the record of call"):
        cache.load_value(honest)
    assert not canary.exists()


def test_a_value_moved_under_another_digest_is_refused(tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    cache = Cache(*_file(tmp_path), secret_key=KEY)
    honest = cache.load(cache.save(Call(NAME, {"x": 1}, 1))).value_digest
    evil = cache.load(cache.save(Call(NAME, {"x": 2}, Canary(canary)))).value_digest
    shutil.copyfile(cache.values._path(evil), cache.values._path(honest))
    with pytest.raises(SignatureError, match="moved under another digest"):
        cache.load_value(Call(NAME, {"x": 1}).key())
    assert not canary.exists()


def test_the_wrong_key_is_refused_and_both_keys_are_named(
    stores: Tuple[str, Any, Any], tmp_path: Path
) -> None:
    _, values, calls = stores
    canary = tmp_path / "canary"
    key = Cache(values, calls, secret_key=OTHER).save(Call(NAME, {"x": Canary(canary)}, Canary(canary)))
    cache = Cache(values, calls, secret_key=KEY)
    for load in _all_loads(cache, key):
        with pytest.raises(SignatureError) as info:
            load()
        assert Signer.of(OTHER).key_id in str(info.value) and Signer.of(KEY).key_id in str(info.value)
    assert not canary.exists()


def test_rotation_the_first_key_signs_every_key_verifies(tmp_path: Path) -> None:
    old = Cache(*_file(tmp_path), secret_key=OTHER)
    k_old = old.save(Call(NAME, {"x": 1}, "old"))
    rotated = Cache(old.values, old.calls, secret_key=[KEY, OTHER])
    k_new = rotated.save(Call(NAME, {"x": 2}, "new"))
    assert rotated.load_value(k_old) == "old" and rotated.load_value(k_new) == "new"
    with pytest.raises(SignatureError):
        old.load_value(k_new)  # signed with the new key only


# -- stacks --------------------------------------------------------------------------------


def test_a_stack_checks_each_layer_with_its_key_and_signs_back_fills(tmp_path: Path) -> None:
    top = Cache(MemoryValueStore(), MemoryCallStore(), secret_key=KEY)
    lower = Cache(*_file(tmp_path), secret_key=OTHER)
    stack = CacheStack([top, lower])
    key = lower.save(Call(NAME, {"x": 1}, np.arange(10)))
    np.testing.assert_array_equal(stack.load(key).result, np.arange(10))
    # the back-filled copy is signed with the top layer's key and stands alone
    np.testing.assert_array_equal(top.load_value(key), np.arange(10))
    assert top.calls.get(key).metadata[SIGNATURE_KEY].split(":")[1] == top.signer.key_id
    # a forged entry in the lower layer is refused through the stack
    canary = tmp_path / "canary"
    forged = Cache(lower.values, lower.calls).save(Call(NAME, {"x": 2}, Canary(canary)))
    with pytest.raises(SignatureError):
        stack.load_value(forged)
    assert not canary.exists() and not top.contains(forged)


def test_an_unsigned_layer_reads_signed_entries_as_they_are(tmp_path: Path) -> None:
    signed = Cache(*_file(tmp_path), secret_key=KEY)
    key = signed.save(Call(NAME, {"x": 1}, {"v": 1}, metadata={"m": 1}))
    plain = Cache(signed.values, signed.calls)
    assert plain.load_value(key) == {"v": 1} and dict(plain.load(key).metadata) == {"m": 1}


# -- canonical form ---------------------------------------------------------------------------


def test_canonical_bytes_tell_types_apart_and_ignore_dict_order() -> None:
    assert canonical({"a": 1, "b": 2}) == canonical({"b": 2, "a": 1})
    assert canonical((1, 2)) == canonical([1, 2])  # some stores give tuples back as lists
    distinct = [1, 1.0, True, "1", b"1", [1], {"1": 1}, None, 0, False, "", b"", [], {}]
    assert len({canonical(x) for x in distinct}) == len(distinct)
    assert canonical(np.int64(7)) == canonical(7)
    with pytest.raises(TypeError):
        canonical(object())


# -- configuration -------------------------------------------------------------------------------


def test_secret_key_in_a_table_signs_the_cache(tmp_path: Path) -> None:
    explicit = {
        "values": {"type": "cloudpickle", "root": str(tmp_path / "v")},
        "calls": {"type": "cloudpickle", "root": str(tmp_path / "c")},
        "secret_key": KEY,
    }
    template = {"template": "cloudpickle", "root": str(tmp_path / "t"), "secret_key": [KEY, OTHER]}
    for table in (explicit, template):
        cache = cache_from_config(table, name="signed")
        assert isinstance(cache, Cache) and cache.signer is not None
        assert cache.signer.key_ids[0] == Signer.of(KEY).key_id
        assert "secret_key of [signed]" in cache.signer.describe()


def test_fleche_form_keys_in_the_store_tables(tmp_path: Path) -> None:
    table = {
        "values": {"type": "pickle", "root": str(tmp_path / "v"), "secret_key": [KEY]},
        "calls": {"type": "pickle", "root": str(tmp_path / "c"), "secret_key": [KEY]},
    }
    cache = cache_from_config(table, name="fleche")
    assert cache.signer is not None and cache.signer.key_id == Signer.of(KEY).key_id
    table["calls"]["secret_key"] = [OTHER]
    with pytest.raises(ConfigError, match="different keys") as info:
        cache_from_config(table, name="fleche")
    assert info.value.table == "fleche"


def test_the_environment_variable_signs_caches_built_from_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ENV_VAR, f"{KEY}:{OTHER}")
    cache = cache_from_config({"template": "cloudpickle", "root": str(tmp_path)}, name="t")
    assert cache.signer is not None and cache.signer.key_ids == [
        Signer.of(KEY).key_id,
        Signer.of(OTHER).key_id,
    ]
    assert ENV_VAR in cache.signer.describe()
    # a key from the environment is not written into a config
    assert "secret_key" not in cache_to_config(cache)
    # a table's own key wins
    own = cache_from_config({"template": "memory", "secret_key": OTHER}, name="t")
    assert own.signer is not None and own.signer.key_ids == [Signer.of(OTHER).key_id]
    monkeypatch.delenv(ENV_VAR)
    assert cache_from_config({"template": "memory"}, name="t").signer is None


def test_bad_keys_are_refused_without_echoing_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for bad in ("not-hex-zz", ["ab" * 16, 7], "", []):
        with pytest.raises(ConfigError) as info:
            cache_from_config({"template": "memory", "secret_key": bad}, name="bad")
        assert info.value.key == "secret_key" and info.value.table == "bad"
        assert "not-hex-zz" not in str(info.value)
    monkeypatch.setenv(ENV_VAR, "zz")
    with pytest.raises(ConfigError, match=ENV_VAR):
        cache_from_config({"template": "memory"}, name="t")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Cache(MemoryValueStore(), MemoryCallStore(), secret_key="abcd")
    assert any("shorter than" in str(w.message) for w in caught)


def test_the_key_is_redacted_wherever_config_is_shown(tmp_path: Path) -> None:
    table = {"template": "cloudpickle", "root": str(tmp_path), "secret_key": KEY}
    cache = cache_from_config(table, name="t")
    round_trip = cache_to_config(cache)
    assert round_trip["secret_key"] == [KEY]  # round-trips ...
    rebuilt = cache_from_config(round_trip, name="t")
    assert rebuilt.signer is not None and rebuilt.signer.key_id == cache.signer.key_id
    shown = [repr(cache), str(redact(round_trip)), repr(cache.signer), str(cache.describe())]
    assert all(KEY not in text for text in shown)  # ... and is never shown
    assert redact(round_trip)["secret_key"] == "***"
    assert "export FLECHE_SECRET_KEY=***" in str(redact({"setup_commands": [f"export {ENV_VAR}={KEY}"]}))


def test_fleche_remote_config_prints_no_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fleche_remote.cli import main

    path = tmp_path / "fleche.toml"
    path.write_text(f'[default]\ncache = "s"\n\n[s]\ntemplate = "memory"\nsecret_key = "{KEY}"\n')
    assert main(["config", "--config", str(path)]) == 0
    printed = capsys.readouterr().out
    assert KEY not in printed and "secret_key" in printed and "***" in printed


def test_pull_signs_an_existing_cache_into_a_signed_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fleche_remote.cli import main
    from fleche_remote.config import load_cache, load_config

    path = tmp_path / "fleche.toml"
    path.write_text(
        '[old]\ntemplate = "cloudpickle"\nroot = "old"\n\n'
        f'[new]\ntemplate = "cloudpickle"\nroot = "new"\nsecret_key = "{KEY}"\n'
    )
    config = load_config(path)
    old = load_cache("old", config=config)
    keys = old.save_many([Call(NAME, {"x": i}, np.arange(i + 1)) for i in range(3)])
    with pytest.raises(SignatureError):  # the signed view of the old files refuses them
        Cache(old.values, old.calls, secret_key=KEY).load_value(keys[0])
    assert main(["pull", "--config", str(path), "old", "new"]) == 0
    new = load_cache("new", config=config)
    assert new.signer is not None
    for i, key in enumerate(keys):
        np.testing.assert_array_equal(new.load_value(key), np.arange(i + 1))
