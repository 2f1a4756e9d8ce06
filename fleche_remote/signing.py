"""Signed caches: HMAC-SHA256 over every stored entry, checked before unpickling.

A cache given a ``secret_key`` (in its fleche.toml table, or through
``FLECHE_SECRET_KEY``) signs what it stores and refuses, with a
:class:`SignatureError`, any entry whose signature is missing, made with
another key, or does not match: nothing of such an entry is unpickled,
neither its arguments nor its result. That is what makes it safe to load
from a directory or database that someone else can write to.

Design rules:

* **Two signatures, each travelling with what it signs.** A record carries
  its signature in ``record.metadata[SIGNATURE_KEY]``; a value blob carries
  its own in ``blob.meta[SIGNATURE_KEY]``. Both are plain data that every
  store, the wire and the server already keep verbatim, so no store, the
  protocol and the server needed to change. A value is often fetched by
  digest alone, without its record (a stack's back-fill pages, a
  ``LazyCall``'s result), and it can be checked then too.
* **The record signature** covers every field of the record (key, name,
  version, the pickled arguments, their digests, the rest of the
  metadata, the value digest, kind and size, the digest scheme). It is
  checked before a record leaves the cache, so a ``LazyCall`` never
  unpickles unsigned arguments; and a record found under one key that
  claims another is refused.
* **The value signature** covers the kind, the rest of the meta and the
  whole body (HMAC-SHA256 on every byte, not the fast XXH3 of big bodies
  that the content digest uses, which is no defence against a forger).
  The signed meta is part of the value digest, so a signed value lives
  under its own digest: equal results signed with one key are still
  stored once, and an older unsigned copy of the same value can never
  stand in for it. A loaded value is checked as its body streams into
  its final buffers, and both its signature and its digest (the address
  it was asked for) must match before :func:`~fleche_remote.codec.values.decode_value`
  unpickles anything.
* **Signing happens in the cache object that holds the key**: a
  :class:`~fleche_remote.Cache`, or an :class:`~fleche_remote.SshCache` on
  the client side, which sends signed bytes that the server stores and
  serves as they are. The key never leaves the client. In a stack each
  layer signs with its own key on the way in (back-fills included) and
  checks with it on the way out.
* **Keys** are hex strings as in the ``fleche`` package: ``secret_key =
  "hex"`` or ``["new", "old"]``, ``FLECHE_SECRET_KEY=new:old``. The first
  key signs, every key verifies (rotation). A key is named in messages by
  its id, 16 hex digits of an HMAC of the key, never by its bytes.

Costs: a save makes one extra pass over the value (HMAC and digest
together), a load one HMAC over the body as it arrives; HMAC-SHA256 runs
at SHA-256 speed (see the README for the figures on this machine).

This module holds the keys, the MACs and what is refused; how the signed
data is spelled in bytes is :mod:`fleche_remote.codec.canonical`.
"""

from __future__ import annotations

import dataclasses
import hmac
import os
import struct
import warnings
from typing import (
    Any,
    Callable,
    Dict,
    Iterable,
    Iterator,
    List,
    Mapping,
    Optional,
    Sequence,
    Tuple,
    Union,
)

from .call import SIGNATURE_KEY, CallRecord
from .codec.bodyhash import DIGEST_SCHEME_NAME, BodyHasher
from .codec.canonical import blob_parts, canonical, rereadable
from .codec.digest import Digest
from .codec.values import (
    CHUNK_SIZE,
    Blob,
    BytesLike,
    StreamBlob,
    decode_value,
    digest_from_body,
)
from .errors import ConfigError, CorruptEntryError

#: The environment variable that ``fleche`` reads too: colon-separated hex keys.
ENV_VAR = "FLECHE_SECRET_KEY"

#: Version of the signature format, first field of every signature string.
FORMAT = "1"

#: Keys shorter than this many bytes draw a warning: an HMAC key should
#: be as long as its hash's block of security (``secrets.token_hex(32)``).
MIN_KEY_BYTES = 16

