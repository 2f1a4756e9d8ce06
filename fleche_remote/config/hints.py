"""Suggestions for a misspelt key or name in fleche.toml.

A user who wrote ``tempalte`` wants to read ``did you mean 'template'?``,
not a list of every key to compare letter by letter. The suggestion comes
from :func:`difflib.get_close_matches`, whose default cutoff (0.6) finds
one transposition or a missing letter in words this short and rarely
proposes a word the user did not mean.
"""

from __future__ import annotations

import difflib
from typing import Iterable, Optional


def close_match(word: str, known: Iterable[str]) -> Optional[str]:
    """The known word closest to ``word`` (case-insensitive), or None."""
    choices = {k.lower(): k for k in known}
    found = difflib.get_close_matches(word.lower(), list(choices), n=1)
    return choices[found[0]] if found else None


def did_you_mean(word: str, known: Iterable[str]) -> str:
    """``"; did you mean 'X'?"`` for the closest known word, else ``""``."""
    match = close_match(word, known)
    return f"; did you mean {match!r}?" if match is not None and match != word else ""
