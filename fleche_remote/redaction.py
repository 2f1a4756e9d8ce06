"""Masking secrets in configuration before it is shown.

``fleche-remote config``, error messages and logs print config tables;
a database password or an API token in them must not reach a terminal,
a job log or a bug report. Keys are judged by name (a value under
``password`` or ``api_key`` is hidden whatever it is) and strings by
content (``postgresql://user:pw@host`` keeps the user and host, loses the
password), because a URL is where credentials hide most often in
fleche.toml.
"""

from __future__ import annotations

import copy
import re
from typing import Any, Mapping

REDACTED = "***"
_SECRET_WORDS = ("password", "passwd", "passphrase", "secret", "token", "credential", "apikey", "private")
_URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^:/@\s]*:)(?P<password>[^@/\s]*)@")
_QUERY_SECRET = re.compile(r"(?P<head>[?&](?:password|passwd|pwd|secret|token|api_key|apikey)=)[^&\s]*", re.I)


def is_secret_key(key: str) -> bool:
    """Whether a config key's value should not be shown.

    ``password``, ``*secret*``, ``*token*`` and friends, and any compound
    ending in ``key`` (``secret_key``, ``api_key``) are secret; ``key``
    alone and names such as ``cache_name`` are not.
    """
    norm = key.lower().replace("-", "_")
    if any(word in norm for word in _SECRET_WORDS) or norm == "pwd":
        return True
    parts = [p for p in norm.split("_") if p]
    return len(parts) > 1 and parts[-1] == "key"


def redact_text(text: str) -> str:
    """``text`` with URL passwords (``user:***@host``) and secret query
    parameters masked."""
    text = _URL_PASSWORD.sub(lambda m: m.group("head") + REDACTED + "@", text)
    return _QUERY_SECRET.sub(lambda m: m.group("head") + REDACTED, text)


def redact(obj: Any) -> Any:
    """A deep copy of ``obj`` that is safe to print.

    Values under secret-looking keys (see :func:`is_secret_key`) become
    ``"***"`` whatever their type, and passwords inside URLs are masked
    wherever a string appears. Mappings come back as plain dicts.

    Args:
        obj: parsed config: mappings, lists, tuples, scalars.

    Returns:
        The redacted copy; ``obj`` is not changed.
    """
    if isinstance(obj, Mapping):
        return {
            k: (REDACTED if isinstance(k, str) and is_secret_key(k) else redact(v)) for k, v in obj.items()
        }
    if isinstance(obj, list):
        return [redact(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(redact(v) for v in obj)
    if isinstance(obj, str):
        return redact_text(obj)
    return copy.deepcopy(obj)


__all__ = ["REDACTED", "is_secret_key", "redact", "redact_text"]
