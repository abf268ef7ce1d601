"""Class names as text that is safe to print on one line.

Class names come from checkpoints and dataset files, which anyone can write; a name with a newline, a
terminal control sequence or a right-to-left override would forge or reorder the lines `cnnlab predict`
prints and the labels `cnnlab serve` shows.
"""

from __future__ import annotations

import unicodedata

# Controls (newline, ESC, ...), format characters (bidirectional overrides and isolates, zero-width marks),
# line and paragraph separators, lone surrogates.
_ESCAPED = frozenset(("Cc", "Cf", "Zl", "Zp", "Cs"))


def printable(text: str) -> str:
    """``text`` with every character that could break or reorder a line written as a Python escape
    ('\\n', '\\x1b', '\\u202e'); all other text, including non-Latin scripts, is unchanged."""
    if text.isprintable():  # the common case; isprintable() is False for every escaped category
        return text
    return "".join(ch.encode("unicode_escape", "backslashreplace").decode("ascii")
                   if unicodedata.category(ch) in _ESCAPED else ch for ch in text)