_RECORD_DOMAIN = b"fleche-remote/signed-record/1\x00"
_VALUE_DOMAIN = b"fleche-remote/signed-value/1\x00"
_U64 = struct.Struct(">Q")

SecretKey = Union[str, bytes, Sequence[Union[str, bytes]]]
#: What a cache constructor's ``secret_key`` accepts (None: unsigned).
SecretKeyArg = Union[SecretKey, "Signer", None]
#: Names where an entry lives (a file, a database, a host), for messages;
#: called only when something is refused.
Where = Callable[[str, str], str]


class SignatureError(CorruptEntryError):
    """An entry of a signed cache is unsigned, signed with another key, or
    altered since it was signed. Nothing of it was unpickled."""


# -- keys ------------------------------------------------------------------------


def parse_secret_key(value: Any, source: str = "secret_key") -> List[bytes]:
    """Keys from a ``secret_key`` value, in ``fleche``'s forms.

    A ``str`` is hex, several keys separated by ``:``; ``bytes`` is one raw
    key; a list holds either. Messages never echo the key.

    Raises:
        ConfigError: not one of these forms, empty, or not hex (``key``
            is ``"secret_key"``).
    """
    items = [value] if isinstance(value, (str, bytes)) else value
    if not isinstance(items, (list, tuple)):
        raise ConfigError(
            f"{source} must be a hex string or a list of them, got a {type(value).__name__}",
            key="secret_key",
        )
    keys: List[bytes] = []
    for i, item in enumerate(items):
        if isinstance(item, bytes):
            keys.append(item)
            continue
        if not isinstance(item, str):
            raise ConfigError(
                f"{source}: entry {i} is a {type(item).__name__}, expected a hex string", key="secret_key"
            )
        for part in item.split(":"):
            try:
                keys.append(bytes.fromhex(part.strip()))
            except ValueError:
                raise ConfigError(
                    f"{source}: entry {i} is not hex (make a key with "
                    f"python -c 'import secrets; print(secrets.token_hex(32))')",
                    key="secret_key",
                ) from None
    if not keys or not all(keys):
        raise ConfigError(f"{source} holds an empty key; give at least one hex key", key="secret_key")
    if any(len(k) < MIN_KEY_BYTES for k in keys):
        warnings.warn(
            f"{source} holds a key shorter than {MIN_KEY_BYTES} bytes; "
            f"use 32 random bytes (secrets.token_hex(32))",
            UserWarning,
            stacklevel=3,
        )
    return keys


def _derive(key: bytes, label: bytes) -> bytes:
    return hmac.digest(key, label, "sha256")


class _Key:
    """One secret, as the derived keys that are actually used: separate MAC
    keys for records and values, and a public id."""

    __slots__ = ("key_id", "raw", "record", "value")

    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        self.key_id = _derive(raw, b"fleche-remote/key-id").hex()[:16]
        self.record = _derive(raw, b"fleche-remote/record-mac/1")
        self.value = _derive(raw, b"fleche-remote/value-mac/1")


