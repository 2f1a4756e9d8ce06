"""Masking secrets in configuration before it is shown.

``fleche-remote config``, error messages and logs print config tables;
a database password or an API token in them must not reach a terminal,
a job log or a bug report. Keys are judged by name (a value under
``password`` or ``api_key`` is hidden whatever it is) and strings by
content (``postgresql://user:pw@host`` keeps the user and host, loses the
password), because a URL is where credentials hide most often in
fleche.toml. Shell assignments in strings are judged by their name too:
``export FLECHE_SECRET_KEY=...`` in an ssh layer's ``setup_commands``, or
``-o SetEnv=API_TOKEN=...`` in its ``ssh_options``, keep the name and lose
the value; a signed cache's ``secret_key`` is hidden by its name.
"""

from __future__ import annotations

import copy
import re
from typing import Any, Mapping

REDACTED = "***"
_SECRET_WORDS = ("password", "passwd", "passphrase", "secret", "token", "credential", "apikey", "private")
_URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^:/@\s]*:)(?P<password>[^@/\s]*)@")
_QUERY_SECRET = re.compile(r"(?P<head>[?&](?:password|passwd|pwd|secret|token|api_key|apikey)=)[^&\s]*", re.I)
#: ``NAME=value`` in a shell command or an ssh option; masked when NAME is secret
_ASSIGNMENT = re.compile(r"(?P<name>\b[A-Za-z_][A-Za-z0-9_]*)=(?P<value>\"[^\"]*\"|'[^']*'|[^\s;&|'\"]+)")


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
    """``text`` with URL passwords (``user:***@host``), secret query
    parameters and secret shell assignments (``FLECHE_SECRET_KEY=***``)
    masked."""
    text = _URL_PASSWORD.sub(lambda m: m.group("head") + REDACTED + "@", text)
    text = _QUERY_SECRET.sub(lambda m: m.group("head") + REDACTED, text)
    return _ASSIGNMENT.sub(_mask_assignment, text)


def _mask_assignment(match: re.Match[str]) -> str:
    name = match.group("name")
    return f"{name}={REDACTED}" if is_secret_key(name) else match.group(0)


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
