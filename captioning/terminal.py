"""Text for the terminal: control characters in tags and file names are shown escaped.

Tags and file names come from untrusted files. Printed raw, an ANSI escape sequence in a tag
(`\\x1b[2J`) clears or recolours the user's terminal, a carriage return overwrites the line
before it, and a bidirectional override reverses what follows. `terminal_safe` shows each such
character as its Python escape (`\\x1b`), and `SafeFormatter` applies it to every log line.
"""

from __future__ import annotations

import logging
import re

# C0 controls except newline (multi-line messages and tracebacks keep their lines), DEL, C1
# controls, and Unicode's line/paragraph separators and bidirectional embeddings/overrides.
_UNSAFE = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def _escaped(match: re.Match) -> str:
    return match.group().encode("unicode_escape").decode("ascii")


def terminal_safe(text: str) -> str:
    """`text` with control characters written as escapes (`\\x1b`, `\\r`, `\\u202e`).

    >>> terminal_safe("red\\x1b[31m tag")
    'red\\\\x1b[31m tag'
    """
    return _UNSAFE.sub(_escaped, text)


def rich_safe(text: str) -> str:
    """`terminal_safe`, and rich's `[markup]` escaped, for text put into rich tables."""
    from rich.markup import escape

    return escape(terminal_safe(text))


class SafeFormatter(logging.Formatter):
    """A logging formatter whose output never carries raw control characters."""

    def format(self, record: logging.LogRecord) -> str:
        return terminal_safe(super().format(record))


def use_safe_formatter(logger: logging.Logger | None = None) -> None:
    """Give each handler of `logger` (default: the root) a `SafeFormatter` with its format."""
    for handler in (logger or logging.getLogger()).handlers:
        current = handler.formatter
        handler.setFormatter(SafeFormatter(current._fmt if current else None,
                                           current.datefmt if current else None))