class Signer:
    """Signs and checks the entries of one cache.

    Args:
        keys: the raw keys; the first signs, all verify.
        source: where the keys came from, for messages (``"secret_key of
            [shared]"``, ``"FLECHE_SECRET_KEY"``).
        in_config: whether :func:`~fleche_remote.config.cache_to_config`
            writes the keys back (not for keys from the environment).
    """

    def __init__(self, keys: Sequence[bytes], source: str = "secret_key", *, in_config: bool = True) -> None:
        if not keys:
            raise ValueError("a Signer needs at least one key")
        self._keys = [_Key(bytes(k)) for k in keys]
        self._by_id = {k.key_id: k for k in self._keys}
        self.source = source
        self.in_config = in_config

    @classmethod
    def of(cls, secret_key: SecretKeyArg, source: str = "secret_key") -> Optional[Signer]:
        """A signer for a constructor's ``secret_key`` argument (None: unsigned)."""
        if secret_key is None or isinstance(secret_key, Signer):
            return secret_key
        return cls(parse_secret_key(secret_key, source), source)

    @classmethod
    def from_config(cls, value: Any, source: str = "secret_key") -> Optional[Signer]:
        """The signer of a fleche.toml cache table: its ``secret_key`` when it
        has one, else ``FLECHE_SECRET_KEY`` when that is set, else None."""
        if value is not None:
            return cls(parse_secret_key(value, source), source)
        env = os.environ.get(ENV_VAR)
        if env:
            return cls(parse_secret_key(env, ENV_VAR), ENV_VAR, in_config=False)
        return None

    @property
    def key_id(self) -> str:
        """Id of the signing key (16 hex digits; reveals nothing of the key)."""
        return self._keys[0].key_id

    @property
    def key_ids(self) -> List[str]:
        """Ids of every key that verifies."""
        return [k.key_id for k in self._keys]

    def describe(self) -> str:
        """``key 1a2b... (secret_key of [shared])``: how messages name the key."""
        others = self.key_ids[1:]
        also = f", also accepting {', '.join(others)}" if others else ""
        return f"key {self.key_id} ({self.source}{also})"

    def to_config(self) -> List[str]:
        """The keys as fleche.toml writes them (hex). Secret: redact before showing."""
        return [k.raw.hex() for k in self._keys]

    def __repr__(self) -> str:
        return f"Signer(key_id={self.key_id!r}, source={self.source!r})"

    # -- records -----------------------------------------------------------------

    def _record_mac(self, key: _Key, record: CallRecord) -> str:
        metadata = {k: v for k, v in record.metadata.items() if k != SIGNATURE_KEY}
        fields = [
            record.key,
            record.name,
            record.version,
            record.arg_digests,
            metadata,
            record.value,
            record.value_kind,
            record.value_size,
            record.digest_scheme,
        ]
        arguments = bytes(record.arguments)  # length first: the fields' text follows it
        message = _RECORD_DOMAIN + _U64.pack(len(arguments)) + arguments + canonical(fields)
        # one-shot, in C: a record costs microseconds, so a query over many stays cheap
        return hmac.digest(key.record, message, "sha256").hex()

    def sign_record(self, record: CallRecord) -> CallRecord:
        """``record`` with this signer's signature in its metadata."""
        key = self._keys[0]
        mac = self._record_mac(key, record)  # over the metadata without any old signature
        metadata = {k: v for k, v in record.metadata.items() if k != SIGNATURE_KEY}
        metadata[SIGNATURE_KEY] = f"{FORMAT}:{key.key_id}:{mac}"
        return dataclasses.replace(record, metadata=metadata)

    def open_record(self, record: CallRecord, where: Where, expected_key: Optional[str] = None) -> CallRecord:
        """``record`` if its signature is one of ours and matches; else raise.

        Args:
            where: names the entry's location for the message.
            expected_key: the key it was looked up under; a record that
                claims another one was moved, and is refused.

        Raises:
            SignatureError: unsigned, another key, altered, or moved.
        """
        place = lambda: where("call", record.key)  # noqa: E731 - built only for a message
        if expected_key is not None and record.key != expected_key:
            raise SignatureError(
                f"call {expected_key[:16]} in {where('call', expected_key)} holds the record of call "
                f"{record.key[:16]}: refused by this signed cache ({self.describe()}); nothing was unpickled"
            )
        key, mac = self._parse(record.metadata.get(SIGNATURE_KEY), "call", record.key, place)
        if not hmac.compare_digest(mac, self._record_mac(key, record)):
            raise SignatureError(
                f"call {record.key[:16]} in {place()} does not match its signature ({self.describe()}): "
                f"it was altered after it was signed; nothing was unpickled. Evict it and save it again"
            )
        return record

    def open_records(
        self, records: Iterable[Optional[CallRecord]], where: Where, keys: Optional[Sequence[str]] = None
    ) -> List[Optional[CallRecord]]:
        """:meth:`open_record` over a batch, ``None`` kept; ``keys`` are
        what each was looked up under."""
        out: List[Optional[CallRecord]] = []
        for i, record in enumerate(records):
            expected = None if keys is None else str(keys[i])
            out.append(None if record is None else self.open_record(record, where, expected))
        return out

    def iter_records(self, records: Iterable[CallRecord], where: Where) -> Iterator[CallRecord]:
        """:meth:`open_record` over a stream (a query's answer). A record
        its store could not read passes on as the
        :class:`~fleche_remote.call.UnreadableRecord` it is: it holds
        nothing to verify, and nothing that will be unpickled."""
        for record in records:
            if not isinstance(record, CallRecord):
                yield record
                continue
            yield self.open_record(record, where)

    def _parse(self, signature: Any, what: str, ident: str, place: Callable[[], str]) -> Tuple[_Key, str]:
        if signature is None:
            raise SignatureError(
                f"{what} {ident[:16]} in {place()} is not signed, and this cache requires "
                f"{self.describe()}; nothing was unpickled. It was stored by an unsigned cache: "
                f"evict it, or save it again through this cache"
            )
        parts = signature.split(":") if isinstance(signature, str) else []
        if len(parts) != 3 or parts[0] != FORMAT:
            raise SignatureError(
                f"{what} {ident[:16]} in {place()} has a malformed signature (expected format "
                f"{FORMAT}:<key id>:<hmac>); refused by {self.describe()}; nothing was unpickled"
            )
        key = self._by_id.get(parts[1])
        if key is None:
            raise SignatureError(
                f"{what} {ident[:16]} in {place()} is signed with key {parts[1]}, not with this cache's "
                f"{self.describe()}; nothing was unpickled. If that key is yours too, add it to "
                f"secret_key after the signing key"
            )
        return key, parts[2]

    # -- values ----------------------------------------------------------------------

    def _value_mac(self, key: _Key, blob: Blob) -> Any:
        meta = {k: v for k, v in blob.meta.items() if k != SIGNATURE_KEY}
        head = _VALUE_DOMAIN + canonical([blob.kind, meta]) + _U64.pack(blob.size)
        return hmac.new(key.value, head, "sha256")  # a name, not a constructor: OpenSSL's HMAC

    def sign_blob(self, blob: Blob, scheme: str = DIGEST_SCHEME_NAME) -> Tuple[Blob, Digest]:
        """``blob`` with its signature in its meta, and its (new) digest.

        One pass over the body computes both. A one-shot stream is spooled
        first (it must be read again to be stored).
        """
        blob = rereadable(blob)
        key = self._keys[0]
        mac = self._value_mac(key, blob)
        body = BodyHasher()
        for part in blob_parts(blob):
            mac.update(part)
            body.update(part)
        if body.size != blob.size:
            raise CorruptEntryError(f"value body has {body.size} bytes, its blob says {blob.size}")
        meta = {k: v for k, v in blob.meta.items() if k != SIGNATURE_KEY}
        meta[SIGNATURE_KEY] = f"{FORMAT}:{key.key_id}:{mac.hexdigest()}"
        return _SignedBlob(blob, meta), digest_from_body(blob.kind, meta, body, scheme)

    def open_blob(self, blob: Blob, digest: str, where: Where, scheme: str = DIGEST_SCHEME_NAME) -> Blob:
        """``blob`` wrapped so that reading it checks its signature, and that
        it hashes to ``digest``, as the last byte passes (before anything
        can be unpickled). An unsigned or foreign blob is refused at once.

        Raises:
            SignatureError: unsigned or signed with another key (now), or
                altered (when the body has been read).
        """
        place = lambda: where("value", digest)  # noqa: E731 - built only for a message
        key, mac = self._parse(blob.meta.get(SIGNATURE_KEY), "value", digest, place)
        return _CheckedBlob(blob, self, key, mac, str(digest), scheme, place)

    def open_blobs(
        self, blobs: Sequence[Optional[Blob]], digests: Sequence[str], where: Where
    ) -> List[Optional[Blob]]:
        """:meth:`open_blob` over a batch, ``None`` kept."""
        return [None if b is None else self.open_blob(b, d, where) for b, d in zip(blobs, digests)]

    def open_entries(
        self, entries: Sequence[Optional[Tuple[CallRecord, Blob]]], where: Where, keys: Sequence[str]
    ) -> List[Optional[Tuple[CallRecord, Blob]]]:
        """Records and blobs of ``load_entries``, each checked (see above)."""
        out: List[Optional[Tuple[CallRecord, Blob]]] = []
        for key, entry in zip(keys, entries):
            if entry is None:
                out.append(None)
                continue
            record = self.open_record(entry[0], where, str(key))
            out.append((record, self.open_blob(entry[1], record.value, where, record.digest_scheme)))
        return out

    def stream_decoder(
        self, where: Where, *, key: Optional[str] = None, digest: Optional[str] = None
    ) -> Callable[[Any, List[Tuple[Any, Iterator[bytes]]]], Any]:
        """A remote reply's ``consume`` that decodes the first value stream
        straight into its final buffers, checked as it arrives.

        Args:
            key: the reply is ``load_value``'s: its result is the record
                found under this key (or prefix), checked first, and the
                value must be the one it names.
            digest: the reply is ``load_blob``'s for this value digest.
        """

        def decode(result: Any, streams: List[Tuple[Any, Iterator[bytes]]]) -> Any:
            header, chunks = streams[0]
            blob = StreamBlob(header.kind, header.meta, header.size, chunks)
            expected, scheme = str(digest), DIGEST_SCHEME_NAME
            if key is not None:
                if not isinstance(result, CallRecord):
                    raise SignatureError(f"load_value for {key[:16]} in {where('call', key)} sent no record")
                record = self.open_record(result, where)
                if not record.key.startswith(str(key).lower()):
                    raise SignatureError(
                        f"call {key[:16]} in {where('call', key)} answered with the record of call "
                        f"{record.key[:16]}; nothing was unpickled"
                    )
                expected, scheme = record.value, record.digest_scheme
            return decode_value(self.open_blob(blob, expected, where, scheme))

        return decode

    # -- saving ---------------------------------------------------------------------------

    def sign_entries(self, items: Sequence[Tuple[CallRecord, Blob]]) -> List[Tuple[CallRecord, Blob]]:
        """Each record pointed at its signed value, then signed itself.

        Equal values in one batch are signed once.
        """
        out: List[Tuple[CallRecord, Blob]] = []
        done: Dict[str, Tuple[Blob, Digest]] = {}
        for record, blob in items:
            signed = done.get(record.value)
            if signed is None:
                signed = done[record.value] = self.sign_blob(blob, record.digest_scheme)
            new = dataclasses.replace(record, value=str(signed[1]))
            out.append((self.sign_record(new), signed[0]))
        return out


