"""JSON in and out of the caption pipeline: orjson when installed (several times faster on
booru dumps), the standard library otherwise. Both raise json.JSONDecodeError on bad input."""

from __future__ import annotations

import json

try:
    import orjson
except ImportError:  # pragma: no cover - orjson is a declared dependency
    orjson = None


def loads(data: bytes):
    """Parse one JSON document; raises json.JSONDecodeError (also for invalid UTF-8)."""
    if orjson is not None:
        return orjson.loads(data)
    return json.loads(data.decode("utf-8"))


def dumps_line(obj) -> bytes:
    """One compact JSON line (UTF-8, newline-terminated)."""
    if orjson is not None:
        return orjson.dumps(obj) + b"\n"
    return (json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")