def config_signer(cfg: Mapping[str, Any], where: Any) -> Tuple[Optional[Signer], Any, Any]:
    """The signer of a fleche.toml cache table, and its store tables without
    their keys.

    ``secret_key`` may sit in the cache table or, as ``fleche`` writes it,
    in its ``values`` / ``calls`` tables: one key (list) signs the whole
    cache here, records and values alike, so keys given in several places
    must be the same. Without any, ``FLECHE_SECRET_KEY`` applies.

    Args:
        cfg: the cache table.
        where: its location (``where.table``; ``where.error(message, key)``
            makes the :class:`~fleche_remote.errors.ConfigError`).

    Raises:
        ConfigError: a malformed key, or different keys in different places.
    """
    label = f"secret_key of [{where.table}]" if getattr(where, "table", None) else "secret_key"
    stores = {kind: cfg.get(kind) for kind in ("values", "calls")}
    given: Dict[str, Any] = {}
    if "secret_key" in cfg:
        given["secret_key"] = cfg["secret_key"]
    for kind, table in stores.items():
        if isinstance(table, Mapping) and "secret_key" in table:
            given[f"{kind}.secret_key"] = table["secret_key"]
            stores[kind] = {k: v for k, v in table.items() if k != "secret_key"}
    signer = None
    try:
        parsed = {name: parse_secret_key(value, label) for name, value in given.items()}
        if len({tuple(keys) for keys in parsed.values()}) > 1:
            raise ConfigError(
                f"{' and '.join(parsed)} hold different keys; one cache signs with one key list: "
                f"give secret_key once, in the cache table",
                key=next(iter(parsed)),
            )
        if parsed:
            signer = Signer(next(iter(parsed.values())), label)
        else:
            signer = Signer.from_config(None)
    except ConfigError as exc:
        raise where.error(exc.message, exc.key) from None
    return signer, stores["values"], stores["calls"]


# -- blobs ------------------------------------------------------------------------------


class _SignedBlob(Blob):
    """A blob's body under signed meta (nothing copied)."""

    def __init__(self, source: Blob, meta: Dict[str, Any]) -> None:
        self.source = source
        self.kind = source.kind
        self.meta = meta
        self.size = source.size

    def chunks(self, chunk_size: int = CHUNK_SIZE) -> Iterator[BytesLike]:
        return iter(self.source.chunks(chunk_size))

    def read_all(self) -> bytes:
        return self.source.read_all()

    def fill(self, targets: Sequence[memoryview]) -> None:
        self.source.fill(targets)


class _CheckedBlob(Blob):
    """A stored blob that checks its signature and digest as it is read.

    ``chunks`` raises after the last chunk (so a store writing temp-then-
    rename never renames a forged body); ``read_all`` and ``fill`` raise
    before they return, so :func:`~fleche_remote.codec.values.decode_value`
    never unpickles a body that did not match.
    """

    def __init__(
        self,
        source: Blob,
        signer: Signer,
        key: _Key,
        mac: str,
        digest: str,
        scheme: str,
        place: Callable[[], str],
    ) -> None:
        self.source = source
        self.kind = source.kind
        self.meta = source.meta
        self.size = source.size
        self._signer = signer
        self._key = key
        self._mac = mac
        self._digest = digest
        self._scheme = scheme
        self._place = place

    def _start(self) -> Tuple[Any, BodyHasher]:
        return self._signer._value_mac(self._key, self.source), BodyHasher()

    def _finish(self, mac: Any, body: BodyHasher) -> None:
        if body.size != self.size or not hmac.compare_digest(mac.hexdigest(), self._mac):
            raise SignatureError(
                f"value {self._digest[:16]} in {self._place()} does not match its signature "
                f"({self._signer.describe()}): it was altered after it was signed; nothing was unpickled"
            )
        got = digest_from_body(self.kind, self.meta, body, self._scheme)
        if got != self._digest:
            raise SignatureError(
                f"value {self._digest[:16]} in {self._place()} holds the signed value {got[:16]}: "
                f"a value was moved under another digest; nothing was unpickled"
            )

    def chunks(self, chunk_size: int = CHUNK_SIZE) -> Iterator[BytesLike]:
        mac, body = self._start()
        for chunk in self.source.chunks(chunk_size):
            mac.update(chunk)
            body.update(chunk)
            yield chunk
        self._finish(mac, body)

    def read_all(self) -> bytes:
        data = self.source.read_all()
        mac, body = self._start()
        mac.update(data)
        body.update(data)
        self._finish(mac, body)
        return data

    def fill(self, targets: Sequence[memoryview]) -> None:
        self.source.fill(targets)
        mac, body = self._start()
        for target in targets:
            mac.update(target)
            body.update(target)
        self._finish(mac, body)


__all__ = [
    "ENV_VAR",
    "SIGNATURE_KEY",
    "SignatureError",
    "SecretKeyArg",
    "Signer",
    "canonical",
    "parse_secret_key",
]
